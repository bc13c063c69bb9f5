"""Process-level performance settings for CPU runs.

`tune_cpu_allocator` keeps large allocations on glibc's heap (no ``mmap``/``munmap`` per tensor) and
never trims it. Without it every backward pass of a layer with many experts maps fresh pages for its
expert weight gradients (256 MiB per matrix at E=128, d=512, h=1024 in fp32) and the kernel zero-fills
them on first touch: measured here, the weight-gradient GEMMs of that layer take 163 ms with a fresh
mapping and 64 ms with the heap reused. It is the CPU counterpart of PyTorch's CUDA caching allocator
(and what jemalloc/tcmalloc give CPU training); the price is that freed memory stays with the process.
`mmoe bench` and `mmoe train` call it on CPU unless ``MMOE_MALLOC_TUNING=0``. Without it, the expert weight
gradients of the ``loop`` path still avoid the fresh mapping through persistent buffers (`mmoe.experts`).

`ThreadGovernor` picks torch's intra-op threads from the CPUs the process may use and their load by other
processes (see its section below); `mmoe train` runs one on CPU unless the thread count is fixed.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_done = False


def tune_cpu_allocator() -> bool:
    """Serve large allocations from the (never trimmed) heap; True when applied (glibc only)."""
    global _done
    if _done:
        return True
    if os.environ.get("MMOE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


# ------------------------------------------------------------------------------------------------ threads
#
# torch's intra-op pool (OpenMP) splits every large op over all its threads and waits for the slowest. When
# another process takes a core, the thread sharing that core is descheduled for whole time slices while
# the others wait at the barrier, and throughput collapses far beyond the one core lost (measured on 2
# cores beside one busy process: the demo's ViT-MoE 5-157 images/s instead of 530). `ThreadGovernor` keeps
# the pool at the number of CPUs the process may use minus those other processes keep busy, re-read every
# few seconds of training, so a run slows in proportion to the CPU it loses.


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_busy_seconds(cpus: set[int] | None) -> float | None:
    """Busy time (user + nice + system + irq + softirq + steal, seconds) summed over ``cpus`` from
    /proc/stat; None without it."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        v = [int(f) for f in fields[:8]]
        total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # idle (3) and iowait (4) left out
    return total / hz


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """Sets ``torch.set_num_threads`` to the usable CPUs minus the CPU other processes used over the last
    interval (at least 1), re-checked by `tick` every ``interval`` seconds.

    Off when the thread count is fixed by the user: ``MMOE_THREADS=N`` (which then sets it) or
    ``OMP_NUM_THREADS`` in the environment (``MMOE_THREADS=auto``, the default, lets it choose); also off
    without /proc/stat. Some CPU reductions round differently with another thread count, so fix it for
    runs that must repeat bit for bit under varying load. `close` restores the count it started from.
    """

    def __init__(self, interval: float = 5.0, probe: float = 0.2) -> None:
        import torch

        self._torch = torch
        self.interval = interval
        self.cpus = usable_cpus()
        fixed = os.environ.get("MMOE_THREADS", "auto")
        self.enabled = fixed == "auto" and "OMP_NUM_THREADS" not in os.environ
        if fixed != "auto":
            try:
                torch.set_num_threads(max(1, int(fixed)))
            except ValueError:
                from ..errors import TrainingError

                raise TrainingError(f"MMOE_THREADS={fixed!r}: expected a number of threads or 'auto'") from None
        try:
            self._cpu_set: set[int] | None = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self._cpu_set = None
        self.threads = self.initial = torch.get_num_threads()
        self.changes: list[tuple[float, int, float]] = []  # (time, threads, CPUs other processes used)
        self._last = self._sample()
        if self.enabled and self._last[1] is None:
            self.enabled = False
        if self.enabled and probe > 0:
            time.sleep(probe)
            self._update()

    def _sample(self) -> tuple[float, float | None, float]:
        return time.monotonic(), _cpu_busy_seconds(self._cpu_set), _own_cpu_seconds()

    def other_load(self) -> float | None:
        """CPUs other processes kept busy since the last sample (and start a new interval)."""
        now = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        if busy0 is None or busy1 is None or t1 - t0 <= 0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def _update(self) -> tuple[float, int, float] | None:
        other = self.other_load()
        if other is None:
            return None
        want = max(1, min(self.cpus, int(self.cpus - other + 0.5)))
        if want == self.threads:
            return None
        self._torch.set_num_threads(want)
        self.threads = want
        self.changes.append((time.time(), want, other))
        return self.changes[-1]

    def close(self) -> None:
        """Put the thread count back to what it was when this governor started (if it changed it)."""
        if self.enabled and self.threads != self.initial:
            self._torch.set_num_threads(self.initial)
            self.threads = self.initial

    def tick(self) -> tuple[float, int, float] | None:
        """Call once per training step: re-reads the load every ``interval`` seconds (cheap otherwise); the
        change made, ``(time, threads, CPUs other processes used)``, or None."""
        if self.enabled and time.monotonic() - self._last[0] >= self.interval:
            return self._update()
        return None
