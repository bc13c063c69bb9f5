"""Detection and segmentation on ViT-MoE backbones (ViTDet-style)."""
