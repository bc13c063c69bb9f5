"""``mmoe bench layer``: one MoE layer against a dense FFN and DeepSpeed's MoE, side by side in one run.

For every cell (E experts, top-k) the bench builds all variants on the same input ``x [T, dim]``:

    dense             GELU MLP dim -> k*H -> dim: the active compute of a top-k MoE whose experts have hidden H
    mmoe_dropless     mmoe.MoE(MoEConfig(dim, E, k, H))
    mmoe_cf1.25       the same with capacity_factor=1.25 (dropped slots are counted)
    mmoe_soft         Soft MoE (router="soft") over sequences of 64 tokens (x reshaped), E experts of hidden H
                      with soft_slots p = round(k * 64 / E) (at least 1): E * p slot rows per sequence, the k
                      rows per token of top-k, so its expert compute equals the dense FFN's; plus the dispatch
                      and combine products (n/a when the tokens are not a multiple of 64)
    deepspeed_cf1.25  deepspeed.moe.layer.MoE(..., capacity_factor=1.25, ep_size=1) in a gloo world of one

and one overhead group at a single (E, k): plain top-k (dropless) vs MH-MoE (--heads, default 2) matched in FLOPs,
``dense_backprop="default"`` and ``dense_backprop="expert_group"``.

One measured call is forward + loss + backward, loss = ``y.float().pow(2).mean()`` plus the layer's aux
loss; gradients are cleared (untimed) before each call. Variants of a group are measured interleaved:
each repetition runs every variant once, rotating the order, and the reported time is the median over
repetitions, so drift in machine load touches every variant alike and the ratios stay comparable.

On CPU, ``--loop`` says under which allocator settings: ``tuned`` runs in this process after
`mmoe.train.perf.tune_cpu_allocator` (as ``mmoe train`` does), ``plain`` with glibc's defaults, the way a
user's own script runs, and ``both`` (the default) runs the plain cells in a child process first (a tuned
process cannot go back), then the tuned ones, and prints both sets of ratios side by side.

Peak memory is measured in a separate, untimed call per variant: on CUDA ``max_memory_allocated`` above
what was allocated before the call; on CPU the growth of the resident set size, read from the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) or, where that reset is not allowed,
by a thread sampling ``/proc/self/statm``. Freed heap is returned to the system (``malloc_trim``) first,
so memory cached by an earlier call is not mistaken for headroom. That growth includes what the allocator
keeps and fragments, so on CPU a child process also measures the **live tensor memory**: with every
allocation of 64 KiB or more mapped on its own (``MALLOC_MMAP_THRESHOLD_``), the resident set follows the
tensors themselves, the quantity CUDA's ``max_memory_allocated`` reports. Persistent expert-gradient
buffers (`mmoe.experts`) are freed before the memory call, so both count the gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

import mmoe
from mmoe.errors import CLIError

CAPACITY_FACTOR = 1.25
DS_MIN_CAPACITY = 4

DENSE = "dense"
DROPLESS = "mmoe_dropless"
CAPACITY = "mmoe_cf1.25"
DEEPSPEED = "deepspeed_cf1.25"
SOFT = "mmoe_soft"
SOFT_SEQ = 64  # tokens per sequence of the Soft MoE variant (an 8 x 8 patch grid)
# overhead group
OVERHEAD_REPEAT_FACTOR = 3  # the overhead rows take this many times the cells' repeats
PLAIN = "topk"
MULTIHEAD = "mh_moe_flops"
# compute floors: the layer's expert MLPs (and MH-MoE projections) on rows already sorted by expert, with the
# counts its router produced on this input, without routing, gather, combine or statistics
DROPLESS_FLOOR = "mmoe_dropless_floor"
PLAIN_FLOOR = "topk_floor"
MULTIHEAD_FLOOR = "mh_moe_flops_floor"
DEFAULT_MOE = "dense_backprop_default"
EXPERT_GROUP = "dense_backprop_expert_group"

LABELS = {
    DENSE: "dense FFN",
    DROPLESS: "mmoe dropless",
    CAPACITY: "mmoe cf 1.25",
    DEEPSPEED: "DeepSpeed cf 1.25",
    SOFT: "Soft MoE",
    PLAIN: "top-k, dropless",
    MULTIHEAD: "MH-MoE, FLOP-matched",
    DROPLESS_FLOOR: "compute floor",
    PLAIN_FLOOR: "top-k compute floor",
    MULTIHEAD_FLOOR: "MH-MoE compute floor",
    DEFAULT_MOE: "dense_backprop=default",
    EXPERT_GROUP: "dense_backprop=expert_group",
}


@dataclass
class LayerBenchSettings:
    tokens: int
    dim: int
    expert_hidden: int
    experts: list[int]
    topk: list[int]
    repeats: int
    device: str  # "cpu" | "cuda"
    bf16: bool = False
    deepspeed: bool = True
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    json_path: str | None = None
    heads: int = 2  # MH-MoE heads of the FLOP-matched overhead row (MH-MoE v2's smallest config)
    loop: str = "both"  # CPU: "tuned" (allocator tuned), "plain" (glibc defaults) or "both" (module docstring)
    overhead: bool = True  # the overhead group (left out by the plain child of --loop both)
    child: bool = False  # a child run of another bench (starts no children of its own)


def layer_settings_from_args(args: argparse.Namespace, sizes: dict) -> LayerBenchSettings:
    """Resolve ``mmoe bench layer`` flags: explicit flags > ``sizes`` (`mmoe.tools.bench`'s full or
    ``--quick`` sizes)."""
    sizes = dict(sizes)
    sizes.update({name: getattr(args, name) for name in sizes if getattr(args, name) is not None})
    settings = LayerBenchSettings(
        **sizes,
        expert_hidden=args.expert_hidden or 2 * sizes["dim"],
        device=_resolve_device(args.device),
        bf16=args.bf16,
        deepspeed=not args.no_deepspeed,
        seed=args.seed,
        threads=args.threads,
        json_path=args.json,
        heads=args.heads,
        loop=args.loop,
        overhead=not args.skip_overhead,
        child=args.child,
    )
    if settings.device != "cpu":
        settings.loop = "tuned"  # CUDA: no allocator tuning, one run
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise CLIError(f"--json {args.json}: its folder does not exist")
    if max(settings.topk) > min(settings.experts):
        raise CLIError(f"--topk {max(settings.topk)} is more than --experts {min(settings.experts)}")
    return settings


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    return name


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text[:300]}"


# ------------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    """One layer under test. ``forward_loss`` runs forward + loss (the runner adds backward)."""

    name: str
    module: nn.Module | None = None
    forward_loss: Callable[[], Tensor] | None = None
    dropped: Callable[[], float | None] = lambda: None  # dropped-slot fraction of the latest call
    error: str | None = None  # set -> "n/a" in the tables
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    dropped_fracs: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s and self.error is None else None

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak_bytes is None or self.error else self.peak_bytes / 2**20

    def result(self) -> dict[str, Any]:
        ok = self.error is None and bool(self.times_s)
        return {
            "label": LABELS.get(self.name, self.name),
            "error": self.error,
            "params": sum(p.numel() for p in self.module.parameters()) if self.module is not None else None,
            "times_ms": [t * 1e3 for t in self.times_s] if ok else [],
            "median_ms": self.median_s * 1e3 if ok else None,
            "min_ms": min(self.times_s) * 1e3 if ok else None,
            "max_ms": max(self.times_s) * 1e3 if ok else None,
            "peak_mib": self.peak_mib,
            "dropped_frac": statistics.fmean(self.dropped_fracs) if ok and self.dropped_fracs else None,
        }


def _failed(name: str, err: BaseException | str) -> Variant:
    return Variant(name, error=err if isinstance(err, str) else _one_line(err))


def _gelu_mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def _dense_variant(x: Tensor, hidden: int) -> Variant:
    mlp = _gelu_mlp(x.shape[-1], hidden).to(x.device)
    return Variant(DENSE, mlp, lambda: mlp(x).float().pow(2).mean())


def _mmoe_variant(name: str, x: Tensor, make_config: Callable[[], Any]) -> Variant:
    """A `mmoe.MoE` built from ``make_config()``; any failure (missing option, bad config) -> n/a."""
    try:
        moe = mmoe.MoE(make_config()).to(x.device)
    except Exception as err:
        return _failed(name, err)

    def forward_loss() -> Tensor:
        return moe(x).float().pow(2).mean() + mmoe.aux_loss(moe)

    return Variant(name, moe, forward_loss, dropped=lambda: _mmoe_dropped_frac(moe))


def _soft_variant(x: Tensor, num_experts: int, top_k: int, hidden: int) -> Variant:
    """Soft MoE of the same expert compute as top-k over sequences of `SOFT_SEQ` tokens (module docstring)."""
    T, D = x.shape
    if T % SOFT_SEQ:
        return _failed(SOFT, f"{T} tokens are not a multiple of the {SOFT_SEQ}-token sequences")
    slots = max(1, round(top_k * SOFT_SEQ / num_experts))
    try:
        moe = mmoe.MoE(mmoe.MoEConfig(dim=D, num_experts=num_experts, router="soft", soft_slots=slots,
                                      expert_hidden=hidden)).to(x.device)
    except Exception as err:
        return _failed(SOFT, err)
    seqs = x.reshape(T // SOFT_SEQ, SOFT_SEQ, D)
    return Variant(SOFT, moe, lambda: moe(seqs).float().pow(2).mean())


def _floor_variant(name: str, moe_variant: Variant, x: Tensor) -> Variant:
    """The compute floor of a `mmoe.MoE` variant: its experts on pre-sorted rows with the per-expert counts
    its router gives ``x`` (plus the head and merge projections of MH-MoE), no routing or dispatch. No
    dispatch can make the layer faster than this with the same expert kernels; layer time minus floor
    time is what routing, gather, combine and statistics cost."""
    if moe_variant.error is not None or moe_variant.module is None:
        return _failed(name, moe_variant.error or "no layer")
    moe = moe_variant.module
    try:
        with torch.no_grad():
            moe(x)
        counts = moe.last_stats.kept_per_expert.clone()
        rows = torch.randn(int(counts.sum()), moe.cfg.expert_dim, device=x.device, requires_grad=True)
    except Exception as err:
        return _failed(name, err)

    grads: dict[str, Tensor] = {}

    def forward_loss() -> Tensor:
        rows.grad = None
        loss = _given_grad(moe.experts(rows, counts), grads, "experts")
        if moe.head_proj is not None:  # the same two D x D GEMMs (fwd and bwd) as the layer's projections
            loss = loss + _given_grad(moe.merge_proj(moe.head_proj(x)), grads, "projections")
        return loss

    return Variant(name, moe, forward_loss)


class _GivenGrad(torch.autograd.Function):
    """A zero scalar whose backward hands ``g`` to ``y``: backward of ``y`` with a fixed output gradient, with
    no loss computation of its own (a loss over the floor's expert rows would cost more for the variants with
    more slots, e.g. MH-MoE's 4x the rows, than the layer's loss over its ``[T, D]`` output)."""

    @staticmethod
    def forward(ctx, y: Tensor, g: Tensor) -> Tensor:
        ctx.g = g
        return y.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, _):
        return ctx.g, None


def _given_grad(y: Tensor, grads: dict[str, Tensor], key: str) -> Tensor:
    g = grads.get(key)
    if g is None or g.shape != y.shape or g.dtype != y.dtype:
        g = grads[key] = torch.randn(y.shape, dtype=y.dtype, device=y.device) / math.sqrt(y.numel())
    return _GivenGrad.apply(y, g)


def _paired(results: dict[str, dict[str, Any]], base: str) -> None:
    """Per-round ratios of every variant's time to ``base``'s time in the same round: their median as
    ``ratio_vs_<base>`` and the middle half as ``ratio_iqr_vs_<base>`` (paired ratios cancel the machine's
    drift between rounds, which on a shared VM is larger than the differences measured)."""
    ref = results[base]["times_ms"]
    for r in results.values():
        ratios = [t / b for t, b in zip(r["times_ms"], ref)] if r["times_ms"] and ref else []
        if ratios:
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            r[f"ratio_vs_{base}"] = statistics.median(ratios)
            r[f"ratio_iqr_vs_{base}"] = [q[0], q[2]]
        else:
            r[f"ratio_vs_{base}"], r[f"ratio_iqr_vs_{base}"] = None, None


def _mmoe_dropped_frac(moe: nn.Module) -> float | None:
    """Mean ``dropped_frac`` over the layers reported by `mmoe.routing_stats`, None if it is not there."""
    try:
        stats = mmoe.routing_stats(moe)
    except Exception:
        return None
    fracs = []
    for layer in stats.values() if isinstance(stats, dict) else ():
        frac = layer.get("dropped_frac") if isinstance(layer, dict) else getattr(layer, "dropped_frac", None)
        if frac is not None:
            fracs.append(float(frac))
    return statistics.fmean(fracs) if fracs else None


class _DeepSpeed:
    """DeepSpeed's MoE class, loaded once; ``error`` says in one line why it is unavailable."""

    def __init__(self, device: str) -> None:
        self.moe_class: type | None = None
        self.error: str | None = None
        self.version: str | None = None
        self._owns_process_group = False
        try:
            self._load(device)
        except Exception as err:
            self.error = _one_line(err)

    def _load(self, device: str) -> None:
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        from mmoe.train.deepspeed import moe_layer_class

        if not dist.is_initialized():
            port = _free_port()
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            self._owns_process_group = True
        self.moe_class, self.version = moe_layer_class()

    def layer(self, dim: int, hidden: int, num_experts: int, top_k: int) -> nn.Module:
        """DeepSpeed's MoE layer with GELU experts of ``hidden``, capacity factor 1.25, one expert-parallel
        rank (RuntimeError with the reason where DeepSpeed is not usable)."""
        if self.moe_class is None:
            raise RuntimeError(self.error or "DeepSpeed is not loaded")
        return self.moe_class(hidden_size=dim, expert=_gelu_mlp(dim, hidden), num_experts=num_experts, ep_size=1,
                              k=top_k, capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR,
                              min_capacity=DS_MIN_CAPACITY)

    def variant(self, x: Tensor, num_experts: int, top_k: int, hidden: int) -> Variant:
        try:
            moe = self.layer(x.shape[-1], hidden, num_experts, top_k).to(x.device)
        except Exception as err:
            return _failed(DEEPSPEED, err)
        last_counts: list[Tensor] = []

        def forward_loss() -> Tensor:
            out, l_aux, exp_counts = moe(x)
            last_counts[:] = [exp_counts]
            return out.float().pow(2).mean() + l_aux

        def dropped() -> float | None:
            # DeepSpeed's exp_counts are the slots routed to each expert before the capacity cut; every
            # gating function (top-1 RTS, top-2, top-k) then keeps min(count, capacity) per expert with
            # capacity = max(ceil(T / E * capacity_factor * k), min_capacity).
            if not last_counts:
                return None
            tokens = x.shape[0]
            capacity = max(math.ceil(tokens / num_experts * CAPACITY_FACTOR * top_k), DS_MIN_CAPACITY)
            over = (last_counts[0].float() - capacity).clamp_min(0).sum().item()
            return over / (tokens * top_k)

        return Variant(DEEPSPEED, moe, forward_loss, dropped)

    def close(self) -> None:
        if self._owns_process_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """Runs one forward+loss+backward of a variant under the chosen precision."""

    def __init__(self, x: Tensor, bf16: bool) -> None:
        self.x = x
        self.device = x.device
        self.bf16 = bf16

    def call(self, v: Variant) -> None:
        """One timed call. Gradients are freed after it (untimed), so that no call accumulates into
        another and every call, the memory pass included, starts from the parameters alone."""
        assert v.forward_loss is not None and v.module is not None
        _sync(self.device)
        start = time.perf_counter()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = v.forward_loss()
            loss.backward()
            _sync(self.device)
            v.times_s.append(time.perf_counter() - start)
        finally:
            for p in v.module.parameters():
                p.grad = None
            self.x.grad = None

    def peak_bytes(self, v: Variant) -> int | None:
        # persistent expert weight-gradient buffers are freed first, so the growth counts the gradients as it
        # does for the layers without such buffers
        mmoe.set_grad_buffers(v.module, None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.call(v)
            return torch.cuda.max_memory_allocated(self.device) - base
        return _cpu_peak_rss_growth(lambda: self.call(v))


def measure_interleaved(variants: list[Variant], runner: _Runner, repeats: int) -> None:
    """A warm-up round, peak memory (one call each), a second warm-up round, then ``repeats`` timed rounds.

    The first warm-up takes one-time allocations and lazy initialisation out of the memory numbers; the
    second faults back in the heap that the memory pass returned to the system. Each round runs every
    variant once, the order rotating by one variant per round. A variant that raises is marked n/a with
    the reason and leaves the rounds; the others go on.
    """

    def attempt(v: Variant, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:
            v.error = _one_line(err)
            print(f"  {v.name}: n/a ({v.error})", file=sys.stderr)
            return None

    def live() -> list[Variant]:
        return [v for v in variants if v.error is None]

    for v in live():
        attempt(v, lambda: runner.call(v))
    for v in live():
        v.peak_bytes = attempt(v, lambda: runner.peak_bytes(v))
    for v in live():
        attempt(v, lambda: runner.call(v))
    for v in variants:
        v.times_s.clear()
    for r in range(repeats):
        order = live()
        shift = r % max(len(order), 1)
        for v in order[shift:] + order[:shift]:
            attempt(v, lambda: runner.call(v))
            frac = v.dropped() if v.error is None else None  # untimed
            if frac is not None:
                v.dropped_fracs.append(frac)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm_bytes() <= _rss_bytes() + 2**20
    except OSError:
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_peak_rss_growth(fn: Callable[[], None]) -> int | None:
    """Peak growth of this process's resident set during ``fn()``; None without Linux /proc."""
    if not os.path.exists("/proc/self/statm"):
        fn()
        return None
    gc.collect()
    _malloc_trim()
    base = _rss_bytes()
    if _reset_hwm():
        fn()
        return max(_hwm_bytes() - base, 0)
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_bytes())
            stop.wait(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        stop.set()
        sampler.join()
    return max(peak, _rss_bytes()) - base


# ------------------------------------------------------------------------------------------------
# The bench


def _input(settings: LayerBenchSettings, seed: int) -> Tensor:
    torch.manual_seed(seed)
    return torch.randn(settings.tokens, settings.dim, device=settings.device, requires_grad=True)


def _measure_group(variants: list[Variant], x: Tensor, settings: LayerBenchSettings) -> dict[str, dict[str, Any]]:
    """Measure variants that share the input ``x`` interleaved; their results by name."""
    for v in variants:
        if v.error and v.name != DEEPSPEED:  # DeepSpeed's reason is printed once, at start
            print(f"  {v.name}: n/a ({v.error})", file=sys.stderr)
    measure_interleaved(variants, _Runner(x, settings.bf16), settings.repeats)
    return {v.name: v.result() for v in variants}


def _bench_cell(settings: LayerBenchSettings, ds: _DeepSpeed | None, num_experts: int, top_k: int,
                seed: int) -> dict[str, Any]:
    x = _input(settings, seed)
    hidden = settings.expert_hidden
    config = partial(mmoe.MoEConfig, dim=settings.dim, num_experts=num_experts, top_k=top_k, expert_hidden=hidden)
    dropless = _mmoe_variant(DROPLESS, x, config)
    variants = [
        _dense_variant(x, top_k * hidden),
        dropless,
        _floor_variant(DROPLESS_FLOOR, dropless, x),
        _mmoe_variant(CAPACITY, x, partial(config, capacity_factor=CAPACITY_FACTOR)),
        _soft_variant(x, num_experts, top_k, hidden),
    ]
    if ds is not None:
        variants.append(ds.variant(x, num_experts, top_k, hidden))
    results = _measure_group(variants, x, settings)
    dense = results[DENSE]
    _paired(results, DENSE)  # ratio_vs_dense: median of per-round ratios
    for r in results.values():
        r["mem_ratio_vs_dense"] = _ratio(r["peak_mib"], dense["peak_mib"])
    return {"experts": num_experts, "top_k": top_k, "dense_hidden": top_k * hidden, "variants": results}


def _bench_overhead(settings: LayerBenchSettings, num_experts: int, top_k: int, seed: int) -> dict[str, Any]:
    x = _input(settings, seed)
    config = partial(mmoe.MoEConfig, dim=settings.dim, num_experts=num_experts, top_k=top_k,
                     expert_hidden=settings.expert_hidden)

    def multihead_config() -> Any:
        if not hasattr(mmoe, "mh_moe_config"):
            raise RuntimeError("mmoe.mh_moe_config is missing")
        return mmoe.mh_moe_config(config(), heads=settings.heads, match="flops")

    plain, multihead = _mmoe_variant(PLAIN, x, config), _mmoe_variant(MULTIHEAD, x, multihead_config)
    variants = [
        plain,
        multihead,
        _mmoe_variant(DEFAULT_MOE, x, partial(config, dense_backprop="default")),
        _mmoe_variant(EXPERT_GROUP, x, partial(config, dense_backprop="expert_group")),
        _floor_variant(PLAIN_FLOOR, plain, x),
        _floor_variant(MULTIHEAD_FLOOR, multihead, x),
    ]
    # overheads of a few percent need more rounds than the cells: 3x the repeats, and each variant's time
    # is divided by plain top-k's time in the same round (paired), which cancels the machine's slow drift
    rounds = OVERHEAD_REPEAT_FACTOR * settings.repeats
    results = _measure_group(variants, x, dataclasses.replace(settings, repeats=rounds))
    _paired(results, PLAIN)
    _paired(results, PLAIN_FLOOR)  # the MH-MoE floor against the top-k floor
    for name, r in results.items():
        base = "ratio_vs_topk_floor" if name == MULTIHEAD_FLOOR else "ratio_vs_topk"
        ratio, iqr = r[base], r[base.replace("ratio_", "ratio_iqr_")]
        r["overhead_pct"] = None if ratio is None else (ratio - 1.0) * 100.0
        r["overhead_iqr_pct"] = None if iqr is None else [(iqr[0] - 1.0) * 100.0, (iqr[1] - 1.0) * 100.0]
    return {"experts": num_experts, "top_k": top_k, "rounds": rounds, "variants": results}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# the live-memory child: every allocation of at least this many bytes gets its own mapping, so the resident set
# rises and falls with the tensors (no heap fragmentation or reuse in the numbers), as CUDA's
# max_memory_allocated counts them
LIVE_MMAP_THRESHOLD = 65536


def _child_report(settings: LayerBenchSettings, kind: str) -> tuple[dict | None, str | None]:
    """The report of a child ``mmoe bench layer``: ``kind="plain"`` (``--loop both``: the cells under
    glibc's allocator defaults, which a process cannot go back to once tuned) or ``"live"`` (one round, for
    the peak memory with every large tensor mapped on its own: `LIVE_MMAP_THRESHOLD`). (report, None) or
    (None, why not)."""
    import subprocess
    import tempfile

    s = settings
    with tempfile.TemporaryDirectory(prefix="mmoe-bench-") as tmp:
        out = os.path.join(tmp, f"{kind}.json")
        cmd = [sys.executable, "-m", "mmoe", "bench", "layer", "--loop", "plain", "--child",
               "--tokens", str(s.tokens), "--dim", str(s.dim), "--expert-hidden", str(s.expert_hidden),
               "--experts", ",".join(map(str, s.experts)), "--topk", ",".join(map(str, s.topk)),
               "--repeats", str(s.repeats if kind == "plain" else 1), "--device", s.device, "--seed", str(s.seed),
               "--heads", str(s.heads), "--json", out]
        cmd += (["--bf16"] if s.bf16 else []) + ([] if s.deepspeed else ["--no-deepspeed"])
        cmd += ["--threads", str(s.threads)] if s.threads is not None else []
        cmd += ["--skip-overhead"] if kind == "plain" else []
        env = dict(os.environ, MMOE_MALLOC_TUNING="0")
        if kind == "live":
            env.update(MALLOC_MMAP_THRESHOLD_=str(LIVE_MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0")
        what = "plain loop (glibc's allocator defaults)" if kind == "plain" else "live tensor memory"
        print(f"[bench] {what} in a child process", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=None)
        if proc.returncode != 0 or not os.path.isfile(out):
            return None, f"the {kind} child exited with status {proc.returncode}"
        with open(out) as f:
            return json.load(f), None


def _merge_live(cells: list[dict], overhead: dict | None, live: dict | None) -> None:
    """``live_peak_mib`` (and ``live_mem_ratio_vs_dense``) from the live-memory child into the results."""
    if live is None:
        return
    by_cell = {(c["experts"], c["top_k"]): c for c in live["cells"]}
    for cell in cells:
        other = by_cell.get((cell["experts"], cell["top_k"]), {"variants": {}})
        dense = other["variants"].get(DENSE, {}).get("peak_mib")
        for name, r in cell["variants"].items():
            r["live_peak_mib"] = other["variants"].get(name, {}).get("peak_mib")
            r["live_mem_ratio_vs_dense"] = _ratio(r["live_peak_mib"], dense)
    if overhead is not None and live.get("overhead"):
        for name, r in overhead["variants"].items():
            r["live_peak_mib"] = live["overhead"]["variants"].get(name, {}).get("peak_mib")


def run_layer_bench(settings: LayerBenchSettings) -> int:
    """Run ``mmoe bench layer`` with resolved settings: print the tables, write JSON if asked; exit code."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    plain, plain_error, live, live_error = None, None, None, None
    if settings.device == "cpu" and not settings.child:
        live, live_error = _child_report(settings, "live")
        if settings.loop == "both":
            plain, plain_error = _child_report(settings, "plain")
    plain_cells = plain["cells"] if plain else None
    if settings.device == "cpu" and settings.loop != "plain":
        from ..train.perf import tune_cpu_allocator

        tune_cpu_allocator()  # applies to every variant alike (dense, mmoe, DeepSpeed)
    print(_header(settings))
    ds = None
    if settings.deepspeed:
        ds = _DeepSpeed(settings.device)
        print(f"DeepSpeed {ds.version}" if ds.error is None else f"DeepSpeed: n/a ({ds.error})")
    try:
        cells = []
        seed = settings.seed
        for num_experts in settings.experts:
            for top_k in settings.topk:
                print(f"[bench] E={num_experts} k={top_k}", file=sys.stderr, flush=True)
                cells.append(_bench_cell(settings, ds, num_experts, top_k, seed))
                seed += 1
                gc.collect()
        overhead = None
        if settings.overhead:
            oh_e = 8 if 8 in settings.experts else settings.experts[0]
            oh_k = 2 if 2 in settings.topk else settings.topk[0]
            print(f"[bench] overhead at E={oh_e} k={oh_k}", file=sys.stderr, flush=True)
            overhead = _bench_overhead(settings, oh_e, oh_k, seed)
    finally:
        if ds is not None:
            ds.close()

    _merge_live(cells, overhead, live)
    _print_tables(settings, cells, overhead, live_error)
    if settings.loop == "both" and settings.device == "cpu" and not settings.child:
        _print_loop_table(settings, cells, plain_cells, plain_error)
    if settings.json_path:
        report = {"settings": asdict(settings), "environment": _environment(settings, ds), "cells": cells,
                  "overhead": overhead, "plain_loop_cells": plain_cells, "plain_loop_error": plain_error,
                  "live_memory_error": live_error}
        try:
            with open(settings.json_path, "w") as f:
                json.dump(report, f, indent=2)
        except OSError as err:
            raise CLIError(f"cannot write --json {settings.json_path}: {err.strerror}") from err
        print(f"raw numbers: {settings.json_path}")
    return 0


def _environment(settings: LayerBenchSettings, ds: _DeepSpeed | None) -> dict[str, Any]:
    device = torch.cuda.get_device_name() if settings.device == "cuda" else platform.processor() or "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mmoe": getattr(mmoe, "__version__", None),
        "deepspeed": ds.version if ds is not None else None,
        "deepspeed_error": ds.error if ds is not None else None,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _header(s: LayerBenchSettings) -> str:
    precision = "bf16 autocast" if s.bf16 else "fp32"
    allocator = ""
    if s.device == "cpu":
        allocator = ", allocator: glibc defaults (plain loop)" if s.loop == "plain" else ", allocator tuned"
    return (f"mmoe bench layer: {s.tokens} tokens, dim {s.dim}, expert hidden {s.expert_hidden}, "
            f"E {','.join(map(str, s.experts))}, k {','.join(map(str, s.topk))}, median of {s.repeats} "
            f"interleaved repeats, fwd+bwd, {precision}, {s.device}, torch threads {torch.get_num_threads()}"
            f"{allocator}")


# ------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _print_tables(settings: LayerBenchSettings, cells: list[dict], overhead: dict | None,
                  live_error: str | None = None) -> None:
    names = [DROPLESS, CAPACITY] + ([DEEPSPEED] if settings.deepspeed else []) + [SOFT]
    capacity_names = {CAPACITY, DEEPSPEED}

    headers = ["E", "k", "dense ms"]
    time_names = [DROPLESS, DROPLESS_FLOOR] + names[1:]
    for name in time_names:
        headers.append(f"{LABELS[name]} x")
        if name in capacity_names:
            headers.append("dropped")
    rows = []
    for cell in cells:
        v = cell["variants"]
        row = [str(cell["experts"]), str(cell["top_k"]), _fmt(v[DENSE]["median_ms"], ".1f")]
        for name in time_names:
            row.append(_fmt(v[name]["ratio_vs_dense"], ".2f", "x"))
            if name in capacity_names:
                frac = v[name]["dropped_frac"]
                row.append(_fmt(None if frac is None else 100 * frac, ".1f", "%"))
        rows.append(row)
    _table("fwd+bwd time: dense FFN (hidden k*H) in ms, MoE layers as ratio to it (median of per-round "
           "ratios; compute floor = the experts alone on pre-sorted rows with the layer's expert counts)",
           headers, rows)

    headers = ["E", "k", "dense MiB"] + [f"{LABELS[name]} MiB" for name in names]
    for key, ratio_key, title in (
            ("live_peak_mib", "live_mem_ratio_vs_dense",
             "peak live tensor memory of one fwd+bwd above the parameters (a child process in which every "
             f"allocation of {LIVE_MMAP_THRESHOLD // 1024} KiB or more is mapped on its own, so the resident "
             "set follows the tensors: what CUDA's max_memory_allocated counts)"),
            ("peak_mib", "mem_ratio_vs_dense",
             "peak resident-set growth of one fwd+bwd in this process (the allocator's reuse and fragmentation "
             "included)")):
        if key == "live_peak_mib" and not any(c["variants"][DENSE].get(key) for c in cells):
            if live_error:
                print(f"\nlive tensor memory: n/a ({live_error})")
            continue
        rows = []
        for cell in cells:
            v = cell["variants"]
            row = [str(cell["experts"]), str(cell["top_k"]), _fmt(v[DENSE].get(key), ".1f")]
            for name in names:
                mib, ratio = v[name].get(key), v[name].get(ratio_key)
                row.append(_fmt(mib, ".1f") + ("" if ratio is None else f" ({ratio:.2f}x)"))
            rows.append(row)
        _table(title, headers, rows)

    if overhead is None:
        return
    rows = []
    for name, r in overhead["variants"].items():
        iqr = r.get("overhead_iqr_pct")
        spread = f"{iqr[0]:+.1f}% .. {iqr[1]:+.1f}%" if iqr and name != PLAIN else ""
        rows.append([LABELS[name], _fmt(r["median_ms"], ".1f"), _fmt(r["overhead_pct"], "+.1f", "%"), spread,
                     _fmt(r.get("live_peak_mib"), ".1f"), _fmt(r["peak_mib"], ".1f")])
    _table(f"overhead over plain top-k at E={overhead['experts']} k={overhead['top_k']} (median of "
           f"{overhead.get('rounds', '?')} per-round ratios to plain top-k, same interleaved run; the MH-MoE "
           f"compute floor against the top-k compute floor)",
           ["variant", "ms", "overhead", "middle half", "live peak MiB", "RSS peak MiB"], rows)


def _print_loop_table(settings: LayerBenchSettings, cells: list[dict], plain: list[dict] | None,
                      error: str | None) -> None:
    """``--loop both``: time ratios to the dense FFN with the allocator tuned (this process) and in a plain
    loop (the child process), side by side."""
    names = [DROPLESS] + ([DEEPSPEED] if settings.deepspeed else [])
    if plain is None:
        print(f"\nplain loop: n/a ({error})")
        return
    by_cell = {(c["experts"], c["top_k"]): c for c in plain}
    headers = ["E", "k"] + [f"{LABELS[n]} x ({mode})" for mode in ("tuned", "plain loop") for n in names]
    rows = []
    for cell in cells:
        other = by_cell.get((cell["experts"], cell["top_k"]))
        row = [str(cell["experts"]), str(cell["top_k"])]
        for source in (cell, other):
            for n in names:
                r = source["variants"].get(n, {}) if source else {}
                row.append(_fmt(r.get("ratio_vs_dense"), ".2f", "x"))
        rows.append(row)
    _table("fwd+bwd time as ratio to the dense FFN, allocator tuned (as `mmoe train` and `mmoe bench` run) and "
           "in a plain loop (glibc's defaults, as a user's own script runs; a child process, measured first)",
           headers, rows)


def _table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(f"\n{title}")
        for line in [headers, *rows]:
            print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # pipes and files: do not squeeze columns to 80 characters
        console = Console(width=200)
    console.print(table)
