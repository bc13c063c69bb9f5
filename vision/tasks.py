"""Image classification on image shards through the mmoe engine (``task: image_classification``).

Model: any timm model by name; ``vit_moe_*`` takes the `mmoe.MoEConfig` options in ``model.moe`` and the
placement in ``model.moe_layers``. ``model.init`` initialises from a local checkpoint (timm formats, key
remapping and position-embedding resizing); with ``model.upcycle_from`` naming the dense timm
architecture, that checkpoint is a dense ViT and is sparsely upcycled (`vision.upcycle_vit`).

Options (``task_options``, `ClassificationOptions`, all optional; the defaults are those of timm's ``train.py``):

=====================  =====================================================================================
auto_augment           timm policy string, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment); None = off
scale, ratio, hflip    RandomResizedCrop scale / aspect range, horizontal flip probability
color_jitter, re_prob  colour jitter strength (when no auto_augment), random-erasing probability
interpolation          resize interpolation; ``crop_pct`` for evaluation (resize then centre crop)
mean, std              normalisation (default: the model's pretrained_cfg)
mixup, cutmix          mixup / cutmix alphas (timm `Mixup`; batch size must be even), ``mixup_prob``,
                       ``mixup_switch_prob``
label_smoothing        label smoothing (also inside mixup targets)
layer_decay            layer-wise lr decay for fine-tuning (BEiT / timm): block ``i`` of ``L`` gets
                       ``layer_decay ** (L - i)``, the embeddings ``layer_decay ** (L + 1)``, the final norm
                       ``layer_decay``, the head the full lr (as timm); None = off
ema_decay              EMA of the weights (decay warm-up ``min(decay, (1+t)/(10+t))``); evaluation then uses
                       the EMA weights unless ``ema_eval: false``; None = off
topk                   the k of top-k accuracy reported besides top-1 (default 5; ``acc5``)
per_class              report the accuracy of every class (``acc_class/<name>``)
=====================  =====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmoe.train.ema import WeightEMA
from mmoe.train.tasks import Task, TaskContext, register_task


@dataclass
class ClassifierConfig:
    """The ``model:`` section of ``image_classification``.

    For the registered ``vit_moe_*`` variants ``moe`` and ``moe_layers`` are validated here, before the
    model is built (`mmoe.moe_config_from_section`, `mmoe.moe_block_indices`, with the variant's width and
    depth after ``kwargs``), so a mistake is reported at its ``file:line`` (``model.moe.top_k: ...``).
    """

    arch: str = "vit_moe_tiny_patch16_224"  # timm model name
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    drop_path_rate: float = 0.0
    moe_layers: str | list[int] = "every_2"  # ViT-MoE placement (mmoe.moe_block_indices)
    moe: dict[str, Any] = field(default_factory=dict)  # mmoe.MoEConfig fields for vit_moe_* models
    kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model keywords
    init: str | None = None  # local checkpoint to start from (timm formats)
    upcycle_from: str | None = None  # dense timm architecture of `init`: upcycle it into this ViT-MoE

    def __post_init__(self) -> None:
        from mmoe.config import moe_block_indices
        from mmoe.errors import ConfigError

        if not is_moe_arch(self.arch):
            if self.moe:
                raise ConfigError("", "moe", f"{self.arch!r} is a dense model; MoE options need a vit_moe_* arch")
            return
        from .models import vit_moe_size

        size = vit_moe_size(self.arch, self.kwargs)
        if size is None:  # another vit_moe_* architecture: its model validates the section when built
            return
        moe_block_indices(self.moe_layers, size[1])
        self.moe_config()

    def moe_config(self):
        """The `mmoe.MoEConfig` of the MoE blocks of a registered ``vit_moe_*`` variant (None otherwise);
        with ``upcycle_from`` the MoE width is the dense checkpoint's, checked when it is loaded."""
        from .models import vit_moe_config, vit_moe_size

        size = vit_moe_size(self.arch, self.kwargs) if is_moe_arch(self.arch) else None
        if size is None:
            return None
        moe = {"normalize_topk": True, **self.moe} if self.upcycle_from else self.moe
        return vit_moe_config(size[0], size[2], moe)


@dataclass
class ClassificationOptions:
    auto_augment: str | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5
    color_jitter: float = 0.4
    re_prob: float = 0.0
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    layer_decay: float | None = None
    ema_decay: float | None = None
    ema_eval: bool = True
    topk: int = 5
    per_class: bool = False

    def __post_init__(self) -> None:
        # "field: problem": the config loader reports it at that key's file:line
        if self.topk < 1:
            raise ValueError(f"topk: must be >= 1, got {self.topk}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")


