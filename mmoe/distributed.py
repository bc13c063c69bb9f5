"""Expert parallelism: experts sharded over a process group, tokens exchanged by all-to-all.

With an expert-parallel group of size ``P`` a layer's ``E`` experts are split into ``P`` contiguous
blocks of ``E / P``: rank ``p`` of the group holds experts ``[p*E/P, (p+1)*E/P)``. Routing, the
dispatch plan, the combine and the dense-backprop estimators stay on the rank that owns the token; only
the expert computation moves:

1. the plan sorts the local slots by *global* expert, so the rows bound for rank ``p`` are one
   contiguous block; the per-expert counts are exchanged first (one small all-to-all of ``E`` ints);
2. the rows travel with an all-to-all with uneven splits; the receiver reorders them from
   (source rank, expert) order to (expert, source rank) order and runs its experts once;
3. the outputs travel back by the inverse all-to-all (its backward is again an all-to-all).

Gradient semantics match one process holding the global batch when the training loss is the mean of
the ranks' local losses: non-expert gradients are averaged over the data-parallel group, and expert
gradients (which already hold every rank's tokens) are divided by the data-parallel world size and
summed over the expert-data-parallel group only — which is what DeepSpeed does for parameters marked
``allreduce = False`` (`shard_experts` marks them).

It runs on CPU with gloo (two ranks on one machine are enough to test it) and on GPUs with NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Differentiable all-to-all of rows: send ``in_splits[p]`` rows to rank p, receive ``out_splits[p]``."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def expert_parallel_forward(experts: nn.Module, x: Tensor, counts: Tensor, group) -> Tensor:
    """Run ``experts`` (the local shard) on rows ``x [S, d]`` sorted by global expert.

    ``counts [E]`` (global experts) are this rank's rows per expert. Returns this rank's rows' outputs in
    the same order, computed by whichever rank owns each expert.
    """
    P = group_size(group)
    E = counts.numel()
    El = E // P
    send_counts = counts.reshape(P, El).contiguous()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [src, local expert]
    host = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one host sync
    in_splits, out_splits = host
    rows = all_to_all(x, out_splits, in_splits, group)  # (src, expert)-major
    # reorder (src, expert) -> (expert, src) so each local expert's rows are contiguous
    seg_key = (torch.arange(El, device=x.device) * P).unsqueeze(0) + torch.arange(P, device=x.device).unsqueeze(1)
    row_key = torch.repeat_interleave(seg_key.reshape(-1), recv_counts.reshape(-1), output_size=rows.shape[0])
    perm = torch.argsort(row_key, stable=True)
    y = experts(rows.index_select(0, perm), recv_counts.sum(0))
    y = y.new_empty(y.shape).index_copy(0, perm, y) if y.shape[0] else y
    return all_to_all(y, in_splits, out_splits, group)


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
    from .layer import moe_layers

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
