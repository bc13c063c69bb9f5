"""``mmoe compare CONFIG``: train one model with several variants (and seeds) on the same data and budget,
then tabulate and plot the results.

::

    mmoe compare configs/compare/dense_backprop.yaml       # every variant, seeds 0 and 1, runs/compare/dense_backprop
    mmoe compare configs/compare/dense_backprop.yaml --variants topk,default --seeds 0 --steps 50
    mmoe compare configs/compare/router.yaml --out runs/cmp/router optim.lr=2e-3   # overrides for every variant
    mmoe compare configs/compare/router.yaml --plot-only                  # table + plot of what has finished

Variants
--------
A compare config is an ordinary training config (``base:`` inheritance included) with one extra top-level
mapping, ``variants:``, from variant name to that variant's overrides::

    base: ../lm_tiny.yaml
    variants:
      topk:     {model.moe.dense_backprop: none}
      default:  {model.moe.dense_backprop: default}
      mh_flops: {model.moe.dense_backprop: none, mh_moe: {heads: 2, match: flops}}

* Keys are dotted config paths (``model.moe.router``), values are YAML values (types kept). A mapping value
  is merged key by key (``model.moe: {router: xmoe, xmoe_dim: 8}`` sets two keys). ``{}`` (or an empty
  value) is the config as it is.
* ``mh_moe: {heads: h, match: flops|params, experts_multiple_of: 8}`` replaces ``num_experts``, ``top_k``,
  ``expert_hidden`` and ``heads`` of ``model.moe`` with `mmoe.mh_moe_config` applied to the variant's MoE
  config (methods.md §2.3): ``flops`` keeps FLOPs and parameters (v2 regime: h*k experts per sub-token,
  more, narrower experts), ``params`` keeps E, k and the parameters (v1 regime, about h times the FLOPs).
* Order: the file, then the command-line ``key=value`` overrides (every variant), then the variant's own
  overrides (so a variant's keys win), then the ``mh_moe`` rewrite, then ``--steps`` (``train.max_steps``),
  ``run.dir = OUT/<variant>/seed<k>`` and ``run.seed = k``. Every variant's config is validated (model
  section included) before anything trains; unknown keys are errors naming the file and line.
* No ``variants:`` in the file: one variant named ``base``.

Reported metrics
----------------
By default the table and plot show validation perplexity and loss (``val/loss``, language models). A
task that validates with other metrics names them in a second extra top-level key, ``report:``, a list of
``metrics.jsonl`` keys without the ``val/`` prefix; a plain name is higher-is-better, the mapping form sets
the direction::

    report: [bbox/AP, segm/AP, bbox/AP50]                 # detection
    report: [mIoU, pixel_acc]                             # segmentation
    report: [acc, {name: loss, better: lower}]            # classification

Then the table has, instead of the perplexity and loss columns, ``final <name>`` and ``best <name>`` of
every reported metric (best: highest, or lowest for ``better: lower``, over the evaluations) and
``Δ <first> vs <first variant>`` (difference of the final means), and the plot shows the first metric.
A malformed entry is a config error naming the file, line and key (``report[1].better``). A reported
metric that no run logs, or runs without ``val/loss`` and no ``report:``, get a warning that lists the
validation metrics the runs log.

Runs
----
``mmoe compare`` is one process (under DeepSpeed's launcher every rank runs it and rank 0 writes the
files; not tested). Runs train one after the other in this process, seeds interleaved (v1 s0, v2 s0, ...,
v1 s1, v2 s1, ...) so that a partial comparison stays balanced. A run directory that already holds a
finished run of the same config (final checkpoint at ``train.max_steps`` and final validation metrics in
``metrics.jsonl``: any ``val/`` metric at that step) is skipped; an unfinished one resumes from its latest
checkpoint (the engine's exact resume; ``train.save_every`` sets how much an interruption costs); one with
a different config (keys other than ``run.dir``, ``run.tensorboard``, ``train.progress``) is an error: use
another ``--out``. After every run the results are rewritten, so ``OUT/results.md`` shows the comparison so
far. ``--plot-only`` trains nothing and tabulates what is there (unfinished runs appear in the plot, not in
the means).

Results (``OUT/results.json``, ``OUT/results.md``, printed as a Markdown table; ``--json`` prints the JSON)
-----------------------------------------------------------------------------------------------------------
Per variant, mean ± sample std over the finished seeds (per seed in the JSON): final validation perplexity
and loss (at ``max_steps``), best validation perplexity over the evaluations, the change of the final
perplexity against the first variant (with ``report:``, the reported metrics instead: JSON keys
``final_val/<name>`` and ``best_val/<name>``, per seed also ``best_step_val/<name>`` and the curves
``report_curves``), training throughput (median of the logged ``throughput`` in the task's unit,
`mmoe.train.tasks.Task.unit`: tokens/s for the language models, images/s for vision; JSON ``throughput``,
``tokens_per_s`` kept as its old name, and ``unit``), total and active parameters (`mmoe.count_params` on
the built model), MoE multiply-adds per token summed over the MoE layers (`mmoe.moe_cost`), load balance
from the last record of ``routing.jsonl`` (busiest expert's routed slots over the mean, and the coefficient
of variation of the slots per expert, both averaged over the MoE layers; 1 and 0 when balanced) and, when a variant uses
MH-MoE (heads > 1), the expert activation (fraction of the experts a token's sub-tokens reach).

Statistics (`add_statistics`, `mmoe.tools.stats`; JSON ``stats`` per variant, a second table in
``results.md``): the final metric's mean and 95% Student-t interval over the finished seeds, the paired
difference to the first variant over the seeds both finished (per seed, mean, interval) with a verdict
(better / worse when the interval excludes 0, else inconclusive), and, for perplexity, the training tokens
to reach ``--target-ppl`` (default: the first variant's mean final perplexity; interpolated between
evaluations) with the per-seed ratio to the first variant's.

``OUT/val_loss.png`` (with ``report:``, ``OUT/val_<first metric>.png``, ``/`` written ``_``: e.g.
``val_bbox_AP.png``; the JSON's ``plot``): validation loss (or the first reported metric) against training
tokens seen (counted exactly by replaying the training data stream of each seed without the model; the step
when tokens cannot be counted, e.g. images), one colour per variant, every seed as a thin line and the seed
mean as a thick line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..argtypes import int_list
from ..argtypes import positive_int as _positive_int

VARIANTS_KEY = "variants"
MH_MOE_KEY = "mh_moe"
REPORT_KEY = "report"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# config keys that do not change what a run computes (a finished run with other values is still reused)
_IGNORED_KEYS = ("train.progress", "run.tensorboard", "run.dir")


def _is_main() -> bool:
    """Rank 0 (or no launcher): the process that writes the comparison's files."""
    return int(os.environ.get("RANK", "0") or 0) == 0


