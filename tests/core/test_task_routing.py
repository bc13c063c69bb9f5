"""Per-row task ids and accumulated aux losses.

A mixed multi-task batch (one call with a tensor of task ids) against separate calls per task (in ascending
task order, same RNG state): outputs, gradients of every parameter and of the input, aux losses, per-task
statistics. The Default-MoE EMA is the documented exception (one update per forward over all tasks)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import mmoe

ROUTERS = ["softmax", "xmoe", "sparsemixer", "expert_choice"]


def _cfg(**kw) -> mmoe.MoEConfig:
    base = dict(dim=8, num_experts=4, top_k=2, expert_hidden=6, num_tasks=2, router_jitter=0.05,
                z_loss_weight=1e-2)
    return mmoe.MoEConfig(**{**base, **kw})


def _tasks(B: int = 3, L: int = 7) -> torch.Tensor:
    t = torch.zeros(B, L, dtype=torch.long)
    t[:, 1::2] = 1  # interleaved rows
    t[0, 0] = 1
    return t


def _mixed_vs_separate(moe: mmoe.MoE, x: torch.Tensor, task: torch.Tensor, seed: int = 0):
    """Run the layer on the mixed batch and a deep copy once per task; compare everything."""
    sep = copy.deepcopy(moe)
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    xm = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = moe(xm, task=task)
    stats = moe.last_stats
    aux = mmoe.aux_loss(moe)
    ((y * c).sum() + aux).backward()

    xs = x.clone().requires_grad_()
    torch.manual_seed(seed)
    ys, auxs, sstats = {}, [], {}
    for t in (0, 1):
        sel = task == t
        ys[t] = sep(xs[sel], task=t)
        sstats[t] = sep.last_stats
        auxs.append(sep.aux_loss())
    assert sep.pending_aux_forwards == 2
    aux_sep = mmoe.aux_loss(sep)
    (sum((ys[t] * c[task == t]).sum() for t in (0, 1)) + aux_sep).backward()

    for t in (0, 1):
        torch.testing.assert_close(y[task == t], ys[t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, aux_sep, rtol=1e-5, atol=1e-7)
    assert float(aux.detach()) > 0
    torch.testing.assert_close(xm.grad, xs.grad, rtol=1e-4, atol=1e-6)
    for (name, p), (_, q) in zip(moe.named_parameters(), sep.named_parameters()):
        if q.grad is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, b), (_, b2) in zip(moe.named_buffers(), sep.named_buffers()):
        torch.testing.assert_close(b, b2, msg=lambda m: f"{name}: {m}")
    # statistics: per task = the separate call's, layer-wide = their combination
    assert stats.task == -1 and set(stats.per_task) == {0, 1}
    for t in (0, 1):
        s, r = stats.per_task[t], sstats[t]
        assert s.task == t
        assert torch.equal(s.tokens_per_expert, r.tokens_per_expert), t
        assert torch.equal(s.kept_per_expert, r.kept_per_expert), t
        assert s.num_rows == r.num_rows and s.dropped_frac == pytest.approx(r.dropped_frac)
        assert s.entropy == pytest.approx(r.entropy, rel=1e-5) and s.activation == pytest.approx(r.activation)
        assert s.aux.keys() == r.aux.keys() and all(s.aux[k] == pytest.approx(r.aux[k], rel=1e-5) for k in s.aux)
    assert torch.equal(stats.tokens_per_expert, sstats[0].tokens_per_expert + sstats[1].tokens_per_expert)
    assert torch.equal(stats.kept_per_expert, sstats[0].kept_per_expert + sstats[1].kept_per_expert)
    assert stats.num_rows == sstats[0].num_rows + sstats[1].num_rows
    return y, ys, sep


@pytest.mark.parametrize("router,cap,heads", list(itertools.product(ROUTERS, [None, 0.75], [1, 2])))
def test_mixed_batch_equals_separate_calls(router, cap, heads):
    torch.manual_seed(0)
    moe = mmoe.MoE(_cfg(router=router, capacity_factor=cap, heads=heads)).train()
    moe.set_top_k(1, task=1)  # each task uses its own top-k
    x = torch.randn(3, 7, 8)
    _mixed_vs_separate(moe, x, _tasks())
    if cap is not None and router != "expert_choice":  # the capacity limit bites, per task
        assert moe.last_stats.dropped_frac > 0


@pytest.mark.parametrize("options", [
    dict(dense_backprop="expert_group"),
    dict(dense_backprop="expert_group", expert_group_mode="backward", capacity_factor=0.75, heads=2),
    dict(dense_backprop="dense_oracle", heads=2),
    dict(dense_backprop="dense_oracle", router="sparsemixer", capacity_factor=0.75),
    dict(capacity_factor=0.75, batch_prioritized=True),
    dict(router_noise_std=0.25, balance_loss="vmoe"),
    dict(balance_bias_rate=0.01, score_func="sigmoid"),
    dict(shared_experts=1, activation="swiglu"),
    dict(router="xmoe", xmoe_variant="torchscale"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_mixed_batch_options_equal_separate_calls(options):
    torch.manual_seed(0)
    moe = mmoe.MoE(_cfg(**options)).train()
    if moe.balance_bias is not None:
        moe.balance_bias.copy_(torch.tensor([[0.3, -0.2, 0.0, 0.1], [-0.1, 0.0, 0.2, 0.0]]))
    _mixed_vs_separate(moe, torch.randn(3, 7, 8), _tasks())


def test_mixed_batch_eval_mode():
    torch.manual_seed(0)
    moe = mmoe.MoE(_cfg(router="sparsemixer", capacity_factor=1.0, eval_capacity_factor=0.5)).eval()
    x, task = torch.randn(3, 7, 8), _tasks()
    with torch.no_grad():
        y = moe(x, task=task)
        for t in (0, 1):
            torch.testing.assert_close(y[task == t], moe(x[task == t], task=t))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_default_moe_mixed_batch_is_one_ema_update(weighted, heads):
    """Defined behaviour: one EMA update per forward from the kept slots of all tasks, used by every row.
    Check: the new vectors are beta * old + (1 - beta) * (mean over both tasks' kept slots), recovered from
    separate calls that each start from the old vectors; then the mixed batch equals separate calls whose
    vectors are set to that result and frozen (beta = 1)."""
    torch.manual_seed(0)
    beta = 0.5
    moe = mmoe.MoE(_cfg(dense_backprop="default", default_beta=beta, default_weighted=weighted, heads=heads,
                        capacity_factor=0.75)).train()
    moe.default.vectors.normal_()
    old = moe.default.vectors.clone()
    x, task = torch.randn(3, 7, 8), _tasks()
    # each task's kept slots, their outputs (and probabilities) from a deep copy: sums and weights per expert
    probe = copy.deepcopy(moe)
    torch.manual_seed(0)
    E, D = 4, moe.cfg.expert_dim
    sums, denom = torch.zeros(E, D), torch.zeros(E)
    for t in (0, 1):
        xt = x[task == t]
        probe.record_routing = True
        probe(xt, task=t)
        r = probe.last_routing
        from reference import capacity_keep

        kept = capacity_keep(probe, r, t)
        h = probe.to_rows(xt)
        for i in range(r.indices.shape[0]):
            for k in range(r.indices.shape[1]):
                e = int(r.indices[i, k])
                if e >= 0 and kept[i][k]:
                    w = float(r.probs[i, e].detach()) if weighted else 1.0
                    sums[e] += w * probe.expert_forward(e, h[i:i + 1])[0].detach()
                    denom[e] += w
    hit = denom > 0
    want = torch.where(hit[:, None], beta * old + (1 - beta) * sums / denom.clamp_min(1e-12)[:, None], old)
    frozen = copy.deepcopy(moe)
    frozen.default.vectors.copy_(want)
    frozen.default.beta = 1.0
    torch.manual_seed(0)
    y = moe(x, task=task)
    torch.testing.assert_close(moe.default.vectors, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(moe.default.vectors, old)
    torch.manual_seed(0)
    for t in (0, 1):
        torch.testing.assert_close(y[task == t], frozen(x[task == t], task=t), rtol=1e-5, atol=1e-6)


def test_task_ids_validation_and_int_tensor_forms():
    torch.manual_seed(0)
    moe = mmoe.MoE(_cfg()).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        y1 = moe(x, task=1)
        torch.testing.assert_close(moe(x, task=torch.tensor(1)), y1)
        torch.testing.assert_close(moe(x, task=torch.ones(2, 5, dtype=torch.int32)), y1)
        assert moe.last_stats.task == 1 and set(moe.last_stats.per_task) == {1}
        r = moe.route(x, task=_tasks(2, 5))
        r0, r1 = moe.route(x, task=0), moe.route(x, task=1)
    sel = _tasks(2, 5).reshape(-1) == 1
    torch.testing.assert_close(r.probs[sel], r1.probs[sel])
    torch.testing.assert_close(r.probs[~sel], r0.probs[~sel])
    assert torch.equal(r.indices[~sel], r0.indices[~sel])
    with pytest.raises(ValueError, match="shape"):
        moe(x, task=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        moe(x, task=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        moe(x, task=torch.full((2, 5), 2))


# ---------------------------------------------------------------------------------------- aux accumulation


def _moe1(**kw) -> mmoe.MoE:
    torch.manual_seed(0)
    return mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, expert_hidden=6, z_loss_weight=1e-2, **kw))


def test_aux_accumulates_until_collected():
    moe = _moe1().train()
    ref = copy.deepcopy(moe)
    x1, x2 = torch.randn(5, 8), torch.randn(6, 8)
    moe(x1)
    moe(x2)
    ref(x1)
    a1 = mmoe.aux_loss(ref)
    ref(x2)
    a2 = mmoe.aux_loss(ref)
    assert moe.pending_aux_forwards == 2
    torch.testing.assert_close(moe.aux_loss(), a1 + a2)  # the layer method does not clear
    total = mmoe.aux_loss(torch.nn.Sequential(moe))
    torch.testing.assert_close(total, a1 + a2)
    assert float(a1.detach()) > 0 and float(a2.detach()) > 0
    assert float(mmoe.aux_loss(moe)) == 0.0 and moe.pending_aux_forwards == 0
    total.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_no_grad_and_eval_add_nothing():
    moe = _moe1().train()
    x = torch.randn(5, 8)
    with torch.no_grad():
        moe(x)
    assert moe.pending_aux_forwards == 0 and moe.last_stats.aux  # statistics still report the terms
    moe.eval()
    moe(x)
    assert moe.pending_aux_forwards == 0 and float(mmoe.aux_loss(moe)) == 0.0
    moe.train()
    moe(x)
    assert moe.pending_aux_forwards == 1
    mmoe.clear_aux(moe)
    assert float(mmoe.aux_loss(moe)) == 0.0


@pytest.mark.parametrize("estimator", ["none", "default"])
def test_activation_checkpointing_adds_aux_once(estimator):
    """Non-reentrant checkpointing: the aux terms count once (not again from the recomputation inside
    backward), with the gradients of an unchecked forward."""
    moe = _moe1(dense_backprop=estimator).train()
    ref = copy.deepcopy(moe)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(5, 8)
    y = checkpoint(lambda h: moe(torch.tanh(h)), lin(x), use_reentrant=False)
    aux = mmoe.aux_loss(moe)
    want_y = ref(torch.tanh(lin(x)))
    want = mmoe.aux_loss(ref)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(aux, want)
    assert float(want.detach()) > 0
    (y.sum() + aux).backward()  # the recomputation adds nothing
    assert moe.pending_aux_forwards == 0
    (want_y.sum() + want).backward()
    for (name, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    for b, c in zip(moe.buffers(), ref.buffers()):
        torch.testing.assert_close(b, c)


def test_reentrant_checkpointing_collects_nothing():
    """Reentrant checkpointing (defined behaviour): the first pass runs under no_grad, so its aux terms are
    not collected, and neither are the recomputation's; output and expert gradients are unaffected."""
    moe = _moe1().train()
    ref = copy.deepcopy(moe)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(5, 8)
    y = checkpoint(lambda h: moe(torch.tanh(h)), lin(x), use_reentrant=True)
    assert moe.pending_aux_forwards == 0
    y.sum().backward()
    assert moe.pending_aux_forwards == 0 and float(mmoe.aux_loss(moe)) == 0.0
    want_y = ref(torch.tanh(lin(x)))
    torch.testing.assert_close(y, want_y)
    want_y.sum().backward()
    torch.testing.assert_close(moe.experts.w1.grad, ref.experts.w1.grad)


def test_pending_aux_is_bounded(monkeypatch):
    moe = _moe1().train()
    monkeypatch.setattr(mmoe.MoE, "max_pending_aux", 3)
    xs = [torch.randn(4, 8) for _ in range(5)]
    with pytest.warns(UserWarning, match="max_pending_aux"):
        for x in xs:
            moe(x)
    assert moe.pending_aux_forwards == 3
    ref = copy.deepcopy(moe)
    want = 0.0
    for x in xs[2:]:  # the three latest are kept
        ref(x)
        want = want + mmoe.aux_loss(ref)
    torch.testing.assert_close(mmoe.aux_loss(moe), want)


def test_deepcopy_drops_pending_aux():
    moe = _moe1().train()
    moe(torch.randn(4, 8))
    twin = copy.deepcopy(moe)
    assert twin.pending_aux_forwards == 0 and moe.pending_aux_forwards == 1
