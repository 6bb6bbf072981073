"""Eager calls of deco's ops, without ``torch.library``'s dispatch on the way.

Every ``torch.ops.deco.*`` op is a ``torch.library`` triton op: ``torch.compile`` sees its kernels
(``_triton_op``) or one opaque node with a fake implementation, and an autograd formula, ``torch.autocast`` its rules
(``_autocast``), dispatch modes their calls. In eager mode that machinery is pure host time on every
call, nested ops paying it again (the first GPU run: a LLaVA-1.5 batch-1 forward+backward spent
1.28 ms on the host against eager PyTorch's 0.57 ms, its kernels 0.1-0.2 ms).

``deco.<name>(*args)`` (the namespace below) runs the same implementation and the same autograd
formula directly when the call is *plain eager*: not compiling, no functorch transform, no
dispatch mode (FakeTensorMode, FlopCounterMode, a test's mode), every tensor argument a plain
``torch.Tensor`` or ``nn.Parameter`` (no FakeTensor, FunctionalTensor, DTensor), no autocast region
and no forward-mode AD level, not under ``torch.jit.trace`` (``_plan.plain``, the one definition). Then autograd records a
``torch.autograd.Function`` built from the op's ``setup_context`` and backward, or nothing at all
where it would record nothing (grad mode off, or no input that requires grad: backward formulas,
inference). A call that would be plain but for a CPU or CUDA autocast region (the backward
formulas' ops when ``backward()`` runs inside one) does what the op's autocast kernel does
(``deco_ops._autocast``: cast by the op's rule, autocast off) and then runs as a plain one, past
the dispatcher. Any other call goes through ``torch.ops.deco.<name>``, exactly as before.

``deco.<name>.body(*args)`` is the implementation alone: what one op's body calls for another op's
work (a body runs below autograd, with autocast already applied, on real tensors).
``deco.<name>.runner(impl, records)`` is what a plain eager call of the op runs when ``impl`` is
the implementation its strategy chose (``deco_ops._plan`` keeps it per call signature: the public
functions for their op, ``deco.<name>`` itself for an op registered with ``plan=``, the backward
ops that autograd formulas call).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import torch

from . import _checkpoint, _plan
from ._triton_op import triton_op

# autograd.Function.apply without its Python wrapper, which only matters under functorch
# transforms (and binds arguments to a setup_context that these Functions do not define): a
# plain eager call has none, and the wrapper's per-argument checks cost more than the op's checks
_function_apply = torch._C._FunctionBase.__dict__["apply"]
_copy_context = contextvars.copy_context
_saved_tensors_hooks = _checkpoint.saved_tensors_hooks


_names: dict[object, str] = {}  # custom op definition -> its name in ``deco``


def custom_op(name: str, plan: Callable[..., Callable] | None = None) -> Callable:
    """``torch.library.triton_op("deco::<name>", mutates_args=())`` (``_triton_op``: compiled
    graphs see its kernels), remembering the implementation for ``deco.<name>``. With ``plan``
    (the function that returns the implementation that runs a call's arguments: the backend's or
    the strategy's choice), ``deco.<name>`` keeps that choice per call signature (``Op.__call__``)."""

    def register(fn: Callable):
        opdef = triton_op(f"deco::{name}", fn)
        deco.add(name, fn, plan)
        _names[opdef] = name
        return opdef

    return register


def register_autograd(opdef, backward: Callable, setup_context: Callable) -> None:
    """``opdef.register_autograd``, remembering the formula for ``deco.<name>``'s eager path; the
    backward runs in the forward's context (``_in_forward_context``)."""
    backward = _in_forward_context(backward)
    opdef.register_autograd(backward, setup_context=_keeping_context(setup_context))
    getattr(deco, _names[opdef]).set_autograd(backward, setup_context)


# ``use_backend`` / ``use_strategy`` blocks hold per ``contextvars`` context, and autograd runs the
# backward of CUDA tensors on its own device thread, which would otherwise see none of them: the
# setup keeps a copy of the context the forward ran in (``contextvars.copy_context``: a new
# reference to the same immutable mapping, no copy of its entries) and the backward runs in it;
# so does an activation checkpoint's recompute of the region (``_checkpoint``).


def _keeping_context(setup_context: Callable) -> Callable:
    """``setup_context``, then the forward's context kept on ``ctx`` (the torch.library path's
    setup; ``Op.function``'s forward does the same inline)."""

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.forward_context = _copy_context()
        _checkpoint.recompute_in_this_context()

    return setup


def _in_forward_context(backward: Callable) -> Callable:
    """``backward`` run in the context its forward ran in (kept by the setup)."""

    def in_context(ctx, *grads):
        # a copy per call: backward passes on two threads (retain_graph) may run one node at once,
        # and one context cannot be entered twice
        return ctx.forward_context.copy().run(backward, ctx, *grads)

    return in_context


_functorch = torch._C._functorch
_forward_ad = torch.autograd.forward_ad


def _refuse_forward_and_functorch_autodiff(name: str, args: tuple) -> None:
    """deco's ops differentiate through ``torch.autograd`` (their formulas are reverse mode, for
    ``backward()``/``torch.autograd.grad``); an input that ``torch.func``'s grad or jvp transforms
    differentiate (``grad``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``, at any depth of the
    transform stack: a grad-tracking wrapper anywhere around the tensor) would make PyTorch fail
    inside with an internal message (grad) or hand back zero tangents, silently (jvp). Refused with
    an error that says so. Inputs those transforms do not differentiate (a frozen feature map under
    ``grad`` of a head's weights) and ``torch.func.vmap`` run as before. The same for a dual tensor
    of ``torch.autograd.forward_ad`` (no forward-mode formula: the kernels would drop its tangent)."""
    for a in args:
        if not isinstance(a, torch.Tensor):
            continue
        inner = a
        while _functorch.is_functorch_wrapped_tensor(inner):
            if _functorch.is_gradtrackingtensor(inner):
                raise NotImplementedError(
                    f"deco_ops' {name} does not differentiate under torch.func's grad and jvp transforms (grad, jvp, "
                    "jacrev, jacfwd, hessian): differentiate with torch.autograd (loss.backward() or "
                    "torch.autograd.grad); torch.func.vmap works")
            inner = _functorch.get_unwrapped(inner)
        if _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(a).tangent is not None:
            raise NotImplementedError(
                f"deco_ops' {name} has no forward-mode AD formula (a dual tensor from torch.autograd.forward_ad): the "
                "Triton kernels would drop its tangent; differentiate with torch.autograd (reverse mode)")


def records(args: tuple) -> bool:
    """Whether autograd records a call with ``args``: grad mode on and a tensor argument requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class Op:
    """One deco op, callable as ``torch.ops.deco.<name>`` is (positional arguments)."""

    __slots__ = ("name", "body", "under_autocast", "_functions", "_formula", "_plans")

    def __init__(self, name: str, body: Callable, implementation: Callable[..., Callable] | None = None):
        self.name, self.body = name, body
        # ``(*args) -> output``: a call inside ``torch.autocast`` run as the op's autocast rule runs it
        # (``deco_ops._autocast`` sets it): cast, then a plain eager call with autocast off
        self.under_autocast: Callable[..., object] | None = None
        self._functions: dict[Callable, type[torch.autograd.Function]] = {}
        self._formula: tuple[Callable, Callable] | None = None
        # what a plain eager call runs, per call signature: ``implementation``'s choice, in the
        # op's autograd Function where autograd records the call
        self._plans = None if implementation is None else _plan.Plans(
            lambda *args: _plan.runner(self, implementation, args, records(args)))

    def set_autograd(self, backward: Callable, setup_context: Callable) -> None:
        self._formula = (backward, setup_context)
        self._functions.clear()

    @property
    def overload(self):
        return getattr(torch.ops.deco, self.name).default

    def __call__(self, *args):
        run = None if self._plans is None else self._plans.get(*args)
        if run is not None:
            return run(*args)
        if torch.compiler.is_compiling():
            return self.overload(*args)
        if not _plan.plain(args):
            if self.under_autocast is not None and _plan.plain_but_autocast(args):
                return self.under_autocast(*args)
            _refuse_forward_and_functorch_autodiff(self.name, args)
            return self.overload(*args)
        if records(args):
            if self._formula is None:  # no autograd formula: the op's own error, unchanged
                return self.overload(*args)
            return self.function().apply(*args)
        return self.body(*args)

    def runner(self, impl: Callable, records: bool) -> Callable:
        """What a plain eager call runs when ``impl`` is its implementation (the body, or the one
        implementation the op's strategy chose): ``impl`` itself, or ``impl`` inside the op's
        autograd Function when autograd records the call (``records``: grad mode on and an input
        requires grad)."""
        if not records:
            return impl
        if self._formula is None:  # no autograd formula: the op's own error, unchanged
            return self.overload
        return _function_apply.__get__(None, self.function(impl))

    def function(self, impl: Callable | None = None) -> type[torch.autograd.Function]:
        """The op's implementation (default: its body) and autograd formula as a
        ``torch.autograd.Function``."""
        impl = self.body if impl is None else impl
        function = self._functions.get(impl)
        if function is None:
            backward, setup_context = self._formula

            # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips
            # binding the arguments to forward's signature (inspect) on every call. The context
            # is kept as ``_keeping_context`` keeps it, without that function's frame.
            def forward(ctx, *args):
                output = impl(*args)
                # The first output, the one the public call returns, detached where it is a view of
                # a tensor the op made (a GEMM's rows as ``y.view(B, P, N)``): the same storage,
                # sizes and strides, no view in autograd's sense, which refuses in-place changes to
                # a view that a Function of several outputs returns; the eager code an op replaces
                # allows them (``y = projector(x); y += pos``). The others are residuals the caller
                # never sees. A view of an argument would stay one (autograd must know it aliases).
                # Inline: no frame on every recorded call.
                first = output[0] if type(output) is tuple else output
                if first is not None and first._is_view() and id(first._base) not in map(id, args):
                    output = first.detach() if first is output else (first.detach(), *output[1:])
                setup_context(ctx, args, output)
                ctx.forward_context = _copy_context()
                if _saved_tensors_hooks(False) is not None:  # a checkpointed region's forward: its recompute runs in this context
                    _checkpoint.recompute_in_this_context()
                return output

            # built with type() so that autograd names its node after the op (deco_pool_mlpBackward)
            function = self._functions[impl] = type(
                f"deco_{self.name}", (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)}
            )
        return function


class Namespace:
    """``deco.<name>``: the ops registered through ``custom_op``."""

    def add(self, name: str, body: Callable, implementation: Callable[..., Callable] | None = None) -> None:
        setattr(self, name, Op(name, body, implementation))


deco = Namespace()
