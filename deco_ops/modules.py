"""Drop-in ``nn.Module`` compressors built on the fused ops."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from . import _children, _validate, reference
from .projector import ACTIVATIONS, pool_mlp
from .mlp_pool import mlp_pool
from .packed import bilinear_pool_tokens, check_mode, pool_mlp_resampled
from .pooling import adaptive_avg_pool_tokens

ORDERS = ("pool_mlp", "mlp_pool")

# Hugging Face activation names (``config.projector_hidden_act``, ``transformers.ACT2FN``) -> ours.
# gelu_new and gelu_pytorch_tanh are the same tanh approximation of GELU; swish is SiLU.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
    "swish": "silu",
}

# The projector's two Linear layers under the names each codebase gives them, mapped to ours
# ("0", "2": LLaVA's mm_projector nn.Sequential(Linear, GELU, Linear)).
_LAYER_NAMES = {
    "0.": "0.", "2.": "2.",                                  # LLaVA (liuhaotian), and ours
    "linear_1.": "0.", "linear_2.": "2.",                    # Hugging Face LlavaMultiModalProjector
    "mlp_projector.0.": "0.", "mlp_projector.2.": "2.",      # DeCo's AvgPoolProjector
}
# The names a DeCoProjector registers its two Linear layers under (``keys``): LLaVA's
# mm_projector, or Hugging Face's LlavaMultiModalProjector (``llava_to_deco``: its state_dict keys
# and its named_parameters then agree with the model's, as distributed checkpointing needs).
KEY_LAYOUTS = {"llava": ("0", "2"), "hf": ("linear_1", "linear_2")}
# Where a whole-model checkpoint keeps the projector (a key must match prefix + layer + param exactly).
PROJECTOR_PREFIXES = (
    "model.multi_modal_projector.",  # Hugging Face LLaVA, transformers >= 4.52
    "multi_modal_projector.",        # Hugging Face LLaVA, older checkpoints
    "model.mm_projector.",           # LLaVA / DeCo training checkpoints
    "mm_projector.",                 # mm_projector.bin saved on its own
)
_PARAMS = ("weight", "bias")


def _projector_key(rest: str) -> str | None:
    """Our name ("0.weight", ...) for a checkpoint key relative to this module, or None if the key
    is not one of the projector's parameters."""
    for outer in ("", *PROJECTOR_PREFIXES):
        if not rest.startswith(outer):
            continue
        layer_key = rest[len(outer):]
        for theirs, ours in _LAYER_NAMES.items():
            if layer_key.startswith(theirs) and layer_key[len(theirs):] in _PARAMS:
                return ours + layer_key[len(theirs):]
    return None


# The dtypes a module's parameters may have: the kernels' and float64, which the PyTorch path runs.
PARAMETER_DTYPES = _validate.FLOAT_DTYPES + _validate.REFERENCE_ONLY_DTYPES


def check_parameter_dtype(dtype) -> None:
    """A module's ``dtype=`` factory argument: None (torch's default dtype) or one of
    ``PARAMETER_DTYPES``, refused by name before torch's error about integer parameters."""
    if dtype is not None and dtype not in PARAMETER_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in PARAMETER_DTYPES)
        raise TypeError(f"dtype must be None or one of {names}, got {dtype!r}")


