"""Run logging: a progress bar, JSON-lines metric files, TensorBoard scalars and plots.

One `RunLogger` per training run writes, under ``run_dir``:

``metrics.jsonl``
    one JSON object per `RunLogger.log` call: ``{"step": 120, "time": 1718000000.5, "loss": 2.31,
    "lr": 0.0003, ...}`` (``time`` is wall-clock seconds since the epoch).
``routing.jsonl``
    one object per `RunLogger.log_routing` call: ``{"step", "time", "layers": {name:
    LayerStats.as_dict()}}``.
``events.jsonl``
    notable events (`RunLogger.event`): ``{"step", "time", "kind", "message", **fields}``, e.g. a
    skipped non-finite step, skipped data, a saved checkpoint. They are also printed (``tqdm.write``,
    so the progress bar is not broken).
``tb/``
    TensorBoard event files (``tensorboard --logdir run_dir/tb``): ``train/<name>`` for each metric
    (a name that already contains ``/``, e.g. ``val/acc``, is used as the tag as is) and
    ``routing/<layer>/<stat>`` per MoE layer.
``plots/expert_load_step0001000.png``
    the expert-load heatmap written by each `RunLogger.log_routing` call.

Non-finite numbers: JSON has no NaN or Infinity, so a non-finite value is written as ``null`` and
recorded in a ``"nonfinite"`` object of the same shape that keeps what it was::

    {"step": 7, "time": 1718000000.5, "loss": null, "lr": 0.001, "nonfinite": {"loss": "nan"}}

(inside nested objects the marks nest the same way, list positions as string keys). Every line is
valid JSON for any reader; `read_jsonl` puts ``nan`` / ``inf`` / ``-inf`` back and drops the
``"nonfinite"`` key.

Resuming: ``RunLogger(run_dir, start_step=s)`` first drops every line with ``"step" > s`` from the
three files (`truncate_after`), so a run resumed from the checkpoint of step ``s`` continues the files
as if it had never stopped, and TensorBoard hides its own events after ``s`` (``purge_step``). A run
starting at step 0 in a used directory therefore keeps only the old step-0 lines: give a new run its
own directory.

On non-zero data-parallel ranks use ``enabled=False``: the logger then does nothing at all (no
files, no output; it does not even import torch or TensorBoard).

Typical use::

    log = RunLogger(run_dir, total_steps=cfg.steps, start_step=start, enabled=rank == 0)
    for step in range(start + 1, cfg.steps + 1):
        ...
        if step % 10 == 0:
            log.log(step, loss=loss, lr=lr, samples_per_s=throughput)
        if step % 500 == 0:
            log.log_routing(step, mmoe.routing_stats(model))
    log.close()
    plot_curves([run_dir, other_run_dir], "loss.png", keys=("loss",), smooth=20)
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "read_jsonl", "truncate_after", "plot_curves", "LOG_FILES"]

LOG_FILES = ("metrics.jsonl", "routing.jsonl", "events.jsonl")
_RESERVED = ("step", "time", "nonfinite")


# ---------------------------------------------------------------------------------------- JSON lines
def _clean(v: Any) -> tuple[Any, Any]:
    """``(json_value, marks)``: non-finite floats become ``None``; ``marks`` records them (or is None)."""
    if v is None or isinstance(v, (bool, str)):
        return v, None
    if isinstance(v, int):
        return v, None
    if isinstance(v, float):
        if math.isfinite(v):
            return v, None
        return None, "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Mapping):
        out, marks = {}, {}
        for k, x in v.items():
            c, m = _clean(x)
            out[str(k)] = c
            if m is not None:
                marks[str(k)] = m
        return out, (marks or None)
    if isinstance(v, (list, tuple)):
        out, marks = [], {}
        for i, x in enumerate(v):
            c, m = _clean(x)
            out.append(c)
            if m is not None:
                marks[str(i)] = m
        return out, (marks or None)
    if hasattr(v, "tolist") and callable(v.tolist):  # torch tensors, numpy arrays and scalars
        return _clean(v.tolist())
    if isinstance(v, os.PathLike):
        return os.fspath(v), None
    if isinstance(v, numbers.Real):
        return _clean(float(v))
    return str(v), None


def _dumps(record: Mapping) -> str:
    clean, marks = _clean(dict(record))
    if marks:
        clean["nonfinite"] = marks
    return json.dumps(clean, allow_nan=False, ensure_ascii=False)


def _restore(obj: Any, marks: Any) -> None:
    if not isinstance(marks, Mapping):
        return
    for k, m in marks.items():
        if isinstance(obj, list):
            try:
                key: Any = int(k)
            except ValueError:
                continue
            if not 0 <= key < len(obj):
                continue
        elif isinstance(obj, dict):
            key = k
            if key not in obj:
                continue
        else:
            continue
        if isinstance(m, str):
            try:
                obj[key] = float(m)
            except ValueError:
                pass
        else:
            _restore(obj[key], m)


def read_jsonl(path: str | os.PathLike, *, restore_nonfinite: bool = True) -> list[dict]:
    """The records of a JSON-lines file (``[]`` when it does not exist).

    With ``restore_nonfinite`` (default) values written as ``null`` + ``"nonfinite"`` marks are put
    back as ``float('nan')`` / ``inf`` / ``-inf`` and the ``"nonfinite"`` key is removed. A last line
    cut short by a crash (no final newline, not valid JSON) is ignored; any other invalid line raises
    ``ValueError`` naming ``file:line``.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # partial final line without newline
                break
            raise ValueError(f"{path}:{i + 1}: invalid JSON line: {e}") from None
        if restore_nonfinite and isinstance(rec, dict) and "nonfinite" in rec:
            _restore(rec, rec.pop("nonfinite"))
        out.append(rec)
    return out


