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
           "moe_layer_class", "full_optimizer_state", "set_full_optimizer_state", "ADAM_STATE"]


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


# ------------------------------------------------------------------ optimizer state, whole tensors
ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _flat_state(optimizer, p):
    """``(state dict of the flat fp32 partition holding p's fragment, p's fragment mapping)`` under ZeRO 1/2
    or DeepSpeed's bf16 optimizer (parameters DeepSpeed gave an ``_hp_mapping``); the mapping is None on a
    rank that holds no part of ``p``."""
    m = p._hp_mapping
    if m is None:
        return None, None
    base = optimizer.optimizer
    flat = base.param_groups[m.param_group_index]["params"][0]
    return base.state.setdefault(flat, {}), m


@torch.no_grad()
def full_optimizer_state(optimizer, named_params) -> dict[str, torch.Tensor]:
    """AdamW's state of every parameter as whole tensors, independent of how ZeRO partitions it:
    ``{name + "/exp_avg": fp32 tensor shaped like the parameter, name + "/exp_avg_sq": ..., name + "/step":
    [1] tensor}``, plus ``name + "/fp32"`` (the fp32 master weights) for a parameter kept in lower precision.
    Parameters without state yet are left out.

    Under ZeRO 1/2 (and the bf16 optimizer) each rank holds a fragment of a flat partition (DeepSpeed's
    ``_hp_mapping``); the fragments are summed over the parameter's data-parallel group (for experts the
    expert-data-parallel group), so this is a collective: every rank calls it with its parameters in the
    same order. Under ZeRO 0 it reads ``optimizer.state`` (a torch optimizer) and is local."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        if not hasattr(p, "_hp_mapping"):
            st = optimizer.state.get(p) or {}
            if st:
                for key in ADAM_STATE:
                    out[f"{name}/{key}"] = st[key].detach().float().cpu()
                out[f"{name}/step"] = torch.tensor([float(st["step"])])
            continue
        st, m = _flat_state(optimizer, p)
        keys = [k for k in ADAM_STATE] + (["fp32"] if p.dtype != torch.float32 else [])
        bufs = {k: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for k in keys}
        step = torch.zeros(2, dtype=torch.float32, device=p.device)  # (step, has state) summed over the group
        if m is not None:
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            for k in keys:
                src = m.hp_fragment if k == "fp32" else st.get(k)
                if src is None:
                    continue
                if k != "fp32":
                    src = src.narrow(0, hp.start, hp.numel)
                bufs[k].narrow(0, lp.start, lp.numel).copy_(src)
            if st:
                step += torch.tensor([float(st["step"]), 1.0], device=p.device)
        for k in keys:
            dist.all_reduce(bufs[k], group=p._dp_group)
        dist.all_reduce(step, group=p._dp_group)
        if step[1] == 0:
            continue  # no optimizer step yet
        for k in keys:
            out[f"{name}/{k}"] = bufs[k].reshape(p.shape).cpu()
        out[f"{name}/step"] = torch.tensor([float(step[0] / step[1])])
    return out


@torch.no_grad()
def set_full_optimizer_state(optimizer, named_params, state: dict[str, torch.Tensor]) -> list[str]:
    """Write `full_optimizer_state`'s whole tensors into ``optimizer`` (any ZeRO stage, any partitioning):
    each rank takes its fragment. Under ZeRO 1/2 and bf16 the fp32 master weights are set too: from
    ``name + "/fp32"`` when saved, else from the parameter itself (so weights loaded into the model after
    DeepSpeed's set-up are what the next step updates). Returns the names that had no saved state (their
    moments start at zero, as for a new parameter)."""
    missing = []
    for name, p in named_params:
        has = f"{name}/exp_avg" in state
        if not has:
            missing.append(name)
        if not hasattr(p, "_hp_mapping"):
            if has:
                optimizer.state[p] = {"step": torch.tensor(float(state[f"{name}/step"][0])),
                                      **{k: state[f"{name}/{k}"].to(p.device, p.dtype).clone() for k in ADAM_STATE}}
            continue
        master = state.get(f"{name}/fp32")
        set_fp32 = master if master is not None else p.detach().float()
        st, m = _flat_state(optimizer, p)
        if m is None:
            continue
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        m.hp_fragment.copy_(set_fp32.to(m.hp_fragment.device).flatten().narrow(0, lp.start, lp.numel))
        if not has:
            continue
        flat = optimizer.optimizer.param_groups[m.param_group_index]["params"][0]
        if not st:
            st.update({"step": torch.tensor(float(state[f"{name}/step"][0])),
                       **{k: torch.zeros_like(flat) for k in ADAM_STATE}})
        for k in ADAM_STATE:
            st[k].narrow(0, hp.start, hp.numel).copy_(
                state[f"{name}/{k}"].to(flat.device).flatten().narrow(0, lp.start, lp.numel))
    return missing


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
