"""Dense-backprop estimators: give the router a gradient for experts a token did not use.

- `DefaultVectors` (Default MoE, Panda et al. 2025, methods.md §1.2-1.5): a per-expert EMA of the
  expert's routed outputs stands in for every expert a token did not compute:
  ``y = sum_{computed} w_i E_i(x) + sum_{not computed} pi_i * ema_i``. The forward *is* changed (the
  paper's ablation prefers it over a backward-only injection). The EMA is updated under no_grad,
  *before* use, from this batch's routed outputs (mean, or probability-weighted mean); experts with no
  routed rows keep their value; sums and counts are all-reduced over the data-parallel group so every
  rank holds the same vectors; nothing is updated in eval mode. ``pi`` is the full router distribution
  (not renormalised), as in the paper.
- `expert_group_term` (expert-group approximation, methods.md §1.9): for a missing expert i of token x,
  ``E_i(x) ~ mean_{j in G(x)} A[j, i]`` where ``A[j, i]`` is the mean output of expert i over this
  batch's rows routed to i whose top-``Kg`` group contains j. ``"forward"`` mode adds the term
  (``y + y'``); ``"backward"`` mode keeps the forward value (``y + y' - sg(y')``). Expert outputs that
  build A are detached.
- `dense_oracle_term`: runs *every* expert on every row; returns ``r - sg(r)`` with
  ``r = sum_i pi_i sg(E_i(x))``. Added to the sparse output computed with *detached* combine weights,
  the forward value stays sparse, the experts get their usual sparse gradient, and the router gets the
  exact dense gradient ``dL/dpi_i = <dL/dy, E_i(x)>`` for all i (the upper bound the estimators
  approximate).

Mixed multi-task batches (`mmoe.MoE` called with per-row task ids): the expert-group tables are built per
task (as separate calls per task would), the oracle is per row anyway, and the Default-MoE EMA takes ONE
update per forward from the kept slots of all tasks (the experts and their default vectors are shared).

"Computed" means a kept slot: in capacity mode a dropped slot's expert also falls back to its default
vector / group approximation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dispatch import DispatchPlan
from .parallel import all_reduce_


def computed_mask(plan: DispatchPlan, num_rows: int, num_experts: int) -> Tensor:
    """``[T, E]`` bool: expert e was computed for row t."""
    m = torch.zeros(num_rows, num_experts, dtype=torch.bool, device=plan.token.device)
    m[plan.token, plan.expert] = True
    return m


class DefaultVectors(nn.Module):
    """The per-expert default vectors of one MoE layer (a buffer, saved in the state dict)."""

    def __init__(self, num_experts: int, dim: int, beta: float, weighted: bool = False) -> None:
        super().__init__()
        self.beta, self.weighted = beta, weighted
        self.register_buffer("vectors", torch.zeros(num_experts, dim))

    @torch.no_grad()
    def update(self, y_slots: Tensor, plan: DispatchPlan, probs: Tensor, group=None) -> None:
        """EMA update from this batch's kept slots (``y_slots`` sorted as in ``plan``)."""
        acc = self.accumulator(plan, probs)
        acc(0, y_slots.shape[0], y_slots)
        acc.apply(group)

    def accumulator(self, plan: DispatchPlan, probs: Tensor) -> "DefaultUpdate":
        """The update of `update` taken piecewise: call it with consecutive slot ranges' outputs (``(s0, s1,
        y_slots[s0:s1])``, e.g. chunk by chunk from the experts' fused combine), then ``.apply(group)``.
        The same sums in the same order as one `update`, so bit for bit the same vectors."""
        return DefaultUpdate(self, plan, probs)

    def term(self, probs: Tensor, computed: Tensor) -> Tensor:
        """``sum_{i not computed} pi_i * ema_i``: ``[T, D]``, differentiable w.r.t. ``probs`` only."""
        # a copy: the product saves its operands for backward, and the next forward of this layer (a second
        # call before backward, e.g. one per modality or per stream) updates the vectors in place
        return probs.float().masked_fill(computed, 0.0) @ self.vectors.clone()


