"""`AdaptiveTopK`: the AdaMV-MoE adaptive expert-count controller ("AES").

AdaMV-MoE ("Adaptive Multi-Task Vision Mixture-of-Experts", Chen et al., ICCV 2023; code:
google-research ``moe_mtl``, ``trainer_utils.train_and_validate_vmoe_mtl``) trains one backbone on
several tasks with a task-specific router per MoE layer over one shared expert pool, and adapts the
number of experts each task activates (its top-k) from that task's validation loss. This module is
the control rule of the released code, as transcribed in ``methods.md`` §4.2; it changes the
per-task k of every `mmoe.MoE` layer of a model through ``MoE.set_top_k(k, task=i)``.

The rule (methods.md §4.2, reproduced exactly; the constants are this class's defaults)::

    k_t = 2 ; best_t = 100.0 ; best_step_t = 40000     for every task t
    flag = False ; stop = False                          # ONE flag and ONE stop for all tasks
    every check_every (2000) train steps, with v_t = validation loss of task t:
        changed = False
        for t in tasks (processing order: cls first, then det):
            if v_t < best_t:
                best_t = v_t ; best_step_t = step ; flag = False
            elif step - best_step_t > patience (5000) and k_t < max_k (8) and not stop:
                if flag: k_t -= 1 ; stop = True      # revert, then freeze the k of ALL tasks
                else:    k_t += 1                    # plateau: one more active expert
                changed = True
        if changed: apply the k's to the routers ; flag = True

Consequences of the rule as written, kept on purpose (they are what the released code does):

* ``flag`` is shared. It is set after *any* change and cleared by a new best of *any* task, and it
  is only set after the loop over tasks, so two tasks can grow in the same check. The "revert"
  decrements the k of whichever task triggers next while ``flag`` is set, which need not be the task
  whose k was increased last: a task that never grew can go from ``initial_k`` to ``initial_k - 1``.
  methods.md reads the rule as "a single revert of the most recent increase"; that reading holds
  only when the same task triggers again. ``min_k`` (default: no floor beyond the layer's 1) can
  bound such a revert: a revert that would go below ``min_k`` leaves k unchanged but still freezes.
* ``stop`` is shared: after the single revert no task's k changes again (best losses are still
  tracked).
* ``k < max_k`` guards both branches: once a task is at ``max_k`` its last increase is never
  reverted.
* The initial ``best = 100.0`` means a first loss >= 100 is not a new best, and the initial
  ``best_step = 40000`` then delays any change to after step 45000; any loss below 100 at the first
  check is a new best and overwrites both, so changes can start from the 4th check (step 8000 with
  the defaults: 8000 - 2000 > 5000). Pass ``initial_best_loss=math.inf`` (and any
  ``initial_best_step``) to make the first finite loss always the first best.
* The signal is the validation *loss* (the code sums the task loss over 11 held-out batches with the
  current weights, train-mode forward); lower is better. A non-finite loss raises instead of
  silently counting as "no improvement" (``nan < best`` is False, so the code would have grown k).

Differences from the released code, neither affecting the rule: the code restores k and the best
losses on resume but resets ``best_step``, ``flag`` and ``stop``; `state_dict` here restores all of
them so that a resumed run continues exactly. The code checks every 2000 steps itself; here the
caller calls `update` at the steps it chooses (`should_check` gives the code's schedule).

[U] The paper text was not retrievable (methods.md §4); it may phrase the rule differently
("increase top-k when the validation loss plateaus, roll back if it does not help").

Distributed training: pass losses that are identical on every rank (all-reduced), so that every rank
takes the same decisions and keeps the same k's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

from torch import nn

from .layer import MoE, moe_layers

Reason = Literal["grow", "revert"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class TopKChange:
    """One decision of the controller: task ``task`` went from ``old_k`` to ``new_k`` at ``step``.

    ``reason`` is ``"grow"`` (plateau, k + 1) or ``"revert"`` (k - 1, then every task frozen); a revert
    clamped by ``min_k`` has ``new_k == old_k``.
    """

    step: int
    task: str
    old_k: int
    new_k: int
    reason: Reason


class AdaptiveTopK:
    """AdaMV-MoE adaptive top-k controller over every `mmoe.MoE` layer of ``model``.

    Args:
        model: a module containing `mmoe.MoE` layers (itself one included); every layer must have
            ``cfg.num_tasks >= len(tasks)``.
        tasks: task names in processing order (the released code: ``("cls", "det")``); task ``i``
            is router index ``i`` of every layer. Routers with index ``>= len(tasks)`` are untouched.
        initial_k: k of every task at the start (code: 2), or a mapping task -> k. Applied to the
            layers at construction.
        min_k: floor of a revert (``None``: 1, i.e. the code's behaviour, no floor). Must be
            ``<= initial_k``.
        max_k: growth stops when ``k == max_k`` (code: 8); must be ``<= num_experts`` of every layer.
        check_every: the check period used by `should_check` (code: 2000 train steps).
        patience: a task may change when ``step - best_step > patience`` (code: 5000).
        initial_best_loss: best loss before the first check (code: 100.0; ``math.inf`` makes the
            first loss always a new best).
        initial_best_step: best step before the first check (code: 40000).

    Call ``update(step, {task: val_loss})`` at the check steps (e.g. when ``should_check(step)``);
    it returns the new ``{task: k}`` when a k changed (after applying it), else ``None``.
    ``state_dict`` / ``load_state_dict`` save and restore everything (also re-applying the k's).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[str],
        *,
        initial_k: int | Mapping[str, int] = 2,
        min_k: int | None = None,
        max_k: int = 8,
        check_every: int = 2000,
        patience: int = 5000,
        initial_best_loss: float = 100.0,
        initial_best_step: int = 40000,
    ) -> None:
        if isinstance(tasks, str):
            raise ValueError(f"AdaptiveTopK: tasks must be a sequence of task names, not the string {tasks!r}")
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("AdaptiveTopK: tasks must name at least one task")
        for t in tasks:
            if not isinstance(t, str) or not t:
                raise ValueError(f"AdaptiveTopK: tasks must be non-empty strings, got {t!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"AdaptiveTopK: tasks has duplicate names: {list(tasks)}")
        self.tasks: tuple[str, ...] = tasks

        layers = moe_layers(model)
        if not layers:
            raise ValueError(f"AdaptiveTopK: model ({type(model).__name__}) has no mmoe.MoE layers to control")
        for name, m in layers:
            if m.cfg.num_tasks < len(tasks):
                raise ValueError(
                    f"AdaptiveTopK: MoE layer {name!r} has MoEConfig.num_tasks={m.cfg.num_tasks} routers, "
                    f"fewer than the {len(tasks)} tasks {list(tasks)}")

        _check_int("max_k", max_k, 1)
        for name, m in layers:
            if max_k > m.cfg.num_experts:
                raise ValueError(
                    f"AdaptiveTopK: max_k={max_k} exceeds MoEConfig.num_experts={m.cfg.num_experts} "
                    f"of MoE layer {name!r}")
        if isinstance(initial_k, Mapping):
            _check_task_keys("initial_k", initial_k, tasks)
            init = {t: initial_k[t] for t in tasks}
        else:
            init = {t: initial_k for t in tasks}
        for t, k in init.items():
            _check_int(f"initial_k[{t!r}]" if isinstance(initial_k, Mapping) else "initial_k", k, 1)
        if min_k is not None:
            _check_int("min_k", min_k, 1)
        floor = 1 if min_k is None else min_k
        for t, k in init.items():
            if not floor <= k <= max_k:
                raise ValueError(
                    f"AdaptiveTopK: initial_k of task {t!r} must be in [min_k={floor}, max_k={max_k}], got {k}")
        _check_int("check_every", check_every, 1)
        _check_int("patience", patience, 0)
        _check_int("initial_best_step", initial_best_step, None)
        if isinstance(initial_best_loss, bool) or not isinstance(initial_best_loss, (int, float)) \
                or math.isnan(initial_best_loss):
            raise ValueError(f"AdaptiveTopK: initial_best_loss must be a number (inf allowed), got {initial_best_loss!r}")

        self.model = model
        self.layers: list[tuple[str, MoE]] = layers
        self.initial_k = dict(init)
        self.min_k = floor
        self.max_k = max_k
        self.check_every = check_every
        self.patience = patience
        self.initial_best_loss = float(initial_best_loss)
        self.initial_best_step = initial_best_step

        self._k: dict[str, int] = dict(init)
        self._best: dict[str, float] = {t: self.initial_best_loss for t in tasks}
        self._best_step: dict[str, int] = {t: initial_best_step for t in tasks}
        self._flag = False  # shared by all tasks (methods.md §4.2)
        self._stop = False  # shared by all tasks
        self._last_step: int | None = None
        self.history: list[TopKChange] = []
        self.apply()

    # ------------------------------------------------------------------ read-only views
    @property
    def ks(self) -> dict[str, int]:
        """The current k of every task, in task order."""
        return dict(self._k)

    @property
    def best_losses(self) -> dict[str, float]:
        return dict(self._best)

    @property
    def best_steps(self) -> dict[str, int]:
        return dict(self._best_step)

    @property
    def flag(self) -> bool:
        """True while the latest change has not been followed by a new best of any task."""
        return self._flag

    @property
    def stopped(self) -> bool:
        """True after the revert: no k changes any more."""
        return self._stop

    # ------------------------------------------------------------------ control
    def should_check(self, step: int) -> bool:
        """The released code's schedule: check at every positive multiple of ``check_every``."""
        return step > 0 and step % self.check_every == 0

    def update(self, step: int, val_losses: Mapping[str, Any]) -> dict[str, int] | None:
        """Apply the rule once at train step ``step`` with the validation loss of every task.

        ``val_losses`` maps every task name (and no other) to a finite number (a Python number or a
        one-element tensor). Inputs are validated before any state changes. Steps must increase
        from call to call. Returns the new ``{task: k}`` (already applied to every MoE layer) when a
        decision fired at this check, else ``None``.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"AdaptiveTopK.update: step must be a non-negative int, got {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"AdaptiveTopK.update: step={step} is not after the previous check at step {self._last_step}")
        losses = self._validated_losses(step, val_losses)

        changed = False
        for t in self.tasks:
            v = losses[t]
            if v < self._best[t]:
                self._best[t] = v
                self._best_step[t] = step
                self._flag = False
            elif step - self._best_step[t] > self.patience and self._k[t] < self.max_k and not self._stop:
                old = self._k[t]
                if self._flag:
                    new, reason = max(old - 1, self.min_k), "revert"
                    self._stop = True
                else:
                    new, reason = old + 1, "grow"
                self._k[t] = new
                self.history.append(TopKChange(step, t, old, new, reason))
                changed = True
        self._last_step = step
        if not changed:
            return None
        self._flag = True
        self.apply()
        return self.ks

    def apply(self, model: nn.Module | None = None) -> None:
        """Set the current k of every task on every MoE layer of ``model`` (default: the controlled
        model), e.g. on a model rebuilt for evaluation."""
        if model is None:
            layers = self.layers
        else:
            layers = moe_layers(model)
            for name, m in layers:
                if m.cfg.num_tasks < len(self.tasks):
                    raise ValueError(f"AdaptiveTopK.apply: MoE layer {name!r} has MoEConfig.num_tasks="
                                     f"{m.cfg.num_tasks} < {len(self.tasks)} tasks")
        for _, m in layers:
            for i, t in enumerate(self.tasks):
                m.set_top_k(self._k[t], task=i)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain-Python state (k's, best losses and steps, both flags, last step, history)."""
        return {
            "version": _STATE_VERSION,
            "tasks": list(self.tasks),
            "k": dict(self._k),
            "best_loss": dict(self._best),
            "best_step": dict(self._best_step),
            "flag": self._flag,
            "stop": self._stop,
            "last_step": self._last_step,
            "history": [asdict(c) for c in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (same tasks, same order) and re-apply the k's to the layers."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"AdaptiveTopK.load_state_dict: unsupported state version {state.get('version')!r}")
        if list(state["tasks"]) != list(self.tasks):
            raise ValueError(f"AdaptiveTopK.load_state_dict: state is for tasks {list(state['tasks'])}, "
                             f"this controller has {list(self.tasks)}")
        for key in ("k", "best_loss", "best_step"):
            _check_task_keys(f"state[{key!r}]", state[key], self.tasks)
        ks = {t: int(state["k"][t]) for t in self.tasks}
        for t, k in ks.items():
            if not self.min_k <= k <= self.max_k:
                raise ValueError(f"AdaptiveTopK.load_state_dict: k={k} of task {t!r} is outside "
                                 f"[min_k={self.min_k}, max_k={self.max_k}]")
        self._k = ks
        self._best = {t: float(state["best_loss"][t]) for t in self.tasks}
        self._best_step = {t: int(state["best_step"][t]) for t in self.tasks}
        self._flag = bool(state["flag"])
        self._stop = bool(state["stop"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self.history = [TopKChange(**c) for c in state["history"]]
        self.apply()

    def __repr__(self) -> str:
        return (f"AdaptiveTopK(tasks={list(self.tasks)}, k={self._k}, flag={self._flag}, stop={self._stop}, "
                f"max_k={self.max_k}, patience={self.patience}, layers={len(self.layers)})")

    # ------------------------------------------------------------------ internals
    def _validated_losses(self, step: int, val_losses: Mapping[str, Any]) -> dict[str, float]:
        if not isinstance(val_losses, Mapping):
            raise TypeError(f"AdaptiveTopK.update: val_losses must map task name -> loss, got {type(val_losses).__name__}")
        _check_task_keys("val_losses", val_losses, self.tasks, where="AdaptiveTopK.update")
        out = {}
        for t in self.tasks:
            try:
                v = float(val_losses[t])
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"AdaptiveTopK.update: validation loss of task {t!r} at step {step} is not a "
                                f"number: {val_losses[t]!r}") from e
            if not math.isfinite(v):
                raise ValueError(f"AdaptiveTopK.update: validation loss of task {t!r} at step {step} is not "
                                 f"finite ({v}); refusing to adapt top-k on it")
            out[t] = v
        return out


def _check_int(name: str, v: Any, lo: int | None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        need = "an int" if lo is None else f"an int >= {lo}"
        raise ValueError(f"AdaptiveTopK: {name} must be {need}, got {v!r}")


def _check_task_keys(name: str, mapping: Mapping, tasks: Sequence[str], where: str = "AdaptiveTopK") -> None:
    unknown = [k for k in mapping if k not in tasks]
    missing = [t for t in tasks if t not in mapping]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown task(s) {unknown}")
        if missing:
            parts.append(f"missing task(s) {missing}")
        raise ValueError(f"{where}: {name} has {' and '.join(parts)}; tasks are {list(tasks)}")
