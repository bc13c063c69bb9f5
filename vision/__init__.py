"""Vision models on the mmoe core: ViT-MoE classifiers registered in timm, sparse upcycling of dense timm
ViTs, and the image-classification task of the training engine.

Importing `vision.models` registers ``vit_moe_{tiny,small,base}_patch16_224`` in timm; so does the first use
of any name below (``vision.upcycle_vit``, ``from vision import VisionTransformerMoE``). ``import vision``
alone loads nothing heavy, so that ``mmoe demo --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VisionTransformerMoE": "models", "vit_moe_config": "models", "moe_block_indices": "models",
    "count_params": "models", "ParamCount": "models", "dense_mlp_ratio_for": "models",
    "upcycle_vit": "upcycle", "load_dense_vit": "upcycle",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vision' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
