"""Vision task family on the mmoe core (DESIGN.md): ViT-MoE models for timm, sparse upcycling,
classification, detection/segmentation backbones and multi-task training.

Nothing is implemented here yet.
"""