def not_scriptable(self) -> None:
    """``__prepare_scriptable__`` of the modules: ``torch.jit.script`` (of the module or of a model
    holding it) calls it first. TorchScript cannot compile the ops' Python, and failed deep inside
    it (``Expression of type dots cannot be used in a type expression``), naming no alternative."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(self).__name__}: deco_ops' ops are Python (torch.library custom ops); "
        "record the model with torch.jit.trace or torch.export, or use torch.compile"
    )


def activation_name(value) -> str:
    """Our activation name for one of ours or a Hugging Face name (``gelu_pytorch_tanh``, ...)."""
    value = HF_ACTIVATIONS.get(value, value) if isinstance(value, str) else value
    if value not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {ACTIVATIONS} or a Hugging Face name {tuple(HF_ACTIVATIONS)}, got {value!r}"
        )
    return value


class DeCoProjector(nn.Module):
    """DeCo: 2D/3D adaptive average pooling of the patch grid, then LLaVA's MLP projector.

    ``forward(x)`` takes ``(B, num_prefix_tokens + prod(grid), in_features)`` (prefix/CLS tokens are
    dropped) and returns ``(B, prod(out_grid), out_features)``. ``grid``/``out_grid`` may be given
    per call (AnyRes tiles, video) without rebuilding the module.

    The two Linear layers are registered as children ``"0"`` and ``"2"``, exactly as in LLaVA's
    ``mlp2x_gelu`` projector ``nn.Sequential(Linear, GELU, Linear)``, so its ``state_dict``
    (``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``) loads unchanged and ours loads into it;
    with ``keys="hf"`` as ``"linear_1"`` and ``"linear_2"``, Hugging Face's names.
    ``load_state_dict`` also takes Hugging Face's ``linear_1.*``/``linear_2.*`` keys and the DeCo
    paper's ``mlp_projector.0.*``/``mlp_projector.2.*``, each with or without the prefix a whole-model
    checkpoint gives them (``PROJECTOR_PREFIXES``: ``model.multi_modal_projector.``,
    ``model.mm_projector.``, ...), so a full LLaVA checkpoint loads with ``strict=False``. As for
    any ``nn.Module``, a ``strict=False`` load in which no key names a projector parameter raises
    nothing and returns them all in ``missing_keys`` (check it: the weights keep their
    initialisation); a strict one raises. ``activation`` takes our names or Hugging
    Face's (``HF_ACTIVATIONS``: ``gelu_pytorch_tanh``, ``gelu_new``, ``quick_gelu``, ...).

    ``order="mlp_pool"`` projects first and pools after (PLLaVA, LLaVA-OneVision/Video:
    ``pool(Linear2(act(Linear1(x))))``, computed with the second GEMM on pooled rows only, see
    ``deco_ops.mlp_pool``); ``mode="bilinear"`` resamples with ``F.interpolate(mode="bilinear",
    align_corners=False)`` (trilinear for 3D grids) instead of adaptive average pooling.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden_features: int | None = None,
        grid=(24, 24),
        out_grid=(12, 12),
        activation: str = "gelu",
        order: str = "pool_mlp",
        mode: str = "average",
        num_prefix_tokens: int = 0,
        bias: bool = True,
        keys: str = "llava",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_parameter_dtype(dtype)
        in_features = _validate.positive_int("in_features", in_features)
        out_features = _validate.positive_int("out_features", out_features)
        hidden_features = _validate.positive_int("hidden_features", out_features if hidden_features is None else hidden_features)
        num_prefix_tokens = _validate.positive_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        self.grid, self.out_grid = _validate.grids(grid, out_grid)
        self.activation = activation_name(activation)
        if not isinstance(order, str) or order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order, self.mode = order, check_mode(mode)
        self.num_prefix_tokens = num_prefix_tokens
        if not isinstance(keys, str) or keys not in KEY_LAYOUTS:
            raise ValueError(f"keys must be one of {tuple(KEY_LAYOUTS)}, got {keys!r}")
        self.keys = keys
        factory = {"device": device, "dtype": dtype}
        first, second = KEY_LAYOUTS[keys]
        self.add_module(first, nn.Linear(in_features, hidden_features, bias=bias, **factory))
        self.add_module(second, nn.Linear(hidden_features, out_features, bias=bias, **factory))
        self._register_load_state_dict_pre_hook(functools.partial(self._rename_projector_keys, layers=KEY_LAYOUTS[keys]))

    keys = "llava"  # the layout of a module pickled before ``keys`` existed
    __prepare_scriptable__ = not_scriptable

    @property
    def fc1(self) -> nn.Linear:
        return self._modules[KEY_LAYOUTS[self.keys][0]]

    @property
    def fc2(self) -> nn.Linear:
        return self._modules[KEY_LAYOUTS[self.keys][1]]

    @staticmethod
    def _rename_projector_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
                               layers: tuple[str, str] = KEY_LAYOUTS["llava"]) -> None:
        """Renames every recognised projector key under ``prefix`` to ours (``layers``: the names of
        the module's ``keys`` layout, registered with the hook); reports (through
        ``error_msgs``, which ``load_state_dict`` raises whatever ``strict`` says) two keys naming
        the same parameter. Keys it does not recognise are left for ``load_state_dict`` to report
        as unexpected (and our parameters as missing), as any ``nn.Module`` does."""
        renamed: dict[str, str] = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            ours = _projector_key(key[len(prefix):])
            if ours is None:
                continue
            if ours in renamed:
                error_msgs.append(f"both {renamed[ours]!r} and {key!r} name the projector's {ours!r}; pass one checkpoint format")
                return
            renamed[ours] = key
        names = dict(zip(("0", "2"), layers))  # ``layers`` defaults to LLaVA's: the hook pickled before ``keys``
        for ours, key in renamed.items():
            layer, param = ours.split(".")
            state_dict[f"{prefix}{names[layer]}.{param}"] = state_dict.pop(key)

    def forward(self, x: torch.Tensor, *, grid=None, out_grid=None) -> torch.Tensor:
        grid, out_grid = _validate.grids(self.grid if grid is None else grid, self.out_grid if out_grid is None else out_grid)
        _validate.tensor("x", x, 3)
        expected = self.num_prefix_tokens + math.prod(grid)
        if x.shape[1] != expected:
            raise ValueError(
                f"x has {x.shape[1]} tokens but DeCoProjector expects num_prefix_tokens + prod(grid) = "
                f"{self.num_prefix_tokens} + {math.prod(grid)} = {expected} (grid {grid})"
            )
        fc1, fc2 = self.fc1, self.fc2
        direct = _children.read_directly((fc1, _children.LINEAR_FORWARD), (fc2, _children.LINEAR_FORWARD))
        # named here, before the pooling runs: the op would name w1, which the caller never passed; a
        # wrapped Linear (LoRA, int8) tells its width by in_features, as nn.Linear does
        # fc1's weight read once: a parametrized weight is computed on every read (a spectral norm's
        # power iteration steps its state once per read; eager's Linear reads it once)
        w1 = fc1.weight if direct else None
        width = w1.shape[1] if direct else getattr(fc1, "in_features", None)
        if width is not None and x.shape[2] != width:
            raise ValueError(f"x has {x.shape[2]} features (x.shape[-1]) but this DeCoProjector takes in_features = {width}")
        if not direct:
            return self._calling_children(x[:, self.num_prefix_tokens:], grid, out_grid, fc1, fc2)
        if self.num_prefix_tokens:
            x = x[:, self.num_prefix_tokens:]
        params = (x, w1, fc1.bias, fc2.weight, fc2.bias)
        if self.order == "mlp_pool":
            return mlp_pool(*params, grid=grid, out_grid=out_grid, activation=self.activation, mode=self.mode)
        if self.mode != "average":
            return pool_mlp_resampled(*params, grid=grid, out_grid=out_grid, activation=self.activation, mode=self.mode)
        return pool_mlp(*params, grid=grid, out_grid=out_grid, activation=self.activation)

    def _calling_children(self, x, grid, out_grid, fc1: nn.Module, fc2: nn.Module) -> torch.Tensor:
        """The replaced projector's computation with its Linears called, where reading their
        parameters would not be the same (``_children``: LoRA adapters, hooks, a subclass's forward);
        the pooling is still ours."""
        pool = adaptive_avg_pool_tokens if self.mode == "average" else bilinear_pool_tokens
        act = reference.ACTIVATIONS[self.activation]
        if self.order == "mlp_pool":
            return pool(fc2(act(fc1(x))), grid, out_grid)
        return fc2(act(fc1(pool(x, grid, out_grid))))

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, out_grid={self.out_grid}, activation={self.activation!r}, "
            f"order={self.order!r}, mode={self.mode!r}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
