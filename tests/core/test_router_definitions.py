"""Each router's routing against its definition (methods.md §1.10, §3, §5; the docstrings in mmoe/routing.py),
recomputed from the router's parameters with plain torch ops and Python loops, independently of `route()`."""

from __future__ import annotations

import math

import pytest
import torch

import mmoe

E, D, T = 6, 8, 20


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # definitions are checked by value
        yield


def _moe(**kw) -> mmoe.MoE:
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=D, num_experts=E, expert_hidden=4, **kw)).eval()
    with torch.no_grad():  # larger router weights than the init: distinct, well separated scores
        for p in moe.router.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
    return moe


def _x() -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(1))


def _check_topk(r: mmoe.Routing, probs: torch.Tensor, k: int, normalize: bool) -> None:
    """Token choice: the k largest scores, weights = those scores (divided by their sum if normalised)."""
    torch.testing.assert_close(r.probs, probs, rtol=1e-5, atol=1e-6)
    assert r.indices.shape == (T, k)
    for t in range(T):
        order = sorted(range(E), key=lambda e: -float(probs[t, e]))[:k]
        assert sorted(r.indices[t].tolist()) == sorted(order), t
        w = {e: float(probs[t, e]) for e in order}
        if normalize:
            s = sum(w.values())
            w = {e: v / s for e, v in w.items()}
        for j, e in enumerate(r.indices[t].tolist()):
            assert float(r.weights[t, j]) == pytest.approx(w[e], rel=1e-5, abs=1e-7), (t, e)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_softmax_topk_router(score_func, normalize, k):
    moe = _moe(router="softmax", top_k=k, score_func=score_func, normalize_topk=normalize)
    x = _x()
    with torch.no_grad():
        r = moe.route(x)
    logits = x @ moe.router.weight.t()
    probs = logits.softmax(-1) if score_func == "softmax" else torch.sigmoid(logits)
    torch.testing.assert_close(r.logits, logits, rtol=1e-5, atol=1e-5)
    _check_topk(r, probs, k, normalize)
    if score_func == "sigmoid":  # the balance loss uses the scores normalised to a distribution
        torch.testing.assert_close(r.balance_probs, probs / probs.sum(-1, keepdim=True))
    if normalize:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_xmoe_paper_router(normalize, score_func):
    """Paper X-MoE: s = cos(W h, e_i) (both L2-normalised); gate softmax/sigmoid(s / tau), tau learnable
    (init xmoe_temperature); the balance loss uses the fixed initial tau."""
    tau0 = 0.3 if score_func == "softmax" else 0.07
    moe = _moe(router="xmoe", top_k=2, xmoe_dim=4, normalize_topk=normalize, score_func=score_func,
               xmoe_temperature=tau0)
    router = moe.router
    with torch.no_grad():
        router.log_tau.fill_(math.log(0.5))  # a learned temperature that differs from tau0
        r = moe.route(_x())
    x = _x()
    h = x @ router.proj.weight.t()
    cos = torch.zeros(T, E)
    for t in range(T):
        for e in range(E):
            emb = router.expert_emb[e]
            cos[t, e] = (h[t] @ emb) / (h[t].norm() * emb.norm())
    logits = cos / 0.5
    torch.testing.assert_close(r.logits, logits, rtol=1e-5, atol=1e-5)
    probs = logits.softmax(-1) if score_func == "softmax" else torch.sigmoid(logits)
    _check_topk(r, probs, 2, normalize)
    bal = (cos / tau0).softmax(-1) if score_func == "softmax" else torch.sigmoid(cos / tau0)
    torch.testing.assert_close(r.balance_probs, bal, rtol=1e-5, atol=1e-6)


def test_xmoe_torchscale_router():
    """torchscale's gate: logits = (W h) . e_i / |e_i| (the token projection is not normalised, no tau)."""
    moe = _moe(router="xmoe", xmoe_variant="torchscale", top_k=2, xmoe_dim=4)
    router = moe.router
    x = _x()
    with torch.no_grad():
        r = moe.route(x)
    h = x @ router.proj.weight.t()
    logits = torch.stack([torch.stack([h[t] @ router.expert_emb[e] / router.expert_emb[e].norm()
                                       for e in range(E)]) for t in range(T)])
    assert router.log_tau is None
    torch.testing.assert_close(r.logits, logits, rtol=1e-5, atol=1e-5)
    _check_topk(r, logits.softmax(-1), 2, False)


