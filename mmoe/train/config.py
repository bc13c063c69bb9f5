"""The training config: one YAML file validated against these dataclasses.

```yaml
task: digits_mlp            # a registered task (mmoe.train.tasks); it validates `model` itself
model: {dim: 64, depth: 2, moe: {num_experts: 8, top_k: 2}}
data: {train: data/digits, train_split: train, val: data/digits, val_split: val, batch_size: 64}
optim: {lr: 3.0e-3, weight_decay: 0.05, warmup_steps: 20, schedule: cosine}
train: {max_steps: 300, log_every: 10, eval_every: 100, save_every: 100}
dist: {zero_stage: 0, ep_size: 1}
run: {dir: runs/tiny, seed: 0}
```
Several weighted training sources instead of ``data.train`` (each batch comes whole from one source, drawn
with probability ~ weight, the same on every rank; see `DataSource` and `mmoe.data.mixing`):
```yaml
data:
  sources:
    - {path: data/digits, split: train, weight: 3}
    - {path: data/more_digits, split: train, weight: 1, task: extra}
  val: data/digits
  val_split: val
```
Several tasks trained together, every micro-batch holding one batch of each (``mix: all``; e.g. AdaMV-MoE's
classification + detection, ``task: multitask_vision``), each source with its own batch size, and one
validation set per task:
```yaml
data:
  mix: all
  sources:
    - {path: data/shapes_cls, split: train, task: cls, batch_size: 32}
    - {path: data/shapes_det, split: train, task: det, batch_size: 4}
  val_sources:
    - {path: data/shapes_cls, split: val, task: cls}
    - {path: data/shapes_det, split: val, task: det, batch_size: 8}
```
Unknown keys and wrong types are errors naming the key and the file (`mmoe.train.configfile`); any key can be
overridden on the command line with ``key.sub=value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataSource:
    """One weighted training source of ``data.sources``.

    The training engine builds one `mmoe.data.ShardLoader` per source (with ``data``'s batch size,
    shuffling, workers and ``resampled``; source ``i`` shuffles with seed ``run.seed + i``, and
    ``num_workers`` counts per source) and mixes them with `mmoe.data.MixedLoader`: each micro-batch
    comes whole from one source, drawn with probability ``weight / sum of weights`` from ``(run.seed,
    micro-batch index)`` only, so every rank draws the same source and resume is exact.

    ``task`` labels the source's batches for a task that trains on several kinds of data (e.g. ``cls``
    and ``det``). When any source has a label, the task's ``loss`` gets a `mmoe.data.SourcedBatch`
    (``.data`` the collated batch, ``.task`` the label, ``.source`` the index) instead of the plain
    batch, and its ``decode`` sees the label as ``sample["__task__"]``; without labels the sources are
    just a weighted mixture of shard sets and the task sees plain batches, as with ``data.train``.
    Each logged step records ``source/<i>``: the share of its micro-batches that came from source ``i``.
    The checkpoint holds the mixture's position (its batch counter and every source's `ShardLoader` state),
    so a resume needs the same sources, weights and seed.

    With ``data.mix: all`` there is no draw: every micro-batch holds the next batch of *every* source, and
    the task's ``loss`` gets a `mmoe.data.MultiBatch` (``batch[label]`` per source; every source must
    have a distinct ``task`` label, ``weight`` is unused and must stay 1). ``batch_size`` overrides
    ``data.batch_size`` for this source (in ``data.val_sources``: ``data.eval_batch_size``), e.g. many
    small classification images beside a few large detection images.
    """

    path: str  # like data.train: shard URL pattern, list file, directory or manifest
    weight: float = 1.0  # relative share of the batches (> 0)
    task: str | None = None  # label handed to the task with this source's batches
    split: str | None = None  # split of a shard directory's manifest (e.g. "train"); None = its only one
    batch_size: int | None = None  # this source's batch size (None: data.batch_size / data.eval_batch_size)

    def __post_init__(self) -> None:
        # "field: problem": the config loader turns it into "file:line: data.sources[i].field: problem"
        if not self.path:
            raise ValueError("path: required (a shard directory, manifest or URL pattern)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight: must be > 0, got {self.weight}")
        if self.task is not None and not self.task:
            raise ValueError("task: an empty label; leave it out (null) or name the task")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class DataConfig:
    train: str = ""  # shard URL pattern, list file, directory or manifest (see mmoe.data.ShardLoader)
    # several weighted training sources instead of `train` (see DataSource); empty = the one stream `train`
    sources: list[DataSource] = field(default_factory=list)
    # how micro-batches come from `sources`: "weighted" = each micro-batch whole from one source drawn by
    # weight (mmoe.data.MixedLoader); "all" = each micro-batch one batch of every source (mmoe.data.AllLoader)
    mix: Literal["weighted", "all"] = "weighted"
    val: str | None = None
    # one validation set per task instead of `val` (each with a `task` label); evaluation passes over each
    # in turn and the task's evaluator gets `SourcedBatch`es
    val_sources: list[DataSource] = field(default_factory=list)
    train_split: str | None = None  # split of a shard directory's manifest (e.g. "train"); None = its only one
    val_split: str | None = None  # e.g. "val"
    batch_size: int = 32  # per rank and micro-batch
    eval_batch_size: int | None = None
    shuffle_buffer: int = 1000
    num_workers: int = 0
    resampled: bool = False
    on_error: Literal["fail", "skip"] = "fail"  # bad shard / sample: stop with its name, or skip and count

    @property
    def has_val(self) -> bool:
        """Validation data is configured (``val`` or ``val_sources``)."""
        return bool(self.val or self.val_sources)

    @property
    def labelled_sources(self) -> bool:
        """Some source has a ``task`` label: the task then gets every training batch as a `SourcedBatch`."""
        return any(s.task is not None for s in self.sources)

    def train_sources(self) -> list[DataSource]:
        """The training sources: ``sources``, or ``train`` (+ ``train_split``) as one source of weight 1
        (e.g. for a task that reads the training manifests in ``setup``); empty when neither is set."""
        if self.sources:
            return list(self.sources)
        return [DataSource(path=self.train, split=self.train_split)] if self.train else []


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decay_norm_and_bias: bool = False  # weight decay on norms and biases (usually off)
    decay_router: bool = False  # weight decay on router parameters (usually off)
    router_lr_scale: float = 1.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr = min_lr_ratio * lr


@dataclass
class TrainLoopConfig:
    max_steps: int = 100  # optimizer steps
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA with bf16 support, else fp32
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int | None = None  # cap on validation batches (None = the whole split)
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    stats_every: int = 50  # routing statistics + expert-load heatmap (0 = off)
    max_bad_steps: int = 5  # stop after this many consecutive non-finite losses
    progress: bool = True
    # persistent expert weight-gradient buffers (mmoe.experts): null = on for CPU except under ZeRO 2, whose
    # gradient partitions already free each gradient once it is reduced; true / false force it
    grad_buffers: bool | None = None


@dataclass
class DistConfig:
    zero_stage: Literal[0, 1, 2] = 0
    ep_size: int = 1  # expert-parallel group size (divides the world size and num_experts)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    tensorboard: bool = True


@dataclass
class TrainConfig:
    task: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)


def check_train_config(cfg: TrainConfig, source: str) -> None:
    """Checks across fields that the dataclass types cannot express; errors name the key and the ``file:line``
    (or override) that set it, from the origins `load_config` leaves on ``cfg``, else ``source``."""
    from .configfile import _Ctx

    err = _Ctx(source, getattr(cfg, "_origins", None)).error

    if not cfg.task:
        raise err("task", "required (one of the registered tasks)")
    for name, value in (("train.max_steps", cfg.train.max_steps), ("train.grad_accum", cfg.train.grad_accum),
                        ("data.batch_size", cfg.data.batch_size), ("dist.ep_size", cfg.dist.ep_size)):
        if value < 1:
            raise err(name, f"must be >= 1, got {value}")
    o = cfg.optim
    for name, value, ok, rule in (
            ("optim.lr", o.lr, o.lr > 0, "must be > 0"),
            ("optim.eps", o.eps, o.eps > 0, "must be > 0"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be >= 0"),
            ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, "must be >= 0"),
            ("optim.router_lr_scale", o.router_lr_scale, o.router_lr_scale >= 0, "must be >= 0"),
            ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("optim.betas", list(o.betas), len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             "must be two numbers in [0, 1)"),
            ("train.grad_clip", cfg.train.grad_clip, cfg.train.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("train.keep_last", cfg.train.keep_last, cfg.train.keep_last >= 0, "must be >= 0 (0 = keep all)")):
        if not ok:
            raise err(name, f"{rule}, got {value}")
    if cfg.data.sources and cfg.data.train:
        raise err("data.sources", f"give data.train or data.sources, not both (data.train is "
                                  f"{cfg.data.train!r})")
    if cfg.data.sources and cfg.data.train_split is not None:
        raise err("data.train_split", "with data.sources each source sets its own split "
                                      "(data.sources[i].split)")
    _check_sources(cfg, err)
    if cfg.data.val == "synthetic" and cfg.train.eval_batches is None:
        raise err("train.eval_batches", "data.val: synthetic is endless: set train.eval_batches")


def _check_sources(cfg: TrainConfig, err) -> None:
    d = cfg.data
    if d.mix == "all":
        if not d.sources:
            raise err("data.mix", "'all' takes one batch of every data.sources entry: give "
                                  "data.sources (with a task label each)")
        for i, s in enumerate(d.sources):
            if s.task is None:
                raise err(f"data.sources[{i}].task", "data.mix: all needs a task label on every "
                                                    "source (the key of its batch)")
            if s.weight != 1.0:
                raise err(f"data.sources[{i}].weight", "unused with data.mix: all (every "
                                                      "micro-batch takes every source); remove it")
    labels = [s.task for s in d.sources if s.task is not None]
    if d.mix == "all" and len(set(labels)) != len(labels):
        raise err("data.sources", f"task labels must be distinct with data.mix: all, got {labels}")
    if d.val_sources:
        if d.val:
            raise err("data.val_sources", f"give data.val or data.val_sources, not both "
                                          f"(data.val is {d.val!r})")
        if d.val_split is not None:
            raise err("data.val_split", "with data.val_sources each source sets its own split")
        seen: set[str] = set()
        for i, s in enumerate(d.val_sources):
            if s.task is None:
                raise err(f"data.val_sources[{i}].task", "required: the task this validation "
                                                        "set belongs to")
            if s.task in seen:
                raise err(f"data.val_sources[{i}].task", f"{s.task!r} given twice")
            seen.add(s.task)
            if s.weight != 1.0:
                raise err(f"data.val_sources[{i}].weight", "unused for validation; remove it")
            if s.path == "synthetic":
                raise err(f"data.val_sources[{i}].path", "synthetic data is not supported as a "
                                                        "validation source (use data.val)")


def load_train_config(path, overrides=()) -> TrainConfig:
    from .configfile import load_config

    cfg = load_config(TrainConfig, path, overrides)
    check_train_config(cfg, str(path))
    return cfg
