"""Vision models on the mmoe core: ViT-MoE classifiers registered in timm, sparse upcycling of dense timm
ViTs, and the image-classification task of the training engine.

``import vision`` registers ``vit_moe_{tiny,small,base}_patch16_224`` in timm.
"""

from .models import (VisionTransformerMoE, count_params, dense_mlp_ratio_for, moe_block_indices,
                     vit_moe_config)
from .upcycle import load_dense_vit, upcycle_vit

__all__ = ["VisionTransformerMoE", "vit_moe_config", "moe_block_indices", "count_params", "dense_mlp_ratio_for",
           "upcycle_vit", "load_dense_vit"]
