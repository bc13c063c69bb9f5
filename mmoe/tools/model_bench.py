"""``mmoe bench model``: whole models, MoE against dense, side by side in one run.

The model families provide the groups to measure through the ``mmoe.benchmarks`` entry-point group
(``name = "package.module:function"``; the function takes `ModelBenchContext` and returns a list of
`Group`): the vision family a ViT-MoE against the dense ViT of equal active compute and the same ViT with
DeepSpeed's MoE layer, training images/s at the demo's size and at ViT-S/16 224; the language family LM
decoding tokens/s with the KV cache, MoE against dense.

Each `Group` is measured on its own: a warm-up round, then ``rounds`` rounds in which every variant runs
one step (a training step: forward, loss with the aux losses, backward, AdamW; or one decode), the order
rotating by one variant per round. Reported: units per second from the median step time, and the median
of the per-round ratios to the group's first variant (paired, so drift in the machine's speed between
rounds cancels). Runs as a user's script does: plain loop, glibc's allocator defaults (``--tuned`` applies
`mmoe.train.perf.tune_cpu_allocator` first, as ``mmoe train`` does).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CLIError

SIZES = ("demo", "vit_s")


@dataclass
class Variant:
    """One model under test: ``step()`` runs one measured unit of work and returns how many units it did
    (images, tokens). ``error`` set (e.g. DeepSpeed missing) -> "n/a" in the table."""

    name: str
    step: Callable[[], int] | None = None
    params: int | None = None
    active_params: int | None = None
    error: str | None = None
    times_s: list[float] = field(default_factory=list)
    units: int = 0


@dataclass
class Group:
    title: str
    unit: str  # "images/s", "tokens/s"
    variants: list[Variant]
    key: str = ""  # a short id for the JSON


@dataclass
class ModelBenchContext:
    """What a family's benchmark function gets: the sizes asked for, rounds, the device, whether DeepSpeed's
    layer is wanted, and `deepspeed_mlp` to build it."""

    sizes: list[str]
    rounds: int
    device: str = "cpu"
    deepspeed: bool = True
    quick: bool = False
    seed: int = 0
    _ds: Any = None

    def deepspeed_mlp(self, dim: int, hidden: int, num_experts: int, top_k: int) -> DeepSpeedMLP:
        """A drop-in MLP replacement ``[..., dim] -> [..., dim]`` made of DeepSpeed's MoE layer (capacity
        factor 1.25, GELU experts of ``hidden``); raises RuntimeError with the reason where DeepSpeed is not
        usable."""
        if self._ds is None:
            from .layer_bench import _DeepSpeed

            self._ds = _DeepSpeed(self.device)
        return DeepSpeedMLP(self._ds.layer(dim, hidden, num_experts, top_k))

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()


class DeepSpeedMLP(nn.Module):
    """DeepSpeed's ``deepspeed.moe.layer.MoE`` as a drop-in MLP; keeps the aux loss of its last forward in
    ``l_aux`` (`deepspeed_aux_loss` sums them)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.l_aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, l_aux, _ = self.moe(x)
        self.l_aux = l_aux
        return out


def deepspeed_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """Sum of the aux losses of every `DeepSpeedMLP` in ``model`` from its last forward (0 if none)."""
    total: torch.Tensor | float = 0.0
    for m in model.modules():
        if isinstance(m, DeepSpeedMLP) and m.l_aux is not None:
            total = total + m.l_aux
    return total


def train_step(model: nn.Module, make_loss: Callable[[], Any], units: int, lr: float = 1e-4) -> Callable[[], int]:
    """A plain training step of ``model``: ``opt.zero_grad(set_to_none=True)``, ``make_loss()`` (the task loss
    plus aux losses), backward, AdamW step; returns ``units``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()

    def step() -> int:
        opt.zero_grad(set_to_none=True)
        make_loss().backward()
        opt.step()
        return units

    return step


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters one token uses), from `mmoe.count_params`."""
    import mmoe

    counts = mmoe.count_params(model)
    return counts.total, counts.active


