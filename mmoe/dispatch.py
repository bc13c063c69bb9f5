"""Dispatch: which (token, expert) slots are computed, in which order.

Pure functions over the routing indices. No ``[T, E, C]`` one-hot tensors: a plan is built with one
stable sort of the ``T*K`` slots, so its cost grows with the number of slots, not with E.

Capacity mode (GShard / V-MoE): slots are placed rank-major (every token's 1st choice before any 2nd
choice), tokens in sequence order or, with batch-prioritized routing, by decreasing max routing weight;
an expert keeps its first ``capacity`` slots and drops the rest. A dropped slot contributes nothing:
a token's output is exactly the weighted sum over its kept slots (no renormalisation after dropping).
"""

from __future__ import annotations

import math
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
        capacity: per-expert capacity, or None when dropless.
    """

    token: Tensor
    expert: Tensor
    slot: Tensor
    counts: Tensor
    routed: Tensor
    kept: Tensor
    num_valid: int
    capacity: int | None

    @property
    def num_dropped(self) -> int:
        return self.num_valid - self.token.numel()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``ceil(cf * T * k / E)``, at least 1 (GShard / V-MoE)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def make_plan(indices: Tensor, num_experts: int, capacity: int | None = None,
              priority: Tensor | None = None) -> DispatchPlan:
    """Build the dispatch plan for ``indices [T, K]`` (``-1`` = empty slot).

    ``priority [T]`` (optional, capacity mode): tokens with a higher value are placed first within each
    choice rank (batch-prioritized routing).
    """
    T, K = indices.shape
    device = indices.device
    if priority is not None:
        tok_order = torch.argsort(priority, descending=True, stable=True)
    else:
        tok_order = torch.arange(T, device=device)
    # rank-major sequence of slots: all 1st choices (in token priority order), then 2nd choices, ...
    seq_slot = (tok_order.unsqueeze(0) * K + torch.arange(K, device=device).unsqueeze(1)).reshape(-1)
    seq_exp = indices.reshape(-1)[seq_slot]
    valid = seq_exp >= 0
    key = torch.where(valid, seq_exp, torch.full_like(seq_exp, num_experts))  # empty slots sort last
    order = torch.argsort(key, stable=True)
    sorted_exp = key[order]
    routed_all = torch.bincount(sorted_exp, minlength=num_experts + 1)
    routed = routed_all[:num_experts]
    num_valid = int(valid.sum())
    if capacity is None:
        keep_sorted = sorted_exp < num_experts
        counts = routed.clone()
    else:
        starts = torch.cumsum(routed_all, 0) - routed_all
        pos = torch.arange(order.numel(), device=device) - starts[sorted_exp]
        keep_sorted = (sorted_exp < num_experts) & (pos < capacity)
        counts = routed.clamp(max=capacity)
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


class _ForwardScale(torch.autograd.Function):
    """``y * scale`` in the forward, identity gradient (SparseMixer-v2's straight-through scaling)."""

    @staticmethod
    def forward(ctx, y: Tensor, scale: Tensor) -> Tensor:
        return y * scale

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def forward_scale(y: Tensor, scale: Tensor) -> Tensor:
    return _ForwardScale.apply(y, scale)


def combine(y_slots: Tensor, plan: DispatchPlan, weights: Tensor, num_rows: int,
            scale: Tensor | None = None) -> Tensor:
    """``out[t] = sum_{kept slots s of t} scale_s * w_s * y_s`` as one ``index_add``."""
    w = weights.reshape(-1)[plan.slot].to(y_slots.dtype)
    contrib = y_slots * w.unsqueeze(-1)
    if scale is not None:
        contrib = forward_scale(contrib, scale.reshape(-1)[plan.slot].to(contrib.dtype).unsqueeze(-1))
    out = y_slots.new_zeros(num_rows, y_slots.shape[-1])
    return out.index_add(0, plan.token, contrib)
