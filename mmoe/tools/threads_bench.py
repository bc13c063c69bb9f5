"""``mmoe bench threads``: training throughput quiet and beside busy processes, under the default threads
and under a fixed thread count, side by side.

Each measurement is a child ``mmoe train CONFIG`` (the config's own model and data, ``--steps`` steps,
logged every step, no checkpoints or evaluation before the end) in one of four settings:

    quiet, default       the machine as it is, intra-op threads chosen by `mmoe.train.perf.ThreadGovernor`
    busy, default        the same beside ``--busy`` processes that each spin on one CPU
    quiet, fixed         ``MMOE_THREADS=<usable CPUs>``: the pool kept at every CPU (torch's own choice)
    busy, fixed          the same beside the busy processes

Throughput is the median of the logged per-step throughput (the task's unit: images/s, tokens/s, ...)
after the first ``--warmup`` steps. The ratio busy / quiet is what a run keeps of its speed when another
process takes CPU; with ``--busy 1`` on ``n`` CPUs, a run that degrades in proportion keeps about
``(n - 1) / n``. The settings run one after another in the order above, so nothing else should run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import CLIError

SETTINGS = [("quiet", "default"), ("busy", "default"), ("quiet", "fixed"), ("busy", "fixed")]


def _busy_processes(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)  # running before the child measures its start-up load
    return procs


def _throughput(run_dir: Path, warmup: int) -> tuple[float | None, list[float]]:
    from ..train.runlog import read_jsonl

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "throughput" in r]
    vals = [float(r["throughput"]) for r in rows if r["step"] > warmup]
    threads = [float(r["threads"]) for r in rows if r["step"] > warmup and "threads" in r]
    return (statistics.median(vals) if vals else None), threads


def measure(config: str, overrides: list[str], *, steps: int, warmup: int, busy: int, out_dir: Path,
            settings: list[tuple[str, str]] = SETTINGS) -> dict[str, Any]:
    """Run the settings; per setting the median throughput, the threads it trained with, wall seconds."""
    from ..train.perf import usable_cpus

    cpus = usable_cpus()
    results: dict[str, Any] = {}
    for load, threads in settings:
        name = f"{load}_{threads}"
        run_dir = out_dir / name
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MMOE_THREADS")}
        if threads == "fixed":
            env["MMOE_THREADS"] = str(cpus)
        cmd = [sys.executable, "-m", "mmoe", "train", config, *overrides, f"run.dir={run_dir}",
               f"train.max_steps={steps}", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
               "train.eval_batches=1", "train.stats_every=0", "train.progress=false", "run.tensorboard=false"]
        print(f"[bench] {load}, {threads} threads: {steps} steps", file=sys.stderr, flush=True)
        procs = _busy_processes(busy) if load == "busy" else []
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CLIError(f"mmoe train {config} ({load}, {threads} threads) failed: {last}")
        value, used = _throughput(run_dir, warmup)
        results[name] = {"load": load, "threads_mode": threads, "throughput": value, "wall_s": wall,
                         "threads": sorted(set(used)), "busy_processes": busy if load == "busy" else 0}
    for threads in ("default", "fixed"):
        q, b = results.get(f"quiet_{threads}"), results.get(f"busy_{threads}")
        if q and b and q["throughput"] and b["throughput"] is not None:
            b["ratio_to_quiet"] = b["throughput"] / q["throughput"]
    return {"config": config, "overrides": overrides, "cpus": cpus, "steps": steps, "warmup": warmup,
            "busy": busy, "results": results}


def run(args) -> int:
    if not os.path.isfile(args.config):
        raise CLIError(f"{args.config}: no such config file")
    if args.warmup >= args.steps:
        raise CLIError(f"--warmup {args.warmup} must be below --steps {args.steps}")
    with tempfile.TemporaryDirectory(prefix="mmoe-threads-") as tmp:
        report = measure(args.config, args.overrides, steps=args.steps, warmup=args.warmup, busy=args.busy,
                         out_dir=Path(tmp))
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"raw numbers: {args.json}")
    return 0


def _print(report: dict[str, Any]) -> None:
    from .layer_bench import _fmt, _table

    res = report["results"]
    rows = []
    for threads, label in (("default", "default (threads follow the load)"),
                           ("fixed", f"fixed at {report['cpus']} threads (MMOE_THREADS)")):
        q, b = res[f"quiet_{threads}"], res[f"busy_{threads}"]
        rows.append([label, _fmt(q["throughput"], ".1f"), ",".join(f"{t:g}" for t in q["threads"]) or "-",
                     _fmt(b["throughput"], ".1f"), ",".join(f"{t:g}" for t in b["threads"]) or "-",
                     _fmt(b.get("ratio_to_quiet"), ".2f", "x")])
    _table(f"training throughput of {report['config']} on {report['cpus']} CPUs, quiet and beside "
           f"{report['busy']} busy process(es) (median per-step throughput after step {report['warmup']})",
           ["threads", "quiet /s", "threads used", "busy /s", "threads used", "busy / quiet"], rows)