# ------------------------------------------------------------------------------------------------
# variants


@dataclass
class MHMoESpec:
    """The ``mh_moe:`` entry of a variant (see `mmoe.mh_moe_config`)."""

    heads: int
    match: Literal["flops", "params"] = "flops"
    experts_multiple_of: int = 8

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise ValueError(f"heads: must be >= 1 (got {self.heads})")
        if self.experts_multiple_of < 1:
            raise ValueError(f"experts_multiple_of: must be >= 1 (got {self.experts_multiple_of})")


@dataclass
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)  # ``key.sub=value`` texts, applied in order
    mh_moe: MHMoESpec | None = None
    origin: str = ""  # ``file:line`` of the variant


@dataclass
class ReportMetric:
    """One entry of ``report:``: a validation metric (its ``metrics.jsonl`` key without ``val/``)."""

    name: str
    better: Literal["higher", "lower"] = "higher"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip() or " " in self.name:
            raise ValueError(f"name: expected a metric name like bbox/AP, got {self.name!r}")
        if self.name.startswith("val/"):
            raise ValueError(f"name: give the metric without its 'val/' prefix ({self.name[4:]!r}, not {self.name!r})")

    @property
    def key(self) -> str:
        """The metric's key in ``metrics.jsonl``."""
        return f"val/{self.name}"


@dataclass
class CompareFile:
    """A compare config: the training config (``variants`` and ``report`` removed, ``base`` merged), its variants
    and the validation metrics to report (empty: perplexity and loss)."""

    path: str
    data: dict
    origins: dict[str, str]
    variants: dict[str, Variant]
    report: list[ReportMetric] = field(default_factory=list)


