"""Every router x dispatch x heads x dense_backprop combination against the per-token reference:
forward values and the gradients of every parameter."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import mmoe
from reference import reference_forward

ROUTERS = ["softmax", "xmoe", "sparsemixer", "expert_choice"]
DISPATCH = [None, 0.75]  # dropless, capacity (drops at this factor)
HEADS = [1, 2]
ESTIMATORS = ["none", "default", "expert_group", "dense_oracle"]


def _check(moe: mmoe.MoE, x: torch.Tensor, task=None, seed=0):
    """Run the layer and the reference from the same RNG state; compare outputs and all gradients."""
    ema0 = moe.default.vectors.clone() if moe.default is not None else None
    ref_moe = copy.deepcopy(moe)
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))

    torch.manual_seed(seed)
    y = moe(x, task=task)
    (y * c).sum().backward()

    torch.manual_seed(seed)
    y_ref, info = reference_forward(ref_moe, x, task, ema0)
    (y_ref * c).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for (name, p), (_, p_ref) in zip(moe.named_parameters(), ref_moe.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if moe.default is not None:
        torch.testing.assert_close(moe.default.vectors, info["ema"])
    return y, info


@pytest.mark.parametrize("router,cap,heads,estimator", list(itertools.product(ROUTERS, DISPATCH, HEADS, ESTIMATORS)))
def test_layer_matches_reference(router, cap, heads, estimator):
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, expert_hidden=6, router=router, capacity_factor=cap,
                         heads=heads, dense_backprop=estimator, router_jitter=0.05, default_beta=0.5)
    moe = mmoe.MoE(cfg).train()
    if moe.default is not None:  # a non-trivial EMA state before the checked step
        moe.default.vectors.normal_()
    x = torch.randn(2, 5, 8)
    _check(moe, x)
    # a second step: the EMA now carries state from the first
    moe.zero_grad()
    _check(moe, torch.randn(2, 5, 8), seed=1)


@pytest.mark.parametrize(
    "options",
    [
        dict(normalize_topk=True),
        dict(score_func="sigmoid"),
        dict(score_func="sigmoid", normalize_topk=True, dense_backprop="default"),
        dict(activation="swiglu"),
        dict(expert_bias=False, activation="swiglu", heads=2),
        dict(shared_experts=1),
        dict(capacity_factor=0.5, batch_prioritized=True),
        dict(capacity_factor=0.5, batch_prioritized=True, heads=2, dense_backprop="default"),
        dict(router_noise_std=0.25, balance_loss="vmoe", z_loss_weight=1e-3),
        dict(default_weighted=True, dense_backprop="default"),
        dict(dense_backprop="expert_group", expert_group_mode="backward"),
        dict(dense_backprop="expert_group", expert_group_k=3, top_k=1),
        dict(router="xmoe", xmoe_variant="torchscale"),
        dict(router="xmoe", score_func="sigmoid", xmoe_temperature=0.07),
        dict(balance_bias_rate=0.01),
        dict(heads=2, head_projections=False),
        dict(router="expert_choice", capacity_factor=2.0, normalize_topk=True),
        dict(grouped_mm="loop"),
        dict(grouped_mm="padded", expert_bias=True),
        dict(grouped_mm="padded", activation="swiglu", heads=2, capacity_factor=1.0),
        dict(grouped_mm="grouped", dim=16, expert_hidden=8, heads=2, dense_backprop="dense_oracle"),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_match_reference(options):
    torch.manual_seed(0)
    base = dict(dim=8, num_experts=4, top_k=2, expert_hidden=6, router_jitter=0.05)
    moe = mmoe.MoE(mmoe.MoEConfig(**{**base, **options})).train()
    if moe.balance_bias is not None:
        moe.balance_bias.copy_(torch.tensor([[0.3, -0.2, 0.0, 0.1]]))
    _check(moe, torch.randn(3, 4, moe.cfg.dim))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_eval_mode_matches_reference(estimator):
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, router="sparsemixer", capacity_factor=1.0,
                         eval_capacity_factor=2.0, dense_backprop=estimator)
    moe = mmoe.MoE(cfg)
    if moe.default is not None:
        moe.default.vectors.normal_()
    moe.eval()
    before = moe.default.vectors.clone() if moe.default is not None else None
    _check(moe, torch.randn(2, 6, 8))
    if before is not None:  # frozen in eval
        assert torch.equal(before, moe.default.vectors)


def test_multi_task_routers_share_experts():
    torch.manual_seed(0)
    cfg = mmoe.MoEConfig(dim=8, num_experts=4, top_k=1, num_tasks=2, dense_backprop="default")
    moe = mmoe.MoE(cfg).train()
    moe.set_top_k(3, task=1)
    x = torch.randn(2, 5, 8)
    y0, info0 = _check(moe, x, task=0)
    assert info0["routing"].indices.shape[1] == 1
    moe.zero_grad()
    y1, info1 = _check(moe, x, task=1)
    assert info1["routing"].indices.shape[1] == 3
    assert len(moe.routers) == 2 and not torch.allclose(y0, y1)
    with pytest.raises(ValueError, match="task"):
        moe(x)
