"""`mmoe.train.perf.ThreadGovernor`: intra-op threads from the usable CPUs and the load of other processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from mmoe.errors import TrainingError
from mmoe.train import perf


class FakeMachine:
    """/proc/stat busy time and this process's CPU time, advanced by hand."""

    def __init__(self, monkeypatch, cpus: int = 2) -> None:
        self.now, self.busy, self.own = 1000.0, 0.0, 0.0
        self.set_calls: list[int] = []
        monkeypatch.setattr(perf, "usable_cpus", lambda: cpus)
        monkeypatch.setattr(perf, "_cpu_busy_seconds", lambda cpus: self.busy)
        monkeypatch.setattr(perf, "_own_cpu_seconds", lambda: self.own)
        monkeypatch.setattr(perf.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(perf.time, "sleep", lambda s: self.run(s, own=0.0, other=0.0))
        monkeypatch.setattr(torch, "set_num_threads", self.set_calls.append)
        monkeypatch.setattr(torch, "get_num_threads", lambda: cpus)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MMOE_THREADS", raising=False)

    def run(self, seconds: float, own: float, other: float) -> None:
        """``seconds`` pass with this process using ``own`` CPUs and other processes ``other``."""
        self.now += seconds
        self.own += own * seconds
        self.busy += (own + other) * seconds


def test_threads_follow_the_cpus_other_processes_leave(monkeypatch):
    m = FakeMachine(monkeypatch, cpus=2)
    gov = perf.ThreadGovernor(interval=5.0)
    assert gov.enabled and gov.threads == 2 and m.set_calls == []  # quiet at start: all CPUs
    m.run(2.0, own=1.9, other=0.0)
    gov.tick()  # before the interval: nothing re-read
    m.run(3.0, own=1.2, other=1.0)  # one busy process appears
    gov.tick()
    assert gov.threads == 1 and m.set_calls == [1]
    m.run(6.0, own=1.0, other=0.95)
    gov.tick()
    assert gov.threads == 1 and m.set_calls == [1]  # still loaded: unchanged
    m.run(6.0, own=1.0, other=0.1)  # it ends
    gov.tick()
    assert gov.threads == 2 and m.set_calls == [1, 2]
    m.run(6.0, own=1.0, other=3.5)  # more load than CPUs: never below one thread
    gov.tick()
    assert gov.threads == 1 and [n for _, n, _ in gov.changes] == [1, 2, 1]


def test_loaded_start_takes_fewer_threads(monkeypatch):
    m = FakeMachine(monkeypatch, cpus=4)
    monkeypatch.setattr(perf.time, "sleep", lambda s: m.run(s, own=0.1, other=2.0))
    gov = perf.ThreadGovernor()
    assert gov.threads == 2 and m.set_calls == [2]


def test_a_fixed_thread_count_is_kept(monkeypatch):
    m = FakeMachine(monkeypatch, cpus=2)
    monkeypatch.setenv("MMOE_THREADS", "3")
    gov = perf.ThreadGovernor()
    assert not gov.enabled and m.set_calls == [3]
    m.run(10.0, own=1.0, other=2.0)
    gov.tick()
    assert m.set_calls == [3]
    monkeypatch.delenv("MMOE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not perf.ThreadGovernor().enabled
    monkeypatch.setenv("MMOE_THREADS", "many")
    with pytest.raises(TrainingError, match="MMOE_THREADS='many': expected a number of threads or 'auto'"):
        perf.ThreadGovernor()


def test_usable_cpus_is_the_affinity_mask():
    n = perf.usable_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_a_real_busy_process_is_seen_as_load():
    """A child spinning on one CPU reads as about one CPU of other load (this process sleeps meanwhile)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        gov = perf.ThreadGovernor.__new__(perf.ThreadGovernor)
        gov._cpu_set = set(os.sched_getaffinity(0))
        gov._last = gov._sample()
        time.sleep(1.0)
        other = gov.other_load()
    finally:
        busy.kill()
        busy.wait()
    assert other is not None and other > 0.6, other


def test_bench_threads_runs_the_four_settings(tmp_path):
    """`mmoe bench threads` on a tiny synthetic run: four children, a throughput each, the fixed pool at every
    CPU, and (on 2+ CPUs) fewer threads beside a busy process."""
    import json

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("task: digits_mlp\nmodel: {dim: 32, depth: 2, moe: {num_experts: 4, top_k: 2, expert_hidden: 32}}\n"
                   "data: {train: synthetic, batch_size: 16}\n")
    out = tmp_path / "threads.json"
    proc = subprocess.run([sys.executable, "-m", "mmoe", "bench", "threads", str(cfg), "--steps", "8", "--warmup",
                           "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"quiet_default", "busy_default", "quiet_fixed", "busy_fixed"}
    assert all(r["throughput"] > 0 for r in res.values())
    assert res["quiet_fixed"]["threads"] == res["busy_fixed"]["threads"] == [report["cpus"]]
    assert res["busy_default"]["busy_processes"] == 1 and res["busy_default"]["ratio_to_quiet"] > 0
    if report["cpus"] >= 2:
        assert max(res["busy_default"]["threads"]) < report["cpus"]
    assert "busy / quiet" in proc.stdout


def test_close_restores_the_thread_count(monkeypatch):
    m = FakeMachine(monkeypatch, cpus=2)
    gov = perf.ThreadGovernor(interval=1.0)
    m.run(2.0, own=1.0, other=1.0)
    gov.tick()
    assert gov.threads == 1
    gov.close()
    assert gov.threads == 2 and m.set_calls == [1, 2]
