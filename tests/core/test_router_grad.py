"""mmoe.tools.router_grad: estimators' router gradients accumulated over micro-batches vs the dense oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmoe
from mmoe.tools.router_grad import router_grad_fidelity, router_gradient


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, expert_hidden=6, **kw)
    return nn.Sequential(mmoe.MoE(cfg)).train()


def _examples(n: int = 12) -> list:
    g = torch.Generator().manual_seed(1)  # each example: 3 rows and their output weights (a tiny document)
    return [(torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)) for _ in range(n)]


def _loss(model, examples):
    x = torch.cat([e[0] for e in examples])
    c = torch.cat([e[1] for e in examples])
    return (model(x) * c).sum(), x.shape[0]


def _cat(examples):
    return torch.cat([e[0] for e in examples]), torch.cat([e[1] for e in examples])


@pytest.mark.parametrize("micro", [1, 5, 12])  # 5: a shorter last micro-batch, weighted by its rows
def test_oracle_gradient_is_the_dense_mixture_gradient_whatever_the_split(micro):
    model, ex = _model(), _examples()
    got = router_gradient(model, ex, _loss, estimator="dense_oracle", micro_batch=micro)["0"]
    moe = model[0]
    x, c = _cat(ex)
    w = moe.router.weight.detach().clone().requires_grad_()
    probs = (x @ w.t()).softmax(-1)
    with torch.no_grad():
        full = torch.stack([moe.expert_forward(e, x) for e in range(4)], 1)  # every expert on every row
    ((probs[..., None] * full).sum(1) * c).sum().div(x.shape[0]).backward()
    torch.testing.assert_close(got, w.grad.flatten(), rtol=1e-4, atol=1e-6)
    assert model[0].cfg.dense_backprop == "none" and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("estimator", ["none", "expert_group"])
def test_accumulation_equals_separate_backwards_per_micro_batch(estimator):
    model, ex = _model(), _examples()
    ref_model = copy.deepcopy(model)
    ref_model[0].cfg = ref_model[0].cfg.replace(dense_backprop=estimator)
    n = sum(e[0].shape[0] for e in ex)
    for i in range(0, len(ex), 4):  # micro-batches of 4 examples, each its own forward (its own table)
        x, c = _cat(ex[i:i + 4])
        (ref_model(x) * c).sum().div(n).backward()
    mmoe.layer.clear_aux(ref_model)
    got = router_gradient(model, ex, _loss, estimator=estimator, micro_batch=4)["0"]
    torch.testing.assert_close(got, ref_model[0].router.weight.grad.flatten(), rtol=1e-5, atol=1e-7)
    whole = router_gradient(model, ex, _loss, estimator=estimator, micro_batch=len(ex))["0"]
    if estimator == "none":  # each row's gradient is its own: the split changes nothing
        torch.testing.assert_close(whole, got, rtol=1e-5, atol=1e-7)
    else:  # the group table averages over the micro-batch's rows: a smaller one gives another gradient
        assert not torch.allclose(whole, got, rtol=1e-3, atol=1e-5)


def test_fidelity_rows_cosine_and_error_against_the_oracle():
    model, ex = _model(), _examples()
    batches = [ex[:6], ex[6:]]
    rows = router_grad_fidelity(model, batches, _loss, estimators=("none", "expert_group", "dense_oracle"),
                                micro_batches=(6, 2))
    assert [(r["estimator"], r["micro_batch"]) for r in rows] == [
        ("none", 6), ("none", 2), ("expert_group", 6), ("expert_group", 2), ("dense_oracle", 6), ("dense_oracle", 2)]
    for r in rows[4:]:
        assert r["cos"] == pytest.approx(1.0) and r["rel_err"] == pytest.approx(0.0, abs=1e-5)
    # the "none" row by hand: mean over the two batches of cos(g, g*) and |g - g*| / |g*|
    cos, err = [], []
    for b in batches:
        g = router_gradient(model, b, _loss, estimator="none", micro_batch=6)["0"].double()
        o = router_gradient(model, b, _loss, estimator="dense_oracle", micro_batch=6)["0"].double()
        cos.append(float(g @ o / (g.norm() * o.norm())))
        err.append(float((g - o).norm() / o.norm()))
    assert rows[0]["cos"] == pytest.approx(sum(cos) / 2) and rows[0]["cos_min"] == pytest.approx(min(cos))
    assert rows[0]["rel_err"] == pytest.approx(sum(err) / 2) and rows[0]["layers"]["0"] == pytest.approx(sum(cos) / 2)
    assert rows[0]["cos"] < 1 - 1e-4  # plain top-k misses the unchosen experts' terms


def test_config_restored_after_a_failing_loss_and_bad_arguments():
    model, ex = _model(dense_backprop="default"), _examples(2)

    def broken(m, examples):
        assert m[0].cfg.dense_backprop == "dense_oracle"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        router_gradient(model, ex, broken, estimator="dense_oracle", micro_batch=1)
    assert model[0].cfg.dense_backprop == "default"
    with pytest.raises(ValueError, match="estimator must be one of"):
        router_gradient(model, ex, _loss, estimator="default", micro_batch=1)
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        router_gradient(model, ex, _loss, estimator="none", micro_batch=0)
    with pytest.raises(ValueError, match="no mmoe.MoE layer"):
        router_gradient(nn.Linear(8, 8), ex, _loss, estimator="none", micro_batch=1)
