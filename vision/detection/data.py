"""COCO-format detection samples -> torchvision Mask R-CNN inputs, with ViTDet's large-scale jitter.

A shard sample (from `mmoe.data.write_coco` / `CocoSource`, e.g. ``mmoe shards shapes-det``) holds the image
bytes and ``json`` = ``{"image": <COCO image entry>, "annotations": [{"id", "bbox" XYWH, "category_id",
"segmentation", "area", "iscrowd"}, ...]}``. `decode_coco_sample` turns it into what torchvision's
``MaskRCNN`` takes:

* ``image``: ``float32 [3, H, W]`` RGB in 0..1 (the model's ``GeneralizedRCNNTransform`` normalises,
  resizes and pads);
* ``target``: ``{"boxes": float32 [N, 4] XYXY pixels, "labels": int64 [N] in 1..K (0 is torchvision's
  background), "masks": uint8 [N, H, W], "iscrowd": int64 [N], "area": float32 [N], "image_id": int (the
  COCO id), "orig_size": (H0, W0)}``; evaluation targets also carry ``"coco"`` = ``{"image", "annotations"}``
  (the sample's own COCO entries, untouched, for `vision.detection.coco_eval.CocoEvaluator`).

Segmentations may be polygons (a list of ``[x0, y0, x1, y1, ...]``), uncompressed RLE (``counts`` a list,
COCO's crowd annotations) or compressed RLE (``counts`` a string); they are decoded with
``pycocotools.mask``. An annotation without a segmentation gets its box as the mask.

Training (``train=True``) applies large-scale jitter as ViTDet trains with it (detectron2's ``RandomFlip``,
``ResizeScale``, ``FixedSizeCrop(pad=True)``), see `DetAugment`:

1. horizontal flip with probability ``hflip``;
2. resize keeping the aspect ratio by ``s * image_size / max(H, W)`` with ``s ~ U(scale_range)`` (image
   bilinear with antialiasing, masks nearest-neighbour by index gathering, the same pixels
   ``F.interpolate(mode="nearest-exact")`` picks);
3. a random ``image_size`` x ``image_size`` crop where the resized image is larger (each axis its own
   uniform offset), then zero padding at the bottom / right to ``image_size`` x ``image_size``.

Boxes are then recomputed as the tight boxes of the transformed masks (detectron2's ``recompute_boxes``),
``area`` is the mask's pixel count, and instances whose mask became empty or whose box is narrower or
lower than ``min_box_size`` are dropped. Crowd annotations stay in the target with ``iscrowd = 1`` (the
loss must leave them out; COCOeval ignores detections on them). All randomness comes from a
``random.Random(seed)``: a decode is a pure function of ``(sample, seed)``; the task passes the sample's
``__seed__``, so augmentation is the same across resume and any number of workers.

Evaluation (``train=False``) applies no transform at all: the image keeps its original size (torchvision's
``MaskRCNN`` resizes it internally to ``min_size``/``max_size`` and maps its outputs back to the size it
was given), the boxes are the annotations' boxes and nothing is dropped.

Images without instances give empty tensors of the right shapes (``[0, 4]``, ``[0]``, ``[0, H, W]``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DetAugment", "decode_coco_sample", "collate_detection", "segmentation_to_rle", "masks_to_boxes"]


@dataclass
class DetAugment:
    """Large-scale jitter of a training sample (ViTDet's LSJ; see the module docstring).

    Attributes:
        hflip: probability of a horizontal flip.
        scale_range: ``(low, high)`` of the uniform jitter ``s``; the image is resized by
            ``s * image_size / max(H, W)``.
        image_size: side of the square crop / padded output.
        min_box_size: instances whose box after the crop is smaller than this on a side are dropped (those
            with an empty mask always are).
    """

    hflip: float = 0.5
    scale_range: tuple[float, float] = (0.1, 2.0)
    image_size: int = 1024
    min_box_size: float = 1.0

    def __post_init__(self) -> None:
        # "field: problem": the config loader reports it at that key's file:line
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip: must be in [0, 1], got {self.hflip}")
        try:
            lo, hi = (float(v) for v in self.scale_range)
        except (TypeError, ValueError):
            raise ValueError(f"scale_range: must be two numbers (low, high), got {self.scale_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"scale_range: must be 0 < low <= high, got {self.scale_range!r}")
        self.scale_range = (lo, hi)
        if isinstance(self.image_size, bool) or int(self.image_size) != self.image_size or self.image_size < 1:
            raise ValueError(f"image_size: must be a positive integer, got {self.image_size!r}")
        self.image_size = int(self.image_size)
        if not (math.isfinite(self.min_box_size) and self.min_box_size >= 0):
            raise ValueError(f"min_box_size: must be >= 0, got {self.min_box_size}")


# ---------------------------------------------------------------------------------------------- helpers
def _data_error(sample: Mapping[str, Any], message: str):
    from mmoe.data import DataError

    key, url = sample.get("__key__"), sample.get("__url__")
    return DataError(f"sample {key!r} of shard {url}: {message}", url=url, key=key)


def segmentation_to_rle(segmentation: Any, height: int, width: int, bbox: Sequence[float] | None = None) -> dict:
    """One COCO segmentation as a compressed RLE (``{"size": [h, w], "counts": bytes}``).

    Polygons (a list of ``[x0, y0, x1, y1, ...]``; those with fewer than three points are left out) are
    rasterised and merged, uncompressed RLE (``counts`` a list) is compressed, compressed RLE (``counts`` a
    string or bytes) is passed through. A missing or empty segmentation gives the ``bbox`` (XYWH) as a
    rectangle, or an empty mask without one. `ValueError` when an RLE's size is not ``[height, width]``."""
    import pycocotools.mask as mask_util

    if isinstance(segmentation, Mapping) and "counts" in segmentation:
        size = [int(s) for s in segmentation.get("size", ())]
        if size != [height, width]:
            raise ValueError(f"RLE segmentation of size {size} on an image of {height}x{width}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_util.frPyObjects({"size": size, "counts": counts}, height, width)
        return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}
    polygons = []
    if isinstance(segmentation, list):
        polygons = [[float(v) for v in p] for p in segmentation if isinstance(p, (list, tuple)) and len(p) >= 6]
    if not polygons and not segmentation and bbox is not None and len(bbox) == 4:
        x, y, w, h = (float(v) for v in bbox)
        polygons = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    if not polygons:
        return mask_util.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    return mask_util.merge(mask_util.frPyObjects(polygons, height, width))


def _decode_rles(rles: list[dict], height: int, width: int) -> Tensor:
    import pycocotools.mask as mask_util

    if not rles:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(mask_util.decode(rles).transpose(2, 0, 1)))


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight XYXY boxes of ``[N, H, W]`` masks in pixel-edge coordinates (a mask covering the columns
    ``x0..x1`` gives ``x0`` and ``x1 + 1``, as COCO's ``w`` counts pixels); empty masks give zeros."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(dim=2).to(torch.uint8), masks.any(dim=1).to(torch.uint8)  # [N, H], [N, W]
    y0, x0 = rows.argmax(dim=1), cols.argmax(dim=1)  # first True (argmax returns the first maximum)
    y1, x1 = h - rows.flip(1).argmax(dim=1), w - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    boxes[rows.sum(dim=1) == 0] = 0.0
    return boxes


def _nearest_index(size_in: int, size_out: int) -> Tensor:
    """Source index of each output pixel of a nearest-neighbour resize (pixel centres, as ``nearest-exact``)."""
    idx = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out)).floor().long()
    return idx.clamp_(max=size_in - 1)