def _override_text(key: str, value: Any) -> str:
    """``key=value`` that `mmoe.train.configfile.parse_override` reads back as ``value`` (type kept)."""
    from ..train.configfile import parse_override

    if isinstance(value, str):
        try:
            if parse_override(f"{key}={value}")[1] == value:
                return f"{key}={value}"
        except ValueError:
            pass
    return f"{key}={json.dumps(value)}"


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    """Leaf ``(dotted key, value)`` pairs of a variant entry (an empty mapping sets nothing)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out.append((prefix, value))


def parse_variants(raw: Any, path: str, origins: dict[str, str]) -> dict[str, Variant]:
    """The ``variants:`` mapping of a compare file as `Variant` objects (errors name file and line)."""
    from ..train.configfile import ConfigError, from_dict

    where = origins.get(VARIANTS_KEY, path)
    if raw is None:
        return {"base": Variant("base", origin=path)}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(where, VARIANTS_KEY,
                          f"expected a non-empty mapping of variant name to overrides, got {raw!r}")
    out: dict[str, Variant] = {}
    for name, spec in raw.items():
        vkey = f"{VARIANTS_KEY}.{name}"
        vwhere = origins.get(vkey, where)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(vwhere, vkey, "a variant name must be letters, digits, '_', '.', '+' or '-' "
                              "(it names the run directory)")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise ConfigError(vwhere, vkey, f"expected a mapping of config keys to values, got {spec!r}")
        variant = Variant(name, origin=vwhere)
        for key, value in spec.items():
            kpath = f"{vkey}.{key}"
            if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
                raise ConfigError(origins.get(kpath, vwhere), kpath,
                                  "expected a dotted config key like model.moe.top_k")
            if key == MH_MOE_KEY:
                if not isinstance(value, dict):
                    raise ConfigError(origins.get(kpath, vwhere), kpath,
                                      "expected a mapping like {heads: 2, match: flops}")
                variant.mh_moe = from_dict(MHMoESpec, value, source=path, path=kpath, origins=origins)
                continue
            items: list[tuple[str, Any]] = []
            _flatten(key, value, items)
            for k, _ in items:
                if k in ("run.dir", "run.seed"):
                    raise ConfigError(origins.get(kpath, vwhere), f"{vkey}.{k}", "set by mmoe compare (--out, --seeds)")
            variant.overrides.extend(_override_text(k, v) for k, v in items)
        out[name] = variant
    return out


def parse_report(raw: Any, path: str, origins: dict[str, str]) -> list[ReportMetric]:
    """The ``report:`` list of a compare file as `ReportMetric` objects (errors name file, line and key)."""
    from ..train.configfile import ConfigError, from_dict

    where = origins.get(REPORT_KEY, path)
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise ConfigError(where, REPORT_KEY, "expected a non-empty list of validation metric names (as in "
                          f"metrics.jsonl, without 'val/'), e.g. [bbox/AP, {{name: loss, better: lower}}], got {raw!r}")
    out: list[ReportMetric] = []
    for i, item in enumerate(raw):
        ipath = f"{REPORT_KEY}[{i}]"
        iwhere = origins.get(ipath, where)
        if isinstance(item, str):
            try:
                metric = ReportMetric(item)
            except ValueError as err:
                raise ConfigError(iwhere, ipath, str(err).split(": ", 1)[1]) from None
        elif isinstance(item, dict):
            metric = from_dict(ReportMetric, item, source=path, path=ipath, origins=origins)
        else:
            raise ConfigError(iwhere, ipath, f"expected a metric name or a mapping like {{name: loss, better: lower}}, "
                              f"got {item!r}")
        if any(m.name == metric.name for m in out):
            raise ConfigError(iwhere, ipath, f"{metric.name!r} is listed twice")
        out.append(metric)
    return out


def load_compare_file(path: str | os.PathLike) -> CompareFile:
    """Read a compare config: ``base`` files merged, ``variants`` and ``report`` popped and parsed (the training
    config is not yet validated)."""
    from ..train.configfile import load_yaml

    path = str(path)
    data, origins = load_yaml(path)
    raw = data.pop(VARIANTS_KEY, None)
    variants = parse_variants(raw, path, origins)
    report = parse_report(data.pop(REPORT_KEY, None), path, origins)
    origins = {k: v for k, v in origins.items()
               if not any(k == top or k.startswith((top + ".", top + "[")) for top in (VARIANTS_KEY, REPORT_KEY))}
    return CompareFile(path, data, origins, variants, report)


def select_variants(cf: CompareFile, names: Sequence[str] | None) -> list[Variant]:
    """The variants named (all of the file's, in file order, when ``names`` is empty)."""
    from ..train.configfile import ConfigError

    if not names:
        return list(cf.variants.values())
    unknown = [n for n in names if n not in cf.variants]
    if unknown:
        raise ConfigError(cf.path, VARIANTS_KEY, f"unknown variant(s) {', '.join(map(repr, unknown))}; "
                          f"available: {', '.join(cf.variants)}")
    return [cf.variants[n] for n in dict.fromkeys(names)]


def _task_class(task: str, source: str):
    from ..train.configfile import ConfigError
    from ..train.tasks import get_task

    try:
        return get_task(task)
    except KeyError as err:
        raise ConfigError(source, "task", err.args[0]) from None


def base_moe_config(task_cls, model: dict, source: str, origins: dict | None = None):
    """The `mmoe.MoEConfig` of a model section (the task's ``moe_config()``, else ``dim`` + ``moe`` through
    `mmoe.moe_config_from_section`)."""
    from ..config import moe_config_from_section
    from ..train.configfile import ConfigError, from_dict, locate_error

    if task_cls.ModelConfig is not dict:
        mc = from_dict(task_cls.ModelConfig, model, source=source, path="model", origins=origins)
        mcfg = mc.moe_config() if hasattr(mc, "moe_config") else None
        if mcfg is not None:
            return mcfg
    moe = model.get("moe")
    if not isinstance(moe, dict) or "dim" not in model:
        raise ConfigError(source, "model.moe", "mh_moe needs a model section with dim and a moe mapping")
    try:
        return moe_config_from_section(moe, dim=model["dim"])
    except ConfigError as err:
        raise locate_error(err, path="model", source=source, origins=origins) from None


def variant_config(cf: CompareFile, variant: Variant, *, overrides: Sequence[str] = (), seed: int | None = None,
                   run_dir: str | os.PathLike | None = None, steps: int | None = None):
    """The validated `TrainConfig` of one (variant, seed) run (see the module docstring for the order)."""
    from ..train.configfile import ConfigError, apply_overrides, from_dict
    from ..multihead import mh_moe_config
    from ..train.config import TrainConfig, check_train_config

    origins = dict(cf.origins)
    for text in overrides:
        if text.split("=", 1)[0].strip() in ("run.dir", "run.seed"):
            raise ConfigError(f"command line: override {text!r}", text.split("=", 1)[0].strip(),
                              "set by mmoe compare (use --out / --seeds)")
    data = apply_overrides(cf.data, list(overrides), source="command line", cls=TrainConfig, origins=origins)
    vsource = f"{variant.origin}: variant {variant.name!r}"
    data = apply_overrides(data, variant.overrides, source=vsource, cls=TrainConfig, origins=origins)
    if variant.mh_moe is not None:
        spec = variant.mh_moe
        task_cls = _task_class(data.get("task") or "", cf.path)
        model = data.get("model") or {}
        base = base_moe_config(task_cls, model, cf.path, origins)
        msource = f"{vsource}: {MH_MOE_KEY}"
        try:
            mh = mh_moe_config(base, spec.heads, spec.match, experts_multiple_of=spec.experts_multiple_of)
        except ValueError as err:
            raise ConfigError(msource, "model.moe", str(err)) from None
        sets = [f"model.moe.{k}={getattr(mh, k)}" for k in ("num_experts", "top_k", "expert_hidden", "heads")]
        data = apply_overrides(data, sets, source=msource, cls=TrainConfig, origins=origins)
    fixed = []
    if steps is not None:
        fixed.append(f"train.max_steps={int(steps)}")
    if run_dir is not None:
        fixed.append(f"run.dir={json.dumps(str(run_dir))}")
    if seed is not None:
        fixed.append(f"run.seed={int(seed)}")
    data = apply_overrides(data, fixed, source="mmoe compare", cls=TrainConfig, origins=origins)
    try:
        cfg = from_dict(TrainConfig, data, source=cf.path, origins=origins)
        check_train_config(cfg, cf.path)
        task_cls = _task_class(cfg.task, cf.path)
        if task_cls.ModelConfig is not dict:  # the engine validates it only when it starts: fail before training
            from_dict(task_cls.ModelConfig, cfg.model, source=cf.path, path="model", origins=origins)
        task_cls.parse_options(cfg.task_options, source=cf.path, origins=origins)  # likewise
        object.__setattr__(cfg, "_origins", origins)  # for the engine's later validation of these sections
    except ConfigError as err:
        if f"variant {variant.name!r}" in err.origin:
            raise
        raise ConfigError(f"{vsource}: {err.origin}", err.key, err.problem) from None
    return cfg


# ------------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    variant: Variant
    seed: int
    dir: Path
    cfg: Any  # TrainConfig
    status: str = "new"  # new | partial | finished
    wall_s: float | None = None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def config_differences(saved_path: Path, cfg) -> list[str]:
    """Dotted keys whose values differ between a run's saved ``config.yaml`` and ``cfg``."""
    from ..train.configfile import load_config, to_dict
    from ..train.config import TrainConfig

    saved = _flat(to_dict(load_config(TrainConfig, saved_path)))
    now = _flat(to_dict(cfg))
    keys = sorted(set(saved) | set(now))
    return [k for k in keys if k not in _IGNORED_KEYS and saved.get(k, "<unset>") != now.get(k, "<unset>")]


def _last_checkpoint_step(run_dir: Path) -> int | None:
    from ..train import checkpoint as ckpt_lib

    latest = ckpt_lib.find_latest(run_dir / "checkpoints")
    if latest is None:
        return None
    return int(ckpt_lib.read_meta(latest)["step"])


def run_status(run_dir: Path, cfg) -> tuple[str, list[str]]:
    """``("new" | "partial" | "finished" | "mismatch", differing keys)`` of a run directory."""
    from ..train.runlog import read_jsonl

    if not (run_dir / "config.yaml").is_file():
        return "new", []
    diff = config_differences(run_dir / "config.yaml", cfg)
    if diff:
        return "mismatch", diff
    step = _last_checkpoint_step(run_dir)
    if step is None:
        return "partial", []
    final = step >= cfg.train.max_steps
    if final and cfg.data.val:  # the final validation was logged (any val/ metric: detection logs no val/loss)
        final = any(r.get("step") == cfg.train.max_steps and any(k.startswith("val/") for k in r)
                    for r in read_jsonl(run_dir / "metrics.jsonl"))
    return ("finished" if final else "partial"), []


def plan_runs(cf: CompareFile, variants: Sequence[Variant], seeds: Sequence[int], out: Path, *,
              overrides: Sequence[str] = (), steps: int | None = None) -> list[Run]:
    """Every (variant, seed) run, seeds interleaved, with its validated config and status."""
    runs = []
    for seed in seeds:
        for v in variants:
            run_dir = out / v.name / f"seed{seed}"
            cfg = variant_config(cf, v, overrides=overrides, seed=seed, run_dir=run_dir, steps=steps)
            runs.append(Run(v, seed, run_dir, cfg))
    return runs


def train_run(run: Run, source: str) -> dict:
    """Train (or resume) one run in this process; returns the final validation metrics."""
    import gc

    from ..train.engine import Trainer

    t0 = time.perf_counter()
    resume = run.status == "partial"
    trainer = Trainer(run.cfg, config_source=source, resume=resume)
    try:
        metrics = trainer.fit()
    finally:
        del trainer
        gc.collect()
    run.wall_s = time.perf_counter() - t0
    if not _is_main():
        return metrics
    info_path = run.dir / "compare.json"
    info = json.loads(info_path.read_text()) if (resume and info_path.is_file()) else {}
    info["wall_s"] = float(info.get("wall_s", 0.0)) + run.wall_s
    info["resumed"] = bool(info.get("resumed")) or resume
    info_path.write_text(json.dumps(info, indent=1))
    return metrics


# ------------------------------------------------------------------------------------------------
# measurements


def _task_for(cfg, source: str):
    from ..train.configfile import from_dict
    from ..train.tasks import TaskContext

    task_cls = _task_class(cfg.task, source)
    model_cfg = from_dict(task_cls.ModelConfig, cfg.model, source=source, path="model")
    options = task_cls.parse_options(cfg.task_options, source=source, origins=getattr(cfg, "_origins", None))
    task = task_cls(model_cfg, options)
    task.setup(TaskContext.from_config(cfg))
    return task


def model_size(cfg, source: str) -> dict:
    """Total / active parameters of the built model and the MoE cost (`mmoe.moe_cost`) of its MoE layers."""
    import warnings

    from ..layer import moe_layers
    from ..multihead import moe_cost

    task = _task_for(cfg, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. CausalityWarning: the engine warns when it trains
        model = task.build_model()
    from ..stats import count_params

    total, active, _ = count_params(model)
    layers = [m.cfg for _, m in moe_layers(model)]
    costs = [moe_cost(c) for c in layers]
    out = {"total": int(total), "active": int(active), "moe_layers": len(layers),
           "moe_params": sum(c["params"] for c in costs), "moe_macs_per_token": sum(c["macs_per_token"] for c in costs)}
    if layers:
        c = layers[0]
        out["moe"] = {"num_experts": c.num_experts, "top_k": c.top_k, "expert_hidden": c.hidden, "heads": c.heads,
                      "router": c.router, "dense_backprop": c.dense_backprop}
    return out


def _data_key(cfg) -> str:
    from ..train.configfile import to_dict

    d = to_dict(cfg)
    skip = ("moe", "moe_layers", "first_dense", "moe_init", "dropout")
    model = {k: v for k, v in d["model"].items() if k not in skip}
    return json.dumps({"task": d["task"], "model": model, "data": d["data"], "opts": d["task_options"],
                       "seed": cfg.run.seed, "accum": cfg.train.grad_accum, "steps": cfg.train.max_steps},
                      sort_keys=True, default=str)


def count_tokens(cfg, source: str) -> list[int] | None:
    """Cumulative training tokens after each step (index 0: 0), by replaying the run's training data stream
    (the engine's own loader, every rank) without the model; None when the batches are not token batches."""
    import types


    from ..data.mixing import SourcedBatch
    from ..train.engine import Trainer

    task = _task_for(cfg, source)
    specials = getattr(task, "specials", None)
    if specials is None:
        return None
    pad = specials()["pad"]
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_step = [0] * cfg.train.max_steps
    for rank in range(world):
        holder = types.SimpleNamespace(cfg=cfg, task=task, rank=rank, world=world)
        loader = Trainer._make_loader(holder, train=True)
        it = iter(loader)
        for step in range(cfg.train.max_steps):
            for _ in range(cfg.train.grad_accum):
                batch = next(it)
                if isinstance(batch, SourcedBatch):  # data.sources
                    batch = batch.data
                if not isinstance(batch, dict) or "input_ids" not in batch:
                    return None
                per_step[step] += int((batch["input_ids"] != pad).sum())
        del it, loader
    cum = [0]
    for n in per_step:
        cum.append(cum[-1] + n)
    return cum


def tokens_seen(run: Run, source: str, cache: dict) -> list[int] | None:
    """`count_tokens` for a run, cached in memory (same data stream) and in ``RUN/tokens_seen.json``."""
    key = _data_key(run.cfg)
    if key in cache:
        return cache[key]
    path = run.dir / "tokens_seen.json"
    cum = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                cum = saved["cumulative"]
        except (ValueError, KeyError):
            cum = None
    if cum is None:
        try:
            cum = count_tokens(run.cfg, source)
        except Exception as err:  # noqa: BLE001 - the plot falls back to steps
            print(f"mmoe compare: cannot count the training tokens of {run.dir} ({err}); plotting against steps",
                  file=sys.stderr)
            cum = None
    cache[key] = cum
    store_tokens(run, cum)
    return cum


def store_tokens(run: Run, cum: list[int] | None) -> None:
    """Keep a run's token count in ``RUN/tokens_seen.json`` (once the run folder exists)."""
    path = run.dir / "tokens_seen.json"
    if cum is not None and _is_main() and run.dir.is_dir() and not path.is_file():
        path.write_text(json.dumps({"key": _data_key(run.cfg), "cumulative": cum}))


def _load_stats(record: dict) -> dict:
    """Load balance of one ``routing.jsonl`` record, averaged over its MoE layers."""
    mom, cvs, acts = [], [], []
    for d in (record.get("layers") or {}).values():
        t = [float(x) for x in d.get("tokens_per_expert") or []]
        if t:
            mean = sum(t) / len(t)
            if mean > 0:
                std = math.sqrt(sum((x - mean) ** 2 for x in t) / len(t))
                mom.append(max(t) / mean)
                cvs.append(std / mean)
        if isinstance(d.get("activation"), (int, float)):
            acts.append(float(d["activation"]))
    avg = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"load_max_over_mean": avg(mom), "load_cv": avg(cvs), "activation": avg(acts),
            "routing_step": record.get("step")}


def _numeric(r: dict, key: str) -> bool:
    v = r.get(key)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def collect_run(run: Run, report: Sequence[ReportMetric] = ()) -> dict | None:
    """The measurements of one run from its files (None when it has not logged anything yet); with ``report``,
    also the final (at ``max_steps``) and best value and the curve of each reported validation metric."""
    from ..train.runlog import read_jsonl

    recs = read_jsonl(run.dir / "metrics.jsonl")
    if not recs:
        return None
    val = [r for r in recs if _numeric(r, "val/loss")]
    thr = [float(r["throughput"]) for r in recs if _numeric(r, "throughput")]
    max_steps = run.cfg.train.max_steps
    final = next((r for r in reversed(val) if r["step"] == max_steps), None)
    best = min(val, key=lambda r: r["val/loss"]) if val else None
    routing = read_jsonl(run.dir / "routing.jsonl")
    out = {
        "seed": run.seed, "dir": str(run.dir), "status": run.status,
        "step": max((int(r["step"]) for r in recs), default=0),
        "final_val_loss": final["val/loss"] if final else None,
        "final_val_ppl": final.get("val/ppl", math.exp(min(final["val/loss"], 50.0))) if final else None,
        "best_val_ppl": best.get("val/ppl", math.exp(min(best["val/loss"], 50.0))) if best else None,
        "best_val_step": best["step"] if best else None,
        "final_val_acc": final.get("val/acc") if final else None,
        "tokens_per_s": statistics.median(thr) if thr else None,  # the name of old results: any unit
        "throughput": statistics.median(thr) if thr else None,  # in the task's unit (results' "unit")
        **(_load_stats(routing[-1]) if routing else {"load_max_over_mean": None, "load_cv": None,
                                                       "activation": None, "routing_step": None}),
        "val_curve": [[int(r["step"]), float(r["val/loss"])] for r in val],
        "val_metrics": sorted({k[4:] for r in recs for k in r if k.startswith("val/") and _numeric(r, k)}),
    }
    if report:
        curves = {}
        for metric in report:
            rows = [r for r in recs if _numeric(r, metric.key)]
            last = next((r for r in reversed(rows) if r["step"] == max_steps), None)
            pick = max if metric.better == "higher" else min
            top = pick(rows, key=lambda r: r[metric.key]) if rows else None
            out[f"final_{metric.key}"] = float(last[metric.key]) if last else None
            out[f"best_{metric.key}"] = float(top[metric.key]) if top else None
            out[f"best_step_{metric.key}"] = int(top["step"]) if top else None
            curves[metric.name] = [[int(r["step"]), float(r[metric.key])] for r in rows]
        out["report_curves"] = curves
    info = run.dir / "compare.json"
    if info.is_file():
        try:
            out["wall_s"] = json.loads(info.read_text()).get("wall_s")
        except ValueError:
            pass
    return out


_METRICS = ("final_val_ppl", "best_val_ppl", "final_val_loss", "final_val_acc", "tokens_per_s", "throughput",
            "load_max_over_mean", "load_cv", "activation", "wall_s")


def task_unit(cfg) -> str:
    """What the task's logged ``throughput`` counts per second (`mmoe.train.tasks.Task.unit`; else "units")."""
    from ..train.tasks import get_task

    try:
        unit = getattr(get_task(cfg.task), "unit", None)
    except KeyError:
        unit = None
    return unit if isinstance(unit, str) and unit else "units"


def _mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def add_statistics(variants: dict[str, dict], tokens: dict[tuple[str, int], list[int] | None],
                   report: Sequence[ReportMetric] = (), *, target_ppl: float | None = None) -> None:
    """Each variant's ``stats`` (`mmoe.tools.stats`): the 95% interval of its final metric (validation
    perplexity, or the first reported metric) over the finished seeds, the paired difference to the first
    variant (same seeds) with its per-seed values and verdict, and, for perplexity, the training tokens to
    reach the target (``target_ppl``, default the first variant's mean final perplexity) with the per-seed
    ratio to the first variant's."""
    from .stats import paired_difference, t_interval, tokens_to_target, verdict

    key = f"final_{report[0].key}" if report else "final_val_ppl"
    better = report[0].better if report else "lower"
    names = list(variants)
    if not names:
        return

    def finished(name: str) -> dict:
        return {m["seed"]: m for m in variants[name]["runs"].values() if m["status"] == "finished"}

    base = finished(names[0])
    base_vals = {s: m.get(key) for s, m in base.items()}
    target = target_ppl
    if target is None and not report:
        target = t_interval(list(base_vals.values()))["mean"]
    reach: dict[str, dict] = {}
    for name in names:
        runs = finished(name)
        reach[name] = {}
        if target is not None and not report:
            for seed, m in runs.items():
                got = tokens_to_target(m.get("val_curve") or [], tokens.get((name, seed)), math.log(target))
                reach[name][seed] = got
    for name in names:
        runs = finished(name)
        vals = {s: m.get(key) for s, m in runs.items()}
        diff = paired_difference(vals, base_vals)
        st = {"metric": key, "better": better, "interval": t_interval(list(vals.values())), "vs": names[0],
              "paired": diff, "verdict": "base" if name == names[0] else verdict(diff, better)}
        if reach[name]:
            ratio = {s: t / reach[names[0]][s] for s, t in reach[name].items()
                     if t is not None and reach[names[0]].get(s)}
            st["target_ppl"] = target
            st["tokens_to_target"] = {**t_interval(list(reach[name].values())),
                                      "per_seed": reach[name], "reached": sum(t is not None for t in reach[name].values())}
            st["tokens_ratio"] = {**t_interval(list(ratio.values())), "per_seed": ratio}
        variants[name]["stats"] = st


def summarize(runs: Sequence[Run], sizes: dict[str, dict], tokens: dict[tuple[str, int], list[int] | None],
              *, source: str, out: Path, report: Sequence[ReportMetric] = (), target_ppl: float | None = None) -> dict:
    """``results.json``'s content: per variant the per-seed measurements and their mean ± std (with ``report``,
    ``final_val/<name>`` and ``best_val/<name>`` of each reported metric too)."""
    variants: dict[str, dict] = {}
    for run in runs:
        v = variants.setdefault(run.variant.name, {
            "overrides": list(run.variant.overrides),
            "mh_moe": vars(run.variant.mh_moe) if run.variant.mh_moe else None,
            "params": sizes.get(run.variant.name), "runs": {}, "summary": {}})
        m = collect_run(run, report)
        if m is None:
            continue
        cum = tokens.get((run.variant.name, run.seed))
        m["tokens_seen"] = cum[min(m["step"], len(cum) - 1)] if cum else None
        v["runs"][str(run.seed)] = m
    for name, v in variants.items():
        done = [m for m in v["runs"].values() if m["status"] == "finished"]
        keys = [*_METRICS, *(f"{kind}_{m.key}" for m in report for kind in ("final", "best"))]
        v["summary"] = {k: _mean_std([m.get(k) for m in done]) for k in keys}
        v["finished_seeds"] = [m["seed"] for m in done]
    cfg0 = runs[0].cfg if runs else None
    add_statistics(variants, tokens, report, target_ppl=target_ppl)
    return {
        "config": source, "out": str(out), "seeds": sorted({r.seed for r in runs}),
        "max_steps": cfg0.train.max_steps if cfg0 else None,
        "eval_every": cfg0.train.eval_every if cfg0 else None,
        "unit": task_unit(cfg0) if cfg0 else "units",
        "report": [vars(m) for m in report],
        "plot": plot_name(report),
        "variants": variants,
    }


# ------------------------------------------------------------------------------------------------
# table and plot


def _fmt(x: float | None, digits: int) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _pm(s: dict, digits: int) -> str:
    if not s or s.get("mean") is None:
        return "–"
    text = _fmt(s["mean"], digits)
    if s.get("std") is not None:
        text += f" ± {_fmt(s['std'], digits)}"
    return text


def _millions(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _decimals(x: float | None) -> int:
    """Decimals that show about four significant digits of ``x`` (0 to 4)."""
    if x is None or not math.isfinite(x) or x == 0:
        return 3
    return max(0, min(4, 3 - math.floor(math.log10(abs(x)))))


def markdown_table(results: dict) -> str:
    """The comparison as a Markdown table (one row per variant) with a legend: validation perplexity and loss,
    or with ``report`` the reported validation metrics."""
    variants = results["variants"]
    names = list(variants)
    report = [ReportMetric(**m) for m in results.get("report") or []]
    unit = results.get("unit") or "units"
    show_act = any(((v.get("params") or {}).get("moe") or {}).get("heads", 1) > 1 for v in variants.values())
    base = names[0] if names else None
    if report:
        first = report[0]
        head = ["variant", "seeds", *(f"{kind} {m.name}" for m in report for kind in ("final", "best")),
                f"Δ {first.name} vs {base}"]
    else:
        head = ["variant", "seeds", "final val ppl", "best val ppl", "final val loss", f"Δ ppl vs {base}"]
    head += [f"{unit}/s", "params total / active", "MoE MACs/token", "load max/mean", "load CV", "train s/run"]
    if show_act:
        head.append("expert activation")
    base_s = variants[base]["summary"] if base else {}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        v = variants[name]
        s = v["summary"]
        p = v.get("params") or {}
        row = [name, f"{len(v.get('finished_seeds', []))}/{len(results.get('seeds') or [])}"]
        if report:
            for m in report:
                for kind in ("final", "best"):
                    st = s.get(f"{kind}_{m.key}") or {}
                    row.append(_pm(st, _decimals(st.get("mean"))))
            key = f"final_{first.key}"
            x, x0 = (s.get(key) or {}).get("mean"), (base_s.get(key) or {}).get("mean")
            row.append("–" if x is None or x0 is None else
                       "0 (base)" if name == base else f"{x - x0:+.{_decimals(x0)}f}")
        else:
            base_ppl = base_s["final_val_ppl"]["mean"] if base else None
            ppl = s["final_val_ppl"]["mean"]
            delta = "–" if ppl is None or not base_ppl else (
                "0 (base)" if name == base else f"{100 * (ppl / base_ppl - 1):+.1f}%")
            row += [_pm(s["final_val_ppl"], 2), _pm(s["best_val_ppl"], 2), _pm(s["final_val_loss"], 3), delta]
        row += [_pm(s.get("throughput") or s["tokens_per_s"], 0),
                f"{_millions(p.get('total'))} / {_millions(p.get('active'))}",
                _millions(p.get("moe_macs_per_token")), _pm(s["load_max_over_mean"], 2), _pm(s["load_cv"], 2),
                _pm(s["wall_s"], 0)]
        if show_act:
            row.append(_pm(s["activation"], 2))
        lines.append("| " + " | ".join(row) + " |")
    if report:
        lower = [m.name for m in report if m.better == "lower"]
        what = (f"best = highest of the validation evaluations (every {results.get('eval_every') or 'run end'} "
                "steps" + (f"; lowest for {', '.join(lower)}: lower is better" if lower else "")
                + f"). Δ {first.name}: final mean minus the first variant's. ")
    else:
        what = (f"best = lowest of the validation evaluations (every {results.get('eval_every') or 'run end'} "
                "steps). ")
    legend = (f"\nMean ± std over the finished seeds ({', '.join(map(str, results.get('seeds') or []))}), "
              f"{results.get('max_steps')} steps each, config `{results.get('config')}`. Final = at the last step; "
              + what + f"{unit}/s = median logged training throughput. Params: total / active per token (whole "
              "model). MoE MACs/token: multiply-adds of the MoE layers per token (leading terms, all MoE layers). "
              "Load: last routing record, averaged over MoE layers: busiest expert's slots over the mean (1 = "
              "balanced) and coefficient of variation of the slots per expert (0 = balanced). train s/run: wall "
              "time of the run in mmoe compare (setup, evaluations and checkpoints included)"
              + ("; expert activation: fraction of the experts a token's sub-tokens reach." if show_act else "."))
    return "\n".join(lines) + "\n" + legend + "\n" + statistics_table(results)


def _ci(st: dict | None, digits: int, scale: float = 1.0) -> str:
    """``mean [low, high]`` of a `mmoe.tools.stats.t_interval` (just the mean with one value)."""
    if not st or st.get("mean") is None:
        return "–"
    text = _fmt(st["mean"] * scale, digits)
    if st.get("low") is not None:
        text += f" [{_fmt(st['low'] * scale, digits)}, {_fmt(st['high'] * scale, digits)}]"
    return text


def statistics_table(results: dict) -> str:
    """The seed statistics of `add_statistics` as a Markdown table with its legend ('' without statistics)."""
    variants = results["variants"]
    rows = [(n, v["stats"]) for n, v in variants.items() if v.get("stats")]
    if not rows:
        return ""
    first = rows[0][1]
    metric = first["metric"].removeprefix("final_").removeprefix("val_").removeprefix("val/")
    reach = any("tokens_to_target" in st for _, st in rows)
    head = ["variant", "n", f"final {metric} (95% CI)", f"Δ vs {first['vs']} (paired, 95% CI)", "Δ per seed",
            "verdict"]
    if reach:
        head += [f"tokens to ppl {first.get('target_ppl') or 0:.2f} (95% CI)", f"tokens / {first['vs']}'s (95% CI)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, st in rows:
        d = _decimals(st["interval"].get("mean"))
        per = ", ".join(f"{x:+.{d}f}" for x in st["paired"]["per_seed"].values()) if name != first["vs"] else "–"
        row = [name, str(st["interval"]["n"]), _ci(st["interval"], d),
               "–" if name == first["vs"] else _ci(st["paired"], d), per, st["verdict"]]
        if reach:
            tt = st.get("tokens_to_target") or {}
            n_reached = tt.get("reached", 0)
            big = (tt.get("mean") or 0) >= 1e5
            row.append((_ci(tt, 2, 1e-6 if big else 1e-3) + ("M" if big else "k") if tt.get("mean") is not None
                        else "–") + f" ({n_reached}/{st['interval']['n']} reached)")
            row.append(_ci(st.get("tokens_ratio"), 3))
        lines.append("| " + " | ".join(row) + " |")
    legend = ("\nStatistics over the finished seeds: mean and 95% Student-t interval; Δ = per-seed difference to "
              f"{first['vs']} (same seed, same data order), its mean and interval; verdict: better / worse when "
              "that interval excludes 0 (for " + ("lower" if first["better"] == "lower" else "higher")
              + " is better), else inconclusive (n<2: no interval).")
    if reach:
        legend += (" Tokens to target: training tokens when the validation perplexity first reached the target "
                   "(interpolated between evaluations), and their per-seed ratio to the first variant's "
                   "(< 1: sooner).")
    return "\n" + "\n".join(lines) + "\n" + legend + "\n"


def plot_name(report: Sequence[ReportMetric] = ()) -> str:
    """The plot's file name: ``val_loss.png``, or with ``report`` ``val_<first metric>.png`` (``/`` -> ``_``)."""
    if not report:
        return "val_loss.png"
    return "val_" + re.sub(r"[^A-Za-z0-9_.+-]", "_", report[0].name) + ".png"


def plot_val_loss(results: dict, tokens: dict[tuple[str, int], list[int] | None], path: Path) -> Path:
    """Validation loss (with ``report``: the first reported metric) against tokens seen (else steps): per
    variant one colour, seeds thin, the seed mean thick."""
    from matplotlib.figure import Figure

    variants = results["variants"]
    report = [ReportMetric(**m) for m in results.get("report") or []]
    metric = report[0] if report else None
    runs_all = [(name, int(seed)) for name, v in variants.items() for seed in v["runs"]]
    use_tokens = bool(runs_all) and all(tokens.get(k) for k in runs_all)

    def xval(name: str, seed: int, step: int) -> float:
        if use_tokens:
            cum = tokens[(name, seed)]
            return float(cum[min(step, len(cum) - 1)])
        return float(step)

    def curve(m: dict) -> list:
        if metric is None:
            return m.get("val_curve") or []
        return (m.get("report_curves") or {}).get(metric.name) or []

    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    drawn = False
    for i, (name, v) in enumerate(variants.items()):
        color = f"C{i % 10}"
        curves = {}
        for seed, m in v["runs"].items():
            pts = curve(m)
            if not pts:
                continue
            curves[int(seed)] = dict(pts)
            ax.plot([xval(name, int(seed), s) for s, _ in pts], [y for _, y in pts], color=color, alpha=0.35,
                    linewidth=0.9)
            drawn = True
        if not curves:
            continue
        common = sorted(set.intersection(*(set(c) for c in curves.values())))
        if common:
            xs = [statistics.fmean(xval(name, sd, s) for sd in curves) for s in common]
            ys = [statistics.fmean(c[s] for c in curves.values()) for s in common]
            ax.plot(xs, ys, color=color, linewidth=2.2, marker="o" if len(common) < 4 else None, markersize=3,
                    label=f"{name} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})")
    what = "validation loss" if metric is None else f"validation {metric.name}"
    ax.set_xlabel("training tokens seen" if use_tokens else "step")
    ax.set_ylabel(what if metric is None else f"{what} ({metric.better} is better)")
    ax.set_title(f"{Path(str(results.get('config'))).name}: {what}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_results(runs: Sequence[Run], sizes: dict, tokens: dict, *, source: str, out: Path,
                  report: Sequence[ReportMetric] = (), target_ppl: float | None = None) -> dict:
    """Write ``results.json``, ``results.md`` and the plot (`plot_name`) under ``out``; returns the results."""
    results = summarize(runs, sizes, tokens, source=source, out=out, report=report, target_ppl=target_ppl)
    if not _is_main():
        return results
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown_table(results))
    plot_val_loss(results, tokens, out / results["plot"])
    return results


def report_hints(results: dict) -> list[str]:
    """Warnings about ``report``: a reported metric no run logs (a typo?), or runs without ``val/loss`` and no
    ``report`` (the table would show no validation metric)."""
    logged = sorted({k for v in results["variants"].values() for m in v["runs"].values()
                     for k in m.get("val_metrics") or ()})
    if not logged:
        return []
    report = [m["name"] for m in results.get("report") or []]
    shown = ", ".join(logged)
    if not report:
        if "loss" in logged:
            return []
        return [f"the runs log no val/loss: name the validation metrics to tabulate with a top-level report: "
                f"list in {results.get('config')} (they log: {shown})"]
    return [f"report: no run logs val/{name} (they log: {shown})" for name in report if name not in logged]


# ------------------------------------------------------------------------------------------------
# command line


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected variant names like topk,default, got {text!r}")
    return names


def _seeds(text: str) -> list[int]:
    return int_list(text, minimum=0, example="0,1")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config with a top-level `variants:` mapping (name -> overrides) "
                        "and optionally `report:` (validation metrics to tabulate, e.g. [bbox/AP, segm/AP])")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides for every variant (a variant's own keys win)")
    parser.add_argument("--variants", type=_names, default=None, metavar="NAME[,NAME...]",
                        help="variants to run, in this order (default: all of the file's)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1], metavar="S[,S...]",
                        help="seeds (run.seed) per variant (default 0,1)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder: DIR/<variant>/seed<k> runs, results.json/.md, val_loss.png "
                        "(with report: val_<metric>.png) "
                        "(default runs/compare/<config name>)")
    parser.add_argument("--steps", type=_positive_int, default=None, metavar="N", help="train.max_steps of every run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the Markdown table")
    parser.add_argument("--target-ppl", type=float, default=None, metavar="PPL",
                        help="validation perplexity whose crossing is reported as tokens to target (default: the "
                        "first variant's mean final perplexity)")
    parser.add_argument("--plot-only", action="store_true",
                        help="train nothing: tabulate and plot the runs already under --out")


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..errors import CLIError, MMoEError

    source = args.config
    if not os.path.isfile(source):
        raise CLIError(f"config file not found: {source}")
    out = Path(args.out) if args.out else Path("runs") / "compare" / Path(source).stem
    # config errors come out as they are (file:line, key); a run that fails says which run it was
    cf = load_compare_file(source)
    variants = select_variants(cf, args.variants)
    runs = plan_runs(cf, variants, args.seeds, out, overrides=args.overrides or (), steps=args.steps)
    mismatched = []
    for r in runs:
        r.status, diff = run_status(r.dir, r.cfg)
        if r.status == "mismatch":
            mismatched.append(f"{r.dir} ({', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''})")
    if mismatched and not args.plot_only:
        raise CLIError("run folder(s) hold a run with a different config: " + "; ".join(mismatched)
                       + ". Use another --out, or delete them")
    if args.plot_only:
        for m in mismatched:
            print(f"mmoe compare: skipping {m}: different config", file=sys.stderr)
        runs = [r for r in runs if r.status != "mismatch"]
    sizes = {v.name: model_size(next(r.cfg for r in runs if r.variant is v), source)
             for v in variants if any(r.variant is v for r in runs)}
    cache: dict = {}
    tokens = {(r.variant.name, r.seed): tokens_seen(r, source, cache) for r in runs}
    if not args.plot_only:
        todo = [r for r in runs if r.status != "finished"]
        for r in runs:
            if r.status == "finished":
                print(f"mmoe compare: {r.variant.name} seed {r.seed}: finished run in {r.dir}, skipped",
                      file=sys.stderr)
        for i, r in enumerate(todo, 1):
            what = "resuming" if r.status == "partial" else "training"
            print(f"mmoe compare: [{i}/{len(todo)}] {what} {r.variant.name} seed {r.seed} "
                  f"({r.cfg.train.max_steps} steps) -> {r.dir}", file=sys.stderr)
            try:
                train_run(r, source)
            except MMoEError as err:
                raise CLIError(f"{r.variant.name} seed {r.seed} ({r.dir}): {err}") from None
            r.status, _ = run_status(r.dir, r.cfg)
            store_tokens(r, tokens.get((r.variant.name, r.seed)))
            write_results(runs, sizes, tokens, source=source, out=out, report=cf.report, target_ppl=args.target_ppl)
    elif not any((r.dir / "metrics.jsonl").is_file() for r in runs):
        raise CLIError(f"--plot-only: no runs of {source} under {out} yet")
    results = write_results(runs, sizes, tokens, source=source, out=out, report=cf.report,
                            target_ppl=args.target_ppl)
    if not _is_main():
        return 0
    for hint in report_hints(results):
        print(f"mmoe compare: {hint}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1, default=str))
    else:
        print(markdown_table(results))
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / results['plot']}", file=sys.stderr)
    return 0
