"""Shared test setup: DeepSpeed on its CPU accelerator, and a fixed torch seed for every test."""

from __future__ import annotations

import os

# Before anything imports deepspeed: without a GPU it would otherwise probe for one and warn.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

# Trainers built in this process keep torch's thread count instead of following the machine's load
# (mmoe.train.perf.ThreadGovernor): some CPU reductions round differently with another thread count, and
# tests compare runs bit for bit. Child processes get OMP_NUM_THREADS=1 from tests.helpers instead.
os.environ.setdefault("MMOE_THREADS", str(torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)
