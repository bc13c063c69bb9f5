"""COCO box and mask AP of torchvision Mask R-CNN outputs (pycocotools ``COCOeval``), as an mmoe `Evaluator`.

The ground truth is the *original* COCO annotations of the evaluation samples (``target["coco"]`` from
`vision.detection.data.decode_coco_sample` with ``train=False``), built into an in-memory ``COCO``
(`coco_gt_from_targets`); detections are COCO result dicts (`detections_from_outputs`). `coco_metrics`
reports detectron2's keys and scale: ``bbox/AP``, ``bbox/AP50``, ``bbox/AP75``, ``bbox/APs``, ``bbox/APm``,
``bbox/APl`` (and ``segm/...``), in percent; an area bucket without ground truth is NaN, as in detectron2.

Image sizes: evaluation images are passed to the model at their original size (``decode_coco_sample``
applies no transform with ``train=False``); torchvision's ``MaskRCNN`` resizes internally and returns boxes
and masks in the coordinates of the image it was given, i.e. the original image. If a task resizes the
images itself, it passes the sizes it gave the model as ``input_sizes`` and the outputs are mapped back.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmoe.train.tasks import Evaluator

from .data import segmentation_to_rle

__all__ = ["coco_gt_from_targets", "coco_metrics", "detections_from_outputs", "CocoEvaluator", "IOU_TYPES",
           "SUMMARY_KEYS"]

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats indices 0..5
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _rle_json(rle: Mapping) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, (bytes, bytearray)) else counts}


def coco_gt_from_targets(records: Sequence[Mapping[str, Any]], categories: Sequence[Mapping[str, Any]]):
    """An in-memory ``pycocotools.coco.COCO`` of ground-truth ``records``.

    Each record: ``{"image_id", "height", "width", "annotations": [{"bbox" XYWH, "category_id",
    "segmentation" (polygons or RLE, compressed or not), "area", "iscrowd"}, ...]}``. Segmentations are
    stored as compressed RLE with string counts (a missing one becomes its box); a missing ``area`` is the
    mask's, a missing ``bbox`` the mask's box. Annotation ids are renumbered 1.. (COCOeval needs them
    unique and non-zero). `ValueError` on an image id given twice."""
    import pycocotools.mask as mask_util
    from pycocotools.coco import COCO

    images, anns, seen = [], [], set()
    for rec in records:
        image_id, h, w = int(rec["image_id"]), int(rec["height"]), int(rec["width"])
        if image_id in seen:
            raise ValueError(f"image id {image_id} appears twice in the ground truth")
        seen.add(image_id)
        images.append({"id": image_id, "height": h, "width": w})
        for ann in rec.get("annotations") or []:
            bbox = ann.get("bbox")
            rle = segmentation_to_rle(ann.get("segmentation"), h, w, bbox)
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                bbox = mask_util.toBbox(rle).tolist()
            area = ann.get("area")
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(ann["category_id"]),
                         "bbox": [float(v) for v in bbox], "segmentation": _rle_json(rle),
                         "area": float(area) if area is not None else float(mask_util.area(rle)),
                         "iscrowd": int(ann.get("iscrowd") or 0)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _results_for(iou_type: str, detections: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Fresh copies for ``loadRes`` (it writes into them). For ``segm`` the box is left out, so that
    pycocotools takes the mask's area for the size buckets (with a box it would take the box's)."""
    out = []
    for d in detections:
        r = {"image_id": int(d["image_id"]), "category_id": int(d["category_id"]), "score": float(d["score"])}
        if iou_type == "bbox":
            r["bbox"] = [float(v) for v in d["bbox"]]
        else:
            seg = d.get("segmentation")
            if seg is None:
                raise ValueError("segm evaluation needs a 'segmentation' in every detection (or iou_types=('bbox',))")
            r["segmentation"] = _rle_json(seg)
        out.append(r)
    return out


def _zero_metrics(iou_type: str, gt, names: Mapping[int, str], per_class: bool) -> dict[str, float]:
    out = {f"{iou_type}/{k}": 0.0 for k in SUMMARY_KEYS}
    if per_class:  # the classes COCOeval would score: those with a non-crowd ground truth
        for cid in sorted(names):
            if any(not a["iscrowd"] for a in gt.loadAnns(gt.getAnnIds(catIds=[cid]))):
                out[f"{iou_type}/AP-{names[cid]}"] = 0.0
    return out


