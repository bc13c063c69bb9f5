"""Object detection and instance segmentation on COCO-style shards (``task: detection``).

Model: torchvision's Mask R-CNN on the ViTDet-style ViT-MoE pyramid (`vision.detection.maskrcnn`,
``model:`` = `DetectionModelConfig`, ``model.backbone`` = `BackboneConfig`). Data: shards of
``mmoe shards coco`` / ``mmoe shards shapes-det`` (an image plus its COCO annotations per sample); the
category list comes from the training manifest (``info.categories``), and category ids map to labels
1..K in that order. The MoE aux loss is added to the detection losses by the engine; every loss is
logged by name.

Options (``task_options``, `DetectionOptions`):

===================  ==========================================================================================
image_size           the large-scale-jitter crop (square, pixels; ViTDet: 1024); training images are flipped,
                     resized by a factor drawn from ``scale_range`` and cropped / padded to it, seeded per
                     sample (exact resume); boxes are recomputed from the transformed masks
scale_range          the resize range of the jitter, relative to ``image_size`` (ViTDet: 0.1 - 2.0)
hflip                horizontal-flip probability
min_box_size         instances whose box after the crop is smaller on a side (pixels) are dropped
layer_decay          ViTDet's layer-wise lr decay of the backbone (0.7 for fine-tuning); None = off
per_class            report the AP of every class (``bbox/AP-<name>``, ``segm/AP-<name>``)
iou_types            what COCOeval scores: ``[bbox, segm]`` (default) or one of them
area_scale           multiplies COCO's small / medium area limits (32**2, 96**2 pixels, meant for images
                     about 640 pixels wide); ``(side / 640) ** 2`` buckets the objects of smaller images as
                     if they were resized to 640 (0.04 for the 128-pixel generated set)
===================  ==========================================================================================

Crowd annotations never enter the training loss (torchvision's heads cannot ignore regions); COCOeval
sees them, as it should. Images without instances train the RPN and the box classifier on background.

Evaluation: pycocotools ``COCOeval`` over the whole validation split (`vision.detection.coco_eval`), the
images at their original size (the model's transform resizes them to ``model.min_size`` /
``model.max_size`` and maps the detections back), results gathered from every rank: ``bbox/AP``, ``AP50``,
``AP75``, ``APs``, ``APm``, ``APl`` and the same for ``segm/`` (x100, as detectron2 reports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmoe.train.tasks import Task, TaskContext, register_task

from .maskrcnn import DetectionModelConfig, build_maskrcnn

__all__ = ["DetectionOptions", "DetectionTask"]


@dataclass
class DetectionOptions:
    image_size: int = 1024
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: float = 0.5
    min_box_size: float = 1.0
    layer_decay: float | None = None
    per_class: bool = False
    iou_types: list[str] = field(default_factory=lambda: ["bbox", "segm"])
    area_scale: float = 1.0
    score_threshold: float = 0.5  # what `mmoe predict` draws

    def __post_init__(self) -> None:
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if not self.area_scale > 0:
            raise ValueError(f"area_scale: must be > 0, got {self.area_scale}")
        bad = [t for t in self.iou_types if t not in ("bbox", "segm")]
        if bad or not self.iou_types:
            raise ValueError(f"iou_types: each must be 'bbox' or 'segm', got {self.iou_types}")
        self.augment()  # validates image_size, scale_range, hflip, min_box_size

    def augment(self):
        from .data import DetAugment

        return DetAugment(hflip=self.hflip, scale_range=tuple(self.scale_range), image_size=self.image_size,
                          min_box_size=self.min_box_size)


@register_task("detection")
class DetectionTask(Task):
    """Mask R-CNN with a ViT-MoE backbone on COCO-style shards (module docstring)."""

    ModelConfig = DetectionModelConfig
    Options = DetectionOptions
    unit = "images"

    def __init__(self, model_cfg: DetectionModelConfig, options: DetectionOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self.options: DetectionOptions
        self.categories: list[dict] | None = None
        self._aug = self.options.augment()

    # ---------------------------------------------------------------- setup / model
    def setup(self, ctx: TaskContext) -> None:
        """The categories of the training shards' manifest (kept in checkpoints for ``mmoe predict``)."""
        cats = ctx.train_manifest.info.get("categories") if ctx.train_manifest is not None else None
        if cats:
            if len(cats) != self.model_cfg.num_classes:
                raise ValueError(f"model.num_classes={self.model_cfg.num_classes} but the shards in {ctx.train_data} "
                                 f"have {len(cats)} categories")
            self.categories = [dict(c) for c in cats]

    @property
    def category_ids(self) -> list[int]:
        """COCO category ids in label order (label ``i + 1`` is ``category_ids[i]``)."""
        if self.categories:
            return [int(c["id"]) for c in self.categories]
        return list(range(1, self.model_cfg.num_classes + 1))

    @property
    def class_names(self) -> list[str]:
        if self.categories:
            return [str(c.get("name", c["id"])) for c in self.categories]
        return [str(i) for i in self.category_ids]

    def build_model(self) -> nn.Module:
        return build_maskrcnn(self.model_cfg)

    def lr_scales(self, model: nn.Module) -> dict[str, float] | None:
        if not self.options.layer_decay:
            return None
        from .backbone import lr_decay_scales

        return lr_decay_scales(model, self.options.layer_decay)

    # ---------------------------------------------------------------- data
    def decode(self, sample: dict):
        from .data import decode_coco_sample

        seed = sample.get("__seed__")
        return decode_coco_sample(sample, categories=self.category_ids, train=True, aug=self._aug,
                                  seed=int(seed) if seed is not None else 0)

    def decode_eval(self, sample: dict):
        from .data import decode_coco_sample

        return decode_coco_sample(sample, categories=self.category_ids, train=False, aug=None, seed=None)

    def collate(self, examples: list):
        from .data import collate_detection

        return collate_detection(examples)

    # ---------------------------------------------------------------- loss / evaluation
    @staticmethod
    def training_targets(targets: list[dict]) -> list[dict]:
        """The targets torchvision's Mask R-CNN trains on: boxes, labels, masks, crowd instances left out."""
        out = []
        for t in targets:
            keep = t["iscrowd"] == 0
            out.append({"boxes": t["boxes"][keep], "labels": t["labels"][keep], "masks": t["masks"][keep]})
        return out

    def loss(self, model, batch):
        images, targets = batch
        losses = model(list(images), self.training_targets(targets))
        total = sum(losses.values())
        scalars = {k: float(v.detach()) for k, v in losses.items()}
        return total, scalars, len(images)

    def _predict(self, model, images) -> list[dict]:
        return model(list(images))

    def evaluator(self):
        from .coco_eval import CocoEvaluator

        cats = self.categories or [{"id": i, "name": n} for i, n in zip(self.category_ids, self.class_names)]
        return CocoEvaluator(self._predict, cats, iou_types=tuple(self.options.iou_types),
                             per_class=self.options.per_class, area_scale=self.options.area_scale)

    # ---------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, model: nn.Module, paths: list[str], out_dir: Path) -> list[dict]:
        """Detect in the image files ``paths``; write ``<stem>_det.png`` (boxes, class names, scores and
        masks of the detections scoring at least ``score_threshold`` drawn on the image) into ``out_dir``.
        Returns one record per image: ``{"image", "output", "detections": [{"label", "category_id",
        "score", "box" XYXY}, ...]}``."""
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        from mmoe.data.decode import to_rgb

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        names, ids = self.class_names, self.category_ids
        results = []
        for path in paths:
            with Image.open(path) as im:
                rgb = pil_to_tensor(to_rgb(im))
            det = model([rgb.float() / 255])[0]
            keep = det["scores"] >= self.options.score_threshold
            boxes, labels, scores = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
            canvas = rgb
            if "masks" in det and keep.any():
                masks = det["masks"][keep][:, 0] >= 0.5
                canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=_palette(labels))
            text = [f"{names[int(label) - 1]} {float(s):.2f}" for label, s in zip(labels, scores)]
            if len(boxes):
                canvas = draw_bounding_boxes(canvas, boxes, labels=text, colors=_palette(labels), width=1)
            out = out_dir / f"{Path(path).stem}_det.png"
            Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(out)
            results.append({"image": str(path), "output": str(out), "detections": [
                {"label": names[int(label) - 1], "category_id": ids[int(label) - 1], "score": round(float(s), 4),
                 "box": [round(float(v), 2) for v in b]} for b, label, s in zip(boxes, labels, scores)]})
        return results

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"categories": self.categories}

    def load_state_dict(self, state: dict) -> None:
        if state.get("categories"):
            self.categories = [dict(c) for c in state["categories"]]


_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
            "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"]


def _palette(labels: Any) -> list[str]:
    return [_COLOURS[(int(label) - 1) % len(_COLOURS)] for label in labels]
