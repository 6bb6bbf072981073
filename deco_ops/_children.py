"""When a drop-in module may hand its children's parameters to a fused op instead of calling them.

``DeCoProjector`` and ``PatchMergerProjector`` replace modules that call their norm and Linears
(LLaVA's ``mm_projector``: ``fc2(act(fc1(x)))``); they pass those children's parameters to one
fused op instead. That computes the same only while calling a child would run its base class's
forward on its parameters and nothing else. It would not for peft's LoRA layers (a forward that adds
the adapter's product), quantised Linears (a forward that dequantises), any subclass that overrides
``forward``, a ``forward`` set on the instance (accelerate's offloading hooks), or hooks:
the child's forward, pre-forward and backward hooks (``torch.nn.utils.prune`` recomputes ``weight``
in a pre-forward hook; FSDP2 gathers the parameters in one) and the process-wide module hooks.
Read directly, an adapter was dropped and got no gradient, a pruning mask went stale, a hook never
ran: silently. Such a module calls its children instead, as the module it replaces does.

A parametrized child (``torch.nn.utils.parametrize``: weight_norm, orthogonal) keeps its base
class's forward and computes ``weight`` on access, so its parameters still stand for it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.modules import module as _module

# The process-wide hooks that ``nn.Module.__call__`` runs around every module's forward (its
# ``_call_impl`` skips its hook handling when these and the module's own are empty). Registering
# and removing such hooks changes these dicts in place.
_GLOBAL_HOOKS = (_module._global_forward_pre_hooks, _module._global_forward_hooks,
                 _module._global_backward_pre_hooks, _module._global_backward_hooks)


LINEAR_FORWARD = nn.Linear.forward


def read_directly(*children: tuple[nn.Module, Callable]) -> bool:
    """Whether calling each ``(child, forward)`` pair's child would run exactly ``forward`` (the
    base class's, e.g. ``nn.Linear.forward``) on its own parameters: no override of it on the class
    or the instance, no hook of the child's and none of the process's."""
    if any(_GLOBAL_HOOKS):
        return False
    for child, forward in children:
        if (type(child).forward is not forward or "forward" in child.__dict__ or child._forward_pre_hooks
                or child._forward_hooks or child._backward_pre_hooks or child._backward_hooks):
            return False
    return True