def _lsj(image: Tensor, masks: Tensor, aug: DetAugment, rng: random.Random) -> tuple[Tensor, Tensor]:
    """Flip, ResizeScale and FixedSizeCrop(pad) of the image ``[3, H, W]`` and its masks ``[N, H, W]``."""
    # always the same four draws, in this order
    flip = rng.random() < aug.hflip
    jitter = rng.uniform(*aug.scale_range)
    u_y, u_x = rng.random(), rng.random()

    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
    _, h, w = image.shape
    size = aug.image_size
    scale = jitter * size / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    ch, cw = min(nh, size), min(nw, size)
    y0, x0 = int(round(u_y * (nh - ch))), int(round(u_x * (nw - cw)))

    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp_(0.0, 1.0)
    out_image = image.new_zeros((3, size, size))
    out_image[:, :ch, :cw] = image[:, y0:y0 + ch, x0:x0 + cw]

    # nearest resize + crop of the masks in one gather: only the kept pixels are ever materialised
    rows = _nearest_index(h, nh)[y0:y0 + ch]
    cols = _nearest_index(w, nw)[x0:x0 + cw]
    out_masks = masks.new_zeros((masks.shape[0], size, size))
    # columns, then rows: about 4x faster than masks[:, rows][:, :, cols]
    out_masks[:, :ch, :cw] = masks.index_select(2, cols).index_select(1, rows)
    return out_image, out_masks


# ---------------------------------------------------------------------------------------------- decode
def _read_json(sample: Mapping[str, Any]) -> dict:
    if "json" not in sample:
        fields = ", ".join(sorted(k for k in sample if not k.startswith("__")))
        raise _data_error(sample, f"no json field (fields: {fields})")
    raw = sample["json"]
    meta = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
    if not isinstance(meta, Mapping) or not isinstance(meta.get("image"), Mapping):
        raise _data_error(sample, "json is not {\"image\": {...}, \"annotations\": [...]} (a CocoSource sample)")
    return dict(meta)


