"""Capacity accounting, equivariance, state dicts, configuration errors, losses, balancing, stats."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import mmoe
from mmoe import losses
from mmoe.dispatch import make_plan


def test_capacity_accounting_and_top1_priority():
    # 4 tokens all want expert 0 first, expert 1 second; capacity 2 per expert
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    plan = make_plan(idx, num_experts=3, capacity=2)
    assert plan.num_valid == 8 and plan.num_dropped == 4
    assert plan.counts.tolist() == [2, 2, 0] and plan.routed.tolist() == [4, 4, 0]
    # first choices of tokens 0,1 kept for expert 0; expert 1 takes the 2nd choices of tokens 0,1
    assert plan.kept.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    # top-1 before top-2: expert 1 is the first choice of token 3 -> it wins over 2nd choices
    idx = torch.tensor([[0, 1], [0, 1], [2, 1], [1, 0]])
    plan = make_plan(idx, num_experts=3, capacity=1)
    assert plan.kept.tolist() == [[True, False], [False, False], [True, False], [True, False]]
    # batch priority: token 2 has the highest priority and takes expert 0
    idx = torch.tensor([[0], [0], [0]])
    plan = make_plan(idx, 1, capacity=1, priority=torch.tensor([0.1, 0.2, 0.9]))
    assert plan.kept[:, 0].tolist() == [False, False, True]


def test_dropped_fraction_reported():
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, capacity_factor=0.5))
    moe(torch.randn(32, 8))
    s = mmoe.routing_stats(moe)["moe"]
    cap = math.ceil(0.5 * 32 * 2 / 4)
    assert s.kept_per_expert.max() <= cap
    expect = 1 - s.kept_per_expert.sum().item() / s.tokens_per_expert.sum().item()
    assert s.dropped_frac == pytest.approx(expect) and s.dropped_frac >= 0.5
    dropless = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2))
    dropless(torch.randn(32, 8))
    assert mmoe.routing_stats(dropless)["moe"].dropped_frac == 0.0


def test_eval_capacity_factor():
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=2.0))
    assert moe.capacity(16) == 8
    moe.eval()
    assert moe.capacity(16) == 16


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("router", ["softmax", "xmoe", "sparsemixer"])
def test_dropless_permutation_equivariance(router, heads):
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=16, num_experts=8, top_k=2, router=router, heads=heads)).eval()
    x = torch.randn(40, 16)
    perm = torch.randperm(40)
    torch.testing.assert_close(moe(x)[perm], moe(x[perm]), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_with_buffers():
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, dense_backprop="default", balance_bias_rate=0.1,
                         num_tasks=2, router="xmoe", heads=2)
    a = mmoe.MoE(cfg).train()
    for _ in range(3):
        a(torch.randn(12, 8), task=0)
        mmoe.update_balance_bias(a)
    a.set_top_k(3, task=1)
    sd = a.state_dict()
    assert {"default.vectors", "balance_bias", "balance_load", "task_top_k", "routers.0.log_tau"} <= set(sd)
    assert sd["default.vectors"].abs().sum() > 0 and sd["balance_bias"].abs().sum() > 0
    b = mmoe.MoE(cfg)
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert b.top_k(1) == 3
    a.eval(), b.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(a(x, task=1), b(x, task=1))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(top_k=9), "top_k"),
        (dict(dim=10, heads=4), "heads"),
        (dict(router="hash"), "router"),
        (dict(dense_backprop="ega"), "dense_backprop"),
        (dict(activation="relu"), "activation"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(batch_prioritized=True), "batch_prioritized"),
        (dict(balance_loss="vmoe"), "balance_loss"),
        (dict(router="sparsemixer", score_func="sigmoid"), "score_func"),
        (dict(router="expert_choice", balance_bias_rate=0.1), "balance_bias_rate"),
        (dict(default_beta=1.0), "default_beta"),
        (dict(num_experts=0), "num_experts"),
        (dict(eval_capacity_factor=1.0), "eval_capacity_factor"),
        (dict(grouped_mm="grouped", expert_hidden=6), "grouped_mm"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        mmoe.MoE(mmoe.MoEConfig(**{"dim": 8, "num_experts": 8, **kwargs}))


def test_replace_rejects_unknown_field():
    with pytest.raises(ValueError, match="top_kk"):
        mmoe.MoEConfig(dim=8).replace(top_kk=1)


def test_non_finite_logits_raise_clear_error():
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8))
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits for 1 of 4 tokens"):
        moe(x)


def test_switch_loss_is_one_at_balance_and_z_loss():
    E, T = 4, 8
    logits = torch.zeros(T, E)
    idx = torch.arange(T).remainder(E)[:, None]
    r = mmoe.Routing(idx, torch.full((T, 1), 0.25), logits.softmax(-1), logits)
    assert losses.switch_balance_loss(r).item() == pytest.approx(1.0)
    skew = mmoe.Routing(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), torch.eye(E)[[0] * T], logits)
    assert losses.switch_balance_loss(skew).item() == pytest.approx(E)
    z = torch.randn(T, E)
    rz = mmoe.Routing(idx, torch.ones(T, 1), z.softmax(-1), z)
    assert losses.z_loss(rz).item() == pytest.approx((torch.logsumexp(z, -1) ** 2).mean().item())


def test_aux_loss_collects_every_layer_and_trains_balance():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, aux_loss_weight=1.0)),
        mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, aux_loss_weight=1.0, z_loss_weight=0.1)),
    )
    for m in model:  # start from a skewed router
        m.router.weight.data[0] += 2.0
    x = torch.randn(64, 8) + 1.0
    model(x)
    per_layer = [m.aux_loss().item() for m in model]  # the layer method does not clear
    total = mmoe.aux_loss(model)  # collects and clears
    assert total.item() == pytest.approx(sum(per_layer)) and all(v > 0 for v in per_layer)
    assert all(m.aux_loss().item() == 0.0 for m in model)
    assert set(mmoe.routing_stats(model)) == {"0", "1"} and "z" in model[1].last_stats.aux
    first = per_layer[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        model(x)
        mmoe.aux_loss(model).backward()
        opt.step()
    model(x)
    assert model[0].aux_loss().item() < first


def test_vmoe_losses_are_differentiable():
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, router_noise_std=0.25, balance_loss="vmoe")).train()
    moe(torch.randn(32, 8))
    assert set(moe.last_stats.aux) == {"importance", "load"}
    moe.aux_loss().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_aux_loss_free_bias_balances_load():
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, balance_bias_rate=0.002, aux_loss_weight=0.0)).train()
    moe.router.weight.data[0] += 1.5
    x = torch.randn(256, 8)
    moe(x)
    skew0 = moe.last_stats.load.max().item()
    w0 = moe.router.weight.detach().clone()
    for _ in range(300):
        moe(x)
        mmoe.update_balance_bias(moe)
    moe(x)
    assert torch.equal(moe.router.weight, w0)  # only the selection bias moved
    assert skew0 > 0.45 and moe.last_stats.load.max().item() < 0.32
    # the bias changes selection only: weights are the unbiased probabilities
    r = moe.route(x)
    torch.testing.assert_close(r.weights, r.probs.gather(-1, r.indices))


def test_expert_choice_capacity():
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.0))
    r = moe.route(torch.randn(10, 8))
    counts = torch.bincount(r.indices[r.indices >= 0], minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]  # ceil(1.0 * 10 * 2 / 4)


def test_mh_moe_activation_stat():
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=16, num_experts=8, top_k=1, heads=4)
    moe = mmoe.MoE(cfg)
    x = torch.randn(20, 16)
    moe(x)
    r = moe.route(x)
    sub = r.indices.view(20, 4)
    want = sum(len(set(row.tolist())) for row in sub) / 20 / 8
    assert moe.last_stats.activation == pytest.approx(want)
    assert 1 / 8 < moe.last_stats.activation <= 4 / 8
    p = r.probs.detach()
    assert moe.last_stats.entropy == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)


@pytest.mark.parametrize("kw", [
    dict(num_experts=8, top_k=2),  # raw softmax weights: the top-2 probabilities summed, per row
    dict(num_experts=8, top_k=2, normalize_topk=True),  # renormalised: exactly 1
    dict(num_experts=8, top_k=1, heads=4),  # MH-MoE: per sub-token row
    dict(num_experts=6, top_k=2, num_tasks=2),  # per task
])
def test_weight_sum_stat_is_the_mean_routed_weight_per_row(kw):
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=16, **kw))
    x = torch.randn(20, 16)
    task = torch.arange(20) % 2 if kw.get("num_tasks") else None
    moe(x, task=task) if task is not None else moe(x)
    r = moe.route(x, task=task) if task is not None else moe.route(x)
    # reference: plain loops over rows and their top-k probabilities
    sums = []
    for row in range(r.indices.shape[0]):
        chosen = [int(e) for e in r.indices[row] if e >= 0]
        p = r.probs[row].detach()
        s = sum(float(p[e]) for e in chosen)
        sums.append(s / sum(float(p[e]) for e in chosen) if kw.get("normalize_topk") else s)
    st = moe.last_stats
    assert st.extra["weight_sum"] == pytest.approx(sum(sums) / len(sums), rel=1e-5)
    assert st.as_dict()["weight_sum"] == st.extra["weight_sum"]
    if kw.get("normalize_topk"):
        assert st.extra["weight_sum"] == pytest.approx(1.0)
    elif not kw.get("num_tasks"):
        assert st.extra["weight_sum"] < 1.0 - 1e-3
    if task is not None:
        rows = {t: [i for i in range(20) if i % 2 == t] for t in (0, 1)}
        for t, idx in rows.items():
            want = sum(sums[i] for i in idx) / len(idx)
            assert st.per_task[t].extra["weight_sum"] == pytest.approx(want, rel=1e-5)


def test_plot_expert_load(tmp_path):
    model = torch.nn.Sequential(*[mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=6, top_k=2)) for _ in range(3)])
    model(torch.randn(30, 8))
    names, mat = mmoe.expert_load_matrix(model)
    assert names == ["0", "1", "2"] and mat.shape == (3, 6)
    torch.testing.assert_close(mat.sum(1), torch.ones(3))
    path = mmoe.plot_expert_load(model, tmp_path / "load.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="forward"):
        mmoe.plot_expert_load(torch.nn.Sequential(mmoe.MoE(mmoe.MoEConfig(dim=8))), tmp_path / "x.png")


def test_mh_moe_sizing_reproduces_paper_configs():
    base = mmoe.MoEConfig(dim=768, num_experts=8, top_k=1, expert_hidden=2048, activation="swiglu")
    h2 = mmoe.mh_moe_config(base, heads=2, match="flops")
    assert (h2.expert_hidden, h2.top_k, h2.num_experts) == (768, 2, 40)
    h3 = mmoe.mh_moe_config(base, heads=3, match="flops")
    assert (h3.expert_hidden, h3.top_k, h3.num_experts) == (512, 3, 96)
    c0, c3 = mmoe.moe_cost(base), mmoe.moe_cost(h3)
    assert c3["macs_per_token"] == c0["macs_per_token"]
    assert abs(c3["params"] - c0["params"]) / c0["params"] < 0.05
    hp = mmoe.mh_moe_config(base, heads=4, match="params")
    cp = mmoe.moe_cost(hp)
    assert (hp.num_experts, hp.top_k) == (8, 1)
    assert abs(cp["params"] - c0["params"]) / c0["params"] < 0.01
    assert cp["macs_per_token"] > 3 * c0["macs_per_token"]  # v1 regime: ~h x the FLOPs


@pytest.mark.parametrize("estimator", ["none", "default", "expert_group", "dense_oracle"])
def test_bf16_autocast_router_in_fp32(estimator):
    torch.manual_seed(0)
    for heads in (1, 2):
        moe = mmoe.MoE(mmoe.MoEConfig(dim=16, num_experts=4, top_k=2, heads=heads, dense_backprop=estimator))
        moe.record_routing = True
        x = torch.randn(3, 8, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
        assert moe.last_routing.logits.dtype == torch.float32
        (y.float().sum() + mmoe.aux_loss(moe)).backward()
        ref = moe.eval()(x)
        assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()
        assert moe.experts.w1.grad is not None and torch.isfinite(moe.experts.w1.grad).all()


def test_deepcopy_after_forward():
    import copy

    moe = mmoe.MoE(mmoe.MoEConfig(dim=8))
    moe(torch.randn(4, 8))
    twin = copy.deepcopy(moe)
    assert torch.equal(twin.experts.w1, moe.experts.w1) and twin.aux_loss().item() == 0.0


@pytest.mark.parametrize("chunk", [1 << 22, 16 * 6, 1])
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu", False), ("swiglu", True), ("swiglu", False)])
def test_expert_paths_agree_with_per_expert_reference(activation, bias, chunk, monkeypatch):
    """loop (the in-place per-expert autograd function), padded and grouped give the per-expert reference's
    outputs and gradients, with empty experts (zero weight gradients) and under bf16 autocast. ``chunk``: the
    loop path's elementwise chunk (hidden values): all experts in one chunk, chunks of one or two experts
    (6 rows of hidden 16), one expert per chunk even where it is larger than the limit."""
    from mmoe import experts as experts_module
    from mmoe.experts import Experts

    monkeypatch.setattr(experts_module, "CHUNK_ELEMENTS", chunk)
    spans = [(s0, t0) for s0, t0, _ in experts_module._chunks([(0, 0, 3), (2, 3, 8), (3, 8, 9), (5, 9, 16)], 16)]
    want_spans = {1 << 22: [(0, 16)], 16 * 6: [(0, 3), (3, 9), (9, 16)], 1: [(0, 3), (3, 8), (8, 9), (9, 16)]}
    assert spans == want_spans[chunk]

    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])  # experts 1 and 4 get no rows
    base = Experts(6, 8, 16, activation, bias)
    if bias:
        for b in (base.b1, base.b2, base.b3):
            if b is not None:
                b.data.normal_()
    x0 = torch.randn(int(counts.sum()), 8)
    g = torch.randn_like(x0)

    def run(mode, autocast=False):
        ex = copy.deepcopy(base)
        ex.mode = mode
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if mode == "reference":
                y = torch.cat([ex.expert_forward(i, xs) for i, xs in enumerate(x.split(counts.tolist()))])
            else:
                y = ex(x, counts)
        (y.float() * g).sum().backward()
        return [y.float()] + [x.grad] + [p.grad for p in ex.parameters()]

    ref = run("reference")
    modes = ["loop", "padded"] + (["grouped"] if hasattr(torch, "_grouped_mm") else [])
    for mode in modes:
        for got, want in zip(run(mode), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{mode}: {m}")
    got = run("loop")
    assert got[2].abs()[[1, 4]].sum() == 0 and got[2].abs()[0].sum() > 0  # w1 grad of empty experts is zero
    ref_bf16 = run("reference", autocast=True)
    for got, want in zip(run("loop", autocast=True), ref_bf16):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("chunk", [1 << 22, 16 * 6, 1])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_gather_equals_gathering_first(activation, chunk, monkeypatch):
    """``Experts(x, counts, rows=idx)`` (the loop path gathers chunk by chunk and index-adds the input gradient)
    gives exactly what gathering ``x[idx]`` first and calling the experts on the rows gives, tokens picked twice
    included; the other paths gather first and agree too."""
    from mmoe import experts as experts_module
    from mmoe.experts import Experts

    monkeypatch.setattr(experts_module, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    base = Experts(6, 8, 16, activation, True)
    x0 = torch.randn(9, 8)
    idx = torch.randint(0, 9, (int(counts.sum()),))  # every token about twice, in expert order
    g = torch.randn(int(counts.sum()), 8)

    def run(mode, fused):
        ex = copy.deepcopy(base)
        ex.mode = mode
        x = x0.clone().requires_grad_()
        y = ex(x, counts, rows=idx) if fused else ex(x.index_select(0, idx), counts)
        (y * g).sum().backward()
        return [y, x.grad] + [p.grad for p in ex.parameters()]

    want = run("loop", fused=False)
    for got, ref in zip(run("loop", fused=True), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    base.recompute_activation = False  # the activation kept from the forward instead: the same numbers
    for got, ref in zip(run("loop", fused=True), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    base.recompute_activation = True
    modes = ["padded", "auto"] + (["grouped"] if hasattr(torch, "_grouped_mm") else [])
    for mode in modes:
        for got, ref in zip(run(mode, fused=True), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{mode}: {m}")


def test_default_moe_layer_called_twice_before_backward():
    """Two forwards of one Default-MoE layer in one graph (e.g. a model run on several streams per loss): the
    second forward's in-place EMA update must not invalidate the first forward's saved tensors, and the
    router gradient is the sum of both forwards' gradients."""
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, expert_hidden=8, dense_backprop="default"))
    moe.default.vectors.normal_()
    x1, x2 = torch.randn(6, 8), torch.randn(5, 8)
    ref = copy.deepcopy(moe)
    (moe(x1).sum() + moe(x2).sum()).backward()  # raised "modified by an inplace operation" before the fix
    ref(x1).sum().backward()
    g1 = ref.router.weight.grad.clone()
    ref.router.weight.grad = None
    ref(x2).sum().backward()
    torch.testing.assert_close(moe.router.weight.grad, g1 + ref.router.weight.grad)
    torch.testing.assert_close(moe.default.vectors, ref.default.vectors)