class DefaultUpdate:
    """One EMA update of `DefaultVectors`, accumulated over slot ranges (`DefaultVectors.accumulator`)."""

    def __init__(self, owner: DefaultVectors, plan: DispatchPlan, probs: Tensor) -> None:
        E, D = owner.vectors.shape
        self.owner, self.plan = owner, plan
        self.sums = torch.zeros(E, D, device=owner.vectors.device)
        self.p = probs.detach().float()[plan.token, plan.expert] if owner.weighted else None

    @torch.no_grad()
    def __call__(self, s0: int, s1: int, y: Tensor) -> None:
        y = y.detach().float()
        if self.p is not None:
            y = y * self.p[s0:s1].unsqueeze(-1)
        self.sums.index_add_(0, self.plan.expert[s0:s1], y)

    @torch.no_grad()
    def apply(self, group=None) -> None:
        owner, plan, sums = self.owner, self.plan, self.sums
        if self.p is not None:
            denom = torch.zeros(sums.shape[0], device=sums.device).index_add_(0, plan.expert, self.p)
        else:
            denom = plan.counts.float().clone()
        all_reduce_(sums, denom, group=group)
        hit = denom > 0
        mean = sums / denom.clamp_min(1e-12).unsqueeze(-1)
        new = owner.beta * owner.vectors + (1.0 - owner.beta) * mean
        owner.vectors.copy_(torch.where(hit.unsqueeze(-1), new, owner.vectors))


def expert_group_term(y_slots: Tensor, plan: DispatchPlan, probs: Tensor, computed: Tensor, group_k: int,
                      group=None, row_group: Tensor | None = None, num_groups: int = 1) -> Tensor:
    """The expert-group approximation ``y'(x) = sum_{i not computed} pi_i * mean_{j in G(x)} A[j, i]``.

    ``row_group [T]`` (ids in ``[0, num_groups)``, e.g. the rows' tasks): one table ``A`` per group, built
    from that group's rows only, so a mixed multi-task batch gets what separate calls per task would. The
    all-reduce over ``group`` always covers all ``num_groups`` tables (every rank calls the same collective).
    """
    T, E = probs.shape
    D = y_slots.shape[-1]
    G = probs.detach().topk(group_k, dim=-1).indices  # [T, Kg]
    if row_group is not None:
        G = G + (row_group * E).unsqueeze(1)  # block id (group, j) in [0, num_groups * E)
    y = y_slots.detach().float()
    sums = torch.zeros(num_groups * E * E, D, device=y.device)
    cnt = torch.zeros(num_groups * E * E, device=y.device)
    ones = torch.ones(plan.token.numel(), device=y.device)
    for g in range(group_k):
        key = G[plan.token, g] * E + plan.expert  # pair ((group, j), i)
        sums.index_add_(0, key, y)
        cnt.index_add_(0, key, ones)
    all_reduce_(sums, cnt, group=group)
    A = (sums / cnt.clamp_min(1.0).unsqueeze(-1)).view(num_groups * E, E, D)  # A[(group, j), i]
    pm = probs.float().masked_fill(computed, 0.0)  # [T, E]
    out = torch.zeros(T, D, device=y.device, dtype=torch.float32)
    for g in range(group_k):
        j = G[:, g]
        order = torch.argsort(j, stable=True)
        counts = torch.bincount(j, minlength=num_groups * E)
        parts = []
        for jj, rows in zip(range(num_groups * E), pm[order].split(counts.tolist())):
            if rows.shape[0]:
                parts.append(rows @ A[jj])
        out = out.index_add(0, order, torch.cat(parts, 0))
    return out / group_k


def dense_oracle_term(experts: nn.Module, h: Tensor, probs: Tensor) -> Tensor:
    """``r - sg(r)`` with ``r = sum_i pi_i sg(E_i(h))``: zero value, exact dense router gradient."""
    T, E = probs.shape
    with torch.no_grad():
        rows = h.detach().to(experts.w1.dtype).repeat(E, 1)  # expert-major: E blocks of the T rows
        counts = torch.full((E,), T, dtype=torch.long, device=h.device)
        y_all = experts(rows, counts, [T] * E).float().view(E, T, -1)
    r = torch.einsum("te,etd->td", probs.float(), y_all)
    return r - r.detach()