def coco_metrics(gt_records: Sequence[Mapping[str, Any]], detections: Sequence[Mapping[str, Any]],
                 categories: Sequence[Mapping[str, Any]], iou_types: Sequence[str] = IOU_TYPES,
                 per_class: bool = False, *, area_scale: float = 1.0) -> dict[str, float]:
    """COCO AP of ``detections`` against ``gt_records`` (see `coco_gt_from_targets`), in percent.

    Args:
        gt_records: one per image evaluated (images without ground truth included: their detections are
            false positives).
        detections: ``{"image_id", "category_id", "bbox" XYWH, "score", "segmentation" (RLE; needed for
            ``segm``)}``; each image id must be among ``gt_records`` (`ValueError` otherwise).
        categories: COCO category dicts (``id``, ``name``); only these are scored.
        iou_types: any of ``"bbox"``, ``"segm"``.
        per_class: also ``<type>/AP-<name>`` per category: the precision averaged over IoU thresholds and
            recall (area all, 100 detections); categories without ground truth are left out.
        area_scale: multiplies COCO's small / medium limits (32**2, 96**2 pixels); e.g.
            ``(img_size / 640) ** 2`` buckets objects of small images as if the image were COCO-sized.

    Returns ``{"bbox/AP": ..., "bbox/AP50": ..., ...}``; no detections at all give 0.0 for every key (no
    COCOeval run); no images give ``{}``.
    """
    from pycocotools.cocoeval import COCOeval

    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad:
        raise ValueError(f"iou_types: unknown {bad}, expected some of {list(IOU_TYPES)}")
    if not gt_records:
        return {}
    gt = coco_gt_from_targets(gt_records, categories)
    known = set(gt.getImgIds())
    stray = sorted({int(d["image_id"]) for d in detections} - known)
    if stray:
        raise ValueError(f"detections for image ids {stray[:5]} that are not in the ground truth")
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    small, medium = 32 ** 2 * area_scale, 96 ** 2 * area_scale
    out: dict[str, float] = {}
    for iou_type in iou_types:
        results = _results_for(iou_type, detections)
        if not results:
            out.update(_zero_metrics(iou_type, gt, names, per_class))
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.params.areaRng = [[0, 1e5 ** 2], [0, small], [small, medium], [medium, 1e5 ** 2]]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for k, name in enumerate(SUMMARY_KEYS):
            v = float(ev.stats[k])
            out[f"{iou_type}/{name}"] = v * 100 if v >= 0 else float("nan")
        if per_class:
            precision = ev.eval["precision"]  # [IoU thresholds, recall, categories, areas, max dets]
            for k, cid in enumerate(ev.params.catIds):
                p = precision[:, :, k, 0, -1]
                p = p[p > -1]
                if p.size:
                    out[f"{iou_type}/AP-{names.get(cid, cid)}"] = float(np.mean(p)) * 100
    return out