def truncate_after(path: str | os.PathLike, step: int) -> None:
    """Drop the lines whose ``"step"`` is greater than ``step`` (for resuming a run).

    ``path`` is one JSON-lines file, or a run directory (then ``metrics.jsonl``, ``routing.jsonl`` and
    ``events.jsonl`` in it). Lines without a step are kept; unreadable lines (a write cut short by a
    crash) are dropped. Missing files are ignored. The file is replaced atomically.
    """
    path = Path(path)
    if path.is_dir():
        for name in LOG_FILES:
            truncate_after(path / name, step)
        return
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        s = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(s, (int, float)) and not isinstance(s, bool) and s > step:
            continue
        kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- logger
def _scalar(name: str, v: Any) -> float:
    if isinstance(v, str):
        raise TypeError(f"metric {name!r}: expected a number, got the string {v!r}")
    try:
        return float(v)  # python numbers, numpy scalars, 0-dim / one-element tensors
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"metric {name!r}: expected a number or 0-dim tensor, got {type(v).__name__}: {e}") from None


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


class RunLogger:
    """Progress bar + ``metrics.jsonl`` / ``routing.jsonl`` / ``events.jsonl`` + TensorBoard for one run.

    Args:
        run_dir: the run's directory (created).
        total_steps: steps of the whole run, for the progress bar's length and ETA (None: unknown).
        start_step: step the run starts from; lines with a larger step are dropped from existing
            files (see `truncate_after`) and the progress bar starts there.
        enabled: False on non-zero ranks: every method does nothing.
        tensorboard: write TensorBoard scalars under ``run_dir/tb`` (the writer is created on first use).
        progress: show a tqdm progress bar (postfix: loss, lr and throughput).
        unit: what the throughput counts; the postfix shows the metric named ``throughput`` or
            ``"<unit>_per_s"`` (e.g. ``samples_per_s``) as ``"1234 samples/s"``.
        desc: the progress bar's label (and the prefix of printed events).

    Values given to `log` may be Python numbers, numpy scalars or 0-dim tensors.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int | None,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        unit: str = "samples",
        desc: str = "train",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.start_step = int(start_step)
        self.enabled = bool(enabled)
        self.tensorboard = bool(tensorboard)
        self.unit = unit
        self.desc = desc
        self._files: dict[str, Any] = {}
        self._writer = None
        self._bar = None
        self._closed = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in LOG_FILES:
            if (self.run_dir / name).exists():
                truncate_after(self.run_dir / name, self.start_step)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=self.start_step,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.05,
            )

    # ------------------------------------------------------------------ output channels
    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter`` (created on first use), or None when disabled."""
        if not (self.enabled and self.tensorboard) or self._closed:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = self.start_step + 1 if self.start_step > 0 else None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
        return self._writer

    def _append(self, name: str, record: Mapping) -> None:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.run_dir / name, "a", encoding="utf-8")
        f.write(_dumps(record) + "\n")
        f.flush()

    def _active(self) -> bool:
        return self.enabled and not self._closed

    # ------------------------------------------------------------------ public API
    def log(self, step: int, **scalars: Any) -> None:
        """Log scalar metrics of ``step``: one line of ``metrics.jsonl``, TensorBoard, progress bar."""
        if not self._active():
            return
        for reserved in _RESERVED:
            if reserved in scalars:
                raise ValueError(f"metric name {reserved!r} is reserved in metrics.jsonl")
        values = {k: _scalar(k, v) for k, v in scalars.items()}
        self._append("metrics.jsonl", {"step": int(step), "time": time.time(), **values})
        w = self.writer
        if w is not None:
            for k, v in values.items():
                w.add_scalar(k if "/" in k else f"train/{k}", v, global_step=int(step))
        if self._bar is not None:
            self._update_bar(int(step), values)

    def _update_bar(self, step: int, values: dict[str, float]) -> None:
        bar = self._bar
        if step > bar.n:
            bar.update(step - bar.n)
        parts = []
        if "loss" in values:
            parts.append(f"loss={_fmt(values['loss'])}")
        if "lr" in values:
            parts.append(f"lr={values['lr']:.3g}")
        for key in ("throughput", f"{self.unit}_per_s", f"{self.unit}/s"):
            if key in values:
                parts.append(f"{values[key]:.0f} {self.unit}/s")
                break
        if parts:
            bar.set_postfix_str(", ".join(parts), refresh=True)

    def log_routing(self, step: int, stats: Mapping[str, Any], *, plot: bool = True,
                    tag: str | None = None) -> Path | None:
        """Log per-layer routing statistics (``mmoe.routing_stats(model)``) of ``step``.

        Appends ``{"step", "time", "layers": {name: stats.as_dict()}}`` to ``routing.jsonl``; writes the
        TensorBoard scalars ``routing/<layer>/{dropped_frac, entropy, activation, load_cv,
        load_max_over_mean}`` (``load_cv``: coefficient of variation of the tokens per expert, 0 when
        balanced; ``load_max_over_mean``: the busiest expert's load over the mean, 1 when balanced);
        and, with ``plot``, the expert-load heatmap ``plots/expert_load_step{step:07d}.png``.

        ``tag`` (e.g. a task of a multi-task model, `mmoe.train.tasks.Task.routing_groups`): the record
        gets ``"tag"``, the scalars are ``routing/<tag>/<layer>/...`` and the heatmap
        ``plots/expert_load_<tag>_step{step:07d}.png``.

        Returns the heatmap's path, or None (disabled, no statistics, or ``plot=False``).
        """
        if not self._active() or not stats:
            return None
        layers = {name: (s.as_dict() if hasattr(s, "as_dict") else dict(s)) for name, s in stats.items()}
        record = {"step": int(step), "time": time.time(), "layers": layers}
        if tag is not None:
            record["tag"] = tag
        self._append("routing.jsonl", record)
        w = self.writer
        if w is not None:
            for name, d in layers.items():
                for key, value in _layer_scalars(d).items():
                    w.add_scalar(f"routing/{tag + '/' if tag else ''}{name}/{key}", value, global_step=int(step))
        if not plot:
            return None
        from ..stats import plot_expert_load

        stem = f"expert_load_{tag}_step" if tag else "expert_load_step"
        path = self.run_dir / "plots" / f"{stem}{int(step):07d}.png"
        title = f"expert load{' (' + tag + ')' if tag else ''}, step {int(step)}"
        return plot_expert_load(dict(stats), path, title=title)

    def event(self, step: int, kind: str, message: str, echo: bool = True, **fields: Any) -> None:
        """Record a notable event (``kind`` e.g. ``"nonfinite_step"``, ``"skipped_data"``,
        ``"checkpoint"``) in ``events.jsonl`` and print it above the progress bar (not with ``echo=False``:
        for an event already printed before the logger existed)."""
        if not self._active():
            return
        for reserved in (*_RESERVED, "kind", "message"):
            if reserved in fields:
                raise ValueError(f"event field name {reserved!r} is reserved")
        self._append(
            "events.jsonl", {"step": int(step), "time": time.time(), "kind": kind, "message": message, **fields}
        )
        if echo:
            from tqdm.auto import tqdm

            tqdm.write(f"[{self.desc} step {int(step)}] {kind}: {message}")

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _layer_scalars(d: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("dropped_frac", "entropy", "activation", "weight_sum"):
        if isinstance(d.get(key), (int, float)):
            out[key] = float(d[key])
    tokens = d.get("tokens_per_expert")
    if isinstance(tokens, (list, tuple)) and tokens:
        t = [float(x) for x in tokens]
        mean = sum(t) / len(t)
        if mean > 0:
            std = math.sqrt(sum((x - mean) ** 2 for x in t) / len(t))
            out["load_cv"] = std / mean
            out["load_max_over_mean"] = max(t) / mean
    return out


# ---------------------------------------------------------------------------------------- plots
def _metrics_file(src: str | os.PathLike) -> tuple[Path, str]:
    p = Path(src)
    if p.is_dir():
        return p / "metrics.jsonl", p.name
    return p, (p.parent.name if p.name == "metrics.jsonl" else p.stem)


def _smooth(ys, window: int):
    import numpy as np

    y = np.asarray(ys, dtype=float)
    ok = np.isfinite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(len(y))
    lo = np.maximum(idx - window + 1, 0)
    n = ccnt[idx + 1] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (csum[idx + 1] - csum[lo]) / np.maximum(n, 1), np.nan)


