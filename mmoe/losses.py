"""Auxiliary router losses as pure functions of a `Routing`.

All take fp32 tensors. ``group`` is an optional data-parallel process group: the expert-assignment
fractions are all-reduced over it (no gradient flows through them), so the balance loss balances the
*global* batch (GShard/Switch as used by Default MoE and GRIN), while the gradient flows through the
local mean probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .parallel import _all_reduce
from .routing import Routing


def expert_counts(indices: Tensor, num_experts: int) -> Tensor:
    """Slots assigned to each expert (``-1`` slots ignored): ``[E]`` float."""
    flat = indices.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=num_experts).float()


def group_expert_counts(indices: Tensor, group_ids: Tensor | int, num_groups: int, num_experts: int,
                        heads: int = 1, *, where: str = "group_expert_counts: routing") -> Tensor:
    """Routed slots per (group, expert) of one routing: ``[G, E]`` int64 (`expert_counts` per group: the
    layer's per-task loads, `mmoe.stats.RoutingCounter`'s per-language / per-modality counts).

    ``indices [T*heads, K]`` are a `mmoe.Routing`'s expert ids (``-1`` = empty slot); ``group_ids`` gives
    every input token's group (``[T]``; sub-tokens inherit their token's group) or is one int for all.
    Slots of empty choices and of tokens whose group is outside ``[0, G)`` are not counted."""
    rows = indices.shape[0]
    if isinstance(group_ids, int):
        g = torch.full((rows,), group_ids, dtype=torch.long, device=indices.device)
    else:
        ids = group_ids.reshape(-1).to(device=indices.device, dtype=torch.long)
        if ids.numel() * heads != rows:
            raise ValueError(f"{where} routed {rows // heads} tokens ({rows} rows, heads={heads}) "
                             f"but got {ids.numel()} group ids; pass ids per layer ({{name: ids}}) when a "
                             "layer sees only some of the tokens")
        g = ids.repeat_interleave(heads) if heads > 1 else ids
    g = g.unsqueeze(1).expand_as(indices)
    ok = (indices >= 0) & (g >= 0) & (g < num_groups)
    flat = g[ok] * num_experts + indices[ok]
    return torch.bincount(flat, minlength=num_groups * num_experts).view(num_groups, num_experts)


def switch_balance_loss(r: Routing, group=None, counts: Tensor | None = None) -> Tensor:
    """GShard/Switch load-balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` = fraction of (valid) slots assigned to expert e before any capacity drop, over the global
    batch when ``group`` is given; ``P_e`` = local mean routing probability. Equals 1 at perfect balance.
    ``counts [E]``: the (already all-reduced) slot counts to use instead of computing them from ``r``
    (the layer reduces every task's counts in one collective); ``group`` is then ignored.
    """
    probs = r.balance_probs if r.balance_probs is not None else r.probs
    E = probs.shape[-1]
    if counts is None:
        counts = _all_reduce(expert_counts(r.indices, E), group)
    f = counts / counts.sum().clamp_min(1.0)
    return E * (f * probs.float().mean(0)).sum()


def z_loss(r: Routing) -> Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``."""
    return torch.logsumexp(r.logits.float(), dim=-1).pow(2).mean()


def _cv_squared(v: Tensor) -> Tensor:
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / v.mean().pow(2).clamp_min(1e-10)


def importance_loss(r: Routing) -> Tensor:
    """V-MoE importance loss: squared coefficient of variation of the summed gates per expert."""
    return _cv_squared(r.probs.sum(0))


def load_loss(r: Routing, top_k: int, noise_std: float) -> Tensor:
    """V-MoE load loss: CV^2 of each expert's probability of being selected under re-sampled noise.

    For token t and expert e, the threshold is the k-th largest *noisy* logit among the other experts
    (the (k+1)-th overall when e is itself in the top k); ``P(select) = 1 - Phi((thr - clean_e)/sigma)``.
    """
    clean = r.clean_logits if r.clean_logits is not None else r.logits
    noisy = r.logits
    E = noisy.shape[-1]
    kk = min(top_k + 1, E)
    top = noisy.topk(kk, dim=-1).values
    thr_in = top[:, kk - 1 : kk] if kk > top_k else top[:, -1:]  # threshold for experts in the top k
    thr_out = top[:, top_k - 1 : top_k]  # threshold for experts outside it
    in_top = noisy >= thr_out
    thr = torch.where(in_top, thr_in, thr_out).detach()
    normal = torch.distributions.Normal(0.0, 1.0)
    p = 1.0 - normal.cdf((thr - clean) / noise_std)
    return _cv_squared(p.sum(0))
