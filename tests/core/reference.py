"""A plain per-token reference of the MoE layer, built only from `MoE.route()` and `MoE.expert_forward()`.

It re-implements capacity placement, the combine and every dense-backprop estimator with explicit
Python loops over tokens and slots, so that the vectorised layer is checked against an independent,
readable computation (values and, through autograd, gradients).
"""

from __future__ import annotations

import torch

import mmoe


def capacity_keep(moe: mmoe.MoE, r: mmoe.Routing, task: int = 0) -> list[list[bool]]:
    """Which slots are kept: top-1 choices of all tokens before top-2 choices, in token order or (batch
    prioritized) by decreasing max probability; an expert keeps its first `capacity` slots."""
    idx = r.indices.tolist()
    T, K = len(idx), len(idx[0])
    cap = moe.capacity(T, task)
    if cap is None:
        return [[idx[t][k] >= 0 for k in range(K)] for t in range(T)]
    if moe.cfg.batch_prioritized:
        pri = r.probs.max(-1).values.tolist()
        order = sorted(range(T), key=lambda t: -pri[t])  # Python's sort is stable
    else:
        order = list(range(T))
    load = [0] * moe.cfg.num_experts
    kept = [[False] * K for _ in range(T)]
    for k in range(K):
        for t in order:
            e = idx[t][k]
            if e >= 0 and load[e] < cap:
                kept[t][k] = True
                load[e] += 1
    return kept


def reference_forward(moe: mmoe.MoE, x: torch.Tensor, task: int | None = None,
                      default_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The layer's output for ``x``, computed token by token. ``default_vectors`` = the EMA buffer as it
    was *before* the forward being checked. Returns (output, info) with the expected new EMA."""
    cfg = moe.cfg
    t_id = 0 if task is None else task
    shape = x.shape
    h = moe.to_rows(x)
    r = moe.route(x, task)
    T, K = r.indices.shape
    E = cfg.num_experts
    kept = capacity_keep(moe, r, t_id)
    idx = r.indices.tolist()
    oracle = cfg.dense_backprop == "dense_oracle"
    w = r.weights.detach() if oracle else r.weights
    scale = r.scale

    rows = []
    computed = [[False] * E for _ in range(T)]
    outputs: dict[int, list[torch.Tensor]] = {e: [] for e in range(E)}
    out_probs: dict[int, list[torch.Tensor]] = {e: [] for e in range(E)}
    for t in range(T):
        y_t = torch.zeros(cfg.expert_dim)
        for k in range(K):
            e = idx[t][k]
            if e < 0 or not kept[t][k]:
                continue
            o = moe.expert_forward(e, h[t : t + 1])[0]
            contrib = w[t, k] * o
            if scale is not None:
                # forward value scaled, gradient as if unscaled (SparseMixer-v2)
                contrib = contrib + ((scale[t, k] - 1.0) * contrib).detach()
            y_t = y_t + contrib
            computed[t][e] = True
            outputs[e].append(o.detach())
            out_probs[e].append(r.probs[t, e].detach())
        rows.append(y_t)
    y = torch.stack(rows)
    info = {}

    if cfg.dense_backprop == "default":
        ema = default_vectors.clone()
        if moe.training:
            for e in range(E):
                if not outputs[e]:
                    continue  # experts with no routed rows keep their vector
                O = torch.stack(outputs[e])
                if cfg.default_weighted:
                    p = torch.stack(out_probs[e])
                    mean = (p[:, None] * O).sum(0) / p.sum()
                else:
                    mean = O.mean(0)
                ema[e] = cfg.default_beta * ema[e] + (1 - cfg.default_beta) * mean
        info["ema"] = ema
        extra = []
        for t in range(T):
            d = torch.zeros(cfg.expert_dim)
            for e in range(E):
                if not computed[t][e]:
                    d = d + r.probs[t, e] * ema[e]
            extra.append(d)
        y = y + torch.stack(extra)
    elif cfg.dense_backprop == "expert_group":
        Kg = cfg.group_k
        groups = [r.probs[t].detach().topk(Kg).indices.tolist() for t in range(T)]
        sums = torch.zeros(E, E, cfg.expert_dim)
        cnt = torch.zeros(E, E)
        for t in range(T):
            for k in range(K):
                e = idx[t][k]
                if e < 0 or not kept[t][k]:
                    continue
                o = moe.expert_forward(e, h[t : t + 1])[0].detach()
                for j in groups[t]:
                    sums[j, e] += o
                    cnt[j, e] += 1
        A = sums / cnt.clamp_min(1)[..., None]
        extra = []
        for t in range(T):
            d = torch.zeros(cfg.expert_dim)
            for e in range(E):
                if not computed[t][e]:
                    approx = sum(A[j, e] for j in groups[t]) / Kg
                    d = d + r.probs[t, e] * approx
            extra.append(d)
        extra = torch.stack(extra)
        y = y + (extra if cfg.expert_group_mode == "forward" else extra - extra.detach())
    elif oracle:
        dense = []
        for t in range(T):
            d = torch.zeros(cfg.expert_dim)
            for e in range(E):
                d = d + r.probs[t, e] * moe.expert_forward(e, h[t : t + 1])[0].detach()
            dense.append(d)
        dense = torch.stack(dense)
        y = y + dense - dense.detach()

    out = moe.from_rows(y, shape)
    if moe.shared is not None:
        out = out + moe.shared(x.reshape(-1, cfg.dim)).reshape(shape)
    info["computed"] = torch.tensor(computed)
    info["routing"] = r
    return out, info
