"""``PatchMergerProjector``: a drop-in for the patch-merge projectors of Qwen2-VL, Qwen2.5-VL,
Qwen3-VL and InternVL, running the fused ``merge_mlp``."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _children, _validate, merge_reference, reference
from .merge import NORM_POSITIONS, NORMS, ORDERS, as_batch, check_eps, check_merge_grid, merge_mlp, token_layout
from .modules import check_parameter_dtype, not_scriptable
from .projector import ACTIVATIONS

# Where each family keeps (norm, first Linear, second Linear) in its state_dict.
KEY_LAYOUTS = {
    "qwen2_vl": ("ln_q", "mlp.0", "mlp.2"),  # Qwen2-VL PatchMerger, Qwen2_5_VLPatchMerger
    "qwen3_vl": ("norm", "linear_fc1", "linear_fc2"),  # Qwen3VLVisionPatchMerger
    "internvl": ("layer_norm", "linear_1", "linear_2"),  # HF InternVLMultiModalProjector
}
# The same paths split at the dots, for ``_at``.
_PATHS = {keys: tuple(tuple(path.split(".")) for path in paths) for keys, paths in KEY_LAYOUTS.items()}
# The original InternVL checkpoints' mlp1 = Sequential(LayerNorm, Linear, GELU, Linear): its own
# keys (the projector standing where mlp1 was: ``model.mlp1 = projector``, then the model's
# state_dict), and the model's (its state_dict loaded into the projector).
INTERNVL_ORIGINAL = (("0", "1", "3"), ("mlp1.0", "mlp1.1", "mlp1.3"))

# Activation modules of nn / transformers (by class name: transformers is optional) -> our names.
_ACTIVATION_CLASSES = {
    "GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh", "SiLU": "silu", "SiLUActivation": "silu", "QuickGELUActivation": "quick_gelu",
}


_NORM_FORWARDS = {"layernorm": nn.LayerNorm.forward, "rmsnorm": nn.RMSNorm.forward}


def _at(module: nn.Module, path: tuple[str, ...]) -> nn.Module:
    """The submodule at ``path``, as ``get_submodule`` finds it (through each level's registered
    modules) without its Python calls per level: ``forward`` looks up three on every call."""
    for name in path:
        module = module._modules[name]
    return module


def _activation_of(module: nn.Module) -> str:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    name = _ACTIVATION_CLASSES.get(type(module).__name__)
    if name is None:
        raise ValueError(f"unsupported activation module {type(module).__name__}; supported: nn.GELU, nn.SiLU, {sorted(_ACTIVATION_CLASSES)}")
    return name


# Hugging Face's RMSNorm classes in the supported mergers (Qwen2.5-VL's under its names across
# transformers versions, Qwen2.5-Omni's and EXAONE 4.5's, both Qwen2-VL's module layout), known by
# module and class name since transformers is optional: each computes
# weight * x * rsqrt(mean(x**2) + variance_epsilon), merge_mlp's "rmsnorm".
_HF_RMS_NORMS = ("Qwen2RMSNorm", "Qwen2_5_VLRMSNorm", "Qwen2_5OmniRMSNorm", "Exaone4_5_RMSNorm")


def _norm_eps(norm: nn.Module) -> float | None:
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


def _is_rms(norm: nn.Module) -> bool:
    """Whether ``norm`` (one ``_check_norm_class`` accepted) is an RMSNorm."""
    return type(norm) is not nn.LayerNorm


def _check_norm_class(kind: str, norm: nn.Module) -> None:
    """Only norms whose computation merge_mlp reproduces, by exact class: a subclass or a look-alike
    may compute something else under the same parameters (Gemma's RMSNorm scales by 1 + weight,
    GroupNorm and BatchNorm normalise over other axes), which a copied state_dict would hide or a
    probe input would miss (BatchNorm's result depends on its running statistics and mode)."""
    cls = type(norm)
    if cls in (nn.LayerNorm, nn.RMSNorm) or (cls.__module__.startswith("transformers.") and cls.__name__ in _HF_RMS_NORMS):
        return
    raise TypeError(f"{kind}'s norm is a {cls.__module__}.{cls.__qualname__}, which PatchMergerProjector cannot reproduce; "
                    f"it converts nn.LayerNorm, nn.RMSNorm and Hugging Face's {', '.join(_HF_RMS_NORMS)}")


def _rms_norm_default_eps(x: torch.Tensor) -> float:
    """``nn.RMSNorm``'s eps when given None: ``torch.finfo`` of the dtype its kernel computes in,
    float32 for 16-bit inputs too (their opmath type), float64 for float64."""
    return torch.finfo(torch.float64 if x.dtype is torch.float64 else torch.float32).eps


def _norm_width(kind: str, norm: nn.Module) -> int:
    """The norm's width, from its weight (``_check_supported`` names a norm without one)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"{kind}'s norm has no weight (elementwise_affine=False): PatchMergerProjector's norm is affine")
    return weight.shape[0]


def _check_supported(kind: str, norm: nn.Module, fc1: nn.Linear, fc2: nn.Linear) -> None:
    """What ``PatchMergerProjector`` cannot hold, refused by name before any weight is copied: a
    norm of another class, a norm without weight, a LayerNorm without bias, Linears of which one
    has a bias and one not (no HF merger has any of these)."""
    _check_norm_class(kind, norm)
    _norm_width(kind, norm)
    if not _is_rms(norm) and norm.bias is None:
        raise ValueError(f"{kind}'s LayerNorm has no bias (bias=False): PatchMergerProjector's LayerNorm has one")
    if (fc1.bias is None) != (fc2.bias is None):
        raise ValueError(f"{kind}'s Linears differ in bias (first: {fc1.bias is not None}, second: {fc2.bias is not None}): "
                         "PatchMergerProjector's bias= covers both")


def _merge_from_widths(merged: int, channels: int) -> int | None:
    """S where the first Linear's input width is S² times the per-token norm's width, else None
    (left to the check that names merge_size)."""
    side = math.isqrt(merged // channels)
    return side if side * side * channels == merged else None


def _config_merge_size(config) -> int:
    """S from a Hugging Face config or model: InternVL's ``1 / downsample_ratio``, Qwen-VL's
    ``spatial_merge_size`` (on the config, its ``vision_config``, or Qwen3-Omni's
    ``thinker_config.vision_config``)."""
    config = getattr(config, "config", config)  # a model: its config
    ratio = getattr(config, "downsample_ratio", None)
    if ratio is not None:
        side = round(1 / ratio) if isinstance(ratio, (int, float)) and ratio > 0 else 0
        if side < 1 or abs(side * ratio - 1) > 1e-6:
            raise ValueError(f"config.downsample_ratio {ratio!r} is not 1 / merge_size for an integer merge_size")
        return side
    thinker = getattr(config, "thinker_config", None)
    for candidate in (config, getattr(config, "vision_config", None), getattr(thinker, "vision_config", None)):
        side = getattr(candidate, "spatial_merge_size", None)
        if side is not None:
            return _validate.positive_int("config's spatial_merge_size", side)
    raise ValueError(
        f"config ({type(config).__name__}) has no downsample_ratio (InternVL) or spatial_merge_size (Qwen-VL) "
        "to give merge_size; pass merge_size="
    )


class PatchMergerProjector(nn.Module):
    """``Linear2(act(Linear1(norm(merge(x)))))``: each ``merge_size`` x ``merge_size`` block of
    patch tokens concatenated into one row, normalised before (per token) or after (per merged
    row) the merge, then the MLP, fused (``deco_ops.merge_mlp``).

    ``forward(x, grid=None)`` takes what the Hugging Face pipeline feeds the stage it replaces:

    * ``order="block"`` (Qwen2/2.5/3-VL): the ``(N, C)`` token sequence the merger receives (or a
      batch ``(B, N, C)``), each block's tokens consecutive; returns ``(N / S², out)``.
    * ``order="grid"`` (InternVL): ``(B, N, C)`` row-major vision tokens (CLS dropped), which
      InternVL reshapes to a square grid and pixel-shuffles; ``grid=(H, W)`` (per call or at
      construction) for a non-square grid. Returns ``(B, N / S², out)``.

    Parameters are registered under the names of ``keys`` (``KEY_LAYOUTS``), so the HF module's
    ``state_dict`` loads unchanged and ours loads into it; every other layout's keys, and the
    original InternVL checkpoints' ``mlp1.0/1/3`` keys, load too.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden_features: int | None = None,
        merge_size: int = 2,
        order: str = "block",
        norm: str = "layernorm",
        norm_position: str = "pre",
        eps: float | None = 1e-6,
        activation: str = "gelu",
        grid=None,
        keys: str = "qwen2_vl",
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_parameter_dtype(dtype)
        in_features = _validate.positive_int("in_features", in_features)
        out_features = _validate.positive_int("out_features", out_features)
        merge_size = _validate.positive_int("merge_size", merge_size)
        merged = merge_size * merge_size * in_features
        hidden_features = _validate.positive_int("hidden_features", merged if hidden_features is None else hidden_features)
        for name, value, choices in (("order", order, ORDERS), ("norm", norm, NORMS),
                                     ("norm_position", norm_position, NORM_POSITIONS), ("keys", keys, tuple(KEY_LAYOUTS))):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
        self.merge_size, self.order, self.norm_type, self.norm_position = merge_size, order, norm, norm_position
        # eps=None is nn.RMSNorm's default: the machine epsilon of the dtype it computes in, per call;
        # kept by the norm child alone (``eps``)
        eps = None if eps is None and norm == "rmsnorm" else float(check_eps(eps))
        self.activation = _validate.activation(activation, ACTIVATIONS)
        if grid is not None and order != "grid":
            raise ValueError("grid is only used with order='grid'")
        self.grid = None if grid is None else check_merge_grid(grid, merge_size)
        self.keys = keys
        factory = {"device": device, "dtype": dtype}
        width = in_features if norm_position == "pre" else merged
        norm_layer = nn.LayerNorm(width, eps=eps, **factory) if norm == "layernorm" else nn.RMSNorm(width, eps=eps, **factory)
        parts = (norm_layer, nn.Linear(merged, hidden_features, bias=bias, **factory),
                 nn.Linear(hidden_features, out_features, bias=bias, **factory))
        for path, module in zip(KEY_LAYOUTS[keys], parts):
            self._register_at(path, module)
        self._register_load_state_dict_pre_hook(self._accept_other_layouts)

    __prepare_scriptable__ = not_scriptable

    def _register_at(self, path: str, module: nn.Module) -> None:
        parent = self
        *heads, leaf = path.split(".")
        for head in heads:
            if head not in parent._modules:
                parent.add_module(head, nn.Module())
            parent = parent._modules[head]
        parent.add_module(leaf, module)

    @property
    def norm_layer(self) -> nn.Module:
        return _at(self, _PATHS[self.keys][0])

    @property
    def eps(self) -> float | None:
        """The norm's epsilon: its child's (``norm_layer.eps``), the one value both paths read. A copy
        kept beside it went stale when the child's was changed (or the child replaced) after the module
        was built: the fused op normalised with the old epsilon, calling the children with the new one."""
        return self.norm_layer.eps

    @eps.setter
    def eps(self, value: float | None) -> None:
        self.norm_layer.eps = value

    @property
    def fc1(self) -> nn.Linear:
        return _at(self, _PATHS[self.keys][1])

    @property
    def fc2(self) -> nn.Linear:
        return _at(self, _PATHS[self.keys][2])

    def _accept_other_layouts(self, state_dict, prefix, *args) -> None:
        ours = KEY_LAYOUTS[self.keys]
        for theirs in (*KEY_LAYOUTS.values(), *INTERNVL_ORIGINAL):
            if theirs == ours:
                continue
            for old, new in zip(theirs, ours):
                head = f"{prefix}{old}."
                for key in [k for k in state_dict if k.startswith(head)]:
                    state_dict[f"{prefix}{new}.{key[len(head):]}"] = state_dict.pop(key)

    @classmethod
    def from_hf(cls, module: nn.Module, *, config=None, merge_size: int | None = None, grid=None) -> PatchMergerProjector:
        """A projector with ``module``'s configuration and a copy of its weights, for HF's Qwen2-VL
        ``PatchMerger``, ``Qwen2_5_VLPatchMerger``, ``Qwen3VLVisionPatchMerger``, ``Qwen3OmniMoeVisionPatchMerger`` or
        ``InternVLMultiModalProjector``; ``grid`` as in ``__init__``.

        The merge size S is read from the module's weights where they determine it (Qwen2/2.5-VL,
        Qwen3-VL with the per-token norm). ``InternVLMultiModalProjector`` and Qwen3-VL's
        post-shuffle merger hold only S²·C, so for them pass ``config`` (the model's or vision
        tower's HF config, or the model itself: ``downsample_ratio`` gives S = 1 / ratio,
        ``spatial_merge_size`` gives S) or ``merge_size``; without either, ``from_hf`` raises
        ``ValueError``. Sources that are given must agree.

        The norm must be an ``nn.LayerNorm``, an ``nn.RMSNorm`` (``eps=None`` too: the machine
        epsilon of the dtype it computes in, per call) or one of Hugging Face's RMSNorm classes in
        ``_HF_RMS_NORMS`` (Qwen2.5-VL's, Qwen2.5-Omni's, EXAONE 4.5's); any other class raises
        ``TypeError`` naming it. Each parameter's ``requires_grad`` and the
        module's train/eval mode are copied, and each part's dtype (a norm kept in float32 before 16-bit
        Linears stays float32)."""
        kind = type(module).__name__
        if hasattr(module, "ln_q"):  # Qwen2-VL / Qwen2.5-VL; Qwen3-Omni (its use_postshuffle_norm as Qwen3-VL's)
            norm, fc1, fc2, act = module.ln_q, module.mlp[0], module.mlp[2], module.mlp[1]
            position = "post" if getattr(module, "use_postshuffle_norm", False) else "pre"
            keys, order = "qwen2_vl", "block"
        elif hasattr(module, "linear_fc1") and hasattr(module, "use_postshuffle_norm"):  # Qwen3-VL
            norm, fc1, fc2, act = module.norm, module.linear_fc1, module.linear_fc2, module.act_fn
            position = "post" if module.use_postshuffle_norm else "pre"
            keys, order = "qwen3_vl", "block"
        elif hasattr(module, "layer_norm") and hasattr(module, "linear_1"):  # InternVL
            norm, fc1, fc2, act = module.layer_norm, module.linear_1, module.linear_2, module.act
            keys, order, position = "internvl", "grid", "post"
        else:
            raise TypeError(f"from_hf does not know {kind}; expected a Qwen2-VL/Qwen2.5-VL/Qwen3-VL/Qwen3-Omni patch merger or "
                            "InternVLMultiModalProjector")
        _check_supported(kind, norm, fc1, fc2)
        # a per-token norm's width is C, so the first Linear's S²·C gives S
        inferred = _merge_from_widths(fc1.in_features, _norm_width(kind, norm)) if position == "pre" else None
        sources = {}
        if merge_size is not None:
            sources["merge_size"] = _validate.positive_int("merge_size", merge_size)
        if config is not None:
            sources["config"] = _config_merge_size(config)
        if inferred is not None:
            sources[f"{kind}'s weights"] = inferred
        if not sources:
            raise ValueError(
                f"{kind}'s weights do not determine merge_size (they hold only merge_size**2 * channels = {fc1.in_features}); "
                "pass config= (the HF model's config, or the model: downsample_ratio / spatial_merge_size) or merge_size="
            )
        if len(set(sources.values())) > 1:
            raise ValueError("merge_size sources disagree: " + ", ".join(f"{source} gives {value}" for source, value in sources.items()))
        (merge_size,) = set(sources.values())
        C = fc1.in_features // (merge_size * merge_size)
        if C * merge_size * merge_size != fc1.in_features:
            raise ValueError(f"{kind}: first Linear's in_features {fc1.in_features} is not merge_size**2 = {merge_size**2} times a channel count")
        weight = fc1.weight
        out = cls(
            C, fc2.out_features, hidden_features=fc1.out_features, merge_size=merge_size, order=order,
            norm="rmsnorm" if _is_rms(norm) else "layernorm", norm_position=position, eps=_norm_eps(norm),
            activation=_activation_of(act), grid=grid, keys=keys, bias=fc1.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        norm_dtype = getattr(getattr(norm, "weight", None), "dtype", weight.dtype)
        if norm_dtype is not weight.dtype:  # a norm kept in float32 before 16-bit Linears stays so, as in the merger
            out.norm_layer.to(dtype=norm_dtype)
        out.load_state_dict(module.state_dict())
        # a frozen or evaluating merger stays so: the same keys, so the same parameter names
        theirs = dict(module.named_parameters())
        for name, p in out.named_parameters():
            p.requires_grad_(theirs[name].requires_grad)
        return out.train(module.training)

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        grid = self.grid if grid is None else grid
        norm_path, fc1_path, fc2_path = _PATHS[self.keys]
        norm, fc1, fc2 = _at(self, norm_path), _at(self, fc1_path), _at(self, fc2_path)
        _validate.tensor("x", x, 3 if self.order == "grid" else None)
        linear = _children.LINEAR_FORWARD
        direct = _children.read_directly((norm, _NORM_FORWARDS[self.norm_type]), (fc1, linear), (fc2, linear))
        blocks = self.merge_size * self.merge_size
        # named here: merge_mlp would name w1 or norm_weight; a wrapped Linear (LoRA, int8) tells
        # its width by in_features, as nn.Linear does
        w1 = fc1.weight if direct else None  # read once: a parametrized weight is computed on every read
        width = w1.shape[-1] if direct else getattr(fc1, "in_features", None)
        if width is not None and x.dim() >= 2 and x.shape[-1] * blocks != width:
            raise ValueError(f"x has {x.shape[-1]} channels (x.shape[-1]) but this PatchMergerProjector takes "
                             f"in_features = {width // blocks}")
        if self.order == "grid" and grid is None:
            if not x.shape[1]:
                raise ValueError("x has no tokens: order='grid' merges each image's (H, W) grid of vision tokens, so it needs at least one")
            side = round(math.sqrt(x.shape[1]))  # math.isqrt cannot take torch.compile's symbolic token count
            if side * side != x.shape[1]:
                raise ValueError(f"x has {x.shape[1]} tokens, not a square grid; pass grid=(H, W) (drop any CLS token first)")
            grid = (side, side)
        if not direct:
            return self._calling_children(x, grid, norm, fc1, fc2)
        return merge_mlp(
            x, norm.weight, getattr(norm, "bias", None), w1, fc1.bias, fc2.weight, fc2.bias,
            grid=grid, merge_size=self.merge_size, order=self.order, norm=self.norm_type, norm_position=self.norm_position,
            eps=_rms_norm_default_eps(x) if norm.eps is None else norm.eps, activation=self.activation,
        )

    def _calling_children(self, x, grid, norm: nn.Module, fc1: nn.Module, fc2: nn.Module) -> torch.Tensor:
        """The replaced merger's computation with its norm and Linears called, where reading their
        parameters would not be the same (``_children``: LoRA adapters, hooks, a subclass's forward)."""
        x3, S = as_batch(x), self.merge_size
        layout = token_layout(x3.shape[1], grid, S, self.order)

        def merged(t: torch.Tensor) -> torch.Tensor:
            return merge_reference.merge_tokens(t, S, self.order, layout, None)

        rows = merged(norm(x3)) if self.norm_position == "pre" else norm(merged(x3))
        y = fc2(reference.ACTIVATIONS[self.activation](fc1(rows)))
        y = y.view(x3.shape[0], x3.shape[1] // (S * S), y.shape[-1])
        return y if x.dim() == 3 else y[0]

    def extra_repr(self) -> str:
        return (
            f"merge_size={self.merge_size}, order={self.order!r}, norm={self.norm_type!r}, "
            f"norm_position={self.norm_position!r}, eps={self.eps}, activation={self.activation!r}, keys={self.keys!r}"
        )