def detections_from_outputs(outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                            categories: Sequence[int], orig_sizes: Sequence[tuple[int, int]],
                            input_sizes: Sequence[tuple[int, int]] | None = None, mask_threshold: float = 0.5,
                            *, with_masks: bool = True) -> list[dict]:
    """COCO result dicts of torchvision Mask R-CNN ``outputs`` (one dict per image: ``boxes`` XYXY,
    ``labels`` 1..K, ``scores``, ``masks`` float ``[N, 1, H, W]``).

    Label ``k`` is category id ``categories[k - 1]`` (the order given to `decode_coco_sample`). The outputs
    are in the coordinates of the image the model was given: ``input_sizes`` (H, W) per image, default the
    ``orig_sizes``; when they differ, boxes are scaled and masks resized (bilinear, before thresholding) to
    the original size. Each result: ``{"image_id", "category_id", "bbox" XYWH, "score", "segmentation":
    {"size", "counts": str}}`` (the RLE of ``mask >= mask_threshold``; left out without ``masks`` in the
    output or with ``with_masks=False``)."""
    import pycocotools.mask as mask_util

    if not len(outputs) == len(image_ids) == len(orig_sizes):
        raise ValueError(f"{len(outputs)} outputs, {len(image_ids)} image ids, {len(orig_sizes)} sizes")
    if input_sizes is not None and len(input_sizes) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(input_sizes)} input sizes")
    results: list[dict] = []
    for i, out in enumerate(outputs):
        h0, w0 = (int(v) for v in orig_sizes[i])
        hi, wi = (int(v) for v in input_sizes[i]) if input_sizes is not None else (h0, w0)
        boxes = out["boxes"].detach().to("cpu", torch.float32).reshape(-1, 4)
        if (hi, wi) != (h0, w0):
            boxes = boxes * torch.tensor([w0 / wi, h0 / hi, w0 / wi, h0 / hi])
        labels = out["labels"].detach().cpu().reshape(-1).tolist()
        scores = out["scores"].detach().to("cpu", torch.float32).reshape(-1).tolist()
        if not len(labels) == len(scores) == boxes.shape[0]:
            raise ValueError(f"output {i}: {boxes.shape[0]} boxes, {len(labels)} labels, {len(scores)} scores")
        bad = [lb for lb in labels if not 1 <= lb <= len(categories)]
        if bad:
            raise ValueError(f"output {i}: labels {bad[:5]} outside 1..{len(categories)}")
        rles = None
        if with_masks and "masks" in out:
            masks = out["masks"].detach().to("cpu", torch.float32)
            masks = masks[:, 0] if masks.dim() == 4 else masks
            if masks.shape[0] != len(labels):
                raise ValueError(f"output {i}: {masks.shape[0]} masks for {len(labels)} boxes")
            if tuple(masks.shape[-2:]) != (hi, wi):
                raise ValueError(f"output {i}: masks are {tuple(masks.shape[-2:])} but the model's input was "
                                 f"{(hi, wi)} (pass input_sizes when the images were resized)")
            if (hi, wi) != (h0, w0) and masks.shape[0]:
                masks = F.interpolate(masks[:, None], size=(h0, w0), mode="bilinear", align_corners=False)[:, 0]
            binary = (masks >= mask_threshold).to(torch.uint8).numpy()
            rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(labels) else []
        xyxy = boxes.tolist()
        for k, (label, score) in enumerate(zip(labels, scores)):
            x0, y0, x1, y1 = xyxy[k]
            det = {"image_id": int(image_ids[i]), "category_id": int(categories[label - 1]),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            if rles is not None:
                det["segmentation"] = _rle_json(rles[k])
            results.append(det)
    return results


class CocoEvaluator(Evaluator):
    """COCO AP over an evaluation split: per image, the model's detections and the image's original
    annotations are kept; `summarize` runs `coco_metrics` over every image of every rank.

    Args:
        predict: ``(model, images) -> outputs``, torchvision Mask R-CNN style (one dict per image, in the
            coordinates of the images given).
        categories: COCO category dicts (``id``, ``name``) in label order (label ``k`` = ``categories[k-1]``).
        iou_types, per_class, area_scale: as `coco_metrics`.
        mask_threshold: mask binarisation threshold for ``segm``.

    Batches are ``(images, targets)`` from `vision.detection.data.collate_detection` of evaluation samples
    (``decode_coco_sample(train=False)``: ``target["coco"]``, ``image_id``, ``orig_size``). Records are plain
    Python (lists, dicts, RLE strings). Images are deduplicated by id in `summarize` (the first record is
    kept), so a batch processed twice (a rank repeating its last batch) does not count twice.
    """

    def __init__(self, predict: Callable[[nn.Module, list[torch.Tensor]], Sequence[Mapping[str, torch.Tensor]]],
                 categories: Sequence[Mapping[str, Any]], iou_types: Sequence[str] = IOU_TYPES,
                 per_class: bool = False, *, mask_threshold: float = 0.5, area_scale: float = 1.0) -> None:
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad:
            raise ValueError(f"iou_types: unknown {bad}, expected some of {list(IOU_TYPES)}")
        self.predict = predict
        self.categories = [dict(c) for c in categories]
        self.iou_types, self.per_class = tuple(iou_types), per_class
        self.mask_threshold, self.area_scale = mask_threshold, area_scale
        self._cat_ids = [int(c["id"]) for c in self.categories]
        self.records: list[dict] = []

    def reset(self) -> None:
        self.records = []

    def run(self, model: nn.Module, batch: Any) -> list[dict]:
        images, targets = batch
        outputs = self.predict(model, images)
        if len(outputs) != len(images):
            raise ValueError(f"predict returned {len(outputs)} outputs for {len(images)} images")
        ids = [int(t["image_id"]) for t in targets]
        orig = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        sizes = [tuple(int(v) for v in img.shape[-2:]) for img in images]
        dets = detections_from_outputs(outputs, ids, self._cat_ids, orig, sizes, self.mask_threshold,
                                       with_masks="segm" in self.iou_types)
        by_image: dict[int, list[dict]] = {i: [] for i in ids}
        for d in dets:
            by_image[d["image_id"]].append(d)
        records = []
        for image_id, (h, w), t in zip(ids, orig, targets):
            if "coco" not in t:
                raise ValueError("CocoEvaluator needs evaluation targets (decode_coco_sample(train=False) puts the "
                                 "original annotations in target['coco'])")
            records.append({"image_id": image_id, "height": h, "width": w,
                            "annotations": copy.deepcopy(list(t["coco"]["annotations"])),
                            "detections": by_image[image_id]})
        return records

    def process(self, batch: Any, outputs: list[dict]) -> None:
        self.records.extend(outputs)

    def state(self) -> list[dict]:
        return list(self.records)

    def merge(self, states: list) -> None:
        self.records = [r for s in states for r in s]

    def summarize(self) -> dict[str, float]:
        if not self.records:
            return {}
        unique: dict[int, dict] = {}
        for rec in self.records:
            unique.setdefault(int(rec["image_id"]), rec)
        recs = list(unique.values())
        detections = [d for r in recs for d in r["detections"]]
        return coco_metrics(recs, detections, self.categories, self.iou_types, self.per_class,
                            area_scale=self.area_scale)