def _loop_experts(reuse: bool):
    from mmoe.experts import Experts

    torch.manual_seed(1)
    ex = Experts(4, 8, 16, "swiglu", True, mode="loop")
    ex.reuse_grad_buffers = reuse
    return ex


def _loss(ex, x, counts, g):
    return (ex(x, counts) * g).sum()


def test_persistent_weight_gradients_equal_autograd_in_every_loop_pattern():
    """The loop path's weight gradients written into persistent buffers equal fresh ones (reuse off, the
    autograd reference of the test above) in a plain loop (zero_grad to None), under accumulation over
    micro-batches, with zero_grad(set_to_none=False), and with two calls of one layer in one graph; a gradient a
    user still holds is never overwritten."""
    counts = [torch.tensor([3, 0, 5, 2]), torch.tensor([1, 4, 0, 5]), torch.tensor([2, 2, 2, 4])]
    xs = [torch.randn(int(c.sum()), 8) for c in counts]
    gs = [torch.randn(int(c.sum()), 8) for c in counts]
    fresh, reused = _loop_experts(False), _loop_experts(True)
    weights = ("w1", "w2", "w3")

    # a plain loop: every step starts from .grad = None
    for step in range(3):
        for ex in (fresh, reused):
            ex.zero_grad(set_to_none=True)
            _loss(ex, xs[step], counts[step], gs[step]).backward()
        for n in weights:
            torch.testing.assert_close(getattr(reused, n).grad, getattr(fresh, n).grad, rtol=0, atol=0)
    # the buffers really are reused: the same storage every step once released
    ptr = reused.w1.grad.untyped_storage().data_ptr()
    reused.zero_grad(set_to_none=True)
    _loss(reused, xs[0], counts[0], gs[0]).backward()
    assert reused.w1.grad.untyped_storage().data_ptr() == ptr
    # accumulation over micro-batches (no zero_grad between): p.grad holds buffer 1, buffer 2 takes the next
    for ex in (fresh, reused):
        ex.zero_grad(set_to_none=True)
        for i in range(3):
            _loss(ex, xs[i], counts[i], gs[i]).backward()
    for n in weights:
        torch.testing.assert_close(getattr(reused, n).grad, getattr(fresh, n).grad, rtol=1e-6, atol=1e-6)
    # zero_grad(set_to_none=False) keeps p.grad (a buffer) and accumulates into it
    for ex in (fresh, reused):
        ex.zero_grad(set_to_none=False)
        _loss(ex, xs[1], counts[1], gs[1]).backward()
    for n in weights:
        torch.testing.assert_close(getattr(reused, n).grad, getattr(fresh, n).grad, rtol=0, atol=1e-6)
    # two calls of the layer in one graph: the first call's gradient is pending while the second's is computed
    for ex in (fresh, reused):
        ex.zero_grad(set_to_none=True)
        (_loss(ex, xs[0], counts[0], gs[0]) + _loss(ex, xs[2], counts[2], gs[2])).backward()
    for n in weights:
        torch.testing.assert_close(getattr(reused, n).grad, getattr(fresh, n).grad, rtol=1e-6, atol=1e-6)
    # a gradient someone still holds (a reference or a .data alias) is not overwritten by later backwards
    held, alias = reused.w1.grad, reused.w2.grad.data
    kept_w1, kept_w2 = held.clone(), alias.clone()
    for _ in range(3):
        reused.zero_grad(set_to_none=True)
        _loss(reused, xs[1], counts[1], gs[1]).backward()
    assert torch.equal(held, kept_w1) and torch.equal(alias, kept_w2)
    assert not torch.equal(reused.w1.grad, held)