def measure(group: Group, rounds: int) -> dict[str, Any]:
    """Warm-up round, then ``rounds`` interleaved rounds (module docstring); the group's results."""
    live = [v for v in group.variants if v.error is None and v.step is not None]

    def attempt(v: Variant) -> float | None:
        try:
            start = time.perf_counter()
            v.units = v.step()
            return time.perf_counter() - start
        except Exception as err:
            from .layer_bench import _one_line

            v.error = _one_line(err)
            print(f"  {v.name}: n/a ({v.error})", file=sys.stderr)
            return None

    for v in live:
        attempt(v)
    for r in range(rounds):
        order = [v for v in live if v.error is None]
        shift = r % max(len(order), 1)
        for v in order[shift:] + order[:shift]:
            t = attempt(v)
            if t is not None:
                v.times_s.append(t)
        gc.collect()
    base = group.variants[0]
    out = {}
    for v in group.variants:
        ok = v.error is None and bool(v.times_s)
        med = statistics.median(v.times_s) if ok else None
        ratios = ([bt / t for t, bt in zip(v.times_s, base.times_s)]
                  if ok and base.error is None and len(base.times_s) == len(v.times_s) else [])
        out[v.name] = {"error": v.error, "params": v.params, "active_params": v.active_params,
                       "times_ms": [t * 1e3 for t in v.times_s] if ok else [],
                       "median_ms": med * 1e3 if med else None,
                       "throughput": v.units / med if med else None,
                       # throughput ratio to the first variant: median over rounds of (its time / this time)
                       "ratio_vs_first": statistics.median(ratios) if ratios else None}
    return {"title": group.title, "unit": group.unit, "key": group.key, "base": base.name, "variants": out}


def collect_groups(ctx: ModelBenchContext) -> list[Group]:
    from ..plugins import family_entry_points, load_entry_point

    groups: list[Group] = []
    eps = family_entry_points("mmoe.benchmarks")
    if not eps:
        raise CLIError("no model benchmarks are installed (the mmoe.benchmarks entry points of the vision and "
                       "language packages); pip install -e . installs them")
    for name, ep in sorted(eps.items()):
        fn = load_entry_point(ep, f"benchmark {name!r}")
        groups.extend(fn(ctx))
    return groups


def run(args) -> int:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()] if args.sizes else (
        ["demo"] if args.quick else list(SIZES))
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise CLIError(f"--sizes {','.join(unknown)}: unknown (known: {', '.join(SIZES)})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tuned:
        from ..train.perf import tune_cpu_allocator

        tune_cpu_allocator()
    rounds = args.rounds or (2 if args.quick else 5)
    ctx = ModelBenchContext(sizes=sizes, rounds=rounds, deepspeed=not args.no_deepspeed, quick=args.quick,
                            seed=args.seed)
    print(f"mmoe bench model: sizes {','.join(sizes)}, median of {rounds} interleaved rounds, "
          f"{'allocator tuned' if args.tuned else 'plain loop (glibc allocator defaults)'}, "
          f"torch threads {torch.get_num_threads()}, cpu")
    results = []
    try:
        for group in collect_groups(ctx):
            print(f"[bench] {group.title}", file=sys.stderr, flush=True)
            torch.manual_seed(args.seed)
            results.append(measure(group, rounds))
            group.variants.clear()
            gc.collect()
            _print_group(results[-1])
    finally:
        ctx.close()
    if args.json:
        report = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "groups": results,
                  "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2, default=str)
        except OSError as err:
            raise CLIError(f"cannot write --json {args.json}: {err.strerror}") from err
        print(f"raw numbers: {args.json}")
    return 0


def _print_group(res: dict[str, Any]) -> None:
    from .layer_bench import _fmt, _table

    rows = []
    for name, r in res["variants"].items():
        params = "n/a" if r["params"] is None else f"{r['params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M"
        rows.append([name, params, _fmt(r["median_ms"], ".1f"), _fmt(r["throughput"], ".1f"),
                     _fmt(r["ratio_vs_first"], ".2f", "x"), f"n/a: {r['error']}" if r["error"] else ""])
    _table(f"{res['title']} ({res['unit']}; ratio = throughput / {res['base']}'s, median of per-round ratios)",
           ["variant", "params all / active", "ms per step", res["unit"], "ratio", "note"], rows)


__all__ = ["DeepSpeedMLP", "Group", "ModelBenchContext", "Variant", "deepspeed_aux_loss", "measure",
           "param_counts", "run", "train_step"]