def plot_curves(
    run_dirs_or_jsonl: Sequence[str | os.PathLike] | str | os.PathLike,
    path: str | os.PathLike,
    *,
    keys: Sequence[str] = ("loss",),
    labels: Sequence[str] | None = None,
    x: str = "step",
    smooth: int | Mapping[str, int] = 0,
) -> Path:
    """Write a PNG of metric curves (one panel per key, the runs overlaid); returns its path.

    Args:
        run_dirs_or_jsonl: run directories (their ``metrics.jsonl``) and/or JSON-lines files.
        path: the PNG to write (parent folders are created).
        keys: metrics to plot; records without the key are skipped (non-finite values leave gaps).
        labels: legend labels, one per run (default: the run directory's name).
        x: the x axis: ``"step"``, ``"time"`` (minutes since the run's first record) or any metric.
        smooth: trailing moving-average window in points (0 or 1: raw curves; else the raw curve is
            drawn faintly under the smoothed one); a mapping gives a window per key (others raw), e.g.
            ``{"loss": 20}`` to smooth the training loss but not the few validation points.

    Raises:
        ValueError: no run has any of ``keys``, or ``labels`` does not match the runs.
    """
    if isinstance(run_dirs_or_jsonl, (str, os.PathLike)):
        run_dirs_or_jsonl = [run_dirs_or_jsonl]
    sources = [_metrics_file(s) for s in run_dirs_or_jsonl]
    if labels is not None and len(labels) != len(sources):
        raise ValueError(f"plot_curves: {len(labels)} labels for {len(sources)} runs")
    if isinstance(keys, str):
        keys = (keys,)
    keys = list(keys)
    series: dict[str, list[tuple[int, str, list[float], list[float]]]] = {k: [] for k in keys}
    for i, (file, default_label) in enumerate(sources):
        records = read_jsonl(file)
        label = labels[i] if labels is not None else default_label
        t0 = next((r["time"] for r in records if isinstance(r.get("time"), (int, float))), 0.0)
        for k in keys:
            xs, ys = [], []
            for r in records:
                if k not in r or x not in r:
                    continue
                xv, yv = r[x], r[k]
                if not isinstance(xv, (int, float)) or isinstance(xv, bool):
                    continue
                xs.append((xv - t0) / 60.0 if x == "time" else float(xv))
                ys.append(float(yv) if isinstance(yv, (int, float)) else float("nan"))
            if xs:
                series[k].append((i, label, xs, ys))
    if not any(series.values()):
        files = ", ".join(str(f) for f, _ in sources)
        raise ValueError(f"plot_curves: none of the keys {keys} found in {files}")

    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7.0, 2.6 * len(keys) + 0.6))
    axes = fig.subplots(len(keys), 1, squeeze=False, sharex=True)[:, 0]
    for ax, k in zip(axes, keys):
        window = smooth.get(k, 0) if isinstance(smooth, Mapping) else smooth
        for i, label, xs, ys in series[k]:
            c = f"C{i % 10}"  # one colour per run, the same in every panel
            if window and window > 1:
                ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
                ax.plot(xs, _smooth(ys, window), color=c, label=label, linewidth=1.4)
            else:
                ax.plot(xs, ys, color=c, label=label, linewidth=1.2)
        ax.set_ylabel(k)
        ax.grid(True, alpha=0.3)
        if series[k]:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("time (min)" if x == "time" else x)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
