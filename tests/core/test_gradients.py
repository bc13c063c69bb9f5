"""Gradient semantics against the definitions in methods.md (router gradient per expert)."""

from __future__ import annotations

import pytest
import torch

import mmoe


def _probs_grad(moe: mmoe.MoE, x: torch.Tensor, c: torch.Tensor):
    """Run forward with a linear loss <c, y>; return (routing, dL/dprobs, dL/dy at the routed rows)."""
    moe.record_routing = True
    y = moe(x)
    r = moe.last_routing
    r.probs.retain_grad()
    (y * c).sum().backward()
    g_rows = c.reshape(-1, moe.cfg.dim)
    if moe.merge_proj is not None:
        g_rows = g_rows @ moe.merge_proj.weight
    return r, r.probs.grad, g_rows.reshape(-1, moe.cfg.expert_dim)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("estimator", ["none", "default", "dense_oracle", "expert_group"])
def test_router_gradient_per_expert(estimator, heads):
    """dL/dpi_i = <g, E_i(x)> for computed experts; for the others: 0 (none), <g, ema_i> (default),
    <g, E_i(x)> (dense oracle), <g, mean_j A[j,i]> (expert group)."""
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, expert_hidden=6, heads=heads, dense_backprop=estimator,
                         default_beta=0.5)
    moe = mmoe.MoE(cfg).train()
    if moe.default is not None:
        moe.default.vectors.normal_()
    x = torch.randn(6, 8)
    c = torch.randn(6, 8)
    r, gp, g = _probs_grad(moe, x, c)
    h = moe.to_rows(x).detach()
    T, E = gp.shape
    sel = r.indices[:, 0]
    with torch.no_grad():
        full = torch.stack([moe.expert_forward(e, h) for e in range(E)], 1)  # [T, E, dh]
        expect = (full * g[:, None, :]).sum(-1)  # <g_t, E_e(x_t)>
        if estimator == "none":
            other = torch.zeros_like(expect)
        elif estimator == "default":
            other = g @ moe.default.vectors.t()  # updated EMA, used in the same forward
        elif estimator == "dense_oracle":
            other = expect
        else:
            G = r.probs.topk(cfg.group_k, -1).indices
            A = torch.zeros(E, E, cfg.expert_dim)
            n = torch.zeros(E, E)
            for t in range(T):
                for j in G[t]:
                    A[j, sel[t]] += full[t, sel[t]]
                    n[j, sel[t]] += 1
            A = A / n.clamp_min(1)[..., None]
            other = torch.stack([(g[t] * A[G[t]].mean(0)).sum(-1) for t in range(T)])
        mask = torch.zeros(T, E, dtype=torch.bool)
        mask[torch.arange(T), sel] = True
        want = torch.where(mask, expect, other)
    torch.testing.assert_close(gp, want, rtol=1e-4, atol=1e-5)
    if estimator in ("default", "dense_oracle"):
        assert (gp[~mask].abs() > 0).all(), "non-selected experts must get a router gradient"
    elif estimator == "expert_group":  # zero only where the batch has no rows for the (j, i) pair
        assert (gp[~mask].abs() > 0).float().mean() > 0.5
    else:
        assert torch.count_nonzero(gp[~mask]) == 0


def test_dense_oracle_value_and_gradients():
    """Sparse forward value and sparse expert gradients; router gradient = all-experts computation."""
    torch.manual_seed(0)
    base = mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, expert_hidden=8, normalize_topk=True)
    plain = mmoe.MoE(base)
    oracle = mmoe.MoE(base.replace(dense_backprop="dense_oracle"))
    oracle.load_state_dict(plain.state_dict())
    x = torch.randn(10, 8)
    c = torch.randn(10, 8)
    y_p, y_o = plain(x), oracle(x)
    torch.testing.assert_close(y_p, y_o)
    (y_p * c).sum().backward()
    (y_o * c).sum().backward()
    torch.testing.assert_close(plain.experts.w1.grad, oracle.experts.w1.grad)
    torch.testing.assert_close(plain.experts.w2.grad, oracle.experts.w2.grad)
    # router gradient of the dense mixture sum_i pi_i E_i(x), experts held fixed
    w = oracle.router.weight.detach().clone().requires_grad_()
    probs = (x @ w.t()).softmax(-1)
    with torch.no_grad():
        full = torch.stack([oracle.expert_forward(e, x) for e in range(4)], 1)
    ((probs[..., None] * full).sum(1) * c).sum().backward()
    torch.testing.assert_close(oracle.router.weight.grad, w.grad)
    assert not torch.allclose(plain.router.weight.grad, w.grad)


