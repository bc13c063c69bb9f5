"""Detection and segmentation on ViT-MoE backbones (ViTDet-style).

`backbone`: the ViT-MoE, its simple feature pyramid, classification-checkpoint loading, layer-wise lr decay.
`segmentation`: detectron2's semantic FPN head, `SemanticSegmentor`, the mIoU metrics and their evaluator.
`segtask`: ``task: semantic_segmentation`` for the engine (image + ``seg.png`` shards).
"""
