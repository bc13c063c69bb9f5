"""Semantic segmentation on the ViTDet-style ViT-MoE pyramid (pure torch; dense-vision.md §4).

`SemSegFPNHead` is detectron2's ``SemSegFPNHead``: every pyramid level goes through
``max(1, log2(stride / common_stride))`` blocks of 3x3 conv + GroupNorm + ReLU, each followed by a 2x
bilinear upsampling while the level is coarser than ``common_stride``; the levels are summed, a 1x1 conv
predicts the classes and the logits are upsampled by ``common_stride`` to the (padded) input size.

`SemanticSegmentor` puts it on a `SimpleFeaturePyramid`: ``forward(images, task=None)`` takes normalised
``[B, 3, H, W]`` images of any size; the backbone pads them on the right and bottom to its
``size_divisibility`` (never crops), and the logits are cropped back to ``[B, K, H, W]``. Only the levels of
the pyramid's ``scale_factors`` are used (p2..p5 for patch 16), not the extra RPN level.

Metrics (`confusion_matrix`, `segmentation_metrics`, `ConfusionEvaluator`) are computed from one confusion
matrix summed over the whole split (never averaged per image), pixels labelled ``ignore_index`` left out.
With ``tp, gt, pred`` the diagonal, row sums and column sums of the matrix (rows = ground truth):

* ``IoU_c = tp_c / (gt_c + pred_c - tp_c)``; **mIoU is the mean over the classes whose union
  ``gt_c + pred_c - tp_c`` is non-empty** (mmseg's ``nanmean``): a class absent from both the ground truth
  and the predictions of the split is left out; a class that is only predicted counts with IoU 0.
  (detectron2's ``SemSegEvaluator`` averages over the classes present in the ground truth instead.)
* ``pixel_acc = sum tp / sum gt``; ``mean_acc`` = the mean of ``tp_c / gt_c`` over classes with ``gt_c > 0``;
  ``fwIoU = sum_c (gt_c / sum gt) * IoU_c``.
* All in percent (x100, as detectron2 reports them); ``IoU-<name>`` per class on request.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.train.tasks import Evaluator

from .backbone import SimpleFeaturePyramid

__all__ = ["SemSegFPNHead", "SemanticSegmentor", "confusion_matrix", "segmentation_metrics", "ConfusionEvaluator"]


def _c2_msra_fill(conv: nn.Conv2d) -> None:
    """detectron2's ``c2_msra_fill``: Kaiming normal (fan_out, ReLU), zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class SemSegFPNHead(nn.Module):
    """detectron2's semantic FPN head (module docstring).

    Args:
        in_channels: channels of every level (an int), or one per level.
        strides: the levels' strides, finest first (e.g. ``[4, 8, 16, 32]``).
        num_classes: K, background included.
        conv_dims: channels of the per-level convs.
        common_stride: the stride the levels are brought to before summing; None = the finest stride (4 for
            ViTDet's patch-16 pyramid, detectron2's default). It must not exceed the finest stride.
        norm: ``"GN"`` (GroupNorm of ``gcd(32, conv_dims)`` groups, 32 as detectron2 whenever it divides) or
            ``""`` (none; the convs then have biases).
        ignore_index: the label of pixels `loss` leaves out.
    """

    def __init__(self, in_channels: int | Sequence[int], strides: Sequence[int], num_classes: int,
                 conv_dims: int = 128, common_stride: int | None = None, norm: str = "GN",
                 ignore_index: int = 255) -> None:
        super().__init__()
        strides = [int(s) for s in strides]
        if not strides:
            raise ValueError("strides: at least one level is needed")
        if isinstance(in_channels, int):
            in_channels = [in_channels] * len(strides)
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels: {len(in_channels)} values for {len(strides)} levels")
        if norm not in ("GN", ""):
            raise ValueError(f"norm: must be 'GN' or '' (none), got {norm!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        common = min(strides) if common_stride is None else int(common_stride)
        for s in strides:
            if s < common or (s // common) * common != s or (s // common) & (s // common - 1):
                raise ValueError(f"common_stride: every stride must be common_stride ({common}) times a power of "
                                 f"two; got strides {strides}")
        self.strides, self.common_stride = strides, common
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.scale_heads = nn.ModuleList()
        for c_in, s in zip(in_channels, strides):
            ups = int(round(math.log2(s // common)))
            layers: list[nn.Module] = []
            for k in range(max(1, ups)):
                conv = nn.Conv2d(c_in if k == 0 else conv_dims, conv_dims, 3, padding=1, bias=not norm)
                _c2_msra_fill(conv)
                layers += [conv]
                if norm == "GN":
                    layers.append(nn.GroupNorm(math.gcd(32, conv_dims), conv_dims))
                layers.append(nn.ReLU(inplace=True))
                if s != common:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(conv_dims, num_classes, 1)
        _c2_msra_fill(self.predictor)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``features``: one map per level (finest first), level ``i`` of size ``(H / strides[i], W / strides[i])``
        for an ``H x W`` input that every stride divides. Returns the logits ``[B, K, H, W]``."""
        if len(features) != len(self.scale_heads):
            raise ValueError(f"SemSegFPNHead: {len(features)} feature maps for {len(self.scale_heads)} levels")
        x = None
        for head, f in zip(self.scale_heads, features):
            y = head(f)
            x = y if x is None else x + y
        x = self.predictor(x)
        if self.common_stride != 1:
            x = F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return x

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross entropy over the pixels not labelled ``ignore_index`` (0, with a gradient, when there are none)."""
        valid = int((target != self.ignore_index).sum())
        ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return ce / max(valid, 1)


class SemanticSegmentor(nn.Module):
    """A `SimpleFeaturePyramid` plus a `SemSegFPNHead` on its levels (module docstring)."""

    def __init__(self, backbone: SimpleFeaturePyramid, head: SemSegFPNHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        n = len(backbone.stages)  # the levels of scale_factors; the RPN level (top_block) is not used
        self.levels = backbone.names[:n]
        if list(head.strides) != list(backbone.strides[:n]):
            raise ValueError(f"SemanticSegmentor: head strides {head.strides} are not the pyramid's "
                             f"{backbone.strides[:n]}")

    @property
    def moe_layers(self) -> list[int]:
        return self.backbone.moe_layers

    def forward(self, images: Tensor, task: Tensor | int | None = None) -> Tensor:
        H, W = images.shape[-2:]
        feats = self.backbone(images, task)
        logits = self.head([feats[name] for name in self.levels])
        return logits[..., :H, :W]


# ---------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """``[K, K]`` int64 counts, ``cm[t, p]`` = pixels of ground-truth class ``t`` predicted as ``p``; pixels whose
    target is ``ignore_index`` are left out. ``pred`` and ``target`` are integer tensors of one shape with
    values in ``[0, K)`` (besides ``ignore_index`` in ``target``); on the device of the inputs."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: target values outside [0, {num_classes}) (besides ignore_index)")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: pred values outside [0, {num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def segmentation_metrics(cm: Tensor, class_names: Sequence[str] | None = None, per_class: bool = False
                         ) -> dict[str, float]:
    """``mIoU``, ``pixel_acc``, ``mean_acc``, ``fwIoU`` (percent) of a summed confusion matrix (definitions in
    the module docstring), and with ``per_class`` ``IoU-<name>`` for every class with a non-empty union (names
    from ``class_names``, else the indices); ``{}`` for an empty matrix."""
    cm = torch.as_tensor(cm).double().cpu()
    total = float(cm.sum())
    if total == 0:
        return {}
    tp, gt, pd = cm.diagonal(), cm.sum(1), cm.sum(0)
    union = gt + pd - tp
    has_union, has_gt = union > 0, gt > 0
    iou = torch.where(has_union, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = tp[has_gt] / gt[has_gt]
    out = {"mIoU": 100 * float(iou[has_union].mean()),
           "pixel_acc": 100 * float(tp.sum()) / total,
           "mean_acc": 100 * float(acc.mean()),
           "fwIoU": 100 * float((gt[has_union] / total * iou[has_union]).sum())}
    if per_class:
        K = cm.shape[0]
        names = list(class_names) if class_names is not None else [str(c) for c in range(K)]
        if len(names) != K:
            raise ValueError(f"segmentation_metrics: {len(names)} class names for {K} classes")
        for c in range(K):
            if has_union[c]:
                out[f"IoU-{names[c]}"] = 100 * float(iou[c])
    return out


class ConfusionEvaluator(Evaluator):
    """`Evaluator` whose state is the confusion matrix summed over batches and ranks (plus summed scalars).

    ``step(model, batch) -> {"cm": [K, K] counts, **sums}``: the forward of one batch and its confusion matrix
    (`confusion_matrix`); it must be a pure function of the model and the batch (`Evaluator.run`). Further
    entries are scalars summed the same way; ``loss_sum`` with ``pixels`` becomes ``loss`` (per pixel).
    `summarize` gives `segmentation_metrics` of the summed matrix, and ``pixels``.
    """

    def __init__(self, step: Callable[[nn.Module, Any], dict], num_classes: int, *,
                 class_names: Sequence[str] | None = None, per_class: bool = False) -> None:
        self.step, self.num_classes = step, num_classes
        self.class_names, self.per_class = class_names, per_class
        self.reset()

    def reset(self) -> None:
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.sums: dict[str, float] = {}

    def run(self, model, batch):
        return self.step(model, batch)

    def process(self, batch, outputs) -> None:
        self.cm += outputs["cm"].detach().to("cpu", torch.int64)
        for k, v in outputs.items():
            if k != "cm":
                self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def state(self) -> dict:
        return {"cm": self.cm.clone(), "sums": dict(self.sums)}

    def merge(self, states: list) -> None:
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.sums = {}
        for s in states:
            self.cm += torch.as_tensor(s["cm"], dtype=torch.int64)
            for k, v in s["sums"].items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def summarize(self) -> dict[str, float]:
        out = segmentation_metrics(self.cm, self.class_names, self.per_class)
        if not out:
            return {}
        pixels = float(self.cm.sum())
        if "loss_sum" in self.sums:
            out["loss"] = self.sums["loss_sum"] / max(self.sums.get("pixels", pixels), 1.0)
        out["pixels"] = pixels
        return out