def decode_coco_sample(sample: Mapping[str, Any], *, categories: Sequence[int], train: bool,
                       aug: DetAugment | None = None, seed: int | None = None) -> tuple[Tensor, dict[str, Any]]:
    """One COCO shard sample as ``(image, target)`` for torchvision's Mask R-CNN (see the module docstring).

    Args:
        sample: the raw sample (image bytes field, ``json`` bytes or the parsed dict, ``__key__``/``__url__``).
        categories: COCO category ids in label order: ``categories[k]`` gets label ``k + 1``. An annotation
            with another id is a `mmoe.data.DataError` naming the shard and key.
        train: apply `DetAugment` (large-scale jitter) and drop instances left empty; False: the image at its
            original size, every annotation, plus ``target["coco"]`` (the original image entry and
            annotations, for COCO evaluation).
        aug: the training augmentation (None: ``DetAugment()``); unused when ``train`` is False.
        seed: seed of the augmentation (the sample's ``__seed__``); None draws from a fresh unseeded RNG.
    """
    from mmoe.data import decode_image

    meta = _read_json(sample)
    entry, anns = meta["image"], list(meta.get("annotations") or [])
    try:
        pil = decode_image(sample, mode="RGB")
    except KeyError as err:
        raise _data_error(sample, str(err.args[0]) if err.args else "no image field") from None
    w0, h0 = pil.size
    if ("width" in entry and int(entry["width"]) != w0) or ("height" in entry and int(entry["height"]) != h0):
        raise _data_error(sample, f"image is {w0}x{h0} (WxH) but its COCO entry says "
                                  f"{entry.get('width')}x{entry.get('height')}")
    image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)

    label_of = {int(c): k + 1 for k, c in enumerate(categories)}
    labels, crowd, areas, boxes, rles = [], [], [], [], []
    for i, ann in enumerate(anns):
        cid = ann.get("category_id")
        if cid not in label_of:
            raise _data_error(sample, f"annotation {ann.get('id', i)!r} has category_id {cid!r}, not one of the "
                                      f"task's categories {list(label_of)}")
        try:
            rles.append(segmentation_to_rle(ann.get("segmentation"), h0, w0, ann.get("bbox")))
        except ValueError as err:
            raise _data_error(sample, f"annotation {ann.get('id', i)!r}: {err}") from None
        labels.append(label_of[cid])
        crowd.append(int(ann.get("iscrowd") or 0))
        areas.append(ann.get("area"))
        boxes.append(ann.get("bbox"))
    masks = _decode_rles(rles, h0, w0)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    crowd_t = torch.tensor(crowd, dtype=torch.int64)
    target: dict[str, Any] = {"image_id": int(entry["id"]) if "id" in entry else None, "orig_size": (h0, w0)}

    if train:
        aug = aug if aug is not None else DetAugment()
        rng = random.Random(seed) if seed is not None else random.Random()
        image, masks = _lsj(image, masks, aug, rng)
        box_t = masks_to_boxes(masks)
        area_t = masks.sum(dim=(1, 2), dtype=torch.int32).to(torch.float32)  # int32 sums: far faster than int64
        side = torch.minimum(box_t[:, 2] - box_t[:, 0], box_t[:, 3] - box_t[:, 1])
        keep = (area_t > 0) & (side >= aug.min_box_size)
        masks, box_t, labels_t, crowd_t, area_t = (masks[keep], box_t[keep], labels_t[keep], crowd_t[keep],
                                                   area_t[keep])
    else:
        mask_boxes = masks_to_boxes(masks)
        box_rows = []
        for k, bbox in enumerate(boxes):
            if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
                x, y, w, h = (float(v) for v in bbox)
                box_rows.append([x, y, x + w, y + h])
            else:
                box_rows.append(mask_boxes[k].tolist())
        box_t = torch.tensor(box_rows, dtype=torch.float32).reshape(-1, 4)
        mask_area = masks.sum(dim=(1, 2), dtype=torch.int32).tolist()
        area_t = torch.tensor([float(a) if a is not None else float(m) for a, m in zip(areas, mask_area)],
                              dtype=torch.float32)
        target["coco"] = {"image": dict(entry), "annotations": anns}
    target.update(boxes=box_t, labels=labels_t, masks=masks, iscrowd=crowd_t, area=area_t)
    return image, target


def collate_detection(examples: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """A batch of ``(image, target)`` pairs as ``(images, targets)`` lists (images may differ in size)."""
    return [image for image, _ in examples], [target for _, target in examples]
