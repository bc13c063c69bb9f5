"""A generated detection / segmentation data set: coloured shapes on a textured background.

`shapes_det_sample` draws one image as a pure function of ``(seed, index)``: up to ``max_instances``
shapes of four classes (``CATEGORIES``: square, circle, triangle, cross) in random colours, scales spread
log-uniformly over ``scale_range`` (fractions of the image side, so that every COCO size bucket occurs,
see `size_bucket`), placed anywhere (partly outside the image too) and drawn in order, later shapes over
earlier ones. The background is a seeded texture (stripes of random orientation, period and colours plus
per-pixel noise). Per instance the sample gives the exact **visible** mask (what is left after the
shapes drawn later), its tight box ``[x, y, w, h]``, its area (visible pixel count), the category id and
``iscrowd = 0``; it also gives the semantic label map (0 = background, class ids 1..C). Visible masks
never overlap, so the label map is exactly the union of the instance masks by class.

Dropped instances: one whose visible area is below ``min_visible_area`` pixels (fully or nearly
occluded, or almost entirely outside the image) is left out of the annotations *and* of the label map;
its pixels stay painted (to a detector it is background clutter, as an unannotated object is in COCO).

Empty images: every image with ``index % empty_every == empty_every - 1`` (indices 19, 39, ... with the
default 20) holds no shape at all, so any set of at least ``empty_every`` images has an empty one, as
detection code must handle; ``empty_every=0`` turns that off. (An image could in principle also end up
empty because all its shapes were dropped; that is rare.)

`write_shapes_det` writes a COCO-format folder (PNG images, PNG label maps, ``instances_train.json`` /
``instances_val.json`` with RLE segmentations from ``pycocotools.mask.encode``) and shards it through the
same `mmoe.data.write_coco` writer that real COCO folders go through (``mmoe shards shapes-det OUT``).

Randomness comes from ``random.Random`` seeded with a string (stable across Python versions; only its
``random()`` is used) and, for the per-pixel noise, from the raw output of numpy's PCG64 bit generator
(a fixed algorithm), so the same arguments give the same pixels; output files are byte-identical for
the same arguments and library versions.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CATEGORIES", "DetSample", "shapes_det_sample", "size_bucket", "write_shapes_det",
           "shapes_cls_sample", "write_shapes_cls", "SMALL_AREA", "MEDIUM_AREA"]

CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
]
_NAMES = [c["name"] for c in CATEGORIES]

# COCO's size buckets (areas in pixels of images about 640 pixels wide): small < 32**2 <= medium < 96**2
SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2
_COCO_SIDE = 640


def size_bucket(area: float, img_size: int) -> str:
    """``"small"``, ``"medium"`` or ``"large"``: COCO's area buckets (32**2, 96**2 pixels at about 640
    pixels a side) scaled to an ``img_size`` image, i.e. the bucket the object would fall in if the
    image were resized to 640 a side."""
    scaled = area * (_COCO_SIDE / img_size) ** 2
    return "small" if scaled < SMALL_AREA else "medium" if scaled < MEDIUM_AREA else "large"


@dataclass
class DetSample:
    """One generated image.

    Attributes:
        image: ``uint8 [H, W, 3]`` RGB.
        semantic: ``uint8 [H, W]`` label map, 0 = background, category ids 1..C.
        instances: kept instances in drawing order, each ``{"category_id", "mask" (bool [H, W], visible
            pixels), "bbox" ([x, y, w, h] ints, tight around the mask), "area" (int, mask sum),
            "iscrowd" (0), "drawn_area" (pixels of the whole shape inside the image, before occlusion),
            "order" (its place among all shapes drawn)}``.
        dropped: number of drawn shapes left out (visible area below ``min_visible_area``).
    """

    image: np.ndarray
    semantic: np.ndarray
    instances: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0


def _shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square / triangle / cross of circumradius-like size ``r`` rotated by ``angle``."""
    if name == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r / math.sqrt(2), y * r / math.sqrt(2)) for x, y in pts]
    elif name == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: arms of half-width r/3
        a, b = r / 3, r
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
               (-b, -a), (-a, -a)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _shape_mask(name: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """The shape's full mask, ``bool [size, size]`` (PIL rasterisation, no anti-aliasing)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_shape_polygon(name, cx, cy, r, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: random.Random, size: int) -> np.ndarray:
    """Stripes of a random orientation, period and two colours, plus per-pixel noise: ``uint8 [H, W, 3]``."""
    c1 = np.array([40 + 120 * rng.random() for _ in range(3)])
    c2 = np.array([40 + 120 * rng.random() for _ in range(3)])
    theta, period = math.pi * rng.random(), size * (0.05 + 0.2 * rng.random())
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
    t = (0.5 + 0.5 * np.sin(2 * math.pi * phase))[..., None]
    base = c1 * (1 - t) + c2 * t
    noise_seed = int(rng.random() * 2 ** 53)
    raw = np.random.PCG64(noise_seed).random_raw(math.ceil(size * size * 3 / 8)).astype("<u8")
    noise = raw.view(np.uint8)[: size * size * 3].reshape(size, size, 3).astype(np.float64)
    return np.clip(base + (noise - 127.5) * (40 / 255), 0, 255).astype(np.uint8)


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def shapes_det_sample(index: int, seed: int = 0, img_size: int = 128, *, max_instances: int = 8,
                      scale_range: tuple[float, float] = (0.025, 0.3), min_visible_area: int = 10,
                      empty_every: int = 20) -> DetSample:
    """The image ``index`` of the set ``seed`` (a pure function of its arguments); see the module doc.

    Args:
        index, seed: which image.
        img_size: side of the square image in pixels (>= 16).
        max_instances: each non-empty image draws 1..``max_instances`` shapes (uniform).
        scale_range: the shape size ``r`` (half its extent) is log-uniform in this range, as fractions
            of ``img_size``; the default covers COCO's small, medium and large buckets (`size_bucket`).
        min_visible_area: shapes with fewer visible pixels are dropped (not annotated).
        empty_every: images with ``index % empty_every == empty_every - 1`` are empty (0: none are).
    """
    if img_size < 16:
        raise ValueError(f"img_size must be >= 16, got {img_size}")
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
    rng = random.Random(f"mmoe-shapes-det/{seed}/{index}")
    image = _background(rng, img_size)
    empty = empty_every > 0 and index % empty_every == empty_every - 1
    n = 0 if empty else 1 + min(int(rng.random() * max_instances), max_instances - 1)
    owner = np.full((img_size, img_size), -1, dtype=np.int32)
    drawn = []
    for k in range(n):
        name = _NAMES[min(int(rng.random() * len(_NAMES)), len(_NAMES) - 1)]
        r = img_size * lo * (hi / lo) ** rng.random()
        cx, cy = img_size * (1.1 * rng.random() - 0.05), img_size * (1.1 * rng.random() - 0.05)
        angle = 2 * math.pi * rng.random()
        color = np.array([int(256 * rng.random()) for _ in range(3)], dtype=np.uint8)
        mask = _shape_mask(name, cx, cy, r, angle, img_size)
        image[mask] = color
        owner[mask] = k
        drawn.append((_NAMES.index(name) + 1, int(mask.sum())))
    semantic = np.zeros((img_size, img_size), dtype=np.uint8)
    instances, dropped = [], 0
    for k, (category_id, drawn_area) in enumerate(drawn):
        visible = owner == k
        area = int(visible.sum())
        if area < max(1, min_visible_area):
            dropped += 1
            continue
        semantic[visible] = category_id
        instances.append({"category_id": category_id, "mask": visible, "bbox": _bbox(visible), "area": area,
                          "iscrowd": 0, "drawn_area": drawn_area, "order": k})
    return DetSample(image=image, semantic=semantic, instances=instances, dropped=dropped)


def _png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG", optimize=False)


def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


_OWN_PNG = re.compile(r"^\d{6,}\.png$")


def write_shapes_det(out_dir: str | os.PathLike, *, num_images: int = 1000, seed: int = 0, img_size: int = 128,
                     val_fraction: float = 0.2, max_instances: int = 8,
                     scale_range: tuple[float, float] = (0.025, 0.3), min_visible_area: int = 10,
                     empty_every: int = 20, **write_shards_kwargs):
    """Generate ``num_images`` images (`shapes_det_sample`) as a COCO folder and shard it.

    Layout of ``out_dir``::

        coco/images/000000.png ...        RGB images (image id = index + 1)
        coco/semantic/000000.png ...      label maps, mode "L", 0 = background, 1..C = CATEGORIES ids
        coco/annotations/instances_train.json, instances_val.json   COCO, RLE segmentation, iscrowd 0
        coco/annotations/instances_all.json   both splits: the file the shards are written from
        manifest.json, train-*.tar, val-*.tar  shards by `mmoe.data.write_coco`

    The split of an image is `mmoe.data.writers.split_for_key` of its shard key (the file stem) with
    ``val_fraction``, the rule `write_shards` applies, so the json files and the shard splits hold the
    same images. Annotation ids run from 1 over the whole set. The manifest's ``info`` holds the
    categories and counts (from `CocoSource`) plus ``generator`` (these arguments) and ``dropped`` (shapes
    left out for ``min_visible_area``). The same arguments give byte-identical files. Rewriting a folder
    removes the images and label maps of a previous write first. ``write_shards_kwargs`` go to
    `write_shards` (``samples_per_shard``, ``max_shard_bytes``, ``progress``). Returns the `Manifest`.
    """
    import pycocotools.mask as mask_util

    from mmoe.data import write_coco
    from mmoe.data.writers import make_key, split_for_key

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    coco = out / "coco"
    image_dir, sem_dir, ann_dir = coco / "images", coco / "semantic", coco / "annotations"
    for folder in (image_dir, sem_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.is_file() and _OWN_PNG.match(old.name):
                old.unlink()
    ann_dir.mkdir(parents=True, exist_ok=True)

    splits: dict[str, dict[str, list]] = {"train": {"images": [], "annotations": []},
                                          "val": {"images": [], "annotations": []}}
    ann_id, dropped = 1, 0
    for index in range(num_images):
        sample = shapes_det_sample(index, seed, img_size, max_instances=max_instances, scale_range=scale_range,
                                   min_visible_area=min_visible_area, empty_every=empty_every)
        stem = f"{index:06d}"
        _png(sample.image, image_dir / f"{stem}.png")
        _png(sample.semantic, sem_dir / f"{stem}.png")
        image_id = index + 1
        split = split_for_key(make_key(stem), val_fraction) if val_fraction > 0 else "train"
        splits[split]["images"].append({"id": image_id, "file_name": f"{stem}.png", "width": img_size,
                                        "height": img_size, "sem_seg_file_name": f"{stem}.png"})
        for inst in sample.instances:
            rle = mask_util.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
            splits[split]["annotations"].append({
                "id": ann_id, "image_id": image_id, "category_id": inst["category_id"],
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": inst["area"], "bbox": inst["bbox"], "iscrowd": 0})
            ann_id += 1
        dropped += sample.dropped

    generator = {"name": "shapes-det", "num_images": num_images, "seed": seed, "img_size": img_size,
                 "val_fraction": val_fraction, "max_instances": max_instances,
                 "scale_range": list(scale_range), "min_visible_area": min_visible_area,
                 "empty_every": empty_every}
    info = {"description": "mmoe generated shapes detection set", "generator": generator}
    for name, part in splits.items():
        _dump({"info": info, "images": part["images"], "annotations": part["annotations"],
               "categories": CATEGORIES}, ann_dir / f"instances_{name}.json")
    every = {"info": info, "categories": CATEGORIES,
             "images": sorted(splits["train"]["images"] + splits["val"]["images"], key=lambda i: i["id"]),
             "annotations": sorted(splits["train"]["annotations"] + splits["val"]["annotations"],
                                   key=lambda a: a["id"])}
    _dump(every, ann_dir / "instances_all.json")
    extra = {"generator": generator, "dropped": dropped, "semantic_dir": "coco/semantic",
             "num_classes": len(CATEGORIES)}
    extra.update(write_shards_kwargs.pop("extra_manifest", None) or {})
    if val_fraction == 0:  # one split, named "train" like the json file (write_shards would say "shard")
        write_shards_kwargs.setdefault("prefix", "train")
    return write_coco(ann_dir / "instances_all.json", image_dir, out, val_fraction=val_fraction,
                      extra_manifest=extra, **write_shards_kwargs)


# ---------------------------------------------------------------------------------------- classification
def shapes_cls_sample(index: int, seed: int = 0, img_size: int = 64, *, max_shapes: int = 3,
                      scale_range: tuple[float, float] = (0.22, 0.38), distractor_range: tuple[float, float] = (0.06, 0.14),
                      dominance: float = 1.5) -> tuple[np.ndarray, int]:
    """A classification image of the shapes world, labelled with the class (0..3, ``CATEGORIES`` order) of
    its **largest visible shape**: one large shape (size ``r`` log-uniform in ``scale_range`` of the side,
    wholly inside the image) and 0..``max_shapes - 1`` smaller distractors of any class
    (``distractor_range``, drawn after it, so they may occlude it a little), on the detection set's
    textured backgrounds and in its random colours. An image whose largest visible shape is not at least
    ``dominance`` times the second is redrawn (deterministically), so the label is never a near tie. A pure
    function of its arguments (its own seeds: never an image of the detection set); returns
    ``(uint8 [H, W, 3], label)``.

    The task shares its visual world with the detection set (classes, textures, colours) without sharing
    images: the setting of AdaMV-MoE's classification + detection training on one backbone.
    """
    if img_size < 16:
        raise ValueError(f"img_size must be >= 16, got {img_size}")
    if max_shapes < 1 or dominance < 1:
        raise ValueError(f"max_shapes must be >= 1 and dominance >= 1, got {max_shapes}, {dominance}")
    for attempt in range(64):
        rng = random.Random(f"mmoe-shapes-cls/{seed}/{index}/{attempt}")
        image = _background(rng, img_size)
        owner = np.full((img_size, img_size), -1, dtype=np.int32)
        n = 1 + min(int(rng.random() * max_shapes), max_shapes - 1)
        classes = []
        for k in range(n):
            lo, hi = scale_range if k == 0 else distractor_range
            r = img_size * lo * (hi / lo) ** rng.random()
            margin = r if k == 0 else 0.0
            cx = margin + (img_size - 2 * margin) * rng.random()
            cy = margin + (img_size - 2 * margin) * rng.random()
            name = _NAMES[min(int(rng.random() * len(_NAMES)), len(_NAMES) - 1)]
            color = np.array([int(256 * rng.random()) for _ in range(3)], dtype=np.uint8)
            mask = _shape_mask(name, cx, cy, r, 2 * math.pi * rng.random(), img_size)
            image[mask] = color
            owner[mask] = k
            classes.append(_NAMES.index(name))
        areas = sorted(((int((owner == k).sum()), classes[k]) for k in range(n)), reverse=True)
        if areas[0][0] > 0 and (n == 1 or areas[0][0] >= dominance * areas[1][0]):
            return image, areas[0][1]
    raise RuntimeError(f"shapes_cls_sample: no unambiguous image for index {index} in 64 draws")


def write_shapes_cls(out_dir: str | os.PathLike, *, num_images: int = 2000, seed: int = 0, img_size: int = 64,
                     val_fraction: float = 0.2, max_shapes: int = 3, **write_shards_kwargs):
    """Generate ``num_images`` classification images (`shapes_cls_sample`) as image-classification shards
    (``png`` + ``cls`` + ``json`` ``{"label"}``, the layout of ``mmoe shards imagefolder``) with
    ``train`` / ``val`` splits by key hash. The manifest's ``info`` holds ``classes`` (the four shape
    names), ``class_counts`` and ``generator`` (these arguments). Byte-identical for the same arguments."""
    import io

    from PIL import Image

    from mmoe.data import write_shards

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    counts = {n: 0 for n in _NAMES}

    def samples():
        for index in range(num_images):
            image, label = shapes_cls_sample(index, seed, img_size, max_shapes=max_shapes)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG", optimize=False)
            counts[_NAMES[label]] += 1
            yield {"__key__": f"{index:06d}", "png": buf.getvalue(), "cls": label,
                   "json": {"label": _NAMES[label]}}

    generator = {"name": "shapes-cls", "num_images": num_images, "seed": seed, "img_size": img_size,
                 "val_fraction": val_fraction, "max_shapes": max_shapes}
    return write_shards(samples(), out_dir, val_fraction=val_fraction, source={"type": "shapes-cls", "options": generator},
                        extra_manifest={"classes": list(_NAMES), "class_counts": counts, "generator": generator},
                        **write_shards_kwargs)
