"""Helpers shared by the test packages: run ``mmoe`` as users do, in fresh processes (one rank, or two CPU
ranks under DeepSpeed's launcher). ``tests/`` is on ``sys.path`` through its conftest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
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
    p = subprocess.run(mmoe_cmd(args, world), env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"mmoe {' '.join(args)} (world {world}) failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p
