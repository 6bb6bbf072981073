"""deco_ops: fused Triton kernels for the visual-token compressors of multimodal LLMs."""

# _backend must come first: it switches on Triton's interpreter (DECO_OPS_BACKEND=triton on a
# machine without a GPU) before any kernel module is decorated by triton.
from ._backend import use_backend  # noqa: I001
from .strategy import use_strategy
from .pooling import adaptive_avg_pool_tokens
from .projector import pool_linear, pool_mlp
from .packed import (
    adaptive_avg_pool_tokens_packed,
    bilinear_pool_tokens,
    bilinear_pool_tokens_packed,
    pool_mlp_packed,
)
from .mlp_pool import mlp_pool, mlp_pool_packed
from .modules import DeCoProjector
from .merge import merge_mlp, merge_mlp_packed
from .merge_modules import PatchMergerProjector
from .attention import cross_attention
from .attention_modules import CrossAttention, QueryResampler
from ._version import __version__
from . import tuning_tables  # noqa: F401,E402  (installs the per-GPU tuning tables into the autotuner)
from . import _compiled_launch_setting  # noqa: F401,E402  (DECO_OPS_DIRECT_LAUNCH, read by every launch)
from . import _autocast  # noqa: E402

_autocast.register()  # the autocast rules of every torch.ops.deco op, once they exist

__all__ = [
    "adaptive_avg_pool_tokens",
    "pool_linear",
    "pool_mlp",
    "adaptive_avg_pool_tokens_packed",
    "bilinear_pool_tokens",
    "bilinear_pool_tokens_packed",
    "pool_mlp_packed",
    "mlp_pool",
    "mlp_pool_packed",
    "DeCoProjector",
    "merge_mlp",
    "merge_mlp_packed",
    "PatchMergerProjector",
    "cross_attention",
    "CrossAttention",
    "QueryResampler",
    "use_backend",
    "use_strategy",
]
