"""Expert sharding: keep each rank's block of experts in every `mmoe.MoE` of a model, marked for DeepSpeed.

The token exchange itself is `mmoe.parallel.expert_parallel_forward`; this module only cuts the expert
parameters and tells the layers which group to use.
"""

from __future__ import annotations

from torch import nn

from ..layer import moe_layers
from ..parallel import group_rank, group_size

__all__ = ["shard_experts"]


def _shard(p: nn.Parameter, start: int, stop: int) -> nn.Parameter:
    q = nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
    for k, v in vars(p).items():
        setattr(q, k, v)
    return q


def shard_experts(model: nn.Module, ep_group, *, group_name: str | None = None) -> nn.Module:
    """Keep only this rank's block of experts in every `mmoe.MoE` of ``model``, in place.

    Build the full model identically on every rank (same seed), then call this: each rank keeps
    experts ``[r*E/P, (r+1)*E/P)`` of every layer, so the sharded model is numerically the full one.
    Expert parameters get ``allreduce = False`` and ``group_name`` (DeepSpeed's markers: reduced over the
    expert-data-parallel group only). ``ep_group=None`` or a group of size 1 keeps every expert but
    still marks them, so one code path serves every ``ep_size``.
    """
    P, r = group_size(ep_group), group_rank(ep_group)
    name = group_name or f"ep_size_{P}"
    for lname, m in moe_layers(model):
        E = m.cfg.num_experts
        if E % P:
            raise ValueError(f"{lname}: num_experts={E} is not divisible by the expert-parallel size {P}")
        if m.cfg.dense_backprop == "dense_oracle" and P > 1:
            raise ValueError(f"{lname}: dense_backprop='dense_oracle' runs every expert on every token and "
                             "is not supported with expert parallelism (use ep_size=1)")
        ex = m.experts
        El = E // P
        if ex.num_experts != E:
            raise ValueError(f"{lname}: experts are already sharded ({ex.num_experts} of {E})")
        start = r * El
        for pname, p in list(ex.named_parameters(recurse=False)):
            q = _shard(p, start, start + El) if P > 1 else p
            q.allreduce = False
            q.group_name = name
            setattr(ex, pname, q)
        ex.num_experts, ex.expert_offset = El, start
        m.ep_group = ep_group if P > 1 else None
        m.ep_size = P
    return model
