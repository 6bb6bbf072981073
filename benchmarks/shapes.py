"""The named benchmark shapes: defined once in ``deco_ops.shapes`` (they ship in the package, so
``python -m deco_ops.tune`` runs from an installed wheel) and re-exported here for the suite."""

from deco_ops.shapes import (  # noqa: F401
    ALL, CPU_PATH, CROSS_ATTENTION, MERGE, MLP_POOL, PACKED, POOL_MLP, PRIORITY, AttentionShape, MergeShape,
    MLPPoolShape, PackedShape, PoolMLPShape, for_device, llava_next_unpadded_grid, select,
)