def is_moe_arch(name: str) -> bool:
    return name.startswith("vit_moe_")


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """The model of a `ClassifierConfig` (also used by ``mmoe predict`` and the demo)."""
    import timm

    import vision.models  # noqa: F401 - registers the vit_moe_* models

    kwargs = dict(num_classes=cfg.num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans,
                  drop_path_rate=cfg.drop_path_rate, **cfg.kwargs)
    moe_arch = is_moe_arch(cfg.arch)
    if not moe_arch and cfg.moe:
        raise ValueError(f"model.moe: {cfg.arch!r} is a dense model; MoE options need a vit_moe_* arch")
    if cfg.upcycle_from:
        if not cfg.init:
            raise ValueError("model.upcycle_from: needs model.init, the dense checkpoint to upcycle")
        if not moe_arch:
            raise ValueError(f"model.upcycle_from: model.arch must be a vit_moe_* model, not {cfg.arch!r}")
        from .upcycle import upcycle_vit

        model = upcycle_vit(cfg.init, model_name=cfg.upcycle_from, model_kwargs=kwargs,
                            moe_layers=cfg.moe_layers, **cfg.moe)
        return model
    if moe_arch:
        kwargs.update(moe_layers=cfg.moe_layers, moe=dict(cfg.moe))
    try:
        model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.arch: {err}") from None
        raise
    if cfg.init:
        from .upcycle import load_vit_state

        load_vit_state(model, cfg.init, what="model.init: ")
    return model


def _seeded(fn, arg, seed: int):
    """``fn(arg)`` with Python's, NumPy's and torch's global RNGs seeded by ``seed`` and restored after.

    timm's augmentations draw from all three; seeding them from the sample's ``__seed__`` (a function of
    the run seed, epoch, rank, worker and position) makes a sample's augmentation the same however the
    data was reached, so a resumed run (which replays the stream without decoding) and any number of
    DataLoader workers see exactly the augmentations of an uninterrupted run."""
    import random

    import numpy as np

    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed % (2**63))
    try:
        return fn(arg)
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def layer_lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Per-parameter lr scale for layer-wise decay, from the model's timm ``group_matcher`` (embeddings are
    layer 0, block i layer i+1, the final norm and head the top layer)."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ValueError("task_options.layer_decay: this model has no timm group_matcher to number its layers")
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer_of.values())
    # as timm's param_groups_layer_decay: the last group (the head) gets the full lr
    return {name: layer_decay ** (top - min(layer_of.get(name, top), top)) for name, _ in model.named_parameters()}


