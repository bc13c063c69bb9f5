"""AdaMV-MoE multi-task vision training: classification + detection on one ViT-MoE (``task: multitask_vision``).

What AdaMV-MoE ("Adaptive Multi-Task Vision Mixture-of-Experts", Chen et al., ICCV 2023; google-research
``moe_mtl``) trains, as dense-vision.md §5 and methods.md §4 read it from the released code:

* **One backbone, two task streams.** `MultiTaskViTMoE` holds one ViTDet-style ViT-MoE
  (`vision.detection.ViTDetMoE`) inside torchvision's Mask R-CNN (`vision.detection.build_maskrcnn`,
  the detection head of ``task: detection``) plus a classification head (global average pool of the
  last map, LayerNorm, linear). Both tasks share attention, norms, dense MLPs and the **expert pool**;
  tokens of the two streams never mix (each stream is its own forward). Per task: one router in every
  MoE layer (``model.routers: task``, the default, task id 0 = ``cls``, 1 = ``det``) or one shared router
  (``routers: shared``, the ablation), and optionally its own patch + position embedding
  (``model.task_embeddings: true``).
* **Both tasks in every step.** With ``data.mix: all`` every micro-batch is a `mmoe.data.MultiBatch` of
  one classification and one detection batch (sources labelled ``cls`` / ``det``, each with its own
  batch size; exact resume through the engine). The loss is the released code's
  ``r * (det_loss + aux_det) + (cls_loss + aux_cls)``: the aux losses are collected per task (after each
  forward), ``r`` is ``task_options.loss_ratio`` (fixed) or, with ``task_options.det_lr``, follows the
  ratio of the two lr schedules ``r = det_lr(step) / cls_lr(step)`` (the optimizer runs at the
  classification lr, ``optim``; the detection schedule is ``det_lr`` with ``det_warmup_steps``,
  ``det_schedule``, ``det_min_lr_ratio``, defaulting to ``optim``'s). Logged per step: ``cls/loss``,
  ``cls/acc``, every detection loss as ``det/<name>``, ``aux/cls``, ``aux/det``, ``loss_ratio``; the
  routing statistics and expert-load heatmaps of each task's latest training forward
  (``plots/expert_load_<task>_step*.png``, ``routing.jsonl`` records tagged by task).
* **Adaptive expert count** (``task_options.adaptive``, `mmoe.AdaptiveTopK`, methods.md §4.2): every
  ``check_every`` steps, the validation loss of each task (no aux; the summed loss of ``val_batches``
  batches of its ``data.val_sources`` split (that source's ``batch_size``, else the training source's),
  current weights, train-mode forward as the released code
  runs it; buffers the forwards touch are restored) goes to `AdaptiveTopK.update`; a new k takes effect in
  every MoE layer at once (the next forward uses it). Iterators are never rewound (each check takes the
  next batches, cycling through the split; their positions are in the checkpoint) unless ``rewind:
  true`` (the same first batches at every check). Logged: ``adaptive/val_loss/<task>``,
  ``adaptive/k/<task>`` at every check, a ``top_k`` event per change, ``plots/top_k.png`` (k per task
  against steps); the controller state is saved and restored with the run.
* **Evaluation per task** over ``data.val_sources``: ``cls/top1`` (percent), ``cls/loss``, and COCO
  ``bbox/AP``, ``segm/AP`` ... (`vision.detection.coco_eval`), plus the current ``k/<task>`` and the
  active parameters per task in millions, ``active_M/<task>`` (backbone at that task's k plus that
  task's head).
* **Initialisation** from a classification ViT-MoE run (``model.init``, `load_backbone_weights`): its
  routers become the classification routers, the detection routers start fresh; with task embeddings
  both sets start from the file's embeddings.

Single-task baselines use the same task with one source (``data.sources`` / ``val_sources`` holding only
``cls`` or only ``det``): only the tasks present are trained and evaluated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.layer import aux_loss, clear_aux, moe_layers, routing_stats
from mmoe.train.tasks import Evaluator, SumEvaluator, Task, TaskContext, register_task

from .detection.maskrcnn import IMAGENET_MEAN, IMAGENET_STD, DetectionModelConfig, build_maskrcnn
from .detection.tasks import DetectionOptions, DetectionTask

__all__ = ["TASKS", "MultiTaskModelConfig", "MultiTaskViTMoE", "AdaptiveOptions", "MultiTaskOptions",
           "MultiTaskVisionTask", "MultiTaskEvaluator", "plot_top_k"]

TASKS = ("cls", "det")  # task id 0, 1 (the released code's processing order: cls first)


# ---------------------------------------------------------------------------------------- model
@dataclass
class MultiTaskModelConfig(DetectionModelConfig):
    """The ``model:`` section of ``task: multitask_vision``: the detection model's fields (backbone, Mask
    R-CNN; ``num_classes`` = detection classes) plus the classification head and the per-task parts."""

    cls_num_classes: int = 1000
    cls_dropout: float = 0.0
    routers: str = "task"  # "task": one router per task in every MoE layer; "shared": one for both
    task_embeddings: bool = False  # a patch + position embedding per task

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cls_num_classes < 1:
            raise ValueError(f"cls_num_classes: must be >= 1, got {self.cls_num_classes}")
        if self.routers not in ("task", "shared"):
            raise ValueError(f"routers: must be 'task' or 'shared', got {self.routers!r}")
        if "num_tasks" in self.backbone.moe:
            raise ValueError("backbone.moe.num_tasks: set by the task (model.routers: task gives 2, shared 1); "
                             "remove it")
        if self.backbone.task_embeddings != 1:
            raise ValueError("backbone.task_embeddings: set model.task_embeddings: true instead")

    def backbone_config(self):
        """The backbone with its task routers and embeddings."""
        moe = {**self.backbone.moe, "num_tasks": len(TASKS) if self.routers == "task" else 1}
        return dataclasses.replace(self.backbone, moe=moe, task_embeddings=len(TASKS) if self.task_embeddings else 1)


class MultiTaskViTMoE(nn.Module):
    """One ViT-MoE, a Mask R-CNN and a classification head (module docstring).

    ``model("cls", images)``: logits ``[B, cls_num_classes]`` of ``float [B, 3, H, W]`` images in 0..1;
    ``model("det", images, targets)``: torchvision Mask R-CNN's output (loss dict in training, detections
    in eval mode). The ViT is ``self.net`` (registered once, inside the detector's backbone).
    """

    def __init__(self, cfg: MultiTaskModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DetectionModelConfig)}
        det_cfg = DetectionModelConfig(**{**fields, "backbone": cfg.backbone_config(), "init": None, "upcycle": False})
        self.det = build_maskrcnn(det_cfg)
        D = det_cfg.backbone.embed_dim
        self.cls_norm = nn.LayerNorm(D, eps=1e-6)
        self.cls_drop = nn.Dropout(cfg.cls_dropout)
        self.cls_head = nn.Linear(D, cfg.cls_num_classes)
        nn.init.trunc_normal_(self.cls_head.weight, std=0.02)
        nn.init.zeros_(self.cls_head.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.init_report: dict | None = None
        if cfg.init:
            from .detection.backbone import load_backbone_weights

            self.init_report = load_backbone_weights(self.net, cfg.init, upcycle=cfg.upcycle)

    @property
    def net(self):
        """The shared `ViTDetMoE`."""
        return self.det.backbone.net

    def forward(self, task: str, images, targets=None):
        if task == "cls":
            return self.classify(images)
        if task == "det":
            return self.detect(images, targets)
        raise ValueError(f"MultiTaskViTMoE: unknown task {task!r}; tasks are {list(TASKS)}")

    def classify(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.std
        H, W = x.shape[-2:]
        feat = self.net(x, TASKS.index("cls"))[self.net.out_feature]  # [B, D, h', w'] of the padded input
        p = self.net.patch_size
        feat = feat[:, :, : math.ceil(H / p), : math.ceil(W / p)]  # the patches of the image, not the padding
        return self.cls_head(self.cls_drop(self.cls_norm(feat.mean((2, 3)))))

    def detect(self, images, targets=None):
        pyramid = self.det.backbone
        before = pyramid.task
        pyramid.task = TASKS.index("det")  # torchvision calls backbone(images) without task ids
        try:
            return self.det(images, targets)
        finally:
            pyramid.task = before

    def active_params(self, task: str) -> int:
        """Parameters one token of ``task`` uses: the ViT at that task's current k, plus the task's head
        (the classification head, or the pyramid and detection heads)."""
        from mmoe.stats import count_params

        backbone = count_params(self.net, task=TASKS.index(task)).active
        if task == "cls":
            head = sum(p.numel() for m in (self.cls_norm, self.cls_head) for p in m.parameters())
        else:
            net_ids = {id(p) for p in self.net.parameters()}
            head = sum(p.numel() for p in self.det.parameters() if id(p) not in net_ids)
        return int(backbone + head)


# ---------------------------------------------------------------------------------------- options
@dataclass
class AdaptiveOptions:
    """``task_options.adaptive``: AdaMV-MoE's adaptive expert count (`mmoe.AdaptiveTopK`; defaults: the
    released code's constants)."""

    enabled: bool = False
    check_every: int = 2000  # train steps between validation-loss checks
    patience: int = 5000  # a task changes k when step - its best step > patience
    initial_k: int | None = None  # None: model.backbone.moe.top_k
    min_k: int | None = None  # floor of the revert (None: 1, the code)
    max_k: int = 8
    val_batches: int = 11  # validation batches per task and check
    rewind: bool = False  # True: the same first val_batches at every check; False: never rewound (the code)
    initial_best_loss: float = 100.0
    initial_best_step: int = 40000

    def __post_init__(self) -> None:
        for name in ("check_every", "val_batches", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"patience: must be >= 0, got {self.patience}")


@dataclass
class MultiTaskOptions:
    """``task_options`` of ``task: multitask_vision``."""

    loss_ratio: float = 1.0  # r when det_lr is not set
    det_lr: float | None = None  # r follows det_lr(step) / optim lr(step) (the released code's default)
    det_warmup_steps: int | None = None  # the detection schedule; None: optim's
    det_schedule: str | None = None
    det_min_lr_ratio: float | None = None
    cls_image_size: int = 64  # classification images are resized / random-resized-cropped to this side
    cls_scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop scale range in training
    cls_hflip: float = 0.5
    label_smoothing: float = 0.0
    layer_decay: float | None = None  # ViTDet's layer-wise lr decay over the shared ViT
    det: DetectionOptions = field(default_factory=DetectionOptions)  # augmentation and COCOeval of the det task
    adaptive: AdaptiveOptions = field(default_factory=AdaptiveOptions)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.loss_ratio) and self.loss_ratio > 0):
            raise ValueError(f"loss_ratio: must be > 0, got {self.loss_ratio}")
        if self.det_lr is not None and not self.det_lr > 0:
            raise ValueError(f"det_lr: must be > 0, got {self.det_lr}")
        if self.det_schedule not in (None, "cosine", "linear", "constant"):
            raise ValueError(f"det_schedule: must be cosine, linear or constant, got {self.det_schedule!r}")
        if self.cls_image_size < 8:
            raise ValueError(f"cls_image_size: must be >= 8, got {self.cls_image_size}")
        lo, hi = self.cls_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"cls_scale: must be 0 < low <= high <= 1, got {list(self.cls_scale)}")
        if not 0 <= self.cls_hflip <= 1:
            raise ValueError(f"cls_hflip: must be in [0, 1], got {self.cls_hflip}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")


