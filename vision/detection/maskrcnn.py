"""torchvision's Mask R-CNN on the ViT-MoE pyramid, with ViTDet-like heads (dense-vision.md §3).

`DetectionModelConfig` is the ``model:`` section of ``task: detection``: the backbone (`BackboneConfig`)
plus the detector. `build_maskrcnn` assembles torchvision's `MaskRCNN` with

* the `SimpleFeaturePyramid` as its backbone (all five levels to the RPN, the four finest to RoIAlign);
* anchors of one size per level, ``anchor_scale * stride`` (detectron2's 32..512 for strides 4..64 with
  the default 8), aspect ratios 0.5, 1, 2;
* ViTDet's heads: a 2-conv RPN head, a 4-conv + 1-fc box head and a 4-conv mask head, with channel
  LayerNorm (``head_norm: LN``) or none;
* the transform sized by ``min_size`` / ``max_size`` (images are resized so their short side is
  ``min_size`` unless the long side would pass ``max_size``; with ``min_size == max_size == S`` the long
  side becomes ``S``, ViTDet's test-time resize), ImageNet mean / std on the 0-1 scale, padding to the
  pyramid's ``size_divisibility``.

Its forward is torchvision's: ``model(images, targets)`` in training gives the loss dict
(``loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg, loss_mask``), ``model(images)`` in
eval mode one dict per image (``boxes`` XYXY, ``labels`` 1..K, ``scores``, ``masks [N, 1, H, W]``) at
the size of the input image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .backbone import BackboneConfig, SimpleFeaturePyramid, build_backbone

__all__ = ["DetectionModelConfig", "build_maskrcnn"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectionModelConfig:
    """The ``model:`` section of ``task: detection`` (defaults: ViTDet-B's Mask R-CNN at 1024)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 80  # object classes, without the background
    min_size: int = 1024
    max_size: int = 1024
    anchor_scale: float = 8.0  # anchor side = anchor_scale * level stride
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    head_dim: int = 256  # channels of the box / mask head convs
    box_fc_dim: int = 1024
    head_norm: str = "LN"  # "LN" (ViTDet) or "" (none)
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    init: str | None = None  # a classification checkpoint for the backbone (vision.detection.load_backbone_weights)
    upcycle: bool = False  # copy the checkpoint's dense MLPs into the experts of the MoE blocks

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {self.num_classes}")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"max_size: must be >= min_size ({self.min_size}), got {self.max_size}")
        if self.head_norm not in ("LN", ""):
            raise ValueError(f"head_norm: must be 'LN' or '' (none), got {self.head_norm!r}")
        if self.anchor_scale <= 0:
            raise ValueError(f"anchor_scale: must be > 0, got {self.anchor_scale}")
        if self.upcycle and not self.init:
            raise ValueError("upcycle: needs model.init, the dense checkpoint to upcycle")


def _norm(kind: str):
    if kind != "LN":
        return None
    from timm.layers import LayerNorm2d

    return LayerNorm2d


def build_maskrcnn(cfg: DetectionModelConfig, backbone: SimpleFeaturePyramid | None = None) -> nn.Module:
    """torchvision's `MaskRCNN` of ``cfg`` (module docstring); ``backbone`` defaults to ``cfg.backbone``'s."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    bb = backbone if backbone is not None else build_backbone(cfg.backbone)
    if cfg.init:
        from .backbone import load_backbone_weights

        load_backbone_weights(bb.net, cfg.init, upcycle=cfg.upcycle)
    levels = bb.names
    roi_levels = levels[:-1] if bb.top_block else levels  # the top level only feeds the RPN
    anchors = AnchorGenerator(sizes=tuple((int(round(cfg.anchor_scale * s)),) for s in bb.strides),
                              aspect_ratios=(tuple(cfg.aspect_ratios),) * len(levels))
    C, norm = bb.out_channels, _norm(cfg.head_norm)
    K = cfg.num_classes + 1  # with the background
    model = MaskRCNN(
        bb, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(C, anchors.num_anchors_per_location()[0], conv_depth=2),
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=0),
        box_head=FastRCNNConvFCHead((C, 7, 7), [cfg.head_dim] * 4, [cfg.box_fc_dim], norm_layer=norm),
        # the predictors are given: torchvision's defaults assume 1024 / 256 input channels
        box_predictor=FastRCNNPredictor(cfg.box_fc_dim, K),
        box_batch_size_per_image=cfg.box_batch_size_per_image, box_score_thresh=cfg.box_score_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(C, [cfg.head_dim] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(cfg.head_dim, cfg.head_dim, K),
    )
    model.transform.size_divisible = max(32, bb.size_divisibility)
    return model
