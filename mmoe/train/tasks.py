"""Tasks: what a model family plugs into the engine.

A task supplies a model, how to decode and batch shard samples, a loss and evaluation metrics; the
engine (`mmoe.train.engine.Trainer`) does everything else (DeepSpeed, expert parallelism, data order,
checkpoints, logging). Register one with ``@register_task("name")``; a config selects it with
``task: name`` and its ``model:`` section is validated against ``Task.ModelConfig``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

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


class Task:
    """Base class. Subclasses set ``ModelConfig`` (a dataclass) and implement the methods below."""

    name = "task"
    ModelConfig: type = dict
    unit = "samples"  # throughput unit for the progress bar ("samples", "tokens", "images")

    def __init__(self, model_cfg: Any, options: dict[str, Any] | None = None) -> None:
        self.model_cfg = model_cfg
        self.options = dict(options or {})

    def setup(self, train_cfg: Any) -> None:
        """Called once with the whole `TrainConfig` before the model is built (e.g. to read class names
        from the data manifest)."""

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
        ``mmoe.aux_loss(model)``: the MoE aux losses of every training forward this call ran."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, float]:
        """Sums over the batch (e.g. ``loss_sum``, ``correct``, ``count``); the engine adds them over
        batches and ranks and passes the totals to `eval_metrics`."""
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

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (e.g. controllers)."""
