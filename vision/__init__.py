"""Vision models on the mmoe core: ViT-MoE classifiers registered in timm, sparse upcycling of dense timm
ViTs, and the image-classification task of the training engine.

Importing `vision.models` registers ``vit_moe_{tiny,small,base}_patch16_224`` in timm; so does the first use
of any name below (``vision.upcycle_vit``, ``from vision import VisionTransformerMoE``). ``import vision``
alone loads nothing heavy, so that ``mmoe demo --help`` stays fast.
"""

from __future__ import annotations

from mmoe._lazy import lazy_exports

_EXPORTS = {
    "VisionTransformerMoE": "models", "vit_moe_config": "models", "moe_block_indices": "models",
    "count_params": "models", "ParamCount": "models", "dense_mlp_ratio_for": "models",
    "upcycle_vit": "upcycle", "load_dense_vit": "upcycle",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
