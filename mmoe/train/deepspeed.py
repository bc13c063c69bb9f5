"""The one module that imports DeepSpeed: process-group start-up, expert-parallel groups, the engine's
DeepSpeed config and `initialize`, and DeepSpeed's own MoE layer for the benchmark.

Everything that reaches into DeepSpeed internals (its private group constructors, the ``MoE`` class its
engine checks for, the CPU shared-memory op) is here, so a DeepSpeed upgrade has one place to look.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "finish", "teach_deepspeed", "expert_groups", "deepspeed_config", "initialize",
           "moe_layer_class"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto") -> None:
    """Initialise torch.distributed through DeepSpeed (a single process gets a world of one)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if os.environ.get("WORLD_SIZE") == "1" and not torch.cuda.is_available():
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (about a minute on a fresh
        # machine) that a single process never uses: skip it
        import importlib

        # (the attribute deepspeed.comm.torch is the torch package; fetch the submodule itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def finish() -> None:
    """End of a command: wait for every rank, then take the process group down. A rank that exits while
    another one's gloo threads still talk to it can kill that one ("terminate called without an active
    exception"); call this once, when no further `Trainer` will run in the process."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def teach_deepspeed(moe_class: type) -> None:
    """Make DeepSpeed's engine treat ``moe_class`` (`mmoe.MoE`) as an MoE layer: it finds them by
    ``isinstance(module, deepspeed.moe.layer.MoE)``, and only then applies its expert-parallel bookkeeping
    (expert groups, no cross-group all-reduce, no broadcast of rank 0's experts over the others)."""
    import deepspeed.runtime.engine as ds_engine

    MoE = moe_class

    current = ds_engine.MoE
    if isinstance(current, tuple):
        if MoE in current:
            return
        ds_engine.MoE = current + (MoE,)
    else:
        ds_engine.MoE = (current, MoE)


def expert_groups(ep_size: int):
    """``(expert-parallel group, expert-data-parallel group)`` of this rank for ``ep_size``, created through
    DeepSpeed (its engine reduces expert gradients over the latter), named ``ep_size_<n>`` as DeepSpeed's
    MoE parameter groups expect. DeepSpeed has no public constructor for them: its private one is used."""
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(ep_size)
    name = f"ep_size_{ep_size}"
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def deepspeed_config(*, micro_batch: int, grad_accum: int, grad_clip: float, zero_stage: int, bf16: bool) -> dict:
    """The DeepSpeed JSON of a run, generated from its training config (written once, in YAML)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        # ZeRO 0 clips with a per-rank norm that misses the other ranks' experts (ranks would diverge
        # under expert parallelism): the engine clips itself there; ZeRO 1/2 get it right
        "gradient_clipping": grad_clip if zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def initialize(model, optimizer, scheduler, config: dict):
    """``deepspeed.initialize`` on an already initialised process group: ``(engine, optimizer, scheduler)``."""
    import deepspeed

    from ..layer import MoE

    teach_deepspeed(MoE)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                 config=config, dist_init_required=False)
    return engine, opt, sched


def moe_layer_class() -> tuple[type, str]:
    """DeepSpeed's MoE layer class and DeepSpeed's version (the benchmark's baseline). Needs an initialised
    process group; DeepSpeed's communication layer is set up on it (quietly: it builds a CPU op and says so)."""
    import contextlib
    import io
    import logging

    import deepspeed
    from deepspeed.moe.layer import MoE

    build_log = logging.getLogger("torch.utils.cpp_extension")
    level = build_log.level
    build_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="gloo")
    finally:
        build_log.setLevel(level)
    return MoE, deepspeed.__version__
