"""Tasks: what a model family plugs into the engine.

A task supplies a model, how to decode and batch shard samples, a loss and an evaluator; the engine
(`mmoe.train.engine.Trainer`) does everything else (DeepSpeed, expert parallelism, data order,
checkpoints, logging). Register one with ``@register_task("name")``; a config selects it with ``task: name``.

The contract, in the order the engine uses it::

    task_cls = get_task(cfg.task)
    model_cfg = from_dict(task_cls.ModelConfig, cfg.model, ...)          # the config's model: section
    options = task_cls.parse_options(cfg.task_options, source, origins)  # its task_options: section
    task = task_cls(model_cfg, options)                                  # Task(model_cfg, options)
    task.setup(TaskContext(...))        # what it may read of the run: data manifests, run dir, rank, seed
    model = task.build_model(); ...; task.model_ready(model)
    loss, scalars, units = task.loss(model, batch)                       # every training micro-batch
    ev = task.evaluator(); ev.reset()                                    # every evaluation pass:
    for batch in val: ev.process(batch, ev.run(model, batch))            #   this rank's share of the split
    ev.gather(world_group); metrics = ev.summarize()                     #   every rank, the whole split

* ``ModelConfig`` and ``Options`` are dataclasses validated by the strict loader (`mmoe.train.configfile`), so a
  typo in ``task_options`` is ``configs/x.yaml:12: task_options.lable_smoothing: unknown key (did you mean
  'label_smoothing'?)``. A cross-field check of ``Options`` is a ``ValueError("field: problem")`` raised in its
  ``__post_init__``; the loader reports it at that field's file and line. ``Options`` defaults to `NoOptions`
  (no keys).
* `TaskContext` is all ``setup`` gets: not the whole `TrainConfig`.
* `Evaluator` (after detectron2's ``DatasetEvaluator``): ``run`` is the forward of one batch, ``process``
  keeps what the metric needs, ``gather`` combines every rank's picklable ``state()`` by
  `torch.distributed.all_gather_object` (rank order; a no-op in one process), ``summarize`` computes the
  metrics; the engine calls it on every rank, which all hold the same gathered state, so every rank returns the
  same metrics. ``run`` and ``process`` are separate because under expert parallelism every rank must take part
  in every forward: a rank whose shards are exhausted repeats ``run`` on its last batch and drops the outputs.
  `SumEvaluator` (the default ``Task.evaluator()``) adds up the scalars of ``Task.eval_step`` and passes the
  totals to ``Task.eval_metrics``; `CollectingEvaluator` keeps every batch's outputs from every rank for a metric
  over the whole split (retrieval recall, mAP, a confusion matrix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..data.manifest import Manifest

__all__ = ["TASKS", "register_task", "get_task", "task_names", "Task", "NoOptions", "TaskContext", "data_manifest",
           "Evaluator", "SumEvaluator", "CollectingEvaluator"]

TASKS: dict[str, type["Task"]] = {}


def register_task(name: str) -> Callable[[type["Task"]], type["Task"]]:
    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> type["Task"]:
    """The task class registered as ``name``: by `register_task` in this process, or by a task family's
    ``mmoe.tasks`` entry point (imported only now). An unknown name, or a family that fails to import, is a
    `KeyError` that lists the known tasks (the engine turns it into a config error naming file and key)."""
    if name in TASKS:
        return TASKS[name]
    from ..plugins import family_entry_points

    eps = family_entry_points("mmoe.tasks")
    if name not in eps:
        known = sorted(set(TASKS) | set(eps))
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(known) or 'none'} (task families "
                       "register theirs as 'mmoe.tasks' entry points)")
    try:
        cls = eps[name].load()
    except ImportError as err:
        raise KeyError(f"task {name!r} comes from {eps[name].value}, which cannot be imported ({err}); is "
                       "that package installed?") from None
    TASKS.setdefault(name, cls)
    return cls


def task_names() -> list[str]:
    """Every known task name (registered in this process or declared by an installed family)."""
    from ..plugins import family_entry_points

    return sorted(set(TASKS) | set(family_entry_points("mmoe.tasks")))


# ---------------------------------------------------------------------------------------- options, context
@dataclass
class NoOptions:
    """The ``Options`` of a task without options: any key in ``task_options`` is an error."""


def data_manifest(source: str | None) -> "Manifest | None":
    """The shard manifest of ``data.train`` / ``data.val`` when that is a shard directory or a
    ``manifest.json`` that can be read; None otherwise (a URL pattern, ``synthetic``, an unreadable manifest:
    the shard loader reports those when it reads the data)."""
    if not source or source == "synthetic":
        return None
    p = Path(str(source))
    if not (p.is_dir() or p.suffix == ".json"):
        return None
    from ..data.manifest import Manifest

    try:
        return Manifest.load(p)
    except Exception:  # noqa: BLE001 - a convenience for setup; the loader reports bad data with its cause
        return None


@dataclass(frozen=True)
class TaskContext:
    """What `Task.setup` gets of the run (the engine builds it with `from_config`; tests build one directly).

    Attributes:
        run_dir: the run folder (the task may write its own files there, e.g. plots).
        train_data: ``data.train`` as configured (shard pattern, directory, ``manifest.json``, ``synthetic``;
            ``""`` when none); with ``data.sources``, the first source's path.
        val_data: ``data.val`` (None when there is no validation data).
        train_manifest: the manifest of ``train_data`` (class names, languages, counts in its ``info``); None
            when ``train_data`` is not a shard directory / manifest or cannot be read (`data_manifest`).
        val_manifest: the same for ``val_data``.
        rank: this process's rank in the world; world_size: the number of ranks.
        seed: ``run.seed``.
        sources: with ``data.sources``: ``(source, its manifest or None)`` per source, in config order (a
            multi-task task reads each task's classes or languages from its own source); else empty.
        val_sources: the same for ``data.val_sources``.
        mix: ``data.mix`` (``"all"``: every training micro-batch is a `mmoe.data.MultiBatch`).
        max_steps: ``train.max_steps``; optim: the ``optim`` section (`mmoe.train.config.OptimConfig`; a task
            whose loss follows the lr schedule, e.g. AdaMV-MoE's loss ratio), None outside the engine.
    """

    run_dir: Path
    train_data: str = ""
    val_data: str | None = None
    train_manifest: "Manifest | None" = None
    val_manifest: "Manifest | None" = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    sources: tuple = ()
    val_sources: tuple = ()
    mix: str = "weighted"
    max_steps: int = 0
    optim: Any = None

    @classmethod
    def from_config(cls, cfg: Any, *, rank: int = 0, world_size: int = 1) -> "TaskContext":
        """The context of a `TrainConfig` (``data.train``, ``data.val``, ``run.dir``, ``run.seed``)."""
        sources = tuple((src, data_manifest(src.path)) for src in getattr(cfg.data, "sources", None) or ())
        val_sources = tuple((src, data_manifest(src.path)) for src in getattr(cfg.data, "val_sources", None) or ())
        train = sources[0][0].path if sources else str(cfg.data.train or "")
        val = str(cfg.data.val) if cfg.data.val else None
        return cls(run_dir=Path(cfg.run.dir), train_data=train, val_data=val,
                   train_manifest=sources[0][1] if sources else data_manifest(train), val_manifest=data_manifest(val),
                   rank=rank, world_size=world_size, seed=int(cfg.run.seed), sources=sources,
                   val_sources=val_sources, mix=getattr(cfg.data, "mix", "weighted"),
                   max_steps=int(cfg.train.max_steps), optim=cfg.optim)


# ---------------------------------------------------------------------------------------- evaluators
class Evaluator:
    """Metrics over one evaluation pass (after detectron2's ``DatasetEvaluator``; protocol in the module
    docstring). Subclasses implement every method but `gather` and `evaluate`."""

    def reset(self) -> None:
        """Forget the results of an earlier pass."""
        raise NotImplementedError

    def run(self, model: nn.Module, batch: Any) -> Any:
        """The forward of one batch (``torch.no_grad``, model in eval mode): the outputs `process` gets. Under
        expert parallelism every rank runs it together; a rank with no batch left runs it again on its last
        batch and the outputs are dropped, so it must not change this evaluator's results itself."""
        raise NotImplementedError

    def process(self, batch: Any, outputs: Any) -> None:
        """Keep what the metrics need of one batch's ``outputs``."""
        raise NotImplementedError

    def state(self) -> Any:
        """This rank's results, picklable (tensors on the CPU), for `gather`."""
        raise NotImplementedError

    def merge(self, states: list) -> None:
        """Replace this evaluator's results by those of every rank (``states`` in rank order, this rank's
        included); ``merge([self.state()])`` changes nothing."""
        raise NotImplementedError

    def gather(self, group: Any = None) -> None:
        """Combine the results of every rank of ``group`` (a collective: all its ranks call it); a no-op with
        ``group=None`` or one rank. Afterwards every rank holds the same results."""
        from ..parallel import all_gather_objects

        self.merge(all_gather_objects(self.state(), group))

    def summarize(self) -> dict[str, float]:
        """The metrics of the results held (after `gather`: of the whole split); ``{}`` when there are none."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable) -> dict[str, float]:
        """One process over ``batches``: `reset`, `run` + `process` each, `summarize` (for tools and tests)."""
        self.reset()
        for batch in batches:
            self.process(batch, self.run(model, batch))
        self.gather(None)
        return self.summarize()


class SumEvaluator(Evaluator):
    """Adds up per-batch scalars over batches and ranks: ``step(model, batch) -> {name: sum over the batch}``,
    ``metrics(totals) -> metrics`` (the default evaluator of a task: its `Task.eval_step` and
    `Task.eval_metrics`). Ranks may return different keys; a missing key counts 0."""

    def __init__(self, step: Callable[[nn.Module, Any], Mapping[str, float]],
                 metrics: Callable[[dict[str, float]], dict[str, float]] = dict) -> None:
        self.step, self.metrics = step, metrics
        self.sums: dict[str, float] = {}

    def reset(self) -> None:
        self.sums = {}

    def run(self, model, batch):
        return self.step(model, batch)

    def process(self, batch, outputs) -> None:
        for k, v in outputs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def state(self) -> dict[str, float]:
        return dict(self.sums)

    def merge(self, states: list) -> None:
        keys = sorted({k for s in states for k in s})
        self.sums = {k: sum(float(s.get(k, 0.0)) for s in states) for k in keys}

    def summarize(self) -> dict[str, float]:
        return self.metrics(dict(self.sums)) if self.sums else {}


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class CollectingEvaluator(Evaluator):
    """Keeps one record per batch from every rank and computes the metrics over the whole split:
    ``step(model, batch) -> record`` (picklable: e.g. a dict of tensors with one row per sample; tensors are
    moved to the CPU) and ``metrics(records) -> metrics``. After `gather` the records are every rank's, rank 0's
    first, each rank's in its batch order: a metric that depends on the order of samples must sort them by
    something it records. Memory grows with the split (what the records hold, on every rank)."""

    def __init__(self, step: Callable[[nn.Module, Any], Any], metrics: Callable[[list], dict[str, float]]) -> None:
        self.step, self.metrics = step, metrics
        self.records: list = []

    def reset(self) -> None:
        self.records = []

    def run(self, model, batch):
        return self.step(model, batch)

    def process(self, batch, outputs) -> None:
        self.records.append(_to_cpu(outputs))

    def state(self) -> list:
        return list(self.records)

    def merge(self, states: list) -> None:
        self.records = [r for s in states for r in s]

    def summarize(self) -> dict[str, float]:
        return self.metrics(list(self.records)) if self.records else {}


# ---------------------------------------------------------------------------------------- the task
class Task:
    """Base class. Subclasses set ``ModelConfig`` and ``Options`` (dataclasses) and implement the methods below."""

    name = "task"
    ModelConfig: type = dict
    Options: type = NoOptions  # the task_options section
    unit = "samples"  # throughput unit for the progress bar ("samples", "tokens", "images")
    # the run's `mmoe.train.runlog.RunLogger` while `Trainer.fit` runs (None otherwise; disabled on ranks > 0):
    # a task may log its own events and metrics, e.g. from `after_step`
    logger: Any = None

    def __init__(self, model_cfg: Any, options: Any = None) -> None:
        """``options``: an instance of ``Options`` (None: its defaults); build one from a mapping with
        `parse_options`."""
        if options is None:
            options = self.Options()
        elif not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__}: options must be a {self.Options.__qualname__}, got "
                            f"{type(options).__name__} (build it with {type(self).__name__}.parse_options(mapping))")
        self.model_cfg = model_cfg
        self.options = options

    @classmethod
    def parse_options(cls, data: Mapping | None, *, source: str = "<dict>",
                      origins: Mapping[str, str] | None = None) -> Any:
        """``Options`` from the ``task_options`` mapping, strictly (`mmoe.train.configfile.from_dict`): errors
        are `ConfigError`\\ s naming ``task_options.<key>`` and, with ``origins`` (the config's ``_origins``),
        the file and line."""
        from .configfile import from_dict

        if not (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass, got {cls.Options!r}")
        return from_dict(cls.Options, dict(data or {}), source=source, path="task_options", origins=origins)

    def setup(self, ctx: TaskContext) -> None:
        """Called once before the model is built (e.g. to read class names from ``ctx.train_manifest``)."""

    # -- model
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def model_ready(self, model: nn.Module) -> None:
        """Called with the model once its experts are sharded and it sits on its device."""

    def lr_scales(self, model: nn.Module) -> dict[str, float] | None:
        """Optional per-parameter lr multipliers by parameter name (e.g. layer-wise lr decay)."""
        return None

    # -- data
    def decode(self, sample: dict) -> Any:
        """A raw shard sample (``__key__``, ``__url__``, bytes fields) -> one decoded example."""
        return sample

    def decode_eval(self, sample: dict) -> Any:
        """Decoding for evaluation (e.g. without random augmentation); default: `decode`."""
        return self.decode(sample)

    def collate(self, examples: list) -> Any:
        return torch.utils.data.default_collate(examples)

    # -- loss / metrics
    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float], int]:
        """(loss for backward, scalars to log, number of units in the batch for throughput). The engine adds
        ``mmoe.aux_loss(model)``: the MoE aux losses of every training forward this call ran that the task has
        not collected itself (a task that weights them, e.g. per task, calls ``mmoe.aux_loss(model)`` after
        each forward and returns them inside the loss; the engine then adds zero; it may report the total as
        the scalar ``aux_loss``). With ``data.sources`` labelled, ``batch`` is a `mmoe.data.SourcedBatch`;
        with ``data.mix: all`` a `mmoe.data.MultiBatch`."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        """A fresh evaluator for one evaluation pass; default: `SumEvaluator` over `eval_step` / `eval_metrics`."""
        return SumEvaluator(self.eval_step, self.eval_metrics)

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, float]:
        """Sums over the batch (e.g. ``loss_sum``, ``correct``, ``count``) for the default evaluator, which adds
        them over batches and ranks and passes the totals to `eval_metrics`."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return dict(sums)

    def eval_begin(self, model: nn.Module) -> None:
        """Called before an evaluation pass (e.g. to swap in EMA weights)."""

    def eval_end(self, model: nn.Module) -> None:
        """Called after an evaluation pass, also when it failed."""

    # -- extra state that must survive a resume (e.g. an adaptive controller)
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        """Per-rank state with tensors (e.g. a weight EMA), saved with each rank's checkpoint state."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def routing_groups(self, model: nn.Module) -> dict[str | None, dict]:
        """Routing statistics to log, in groups: ``{tag: {layer name: LayerStats}}``, each logged with its tag
        (`mmoe.train.runlog.RunLogger.log_routing`; e.g. one group per task of a multi-task model). Default:
        ``{None: mmoe.routing_stats(model)}``, the latest forward's, untagged."""
        from ..layer import routing_stats

        return {None: routing_stats(model)}

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (e.g. controllers)."""