@register_task("image_classification")
class ImageClassificationTask(Task):
    """Classify images of image shards (``jpg``/``png``/... + ``cls``), e.g. from ``mmoe shards imagefolder``."""

    ModelConfig = ClassifierConfig
    Options = ClassificationOptions
    unit = "images"

    def __init__(self, model_cfg: ClassifierConfig, options: ClassificationOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self.options: ClassificationOptions
        o, m = self.options, model_cfg
        self.classes: list[str] | None = None
        self.ema: WeightEMA | None = None
        self._train_tf = self._eval_tf = None
        self._mixup = None
        if o.mixup > 0 or o.cutmix > 0:
            from timm.data import Mixup

            self._mixup = Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, prob=o.mixup_prob,
                                switch_prob=o.mixup_switch_prob, label_smoothing=o.label_smoothing,
                                num_classes=m.num_classes)

    # ---------------------------------------------------------------- setup
    def setup(self, ctx: TaskContext) -> None:
        """Read the class names from the training shards' manifest (kept in checkpoints for predict)."""
        classes = ctx.train_manifest.info.get("classes") if ctx.train_manifest is not None else None
        if classes:
            if len(classes) != self.model_cfg.num_classes:
                raise ValueError(f"model.num_classes={self.model_cfg.num_classes} but the shards in {ctx.train_data} "
                                 f"have {len(classes)} classes")
            self.classes = [str(c) for c in classes]

    def build_model(self) -> nn.Module:
        model = build_classifier(self.model_cfg)
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        self._model_norm = (tuple(pcfg["mean"]), tuple(pcfg["std"])) if "mean" in pcfg and "std" in pcfg else None
        return model

    def model_ready(self, model: nn.Module) -> None:
        # after expert sharding and the move to the device: the EMA holds what this rank holds
        if self.options.ema_decay is not None:
            self.ema = WeightEMA(model, self.options.ema_decay)

    def lr_scales(self, model: nn.Module) -> dict[str, float] | None:
        return layer_lr_scales(model, self.options.layer_decay) if self.options.layer_decay else None

    # ---------------------------------------------------------------- data
    def _data_cfg(self) -> dict:
        m, o = self.model_cfg, self.options
        norm = getattr(self, "_model_norm", None) or ((0.5,) * 3, (0.5,) * 3)  # the model's pretrained_cfg
        mean = o.mean or norm[0]
        std = o.std or norm[1]
        if m.in_chans == 1:
            mean, std = mean[:1], std[:1]
        return dict(input_size=(m.in_chans, m.img_size, m.img_size), interpolation=o.interpolation,
                    mean=tuple(mean), std=tuple(std))

    def transforms(self, train: bool):
        from timm.data import create_transform

        if train and self._train_tf is None:
            o = self.options
            self._train_tf = create_transform(
                **self._data_cfg(), is_training=True, auto_augment=o.auto_augment, scale=tuple(o.scale),
                ratio=tuple(o.ratio), hflip=o.hflip, color_jitter=o.color_jitter, re_prob=o.re_prob)
        if not train and self._eval_tf is None:
            self._eval_tf = create_transform(**self._data_cfg(), is_training=False, crop_pct=self.options.crop_pct)
        return self._train_tf if train else self._eval_tf

    def _decode(self, sample: dict, train: bool):
        from mmoe.data import decode_image, decode_label

        img = decode_image(sample, mode="RGB")
        tf = self.transforms(train)
        seed = sample.get("__seed__") if train else None
        if seed is None:
            x = tf(img)
        else:
            x = _seeded(tf, img, int(seed))
        if self.model_cfg.in_chans == 1 and x.shape[0] == 3:
            x = x.mean(0, keepdim=True)
        y = decode_label(sample)
        if not 0 <= y < self.model_cfg.num_classes:
            from mmoe.data import DataError

            raise DataError(f"label {y} is outside [0, {self.model_cfg.num_classes})",
                            url=sample.get("__url__"), key=sample.get("__key__"))
        return x, y

    def decode(self, sample: dict):
        return self._decode(sample, train=True)

    def decode_eval(self, sample: dict):
        return self._decode(sample, train=False)

    # ---------------------------------------------------------------- loss / metrics
    def loss(self, model, batch):
        x, y = batch
        scalars: dict[str, float] = {}
        if self._mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"task_options.mixup/cutmix need an even batch size (got {x.shape[0]})")
            from timm.loss import SoftTargetCrossEntropy

            x, target = self._mixup(x, y)
            loss = SoftTargetCrossEntropy()(model(x).float(), target)
        else:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.options.label_smoothing)
            scalars["acc"] = float((logits.argmax(-1) == y).float().mean())
        return loss, scalars, int(y.shape[0])

    @torch.no_grad()
    def eval_step(self, model, batch):
        x, y = batch
        logits = model(x).float()
        n = self.model_cfg.num_classes
        k = min(self.options.topk, n)
        top = logits.topk(k, dim=-1).indices
        hit = top == y[:, None]
        out = {"loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
               "correct": float(hit[:, 0].sum()), f"correct{k}": float(hit.any(-1).sum()),
               "count": float(y.numel())}
        if self.options.per_class:
            right = torch.bincount(y[hit[:, 0]], minlength=n)
            seen = torch.bincount(y, minlength=n)
            for c in range(n):
                out[f"class{c}_correct"] = float(right[c])
                out[f"class{c}_count"] = float(seen[c])
        return out

    def eval_metrics(self, sums):
        n = max(sums.get("count", 0.0), 1.0)
        k = min(self.options.topk, self.model_cfg.num_classes)
        out = {"loss": sums["loss_sum"] / n, "acc": sums["correct"] / n, f"acc{k}": sums[f"correct{k}"] / n,
               "count": sums.get("count", 0.0)}
        if self.options.per_class:
            names = self.classes or [str(c) for c in range(self.model_cfg.num_classes)]
            for c, name in enumerate(names):
                seen = sums.get(f"class{c}_count", 0.0)
                if seen:
                    out[f"acc_class/{name}"] = sums[f"class{c}_correct"] / seen
        return out

    # ---------------------------------------------------------------- EMA and state
    def after_step(self, model, step):
        if self.ema is not None:
            self.ema.update(model)

    def eval_begin(self, model) -> None:
        if self.ema is not None and self.options.ema_eval:
            self.ema.swap_in(model)

    def eval_end(self, model) -> None:
        if self.ema is not None:
            self.ema.swap_out(model)

    def state_dict(self) -> dict:
        return {"classes": self.classes}

    def load_state_dict(self, state: dict) -> None:
        if state.get("classes"):
            self.classes = list(state["classes"])

    def rank_state_dict(self) -> dict:
        """Per-rank tensors saved with the rank's checkpoint state (the EMA holds this rank's experts)."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_rank_state_dict(self, state: dict) -> None:
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
