"""The few-rows forward (`MoE._few_rows_forward`, a decoding step) against the batched path, and `no_stats`."""

from __future__ import annotations

import pytest
import torch

import mmoe
import mmoe.layer as layer_mod
from mmoe.layer import MoE, no_stats

CASES = {
    "gelu top-2": dict(),
    "swiglu top-1, no bias": dict(activation="swiglu", top_k=1, expert_bias=False),
    "normalised sigmoid top-3": dict(top_k=3, score_func="sigmoid", normalize_topk=True),
    "xmoe": dict(router="xmoe", top_k=1),
    "sparsemixer": dict(router="sparsemixer", top_k=2),
    "expert choice": dict(router="expert_choice", top_k=2),
    "MH-MoE heads 2": dict(heads=2, top_k=2),
    "Default MoE": dict(dense_backprop="default"),
    "shared expert": dict(shared_experts=1),
    "task routers": dict(num_tasks=2),
}


def _layer(**kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(mmoe.MoEConfig(dim=16, num_experts=6, expert_hidden=24, **kw))
    if m.default is not None:  # non-zero default vectors, as after training
        m.default.vectors.copy_(torch.randn_like(m.default.vectors))
    return m.eval()


def _batched(m: MoE, x, monkeypatch, **kw):
    with monkeypatch.context() as mp:
        mp.setattr(layer_mod, "FEW_SLOTS", 0)
        return m(x, **kw), m.last_stats


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tokens", [1, 3])
def test_few_rows_equal_the_batched_path(name, tokens, monkeypatch):
    m = _layer(**CASES[name])
    kw = {"task": 1} if m.cfg.num_tasks > 1 else {}
    calls = []
    real = MoE._few_rows_forward
    monkeypatch.setattr(MoE, "_few_rows_forward", lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randn(1, tokens, 16)
    with torch.no_grad():
        ref, ref_stats = _batched(m, x, monkeypatch, **kw)
        got = m(x, **kw)
    assert calls, "the few-rows path was not taken"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    s = m.last_stats
    assert torch.equal(s.tokens_per_expert, ref_stats.tokens_per_expert) and s.activation == ref_stats.activation
    assert s.entropy == pytest.approx(ref_stats.entropy)


def test_few_rows_only_without_gradient_or_training(monkeypatch):
    m = _layer()
    calls = []
    real = MoE._few_rows_forward
    monkeypatch.setattr(MoE, "_few_rows_forward", lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randn(2, 16)
    m(x)  # gradient enabled
    with torch.no_grad():
        m.train()(x)  # training
        m.eval()(torch.randn(9, 16))  # 9 rows x 2 slots > FEW_SLOTS
        assert not calls
        m(x)
        with torch.inference_mode():
            m(x)
    assert len(calls) == 2
    mc = _layer(capacity_factor=1.0)  # capacity: a token may be dropped, the batched path decides
    with torch.no_grad():
        mc(x)
    assert len(calls) == 2


def test_no_stats_leaves_the_statistics_and_training_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_layer(), torch.nn.Linear(16, 16), _layer(top_k=1))
    x = torch.randn(4, 16)
    with torch.no_grad():
        model(x)
    before = mmoe.routing_stats(model)
    assert len(before) == 2
    with no_stats(model):
        with torch.no_grad():
            model(torch.randn(1, 16))  # the few-rows path
            model(torch.randn(40, 16))  # the batched path
        assert mmoe.routing_stats(model) == before
        model.train()
        model(x).sum().backward()  # training forwards still record statistics and aux losses
        assert mmoe.aux_loss(model).item() > 0
        after = mmoe.routing_stats(model)
        assert all(after[k] is not before[k] for k in after)
    assert all(m.record_stats for _, m in layer_mod.moe_layers(model))
