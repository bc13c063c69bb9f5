"""Collectives of the core: data-parallel all-reduce helpers and expert parallelism's all-to-all.

Data parallelism: `all_reduce_` / `dp_active` are no-ops without a process group, so a layer never needs
``torch.distributed`` (the balance loss, Default-MoE's EMA and the aux-loss-free load use them).

Expert parallelism: experts sharded over a process group, tokens exchanged by all-to-all.

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
``allreduce = False`` (`mmoe.train.sharding.shard_experts` marks them).

It runs on CPU with gloo (two ranks on one machine are enough to test it) and on GPUs with NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def dp_active(group) -> bool:
    """True when ``group`` is a process group with more than one rank."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_(*ts: Tensor, group=None) -> None:
    """In-place sum over ``group``; a no-op without one (the layer never needs torch.distributed)."""
    if dp_active(group):
        for t in ts:
            dist.all_reduce(t, group=group)


def _all_reduce(t: Tensor, group) -> Tensor:
    if dp_active(group):
        t = t.clone()
        dist.all_reduce(t, group=group)
    return t


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


def all_gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj`` in rank order (`torch.distributed.all_gather_object`); ``[obj]`` without a
    group of more than one rank. A collective: every rank of ``group`` calls it. Tensors inside ``obj`` should
    be on the CPU (they are unpickled on the device they were pickled from)."""
    if not dp_active(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
