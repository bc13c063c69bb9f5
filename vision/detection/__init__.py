"""Detection and segmentation on ViT-MoE backbones (ViTDet-style).

* `vision.detection.backbone`: `ViTDetMoE` (plain ViT with window / global attention and `mmoe.MoE` FFNs),
  `SimpleFeaturePyramid`, `BackboneConfig`, weights from classification checkpoints, layer-wise lr decay.
* `vision.detection.maskrcnn`: torchvision's Mask R-CNN on that pyramid (`DetectionModelConfig`).
* `vision.detection.data`: COCO shard samples to images and targets, ViTDet's large-scale jitter.
* `vision.detection.coco_eval`: pycocotools COCOeval as an engine evaluator (`CocoEvaluator`).
* `vision.detection.tasks`: ``task: detection``.
* `vision.detection.segmentation`: detectron2's semantic FPN head, `SemanticSegmentor`, the mIoU metrics and
  their evaluator; `vision.detection.segtask`: ``task: semantic_segmentation`` (image + ``seg.png`` shards).

Names are imported lazily (``import vision.detection`` loads no torch).
"""

from __future__ import annotations

from mmoe._lazy import lazy_exports

_EXPORTS = {
    "BackboneConfig": "backbone", "ViTDetMoE": "backbone", "SimpleFeaturePyramid": "backbone",
    "build_backbone": "backbone", "load_backbone_weights": "backbone", "lr_decay_scales": "backbone",
    "DetectionModelConfig": "maskrcnn", "build_maskrcnn": "maskrcnn",
    "DetAugment": "data", "decode_coco_sample": "data", "collate_detection": "data",
    "CocoEvaluator": "coco_eval", "coco_metrics": "coco_eval",
    "DetectionTask": "tasks", "DetectionOptions": "tasks",
    "SemSegFPNHead": "segmentation", "SemanticSegmentor": "segmentation", "segmentation_metrics": "segmentation",
    "ConfusionEvaluator": "segmentation", "SemanticSegmentationTask": "segtask",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
