"""Activation checkpointing recomputes a region under the settings its forward ran with.

``torch.utils.checkpoint`` (non-reentrant, the default that Hugging Face's and PyTorch's training
code use) frees a region's activations and recomputes the region the first time backward unpacks
one of them. It restores the RNG and autocast state of the forward for that recompute, but not our
``use_backend`` / ``use_strategy`` blocks (``contextvars``): the recompute runs in whatever context
backward runs in, which is the caller's outside the block, and on CUDA autograd's device thread,
which sees no block at all. A region whose forward ran its ops on one backend or strategy was then
recomputed on another; the recomputed residuals did not match the ones the forward saved
(a ``CheckpointError``, or with ``determinism_check="none"`` kernels handed tensors of other shapes).
Our own backward formulas already run in their forward's context (``_direct``); the first of an
op's recorded calls and a block's entry inside a checkpointed forward also makes the region's
recompute run in a copy of the context at that point. A region with neither (its ops all frozen,
no block inside) is recomputed as before: no mismatch (an unrecorded op saves nothing), but its
activations may come from another backend than the forward's.

``torch.utils.checkpoint`` has no public hook for this (``context_fn`` is the caller's argument):
the region's frame is found through the saved-tensor hooks it installs around its forward (the pack
hook's closure holds the frame, since torch 2.1). Where that layout is not found, nothing changes;
``tests/test_training_tools.py`` fails if it moves. A nested checkpoint's outer region and the
reentrant variant (``use_reentrant=True``, which recomputes and differentiates a fresh graph, so it
cannot mismatch) keep their recompute as it is.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import torch

_KEPT = "_deco_ops_context"  # set on a frame whose recompute already runs in its forward's context


# (pack, unpack) of the innermost ``saved_tensors_hooks`` in force (a checkpoint's forward installs
# its own), or None, as ``f(ignore_is_tracing)``: what the hot callers (an op's recorded forward) ask
# inline, one C call, before ``recompute_in_this_context`` (torch >= 2.10, the floor, has it)
saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def recompute_in_this_context() -> None:
    """Called from an op's recorded forward, or a ``use_backend``/``use_strategy`` block being
    entered (before its setting): if the innermost saved-tensor hooks are a non-reentrant
    checkpoint's whose recompute runs as it was, the region will be recomputed in a copy of the
    current context. The first of these inside a region decides: a block entered inside it, then
    left, is entered and left again by the recompute, as in the forward."""
    hooks = saved_tensors_hooks(False)
    frame = None if hooks is None else _checkpoint_frame(hooks[0])
    if frame is None or getattr(frame, _KEPT, False):
        return
    context, recompute = contextvars.copy_context(), frame.recompute_fn

    def in_forward_context(*args):
        # a copy per recompute: backward passes on two threads may recompute the region at once,
        # and one context cannot be entered twice
        return context.copy().run(recompute, *args)

    frame.recompute_fn = in_forward_context
    setattr(frame, _KEPT, True)


def _checkpoint_frame(pack_hook) -> object | None:
    """The ``torch.utils.checkpoint._CheckpointFrame`` that ``pack_hook`` saves tensors for, or None."""
    for cell in getattr(pack_hook, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if type(value).__name__ == "_CheckpointFrame" and callable(getattr(value, "recompute_fn", None)):
            return value
    return None


def recording(native: Callable, function: Callable) -> Callable:
    """A plan that autograd records as ATen's own nodes (``native``: SDPA's CPU kernel, no op
    Function of ours), except inside a checkpointed region (or under any saved-tensor hooks),
    where the op's Function runs (``function``), as an op's recorded forward does: its recompute
    then runs in this context, and saves what the forward saved whichever path it takes. A
    recompute outside a dispatch mode the forward ran under (a FLOP counter around the forward
    only) takes the plain path where the forward took the dispatcher's, whose node is the op's
    Function too: ATen's node saves other tensors (a CheckpointError)."""

    def recorded(*args):
        if saved_tensors_hooks(False) is not None:
            return function(*args)
        return native(*args)

    return recorded
