"""Dispatch: which (token, expert) slots are computed, in which order.

Pure functions over the routing indices. No ``[T, E, C]`` one-hot tensors: a plan is built with one
stable sort of the ``T*K`` slots, so its cost grows with the number of slots, not with E.

Capacity mode (GShard / V-MoE): slots are placed rank-major (every token's 1st choice before any 2nd
choice), tokens in sequence order or, with batch-prioritized routing, by decreasing max routing weight;
an expert keeps its first ``capacity`` slots and drops the rest. A dropped slot contributes nothing:
a token's output is exactly the weighted sum over its kept slots (no renormalisation after dropping).
With row ``groups`` (the tasks of a mixed multi-task batch) the capacity is per (group, expert): each
group's rows compete only with each other, exactly as if each group were dispatched on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """Kept slots sorted by expert (stable in priority order).

    Attributes:
        token: ``[S]`` row index (into the routed rows) of each kept slot.
        expert: ``[S]`` expert id of each kept slot (non-decreasing).
        slot: ``[S]`` flat index into the ``[T, K]`` routing arrays.
        counts: ``[E]`` kept slots per expert (int64).
        routed: ``[E]`` valid slots per expert before any capacity drop (int64).
        kept: ``[T, K]`` bool, slot is valid and kept.
        num_valid: number of valid (non-empty) slots.
        capacity: per-expert capacity (a ``[G]`` tensor, per group, when the plan was made with
            groups), or None when dropless.
    """

    token: Tensor
    expert: Tensor
    slot: Tensor
    counts: Tensor
    routed: Tensor
    kept: Tensor
    num_valid: int
    capacity: int | Tensor | None

    @property
    def num_dropped(self) -> int:
        return self.num_valid - self.token.numel()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``ceil(cf * T * k / E)``, at least 1 (GShard / V-MoE)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def make_plan(indices: Tensor, num_experts: int, capacity: int | Tensor | None = None,
              priority: Tensor | None = None, groups: Tensor | None = None) -> DispatchPlan:
    """Build the dispatch plan for ``indices [T, K]`` (``-1`` = empty slot).

    ``priority [T]`` (optional, capacity mode): tokens with a higher value are placed first within each
    choice rank (batch-prioritized routing). ``groups [T]`` (optional, int64 ids in ``[0, G)``): capacity
    is counted per (group, expert) and ``capacity`` is then a ``[G]`` tensor of per-group capacities;
    kept slots stay sorted by expert (then by group).
    """
    T, K = indices.shape
    E = num_experts
    device = indices.device
    if priority is not None:
        tok_order = torch.argsort(priority, descending=True, stable=True)
    else:
        tok_order = torch.arange(T, device=device)
    # rank-major sequence of slots: all 1st choices (in token priority order), then 2nd choices, ...
    seq_slot = (tok_order.unsqueeze(0) * K + torch.arange(K, device=device).unsqueeze(1)).reshape(-1)
    seq_exp = indices.reshape(-1)[seq_slot]
    valid = seq_exp >= 0
    # sort key: the expert, or (expert, group) when capacity is per group; empty slots sort last
    G = 1
    if groups is not None and isinstance(capacity, Tensor) and capacity.numel() > 1:
        G = int(capacity.numel())
        key = seq_exp * G + groups[seq_slot // K]
    else:
        key = seq_exp
    key = torch.where(valid, key, torch.full_like(key, E * G))
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    sorted_exp = sorted_key // G
    routed = torch.bincount(sorted_exp, minlength=E + 1)[:E]
    num_valid = int(valid.sum())
    if capacity is None:
        keep_sorted = sorted_exp < E
        counts = routed.clone()
    else:
        bucket_all = torch.bincount(sorted_key, minlength=E * G + 1)
        starts = torch.cumsum(bucket_all, 0) - bucket_all
        pos = torch.arange(order.numel(), device=device) - starts[sorted_key]
        if G > 1:
            cap = capacity.to(device)
            keep_sorted = (sorted_exp < E) & (pos < cap[sorted_key % G])
            counts = torch.minimum(bucket_all[: E * G].view(E, G), cap.unsqueeze(0)).sum(1)
        else:
            cap = int(capacity)
            keep_sorted = (sorted_exp < E) & (pos < cap)
            counts = routed.clamp(max=cap)
    sel = order[keep_sorted]
    slot = seq_slot[sel]
    kept = torch.zeros(T * K, dtype=torch.bool, device=device)
    kept[slot] = True
    return DispatchPlan(
        token=slot // K,
        expert=sorted_exp[keep_sorted],
        slot=slot,
        counts=counts,
        routed=routed,
        kept=kept.view(T, K),
        num_valid=num_valid,
        capacity=capacity,
    )


# on CPU the combine works over chunks of at most this many slot values (4 MiB in fp32), so no weighted copy of
# the slots and no gathered output gradient exists whole: one chunk-sized scratch per call, reused
COMBINE_CHUNK_ELEMENTS = 1 << 20


class _Combine(torch.autograd.Function):
    """``out[token_s] += scale_s * w_s * y_s`` over slots in order; the gradient treats ``scale`` as 1
    (SparseMixer-v2's straight-through scaling): ``dy_s = w_s * g[token_s]``, ``dw_s = <g[token_s], y_s>``.

    The same sums as ``index_add`` of the weighted slots in one call (the slots are added in the same order,
    so the result is bit-identical), chunk by chunk."""

    @staticmethod
    def forward(ctx, y: Tensor, w: Tensor, token: Tensor, num_rows: int, scale: Tensor | None,
                workspace: Callable[[str, tuple[int, ...], Tensor], Tensor] | None) -> Tensor:
        S, D = y.shape
        out = y.new_zeros(num_rows, D)
        # CPU: chunks (cache-sized, no whole temporaries); an accelerator: one call each (no launch per chunk)
        step = max(COMBINE_CHUNK_ELEMENTS // max(D, 1), 1) if y.device.type == "cpu" else max(S, 1)
        ws = w if scale is None else w * scale
        scratch = y.new_empty(min(step, S), D)
        for s0 in range(0, S, step):
            s1 = min(s0 + step, S)
            contrib = torch.mul(y[s0:s1], ws[s0:s1].unsqueeze(-1), out=scratch[:s1 - s0])
            out.index_add_(0, token[s0:s1], contrib)
        ctx.save_for_backward(y, w, token)
        ctx.step, ctx.workspace = step, workspace
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        y, w, token = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        S, D = y.shape
        g = g.contiguous()
        gy = None
        if need_y:
            gy = torch.empty_like(y) if ctx.workspace is None else ctx.workspace("combine_grad", tuple(y.shape), y)
        gw = torch.empty_like(w) if need_w else None
        step = ctx.step
        gt_buf = y.new_empty(min(step, S), D)
        prod_buf = y.new_empty(min(step, S), D) if need_w else None
        for s0 in range(0, S, step):
            s1 = min(s0 + step, S)
            gt = torch.index_select(g, 0, token[s0:s1], out=gt_buf[:s1 - s0])
            if gw is not None:
                torch.sum(torch.mul(gt, y[s0:s1], out=prod_buf[:s1 - s0]), -1, out=gw[s0:s1])
            if gy is not None:
                torch.mul(gt, w[s0:s1].unsqueeze(-1), out=gy[s0:s1])
        return gy, gw, None, None, None, None


@dataclass
class SlotCombine:
    """What the combine needs besides the slots' outputs: each kept slot's routing weight ``weight [S]``, its
    row ``token [S]``, SparseMixer-v2's straight-through ``scale [S]`` (or None), and the output rows.
    ``observe(s0, s1, y)``, when given, is shown the slots' outputs ``y_slots[s0:s1]`` (before weighting, in
    consecutive ranges covering all slots) by whoever computes them: a reader such as Default MoE's EMA
    update (`mmoe.dense_backprop.DefaultVectors.accumulator`) then needs no ``[S, D]`` slot outputs."""

    weight: Tensor
    token: Tensor
    num_rows: int
    scale: Tensor | None = None
    observe: Callable[[int, int, Tensor], None] | None = None


def slot_combine(plan: DispatchPlan, weights: Tensor, num_rows: int, scale: Tensor | None = None) -> SlotCombine:
    """The `SlotCombine` of ``plan``'s kept slots under routing ``weights [T, K]`` (``scale`` detached)."""
    s = None if scale is None else scale.reshape(-1)[plan.slot].detach()
    return SlotCombine(weights.reshape(-1)[plan.slot], plan.token, num_rows, s)


def combine_slots(y_slots: Tensor, c: SlotCombine,
                  workspace: Callable[[str, tuple[int, ...], Tensor], Tensor] | None = None) -> Tensor:
    """``out[t] = sum_{kept slots s of t} scale_s * w_s * y_s`` (`_Combine`; ``scale`` straight-through).
    ``workspace(key, shape, like)`` (e.g. `mmoe.experts.Experts.workspace`) gives the slots' gradient."""
    dt = y_slots.dtype
    if c.observe is not None:
        c.observe(0, y_slots.shape[0], y_slots)
    s = None if c.scale is None else c.scale.to(dt)
    return _Combine.apply(y_slots, c.weight.to(dt), c.token, c.num_rows, s, workspace)


def combine(y_slots: Tensor, plan: DispatchPlan, weights: Tensor, num_rows: int,
            scale: Tensor | None = None,
            workspace: Callable[[str, tuple[int, ...], Tensor], Tensor] | None = None) -> Tensor:
    """``out[t] = sum_{kept slots s of t} scale_s * w_s * y_s`` over ``plan``'s slots (`combine_slots`)."""
    return combine_slots(y_slots, slot_combine(plan, weights, num_rows, scale), workspace)
