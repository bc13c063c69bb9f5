"""Semantic segmentation on image + label-map shards through the mmoe engine (``task: semantic_segmentation``).

Data: shards whose samples hold an image and ``seg.png``, a single-channel label map of class indices (0 =
background in the writers' convention, ``ignore_index`` = unlabelled), e.g. from ``mmoe shards segfolder
IMAGES LABELS OUT`` or ``mmoe shards coco-semantic ANNOTATIONS IMAGE_DIR OUT``. Class names come from the
training manifest's ``classes`` when it has them (kept in checkpoints for `SemanticSegmentationTask.predict`).

Model (``model:``, `SegmentationModelConfig`): the ViTDet-style ViT-MoE and its simple pyramid
(``model.backbone``, `vision.detection.backbone.BackboneConfig`) with detectron2's semantic FPN head
(`vision.detection.segmentation.SemanticSegmentor`); ``model.init`` starts the ViT from a classification
checkpoint (`load_backbone_weights`; ``model.upcycle: true`` copies its dense MLPs into the experts).

Options (``task_options``, `SegmentationOptions`):

=============  ===========================================================================================
image_size     side of the square training crop
scale_range    training scale: the shorter image side is resized to ``image_size * s``, ``s`` uniform in the
               range (mmseg's ratio range), then a random ``image_size`` crop (label padded with
               ``ignore_index``, image with zeros after normalisation, i.e. the mean colour), then a flip
hflip          horizontal flip probability
mean, std      normalisation of the 0-1 RGB image (ImageNet's by default)
layer_decay    ViTDet's layer-wise lr decay (`lr_decay_scales`, e.g. 0.7); None = off
ignore_index   label of unlabelled pixels (left out of the loss and the metrics)
per_class      report ``IoU-<class name>`` too
eval_size      evaluation: None = the original image; else its shorter side resized to this, the logits
               resized back to the label map (metrics at the label's resolution)
=============  ===========================================================================================

Augmentation draws only from a generator seeded by the sample's ``__seed__``, so a resumed run and any number
of loader workers see exactly an uninterrupted run's crops. Metrics: `ConfusionEvaluator` over the whole split
(mIoU over the classes with a non-empty union, pixel_acc, mean_acc, fwIoU, in percent; definitions in
`vision.detection.segmentation`), plus the per-pixel validation ``loss``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmoe.train.tasks import Task, TaskContext, register_task

from .backbone import BackboneConfig, build_backbone, load_backbone_weights, lr_decay_scales
from .segmentation import ConfusionEvaluator, SemanticSegmentor, SemSegFPNHead, confusion_matrix

__all__ = ["SegmentationModelConfig", "SegmentationOptions", "SemanticSegmentationTask", "palette"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SegmentationModelConfig:
    """The ``model:`` section of ``semantic_segmentation``."""

    num_classes: int  # K, background included (label values 0..K-1; ignore_index besides)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head_dim: int = 128  # conv_dims of the semantic FPN head
    norm: str = "GN"  # the head's norm: "GN" or "" (none)
    init: str | None = None  # classification checkpoint for the ViT (run / checkpoint folder, timm file)
    upcycle: bool = False  # copy the checkpoint's dense MLPs into the MoE blocks' experts

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= 255:
            raise ValueError(f"num_classes: must be in [1, 255] (8-bit label maps), got {self.num_classes}")
        if self.head_dim < 1:
            raise ValueError(f"head_dim: must be >= 1, got {self.head_dim}")
        if self.norm not in ("GN", ""):
            raise ValueError(f"norm: must be 'GN' or '' (none), got {self.norm!r}")
        if self.upcycle and not self.init:
            raise ValueError("upcycle: needs model.init, the checkpoint to upcycle")


@dataclass
class SegmentationOptions:
    image_size: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layer_decay: float | None = None
    ignore_index: int = 255
    per_class: bool = False
    eval_size: int | None = None

    def __post_init__(self) -> None:
        # "field: problem": the config loader reports it at that key's file:line
        if self.image_size < 1:
            raise ValueError(f"image_size: must be >= 1, got {self.image_size}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: must be 0 < low <= high, got {list(self.scale_range)}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip: must be a probability in [0, 1], got {self.hflip}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: must be positive, got {list(self.std)}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.ignore_index < 0:
            raise ValueError(f"ignore_index: must be >= 0, got {self.ignore_index}")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"eval_size: must be >= 1 or null (the original size), got {self.eval_size}")


def palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map: ``uint8 [n, 3]``, class 0 black, then distinct colours (128, 0, 0), (0, 128, 0),
    ... (fixed, so a class keeps its colour across runs and images)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def _resize_short(size: tuple[int, int], short: float) -> tuple[int, int]:
    """``(w, h)`` scaled so that the shorter side is ``short`` (at least 1 pixel a side)."""
    w, h = size
    f = short / min(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


@register_task("semantic_segmentation")
class SemanticSegmentationTask(Task):
    """Per-pixel classification of image + ``seg.png`` shards (module docstring)."""

    ModelConfig = SegmentationModelConfig
    Options = SegmentationOptions
    unit = "images"

    def __init__(self, model_cfg: SegmentationModelConfig, options: SegmentationOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self.options: SegmentationOptions
        self.classes: list[str] | None = None
        self._mean = torch.tensor(self.options.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.options.std, dtype=torch.float32).view(3, 1, 1)

    # ---------------------------------------------------------------- setup / model
    def setup(self, ctx: TaskContext) -> None:
        """Check the label values and read the class names of the training shards' manifest."""
        K, ignore = self.model_cfg.num_classes, self.options.ignore_index
        if ignore < K:
            raise ValueError(f"task_options.ignore_index: {ignore} is a class index (model.num_classes={K}); "
                             "use a value >= num_classes, e.g. 255")
        info = ctx.train_manifest.info if ctx.train_manifest is not None else {}
        classes = info.get("classes")
        if classes:
            if len(classes) != K:
                raise ValueError(f"model.num_classes={K} but the shards in {ctx.train_data} have {len(classes)} "
                                 f"classes ({', '.join(map(str, classes[:6]))}{' ...' if len(classes) > 6 else ''})")
            self.classes = [str(c) for c in classes]
        bad = [v for v in info.get("label_values") or [] if v >= K and v != ignore]
        if bad:
            raise ValueError(f"model.num_classes={K} but the label maps in {ctx.train_data} hold the values {bad} "
                             f"(task_options.ignore_index is {ignore})")

    def build_model(self) -> nn.Module:
        m = self.model_cfg
        backbone = build_backbone(m.backbone)
        n = len(backbone.stages)
        head = SemSegFPNHead(m.backbone.out_channels, backbone.strides[:n], m.num_classes, conv_dims=m.head_dim,
                             norm=m.norm, ignore_index=self.options.ignore_index)
        model = SemanticSegmentor(backbone, head)
        if m.init:
            load_backbone_weights(model.backbone.net, m.init, upcycle=m.upcycle)
        return model

    def lr_scales(self, model: nn.Module) -> dict[str, float] | None:
        return lr_decay_scales(model, self.options.layer_decay) if self.options.layer_decay else None

    # ---------------------------------------------------------------- data
    def _to_tensor(self, img) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self._mean) / self._std

    def _load(self, sample: dict):
        """The RGB image (PIL) and the label map (``uint8 [H, W]``) of a shard sample, checked."""
        from PIL import Image

        from mmoe.data import DataError, decode_image

        key, url = sample.get("__key__"), sample.get("__url__")
        where = f"sample {key!r} of shard {url}"
        img = decode_image(sample, mode="RGB")
        if "seg.png" not in sample:
            fields = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            raise DataError(f"{where}: no 'seg.png' label map (its fields: {fields})", url=url, key=key)
        with Image.open(io.BytesIO(sample["seg.png"])) as lab:
            lab.load()
            if lab.mode not in ("L", "P"):
                raise DataError(f"{where}: the label map has mode {lab.mode}, not L or P (class indices)",
                                url=url, key=key)
            label = np.array(lab, dtype=np.uint8)
        if label.shape != (img.height, img.width):
            raise DataError(f"{where}: label map {label.shape[1]}x{label.shape[0]} for an image {img.width}x"
                            f"{img.height}", url=url, key=key)
        K, ignore = self.model_cfg.num_classes, self.options.ignore_index
        bad = (label >= K) & (label != ignore)
        if bad.any():
            values = sorted(int(v) for v in np.unique(label[bad]))
            raise DataError(f"{where}: label values {values} outside [0, {K}) (model.num_classes; ignore_index "
                            f"{ignore})", url=url, key=key)
        return img, label

    def _train_example(self, img, label: np.ndarray, seed: int | None) -> dict:
        from PIL import Image

        o = self.options
        S = o.image_size
        rng = np.random.default_rng(None if seed is None else int(seed) % 2**64)
        lo, hi = o.scale_range
        scale = lo + (hi - lo) * rng.random()
        size = _resize_short(img.size, S * scale)
        img = img.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        w, h = size
        y0 = int(rng.integers(0, max(h - S, 0) + 1))
        x0 = int(rng.integers(0, max(w - S, 0) + 1))
        flip = bool(rng.random() < o.hflip)
        x = self._to_tensor(img)[:, y0:y0 + S, x0:x0 + S]
        y = torch.from_numpy(label[y0:y0 + S, x0:x0 + S].astype(np.int64))
        ph, pw = S - x.shape[1], S - x.shape[2]
        if ph or pw:  # smaller than the crop: pad right / bottom
            x = F.pad(x, (0, pw, 0, ph))
            y = F.pad(y, (0, pw, 0, ph), value=o.ignore_index)
        if flip:
            x, y = x.flip(-1), y.flip(-1)
        return {"image": x.contiguous(), "label": y.contiguous()}

    def _eval_image(self, img) -> torch.Tensor:
        from PIL import Image

        if self.options.eval_size is not None:
            img = img.resize(_resize_short(img.size, self.options.eval_size), Image.BILINEAR)
        return self._to_tensor(img)

    def decode(self, sample: dict) -> dict:
        """Training example: ``{"image": [3, S, S], "label": [S, S] int64}`` (random scale, crop, flip seeded by
        ``__seed__``)."""
        img, label = self._load(sample)
        return self._train_example(img, label, sample.get("__seed__"))

    def decode_eval(self, sample: dict) -> dict:
        """Evaluation example: the whole image (resized with ``eval_size``) and the label map at its own size."""
        img, label = self._load(sample)
        return {"image": self._eval_image(img), "label": torch.from_numpy(label.astype(np.int64))}

    def collate(self, examples: list) -> dict:
        """Stack; images of different sizes (evaluation) are padded right / bottom to the batch's largest, with
        zeros, and labels with ``ignore_index``. ``sizes`` [B, 4] holds each image's and label's ``h, w``.
        Note: a padded image's features see the padding through global attention, so its logits may differ
        slightly from those of the image alone; evaluate with ``data.eval_batch_size: 1`` or same-size images
        when that matters."""
        images = [e["image"] for e in examples]
        labels = [e["label"] for e in examples]
        sizes = torch.tensor([[*x.shape[-2:], *y.shape[-2:]] for x, y in zip(images, labels)], dtype=torch.int64)
        H, W = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        LH, LW = int(sizes[:, 2].max()), int(sizes[:, 3].max())
        x = torch.stack([F.pad(im, (0, W - im.shape[-1], 0, H - im.shape[-2])) for im in images])
        y = torch.stack([F.pad(lb, (0, LW - lb.shape[-1], 0, LH - lb.shape[-2]), value=self.options.ignore_index)
                         for lb in labels])
        return {"image": x, "label": y, "sizes": sizes}

    # ---------------------------------------------------------------- loss / metrics
    def loss(self, model, batch):
        x, y = batch["image"], batch["label"]
        logits = model(x).float()
        ignore = self.options.ignore_index
        valid = y != ignore
        n = int(valid.sum())
        loss = F.cross_entropy(logits, y, ignore_index=ignore, reduction="sum") / max(n, 1)
        with torch.no_grad():
            hit = (logits.argmax(1) == y) & valid
            scalars = {"pix_acc": float(hit.sum()) / max(n, 1)}
        return loss, scalars, int(x.shape[0])

    @torch.no_grad()
    def eval_step(self, model, batch) -> dict:
        """The summed confusion matrix, cross entropy and labelled pixel count of one batch."""
        x, y, sizes = batch["image"], batch["label"], batch["sizes"].tolist()
        K, ignore = self.model_cfg.num_classes, self.options.ignore_index
        logits = model(x).float()
        if all(s[:2] == s[2:] for s in sizes) and tuple(logits.shape[-2:]) == tuple(y.shape[-2:]):
            pairs = [(logits, y)]  # padding is labelled ignore_index: nothing to crop
        else:
            pairs = []
            for i, (h, w, lh, lw) in enumerate(sizes):
                lg = logits[i:i + 1, :, :h, :w]
                if (h, w) != (lh, lw):
                    lg = F.interpolate(lg, size=(lh, lw), mode="bilinear", align_corners=False)
                pairs.append((lg, y[i:i + 1, :lh, :lw]))
        cm = torch.zeros(K, K, dtype=torch.int64, device=logits.device)
        loss_sum, pixels = 0.0, 0
        for lg, t in pairs:
            cm += confusion_matrix(lg.argmax(1), t, K, ignore)
            loss_sum += float(F.cross_entropy(lg, t, ignore_index=ignore, reduction="sum"))
            pixels += int((t != ignore).sum())
        return {"cm": cm.cpu(), "loss_sum": loss_sum, "pixels": float(pixels)}

    def evaluator(self) -> ConfusionEvaluator:
        return ConfusionEvaluator(self.eval_step, self.model_cfg.num_classes, class_names=self.class_names,
                                  per_class=self.options.per_class)

    @property
    def class_names(self) -> list[str]:
        return self.classes or [str(c) for c in range(self.model_cfg.num_classes)]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"classes": self.classes}

    def load_state_dict(self, state: dict) -> None:
        if state.get("classes"):
            self.classes = list(state["classes"])

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, model: nn.Module, paths: list[str], out_dir: Path) -> list[dict]:
        """Segment image files: for each, ``out_dir/<stem>_seg.png`` (the classes in `palette` colours, background
        black, blended half and half over the image) and ``out_dir/<stem>_label.png`` (the class index map, mode
        L); a stem met before gets ``_1``, ``_2``, ... Returns per image ``{"image", "output" (the _seg.png),
        "label_map" (the _label.png), "classes_present": {class name: pixel fraction}}`` (classes predicted
        anywhere, by index). The model runs in eval mode on its own device (its mode is restored after)."""
        from PIL import Image

        from mmoe.data.decode import to_rgb

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = self.class_names
        colours = palette(256)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        results, used = [], set()
        try:
            for path in paths:
                path = Path(path)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no such image file")
                try:
                    with Image.open(path) as im:
                        img = to_rgb(im)
                except Exception as err:  # PIL raises many types for bad files
                    raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
                x = self._eval_image(img)[None].to(device)
                logits = model(x).float()
                if tuple(logits.shape[-2:]) != (img.height, img.width):
                    logits = F.interpolate(logits, size=(img.height, img.width), mode="bilinear", align_corners=False)
                pred = logits[0].argmax(0).to("cpu", torch.uint8).numpy()
                stem, n = path.stem, 0
                while stem in used:
                    n += 1
                    stem = f"{path.stem}_{n}"
                used.add(stem)
                seg_file, label_file = out_dir / f"{stem}_seg.png", out_dir / f"{stem}_label.png"
                Image.fromarray(pred).save(label_file, format="PNG")
                blend = (0.5 * np.asarray(img, dtype=np.float32) + 0.5 * colours[pred]).round().astype(np.uint8)
                Image.fromarray(blend).save(seg_file, format="PNG")
                counts = np.bincount(pred.ravel(), minlength=len(names))
                total = float(pred.size)
                present = {names[c]: float(counts[c]) / total for c in range(len(names)) if counts[c]}
                results.append({"image": str(path), "output": str(seg_file), "label_map": str(label_file),
                                "classes_present": present})
        finally:
            model.train(was_training)
        return results