def _masked_softmax(z: list[float], removed: set[int], eps: float) -> dict[int, float]:
    """SparseMixer's masked softmax over the not yet chosen experts: keep i iff
    (z* - z_i) / max(|z_i|, z*) <= 2 eps."""
    live = [e for e in range(len(z)) if e not in removed]
    zmax = max(z[e] for e in live)
    keep = [e for e in live if (zmax - z[e]) / max(abs(z[e]), zmax, 1e-12) <= 2 * eps]
    m = max(z[e] for e in keep)
    ex = {e: math.exp(z[e] - m) for e in keep}
    s = sum(ex.values())
    return {e: v / s for e, v in ex.items()}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_sparsemixer_eval_is_iterated_argmax_with_masked_softmax_weights(normalize, eps):
    moe = _moe(router="sparsemixer", top_k=2, sparsemixer_eps=eps, normalize_topk=normalize)
    x = _x()
    with torch.no_grad():
        r = moe.route(x)
    logits = x @ moe.router.weight.t()
    torch.testing.assert_close(r.probs, logits.softmax(-1), rtol=1e-5, atol=1e-6)
    assert r.scale is None
    for t in range(T):
        z = logits[t].tolist()
        removed: set[int] = set()
        want_idx, want_w = [], []
        for _ in range(2):
            p = _masked_softmax(z, removed, eps)
            d = max((e for e in range(E) if e not in removed), key=lambda e: z[e])
            want_idx.append(d)
            want_w.append(p[d])
            removed.add(d)
        if normalize:
            s = sum(want_w)
            want_w = [w / s for w in want_w]
        assert r.indices[t].tolist() == want_idx, t
        for j in range(2):
            assert float(r.weights[t, j]) == pytest.approx(want_w[j], rel=1e-5), (t, j)


def test_sparsemixer_training_weights_given_the_samples():
    """Training samples D without replacement; given the sampled experts (random), each slot's weight is the
    masked-softmax probability of D among the experts not chosen before, D lies in that mask, and the
    forward scale is 1 when D is the remaining argmax, else 1 or 1/3."""
    moe = _moe(router="sparsemixer", top_k=3, sparsemixer_eps=0.5).train()
    x = _x()
    torch.manual_seed(3)
    with torch.no_grad():
        r = moe.route(x)
    logits = x @ moe.router.weight.t()
    not_argmax = 0
    for t in range(T):
        z = logits[t].tolist()
        removed: set[int] = set()
        for j, d in enumerate(r.indices[t].tolist()):
            p = _masked_softmax(z, removed, 0.5)
            assert d in p, (t, j)
            assert float(r.weights[t, j]) == pytest.approx(p[d], rel=1e-5), (t, j)
            top = max((e for e in range(E) if e not in removed), key=lambda e: z[e])
            c = float(r.scale[t, j])
            if d == top:
                assert c == 1.0
            else:
                assert c in (1.0, pytest.approx(1 / 3))
                not_argmax += 1
            removed.add(d)
    assert not_argmax > 0  # the samples are not just the argmax (eps = 0.5 keeps several experts)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("cf,k", [(1.0, 1), (1.0, 2), (2.0, 1)])
def test_expert_choice_router(normalize, cf, k):
    """Each expert takes its C = ceil(cf * T * k / E) highest-scoring tokens, weight = the softmax score
    (renormalised over the token's experts if asked)."""
    moe = _moe(router="expert_choice", top_k=k, capacity_factor=cf, normalize_topk=normalize)
    x = _x()
    with torch.no_grad():
        r = moe.route(x)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    torch.testing.assert_close(r.probs, probs, rtol=1e-5, atol=1e-6)
    C = math.ceil(cf * T * k / E)
    chosen: dict[int, list[int]] = {t: [] for t in range(T)}
    for e in range(E):
        for t in sorted(range(T), key=lambda t: -float(probs[t, e]))[:C]:
            chosen[t].append(e)
    for t in range(T):
        got = {e: float(w) for e, w in zip(r.indices[t].tolist(), r.weights[t].tolist()) if e >= 0}
        assert sorted(got) == sorted(chosen[t]), t
        w = {e: float(probs[t, e]) for e in chosen[t]}
        if normalize and w:
            s = sum(w.values())
            w = {e: v / s for e, v in w.items()}
        for e in got:
            assert got[e] == pytest.approx(w[e], rel=1e-5), (t, e)
        assert all(float(v) == 0.0 for e, v in zip(r.indices[t].tolist(), r.weights[t].tolist()) if e < 0)


def test_multi_task_route_uses_each_tasks_router():
    """route(x, task=tensor): each row's scores come from its task's router parameters."""
    moe = _moe(router="softmax", top_k=2, num_tasks=2, normalize_topk=True)
    moe.set_top_k(1, task=1)
    x = _x()
    task = torch.arange(T) % 2
    with torch.no_grad():
        r = moe.route(x, task=task)
    assert r.indices.shape == (T, 2)
    for t in range(T):
        W = moe.routers[int(task[t])].weight
        probs = (x[t] @ W.t()).softmax(-1)
        torch.testing.assert_close(r.probs[t], probs, rtol=1e-5, atol=1e-6)
        k = 2 if task[t] == 0 else 1
        top = probs.topk(k).indices.tolist()
        assert r.indices[t, :k].tolist() == top and (r.indices[t, k:] == -1).all()
        w = probs[top] / probs[top].sum()
        torch.testing.assert_close(r.weights[t, :k], w, rtol=1e-5, atol=1e-6)