# ---------------------------------------------------------------------------------------- evaluation
class MultiTaskEvaluator(Evaluator):
    """One evaluator per task, fed by `mmoe.data.SourcedBatch` labels (``data.val_sources``); the metrics
    are every part's plus ``extra()`` (computed on every rank alike)."""

    def __init__(self, parts: dict[str, Evaluator], extra=None) -> None:
        self.parts, self.extra = parts, extra

    def _part(self, batch) -> Evaluator:
        task = getattr(batch, "task", None)
        if task not in self.parts:
            raise ValueError(f"multitask_vision: validation batch of task {task!r}; data.val_sources must be "
                             f"labelled with {list(self.parts)}")
        return self.parts[task]

    def reset(self) -> None:
        for p in self.parts.values():
            p.reset()

    def run(self, model, batch):
        return self._part(batch).run(model, batch.data)

    def process(self, batch, outputs) -> None:
        self._part(batch).process(batch.data, outputs)

    def state(self) -> dict:
        return {t: p.state() for t, p in self.parts.items()}

    def merge(self, states: list) -> None:
        for t, p in self.parts.items():
            p.merge([s[t] for s in states])

    def summarize(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts.values():
            out.update(p.summarize())
        if out and self.extra is not None:
            out.update(self.extra())
        return out


def plot_top_k(trace: list, path: str | Path, title: str = "experts per token (top-k) per task") -> Path:
    """k of every task against training steps (a step plot of ``trace = [[step, {task: k}], ...]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    tasks = list(trace[0][1]) if trace else []
    for i, t in enumerate(tasks):
        steps = [int(s) for s, _ in trace]
        ks = [int(k[t]) + 0.04 * (i - (len(tasks) - 1) / 2) for _, k in trace]  # tiny offset: lines stay apart
        ax.step(steps, ks, where="post", label=t, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("top-k")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    if tasks:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- the task
def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@register_task("multitask_vision")
class MultiTaskVisionTask(Task):
    """Classification + detection on one ViT-MoE, AdaMV-MoE style (module docstring)."""

    ModelConfig = MultiTaskModelConfig
    Options = MultiTaskOptions
    unit = "images"

    def __init__(self, model_cfg: MultiTaskModelConfig, options: MultiTaskOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self.options: MultiTaskOptions
        self.det_task = DetectionTask(model_cfg, self.options.det)  # decode / collate / COCOeval of det batches
        self.ctx: TaskContext | None = None
        self.train_tasks: list[str] = list(TASKS)
        self.val_tasks: list[str] = []
        self.cls_classes: list[str] | None = None
        self.controller = None
        self.k_trace: list = []  # [[step, {task: k}], ...] at the start and at every check
        self._step = 0
        self._model: MultiTaskViTMoE | None = None  # set by model_ready
        self._train_stats: dict[str, dict] = {}
        self._val_loaders: dict[str, Any] = {}
        self._val_iters: dict[str, Any] = {}
        self._pending_val_state: dict | None = None
        self._cls_train_tf = self._cls_eval_tf = None

    # ---------------------------------------------------------------- setup / model
    def setup(self, ctx: TaskContext) -> None:
        """Checks the data layout (``data.mix: all``, sources labelled ``cls`` / ``det``) and reads the
        detection categories and classification classes from the sources' manifests."""
        self.ctx = ctx
        if not ctx.sources:
            raise ValueError("data.sources: multitask_vision trains from labelled sources (task: cls / det) with "
                             "data.mix: all, not from data.train")
        if ctx.mix != "all":
            raise ValueError("data.mix: multitask_vision takes one batch of every task per step: set data.mix: all")
        if ctx.val_data:
            raise ValueError("data.val: multitask_vision validates per task: give data.val_sources "
                             "(task: cls / det) instead")
        self.train_tasks = _task_labels("data.sources", ctx.sources)
        self.val_tasks = _task_labels("data.val_sources", ctx.val_sources)
        manifests = {src.task: m for src, m in ctx.sources}
        a = self.options.adaptive
        if a.enabled:
            if self.model_cfg.routers != "task":
                raise ValueError("task_options.adaptive.enabled: the adaptive expert count needs task routers "
                                 "(model.routers: task)")
            missing = [t for t in TASKS if t not in self.train_tasks or t not in self.val_tasks]
            if missing:
                raise ValueError(f"task_options.adaptive.enabled: needs training and validation sources of every "
                                 f"task; missing {missing}")
        det_manifest = manifests.get("det")
        self.det_task.setup(dataclasses.replace(ctx, train_manifest=det_manifest, sources=(), val_sources=()))
        cls_manifest = manifests.get("cls")
        classes = cls_manifest.info.get("classes") if cls_manifest is not None else None
        if classes:
            if len(classes) != self.model_cfg.cls_num_classes:
                raise ValueError(f"model.cls_num_classes={self.model_cfg.cls_num_classes} but the classification "
                                 f"shards have {len(classes)} classes")
            self.cls_classes = [str(c) for c in classes]

    def build_model(self) -> nn.Module:
        return MultiTaskViTMoE(self.model_cfg)

    def model_ready(self, model: nn.Module) -> None:
        a = self.options.adaptive
        if a.enabled:
            from mmoe.adaptive import AdaptiveTopK

            k0 = a.initial_k if a.initial_k is not None else int(self.model_cfg.backbone_config().moe_config().top_k)
            self.controller = AdaptiveTopK(_unwrap(model).net, TASKS, initial_k=k0, min_k=a.min_k, max_k=a.max_k,
                                           check_every=a.check_every, patience=a.patience,
                                           initial_best_loss=a.initial_best_loss,
                                           initial_best_step=a.initial_best_step)
        self._model = _unwrap(model)
        self.k_trace = [[0, self.current_k()]]

    def lr_scales(self, model: nn.Module) -> dict[str, float] | None:
        if not self.options.layer_decay:
            return None
        from .detection.backbone import lr_decay_scales

        return lr_decay_scales(model, self.options.layer_decay)

    def current_k(self, model: nn.Module | None = None) -> dict[str, int]:
        """The top-k of every task (the first MoE layer's; every layer has the same)."""
        model = _unwrap(model) if model is not None else self._model
        layers = moe_layers(model.net)
        if not layers:
            return {}
        m = layers[0][1]
        return {t: m.top_k(i if m.cfg.num_tasks > 1 else 0) for i, t in enumerate(TASKS)}

    # ---------------------------------------------------------------- the loss ratio
    def loss_ratio(self, step: int | None = None) -> float:
        """``r`` of ``r * (det_loss + aux_det) + (cls_loss + aux_cls)`` at ``step`` (default: the current)."""
        o = self.options
        if o.det_lr is None:
            return float(o.loss_ratio)
        if self.ctx is None or self.ctx.optim is None:
            raise ValueError("task_options.det_lr: the lr schedules come from the engine's optim section")
        from mmoe.train.optim import lr_lambda

        step = self._step if step is None else step
        cls_opt = self.ctx.optim
        det_opt = dataclasses.replace(
            cls_opt, lr=o.det_lr,
            warmup_steps=cls_opt.warmup_steps if o.det_warmup_steps is None else o.det_warmup_steps,
            schedule=cls_opt.schedule if o.det_schedule is None else o.det_schedule,
            min_lr_ratio=cls_opt.min_lr_ratio if o.det_min_lr_ratio is None else o.det_min_lr_ratio)
        f_cls = lr_lambda(cls_opt, self.ctx.max_steps)(step)
        f_det = lr_lambda(det_opt, self.ctx.max_steps)(step)
        if f_cls <= 0:
            return o.det_lr / cls_opt.lr
        return (o.det_lr * f_det) / (cls_opt.lr * f_cls)

    # ---------------------------------------------------------------- data
    def _cls_transform(self, train: bool):
        from torchvision import transforms as T

        size = self.options.cls_image_size
        if train:
            if self._cls_train_tf is None:
                self._cls_train_tf = T.Compose([
                    T.RandomResizedCrop(size, scale=tuple(self.options.cls_scale), antialias=True),
                    T.RandomHorizontalFlip(self.options.cls_hflip), T.ToTensor()])
            return self._cls_train_tf
        if self._cls_eval_tf is None:
            self._cls_eval_tf = T.Compose([T.Resize((size, size), antialias=True), T.ToTensor()])
        return self._cls_eval_tf

    def _decode_cls(self, sample: dict, train: bool):
        from mmoe.data import DataError, decode_image, decode_label

        from .tasks import _seeded

        img = decode_image(sample, mode="RGB")
        tf = self._cls_transform(train)
        seed = sample.get("__seed__") if train else None
        x = tf(img) if seed is None else _seeded(tf, img, int(seed))
        y = decode_label(sample)
        if not 0 <= y < self.model_cfg.cls_num_classes:
            raise DataError(f"label {y} is outside [0, model.cls_num_classes={self.model_cfg.cls_num_classes})",
                            url=sample.get("__url__"), key=sample.get("__key__"))
        return x, y

    def _decode(self, sample: dict, train: bool):
        task = sample.get("__task__")
        if task == "cls":
            return self._decode_cls(sample, train)
        if task == "det":
            return self.det_task.decode(sample) if train else self.det_task.decode_eval(sample)
        from mmoe.data import DataError

        raise DataError(f"sample of task {task!r}: multitask_vision reads sources labelled cls / det",
                        url=sample.get("__url__"), key=sample.get("__key__"))

    def decode(self, sample: dict):
        return self._decode(sample, train=True)

    def decode_eval(self, sample: dict):
        return self._decode(sample, train=False)

    def collate(self, examples: list):
        if examples and isinstance(examples[0][1], dict):
            return self.det_task.collate(examples)
        return torch.utils.data.default_collate(examples)

    # ---------------------------------------------------------------- loss
    def _task_loss(self, model, task: str, data) -> tuple[Tensor, dict[str, float], int]:
        if task == "cls":
            x, y = data
            logits = model("cls", x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.options.label_smoothing)
            return loss, {"cls/loss": float(loss.detach()),
                          "cls/acc": float((logits.argmax(-1) == y).float().mean())}, int(y.shape[0])
        loss, losses, n = self.det_task.loss(_DetectionView(model), data)  # task: detection's loss
        scalars = {f"det/{k}": v for k, v in losses.items()}
        scalars["det/loss"] = float(loss.detach())
        return loss, scalars, n

    def loss(self, model, batch):
        from mmoe.data import MultiBatch

        if not isinstance(batch, MultiBatch):
            raise TypeError("multitask_vision: expected a MultiBatch (data.mix: all with sources labelled cls / det), "
                            f"got {type(batch).__name__}")
        r = self.loss_ratio()
        module = _unwrap(model)
        total, scalars, units, aux_total = None, {"loss_ratio": r}, 0, 0.0
        for task in TASKS:
            if task not in batch:
                continue
            clear_aux(module)  # only this task's forward
            loss, s, n = self._task_loss(model, task, batch[task])
            aux = aux_loss(module)  # collected here: the engine adds nothing more
            self._train_stats[task] = routing_stats(module)
            part = (loss + aux) * (r if task == "det" else 1.0)
            total = part if total is None else total + part
            scalars.update(s)
            scalars[f"aux/{task}"] = float(aux.detach())
            aux_total += float(aux.detach())
            units += n
        if total is None:
            raise ValueError(f"multitask_vision: a batch with none of the tasks {list(TASKS)}: {batch.tasks}")
        scalars["aux_loss"] = aux_total
        return total, scalars, units

    def routing_groups(self, model: nn.Module) -> dict[str | None, dict]:
        """Each task's latest training forward, tagged ``cls`` / ``det``."""
        return dict(self._train_stats) if self._train_stats else super().routing_groups(model)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _cls_eval_step(self, model, batch) -> dict[str, float]:
        x, y = batch
        logits = model("cls", x).float()
        return {"loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
                "correct": float((logits.argmax(-1) == y).sum()), "count": float(y.shape[0])}

    @staticmethod
    def _cls_metrics(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("count", 0.0), 1.0)
        return {"cls/top1": 100.0 * sums.get("correct", 0.0) / n, "cls/loss": sums.get("loss_sum", 0.0) / n}

    def evaluator(self) -> Evaluator:
        parts: dict[str, Evaluator] = {}
        for t in self.val_tasks or list(TASKS):
            if t == "cls":
                parts[t] = SumEvaluator(self._cls_eval_step, self._cls_metrics)
            else:  # task: detection's COCOeval, predicting through the detection branch
                parts[t] = self.det_task.evaluator()
                parts[t].predict = lambda model, images: model("det", list(images))

        def extra() -> dict[str, float]:
            out: dict[str, float] = {}
            for t, k in self.current_k().items():
                if t in self.train_tasks:
                    out[f"k/{t}"] = float(k)
                    out[f"active_M/{t}"] = self._model.active_params(t) / 1e6
            return out

        return MultiTaskEvaluator(parts, extra)

    # ---------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, model: nn.Module, paths: list[str], out_dir: Path) -> list[dict]:
        """``mmoe predict`` on a multi-task run: the detection drawing of ``task: detection``
        (``<stem>_det.png``) plus the classification head's top classes of each image (``"classes"``:
        ``[{"label", "score"}, ...]``, best first)."""
        from PIL import Image

        from mmoe.data.decode import to_rgb

        module = _unwrap(model)
        module.eval()
        results = self.det_task.predict(_DetectionView(module), paths, out_dir)
        names = self.cls_classes or [str(i) for i in range(self.model_cfg.cls_num_classes)]
        tf = self._cls_transform(train=False)
        for rec in results:
            with Image.open(rec["image"]) as im:
                x = tf(to_rgb(im))[None]
            probs = module("cls", x).float().softmax(-1)[0]
            top = probs.topk(min(5, len(names)))
            rec["classes"] = [{"label": names[int(i)], "score": round(float(p), 4)} for p, i in zip(*top)]
        return results

    # ---------------------------------------------------------------- adaptive top-k
    def _val_loader(self, task: str, *, endless: bool):
        from mmoe.data import ShardLoader
        from mmoe.train.engine import LabelledDecode

        src = next(s for s, _ in self.ctx.val_sources if s.task == task)
        train_bs = next((s.batch_size for s, _ in self.ctx.sources if s.task == task), None)
        where = Path(str(src.path))
        use_split = where.is_dir() or where.suffix == ".json"
        return ShardLoader(src.path, split=src.split if use_split else None,
                           batch_size=src.batch_size or train_bs or 8, decode=LabelledDecode(self.decode_eval, task),
                           collate=self.collate, shuffle_buffer=0, seed=self.ctx.seed, rank=self.ctx.rank,
                           world_size=self.ctx.world_size, num_workers=0, resampled=False,
                           epochs=None if endless else 1, drop_last=endless)

    def _val_batches(self, task: str):
        """The next ``val_batches`` validation batches of ``task`` (never rewound unless ``rewind``)."""
        a = self.options.adaptive
        if a.rewind:
            it = iter(self._val_loader(task, endless=True))
        else:
            if task not in self._val_loaders:
                self._val_loaders[task] = self._val_loader(task, endless=True)
                if self._pending_val_state and task in self._pending_val_state:
                    self._val_loaders[task].load_state_dict(self._pending_val_state[task])
            if task not in self._val_iters:
                self._val_iters[task] = iter(self._val_loaders[task])
            it = self._val_iters[task]
        return [next(it) for _ in range(a.val_batches)]

    @torch.no_grad()
    def validation_losses(self, model: nn.Module) -> dict[str, float]:
        """Each task's summed loss (no aux) over its next ``adaptive.val_batches`` validation batches, with
        the current weights and the model's current mode (train mode during training, as the released code);
        buffers the forwards update are restored, pending aux terms dropped. Averaged over ranks."""
        from mmoe.train.engine import to_device

        module = _unwrap(model)
        device = next(module.parameters()).device
        saved = [(b, b.detach().clone()) for b in module.buffers() if b.is_floating_point()]
        out: dict[str, float] = {}
        try:
            for task in TASKS:
                total = 0.0
                for batch in self._val_batches(task):
                    loss, _, _ = self._task_loss(module, task, to_device(batch, device))
                    total += float(loss)
                out[task] = total
        finally:
            clear_aux(module)
            for b, copy in saved:
                b.copy_(copy)
        import torch.distributed as dist

        from mmoe.parallel import all_reduce_, dp_active

        world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        if dp_active(world):
            t = torch.tensor([out[k] for k in TASKS], dtype=torch.float64)
            all_reduce_(t, group=world)
            out = {k: float(v) / dist.get_world_size() for k, v in zip(TASKS, t.tolist())}
        return out

    def after_step(self, model: nn.Module, step: int) -> None:
        self._step = step
        c = self.controller
        if c is None or not c.should_check(step):
            return
        losses = self.validation_losses(model)
        changed = c.update(step, losses)
        self.k_trace.append([step, c.ks])
        log = self.logger
        if log is None:
            return
        log.log(step, **{f"adaptive/val_loss/{t}": v for t, v in losses.items()},
                **{f"adaptive/k/{t}": float(k) for t, k in c.ks.items()})
        if changed:
            for ch in c.history:
                if ch.step == step:
                    log.event(step, "top_k", f"task {ch.task}: top-k {ch.old_k} -> {ch.new_k} ({ch.reason}); "
                                             f"validation losses {', '.join(f'{t} {v:.4f}' for t, v in losses.items())}",
                              task=ch.task, old_k=ch.old_k, new_k=ch.new_k, reason=ch.reason)
        if self.ctx is not None and self.ctx.rank == 0:
            plot_top_k(self.k_trace, self.ctx.run_dir / "plots" / "top_k.png")

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"categories": self.det_task.categories, "cls_classes": self.cls_classes, "step": self._step,
                "adaptive": self.controller.state_dict() if self.controller is not None else None,
                "k_trace": [[int(s), dict(k)] for s, k in self.k_trace]}

    def load_state_dict(self, state: dict) -> None:
        self.det_task.load_state_dict({"categories": state.get("categories")})
        if state.get("cls_classes"):
            self.cls_classes = list(state["cls_classes"])
        self._step = int(state.get("step", 0))
        if state.get("k_trace"):
            self.k_trace = [[int(s), dict(k)] for s, k in state["k_trace"]]
        # the k's themselves are in the weights (every MoE layer's task_top_k buffer); a controller also
        # takes back its best losses, flags and history
        if state.get("adaptive") is not None and self.controller is not None:
            self.controller.load_state_dict(state["adaptive"])

    def rank_state_dict(self) -> dict:
        return {"val_loaders": {t: loader.state_dict() for t, loader in self._val_loaders.items()}}

    def load_rank_state_dict(self, state: dict) -> None:
        self._pending_val_state = dict(state.get("val_loaders") or {})
        self._val_loaders, self._val_iters = {}, {}


def _task_labels(key: str, sources: tuple) -> list[str]:
    """The tasks of ``sources`` (``(DataSource, manifest)`` pairs) in `TASKS` order; other labels are an error."""
    labels = [src.task for src, _ in sources]
    bad = [t for t in labels if t not in TASKS]
    if bad:
        raise ValueError(f"{key}: task labels {bad} are not tasks of multitask_vision ({', '.join(TASKS)})")
    return [t for t in TASKS if t in labels]


class _DetectionView(nn.Module):
    """The detection branch of a `MultiTaskViTMoE` as a plain detector: ``view(images)``."""

    def __init__(self, model: MultiTaskViTMoE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, targets=None):
        return self.model("det", images, targets)