def test_persistent_weight_gradients_through_an_optimizer_and_a_copy():
    """AdamW steps with buffered gradients land where fresh gradients do; a deep copy (a weight EMA) gets no
    buffers of its own."""
    counts = torch.tensor([3, 1, 5, 2])
    x, g = torch.randn(11, 8), torch.randn(11, 8)
    fresh, reused = _loop_experts(False), _loop_experts(True)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (fresh, reused)]
    for _ in range(4):
        for ex, opt in zip((fresh, reused), opts):
            opt.zero_grad()
            _loss(ex, x, counts, g).backward()
            opt.step()
    for a, b in zip(fresh.parameters(), reused.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    twin = copy.deepcopy(reused)
    assert twin._grad_buffers._bufs == {} and reused._grad_buffers._bufs
    # a whole pickled module (torch.save(model)) carries no buffers and trains on
    blob = io.BytesIO()
    torch.save(reused, blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=False)
    assert loaded._grad_buffers._bufs == {}
    _loss(loaded, x, counts, g).backward()
    assert loaded._grad_buffers._bufs


def test_grad_buffers_default_on_cpu_and_switchable():
    """By default a CPU layer's loop path reuses one buffer per expert weight across plain-loop steps;
    ``mmoe.set_grad_buffers(model, False)`` frees the buffers and gives fresh gradients from then on."""
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, expert_hidden=16, grouped_mm="loop"))
    assert moe.experts.reuse_grad_buffers is None
    x = torch.randn(10, 8)

    def step() -> int:
        moe.zero_grad(set_to_none=True)
        moe(x).pow(2).sum().backward()
        return moe.experts.w1.grad.untyped_storage().data_ptr()

    first = step()
    assert step() == first and moe.experts._grad_buffers._bufs
    want = moe.experts.w1.grad.clone()
    assert mmoe.set_grad_buffers(moe, False) == 1 and not moe.experts._grad_buffers._bufs
    step()
    assert not moe.experts._grad_buffers._bufs
    torch.testing.assert_close(moe.experts.w1.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_activation_workspaces_equal_fresh_tensors_and_never_clobber_live_ones(activation):
    """The loop path's pre-activations, outputs and input gradient in persistent workspaces
    (``Experts.reuse_act_buffers``) give bit-identical outputs and gradients to fresh tensors, with the fused
    gather and without, as the row count grows and shrinks; a workspace is reused once released, and never
    while a tensor over it is alive: outputs a caller still holds and the saved tensors of a graph that was
    not run backward yet keep their values."""
    from mmoe.experts import SHARED_WORKSPACES, Experts

    torch.manual_seed(3)
    fresh = Experts(4, 8, 16, activation, True, mode="loop")
    fresh.reuse_grad_buffers = fresh.reuse_act_buffers = False
    ws = copy.deepcopy(fresh)
    ws.reuse_act_buffers = True
    counts = [torch.tensor([3, 0, 5, 2]), torch.tensor([4, 4, 1, 5]), torch.tensor([2, 2, 2, 1])]
    tokens = [torch.randn(9, 8) for _ in counts]
    idx = [torch.randint(0, 9, (int(c.sum()),)) for c in counts]
    gs = [torch.randn(int(c.sum()), 8) for c in counts]

    def step(ex, i, fused):
        ex.zero_grad(set_to_none=True)
        x = tokens[i].clone().requires_grad_()
        y = ex(x, counts[i], rows=idx[i]) if fused else ex(x.index_select(0, idx[i]), counts[i])
        (y * gs[i]).sum().backward()
        return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in ex.parameters()]

    for fused in (True, False):
        for i in (0, 1, 2, 1):  # 10, 14, 7, 14 rows: the workspace grows, then serves smaller calls
            for got, want in zip(step(ws, i, fused), step(fresh, i, fused)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "a1" in ws._grad_buffers._bufs and not fresh._grad_buffers._bufs
    # the input gradient is a fresh tensor (autograd adds the input's other gradients into it in place)
    assert not any(k.startswith("experts") for k in SHARED_WORKSPACES._bufs)

    # reused once released: one pre-activation workspace serves call after call
    with torch.no_grad():
        for i in (1, 0, 2):
            ws(tokens[i], counts[i], rows=idx[i])
        assert len(ws._grad_buffers._bufs["a1"]) == 1
        # outputs still held are not overwritten by later calls
        held = [ws(tokens[i], counts[i], rows=idx[i]) for i in (0, 1, 2, 0)]
        for out, i in zip(held, (0, 1, 2, 0)):
            torch.testing.assert_close(out, fresh(tokens[i], counts[i], rows=idx[i]), rtol=0, atol=0)

    # two forwards in one graph before its backward: the first forward's saved tensors stay intact
    def twice(ex):
        ex.zero_grad(set_to_none=True)
        xs = [tokens[i].clone().requires_grad_() for i in (0, 1)]
        loss = sum((ex(x, counts[i], rows=idx[i]) * gs[i]).sum() for i, x in zip((0, 1), xs))
        loss.backward()
        return [x.grad for x in xs] + [p.grad for p in ex.parameters()]

    for got, want in zip(twice(ws), twice(fresh)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [7 * 8, 8, 1 << 20])  # several chunks, one slot per chunk, one chunk
def test_chunked_combine_equals_one_index_add(monkeypatch, chunk):
    """`mmoe.dispatch.combine` over chunks equals ``index_add`` of the weighted slots in one call: the output,
    the slot gradient and the weight gradient bit for bit; with a forward-only scale (SparseMixer-v2) the
    output is scaled and the gradients are those of scale 1."""
    from mmoe import dispatch

    monkeypatch.setattr(dispatch, "COMBINE_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    T, K, D, E = 11, 2, 8, 4
    plan = dispatch.make_plan(torch.randint(0, E, (T, K)), E)
    S = plan.token.numel()
    y0, w0, g = torch.randn(S, D), torch.rand(T, K), torch.randn(T, D)
    scale = 1 + torch.rand(T, K)

    def run(fn, with_scale):
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(y, w, with_scale)
        (out * g).sum().backward()
        return out.detach(), y.grad, w.grad

    def ours(y, w, with_scale):
        return dispatch.combine(y, plan, w, T, scale if with_scale else None)

    def reference(y, w, with_scale):
        contrib = y * w.reshape(-1)[plan.slot].unsqueeze(-1)
        if with_scale:
            s = scale.reshape(-1)[plan.slot].unsqueeze(-1)
            contrib = contrib + (contrib * s - contrib).detach()
        return torch.zeros(T, D).index_add(0, plan.token, contrib)

    for got, want in zip(run(ours, False), run(reference, False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(run(ours, True), run(reference, True)):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(run(ours, True)[0], run(ours, False)[0])


@pytest.mark.parametrize("options", [{}, {"dense_backprop": "default"}, {"dense_backprop": "expert_group"},
                                     {"heads": 2, "top_k": 2}, {"router": "sparsemixer"}])
def test_layer_with_persistent_buffers_equals_fresh_tensors_over_steps(options):
    """A whole layer in a plain loop (AdamW, zero_grad to None) with its persistent weight-gradient buffers and
    activation workspaces (the CPU default: the slots' gradient of the combine too) follows the same
    trajectory bit for bit as with fresh tensors, also where the slots have a second consumer (expert-group)."""
    from mmoe.experts import SHARED_WORKSPACES

    SHARED_WORKSPACES.clear()
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, expert_hidden=16, grouped_mm="loop").replace(**options)
    reused = mmoe.MoE(cfg)
    fresh = copy.deepcopy(reused)
    mmoe.set_grad_buffers(fresh, False)
    fresh.experts.reuse_act_buffers = False
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (fresh, reused)]
    xs = [torch.randn(n, 8) for n in (10, 13, 10, 7)]
    for step, x in enumerate(xs):
        grads = []
        for m, opt in zip((fresh, reused), opts):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same draws for a sampling router (SparseMixer)
            xi = x.clone().requires_grad_()
            (m(xi).pow(2).sum() + mmoe.aux_loss(m)).backward()
            grads.append([xi.grad] + [p.grad for p in m.parameters()])
            opt.step()
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the slots' outputs exist (and the combine's slot gradient with them) only where the estimator's table reads
    # them; elsewhere the combine is fused into the experts (Default MoE's EMA reads them chunk by chunk)
    assert ("combine_grad" in SHARED_WORKSPACES._bufs) == (options.get("dense_backprop") == "expert_group")
    assert "a1" in reused.experts._grad_buffers._bufs
    assert not fresh.experts._grad_buffers._bufs


def test_experts_input_gradient_takes_the_routers_gradient_in_place(monkeypatch):
    """The loop path's input gradient is a fresh tensor that autograd can reuse: the router's gradient of the
    same rows is added into it in place, so the layer's input gradient is that very tensor (a workspace
    there made autograd allocate their sum: one more [tokens, dim] tensor at the end of backward)."""
    from mmoe import experts as experts_module

    backward = experts_module._ExpertMLP.backward
    seen = []

    def spy(ctx, gy):
        out = backward(ctx, gy)
        seen.append(out[0].data_ptr())
        return out

    monkeypatch.setattr(experts_module._ExpertMLP, "backward", staticmethod(spy))
    torch.manual_seed(0)
    moe = mmoe.MoE(mmoe.MoEConfig(dim=16, num_experts=4, top_k=2, expert_hidden=32))
    moe.experts.reuse_act_buffers = True
    x = torch.randn(40, 16, requires_grad=True)
    ref = copy.deepcopy(moe)
    ref.experts.reuse_act_buffers = False
    for _ in range(2):  # the second step runs over the workspaces of the first
        moe.zero_grad(set_to_none=True)
        x.grad = None
        moe(x).pow(2).sum().backward()
    assert len(seen) == 2 and x.grad.data_ptr() == seen[-1]
    xr = x.detach().clone().requires_grad_()
    ref(xr).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1 << 22, 16 * 6, 1])
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False), ("swiglu", True)])
def test_fused_combine_equals_combining_the_slots(activation, bias, chunk, monkeypatch):
    """``Experts(..., combine=c)`` (the loop path weights each chunk's outputs and adds them into their rows,
    keeping no slot outputs) gives the same output, bit for bit, as `combine_slots` of the unfused slots, and the
    same gradients of the input, every weight and the routing weights (from ``<g W2^T, h> + <g, b2>`` instead
    of ``<g, y>``), with a straight-through scale, with the activation kept instead of recomputed, and under bf16
    autocast; the padded path's combine agrees too."""
    from mmoe import experts as experts_module
    from mmoe.dispatch import SlotCombine, combine_slots
    from mmoe.experts import Experts

    monkeypatch.setattr(experts_module, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    S, T = int(counts.sum()), 9
    base = Experts(6, 8, 16, activation, bias, mode="loop")
    if bias:
        for b in (base.b1, base.b2, base.b3):
            if b is not None:
                b.data.normal_()
    x0 = torch.randn(T, 8)
    idx = torch.randint(0, T, (S,))
    w0, scale = torch.rand(S), 1 + 0.1 * torch.randn(S)
    g = torch.randn(T, 8)

    def run(fused, use_scale, recompute=True, mode="loop", autocast=False):
        ex = copy.deepcopy(base)
        ex.mode, ex.recompute_activation = mode, recompute
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        c = SlotCombine(w, idx, T, scale if use_scale else None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ex(x, counts, rows=idx, combine=c) if fused else combine_slots(ex(x, counts, rows=idx), c)
        (y.float() * g).sum().backward()
        return [y.float(), x.grad, w.grad] + [p.grad for p in ex.parameters()]

    for use_scale in (False, True):
        want = run(False, use_scale)
        got = run(True, use_scale)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(run(True, use_scale, recompute=False), got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(run(True, use_scale, mode="padded"), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[2].abs().sum() > 0  # the routing weights get a gradient
    for a, b in zip(run(True, True, autocast=True), run(False, True, autocast=True)):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("weighted", [False, True])
def test_default_ema_accumulated_by_chunks_equals_one_update(weighted):
    """Default MoE's EMA update taken chunk by chunk (`DefaultVectors.accumulator`, as the fused combine shows it
    each chunk's outputs) gives bit for bit the vectors of one `update` over all slots; experts without rows keep
    their vectors."""
    from mmoe.dense_backprop import DefaultVectors
    from mmoe.dispatch import make_plan

    torch.manual_seed(0)
    T, E, D = 23, 5, 8
    probs = torch.softmax(torch.randn(T, E), -1)
    probs[:, 4] = 0  # expert 4 gets no rows
    idx = probs.topk(2, -1).indices
    plan = make_plan(idx, E)
    y = torch.randn(plan.token.numel(), D)
    one, chunked = DefaultVectors(E, D, 0.9, weighted), DefaultVectors(E, D, 0.9, weighted)
    one.vectors.normal_()
    chunked.vectors.copy_(one.vectors)
    before = one.vectors.clone()
    one.update(y, plan, probs)
    acc = chunked.accumulator(plan, probs)
    for s0 in range(0, y.shape[0], 7):
        acc(s0, min(s0 + 7, y.shape[0]), y[s0:s0 + 7])
    acc.apply()
    assert torch.equal(one.vectors, chunked.vectors)
    assert torch.equal(one.vectors[4], before[4]) and not torch.equal(one.vectors[0], before[0])