def test_sparsemixer_eval_is_argmax_and_train_samples_in_mask():
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=6, top_k=2, router="sparsemixer", sparsemixer_eps=0.4)
    moe = mmoe.MoE(cfg)
    x = torch.randn(64, 8) * 3
    moe.eval()
    r = moe.route(x)
    assert torch.equal(r.indices, r.logits.topk(2, -1).indices)
    assert r.scale is None
    moe.train()
    r = moe.route(x)
    z = r.logits
    zmax = z.max(-1, keepdim=True).values
    keep = (zmax - z) / z.abs().clamp(min=zmax) <= 2 * cfg.sparsemixer_eps
    first = r.indices[:, 0:1]
    assert keep.gather(-1, first).all(), "the first sample lies inside the SparseMixer mask"
    assert torch.isclose(r.scale, torch.tensor(1.0)).logical_or(torch.isclose(r.scale, torch.tensor(1 / 3))).all()
    is_top = first == z.argmax(-1, keepdim=True)
    assert (r.scale[:, :1][is_top] == 1.0).all()
    # sampling: with a wide mask, not every first choice is the argmax
    assert (~is_top).any()


def test_sparsemixer_gradient_is_masked_softmax_derivative():
    """dL/dz = g * p_D (1_D - p) with p the masked softmax (top-1), independent of the forward scale."""
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, router="sparsemixer", sparsemixer_eps=0.5)
    moe = mmoe.MoE(cfg).train()
    x = torch.randn(16, 8)
    c = torch.randn(16, 8)
    moe.record_routing = True
    torch.manual_seed(3)
    y = moe(x)
    r = moe.last_routing
    r.logits.retain_grad()
    (y * c).sum().backward()
    with torch.no_grad():
        D = r.indices[:, 0]
        out = torch.stack([moe.expert_forward(int(D[t]), x[t : t + 1])[0] for t in range(16)])
        gD = (out * c).sum(-1)  # dL/dp_D (unscaled)
        z = r.logits
        zmax = z.max(-1, keepdim=True).values
        keep = (zmax - z) / z.abs().clamp(min=zmax) <= 2 * cfg.sparsemixer_eps
        p = z.masked_fill(~keep, float("-inf")).softmax(-1)
        pD = p.gather(-1, D[:, None])
        onehot = torch.nn.functional.one_hot(D, 4).float()
        want = gD[:, None] * pD * (onehot - p)
    torch.testing.assert_close(r.logits.grad, want, rtol=1e-4, atol=1e-6)


def test_default_moe_empty_experts_keep_their_vector():
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=8, top_k=1, dense_backprop="default", default_beta=0.5)
    moe = mmoe.MoE(cfg).train()
    moe.default.vectors.normal_()
    before = moe.default.vectors.clone()
    moe(torch.randn(3, 8))
    hit = moe.last_stats.tokens_per_expert > 0
    assert (~hit).sum() >= 5
    assert torch.equal(moe.default.vectors[~hit], before[~hit])
    assert not torch.allclose(moe.default.vectors[hit], before[hit])


def test_default_moe_ema_from_zero_is_scaled_batch_mean():
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=2, top_k=1, dense_backprop="default", default_beta=0.9)
    moe = mmoe.MoE(cfg).train()
    x = torch.randn(20, 8)
    r = moe.route(x)
    moe(x)
    e = int(r.indices[0, 0])
    rows = x[r.indices[:, 0] == e]
    want = 0.1 * moe.expert_forward(e, rows).mean(0)
    torch.testing.assert_close(moe.default.vectors[e], want.detach())
