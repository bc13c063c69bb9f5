"""Helpers shared by the test packages: run ``mmoe`` as users do, in fresh processes (one rank, or two CPU
ranks under DeepSpeed's launcher). ``tests`` is a package, imported from the repository root
(``from tests.helpers import run_mmoe``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("MMOE_THREADS", None)  # conftest's, for this process; the children keep OMP_NUM_THREADS=1
    env.pop("WORLD_SIZE", None)
    return env


def mmoe_cmd(args, world: int = 1) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "mmoe", *args]
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", str(world), "--master_port", str(_free_port()), "--module", "mmoe", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mmoe(args, world: int = 1, check: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``mmoe ARGS`` (``world`` ranks) in its own session; past ``timeout`` seconds the whole process group
    (the launcher and every rank) is killed and the test fails with the output so far, so that a hung run
    never leaves ranks behind to slow down the tests after it."""
    cmd = mmoe_cmd(args, world)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mmoe {' '.join(args)} (world {world}) ran past {timeout} s and was killed:\n"
                             f"{(out or '')[-3000:]}\n{(err or '')[-5000:]}") from None
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): take the ranks down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"mmoe {' '.join(args)} (world {world}) failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, timeout: float = 180) -> int:
    """Start ``cmd`` (a training run), SIGKILL its whole process group as soon as ``checkpoint`` exists (a
    complete checkpoint folder), and return its exit status."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not checkpoint.is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, f"no {checkpoint.name} after {timeout:.0f} s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc.returncode


def soft_moe_reference(m, x, mask=None, task: int = 0):
    """Soft MoE (`mmoe.MoE` with ``router="soft"``, router ``task``) one sequence of ``x [B, T, dim]`` at a time,
    straight from the definition: X^ = X / ||X||, Phi^ = Phi / ||Phi|| (per slot), L = s X^ Phi^, D = softmax
    over tokens (real tokens only, ``mask [B, T]`` True = real), C = softmax over slots, slots = D^T X, expert
    e on its p slots, Y = C Y~ (0 at padding)."""
    import torch

    r = m.routers[task]
    E, p = m.cfg.num_experts, m.cfg.soft_slots
    out = []
    for b in range(x.shape[0]):
        keep = mask[b] if mask is not None else torch.ones(x.shape[1], dtype=torch.bool)
        X = x[b][keep]  # [t, D] the real tokens
        Xn = X / torch.sqrt((X ** 2).sum(-1, keepdim=True) + 1e-6)
        Pn = r.phi / torch.sqrt((r.phi ** 2).sum(0, keepdim=True) + 1e-6)
        L = r.scale * (Xn @ Pn)  # [t, E*p]
        D = torch.softmax(L, dim=0)
        C = torch.softmax(L, dim=1)
        slots = D.T @ X  # [E*p, D]
        ys = torch.cat([m.expert_forward(e, slots[e * p:(e + 1) * p]) for e in range(E)])
        y = torch.zeros_like(x[b])
        y[keep] = C @ ys
        out.append(y)
    return torch.stack(out)
