"""Soft MoE (``MoEConfig(router="soft")``): outputs and gradients against a plain per-sequence computation of
the paper's definition (dense-vision.md §6), padding invariance, task routers, statistics, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmoe
from mmoe.errors import ConfigError
from tests.helpers import soft_moe_reference as reference


def _layer(**kw) -> mmoe.MoE:
    torch.manual_seed(0)
    cfg = dict(dim=12, num_experts=4, router="soft", soft_slots=2, expert_hidden=20)
    cfg.update(kw)
    m = mmoe.MoE(mmoe.MoEConfig(**cfg))
    with torch.no_grad():
        for r in m.routers:
            r.scale.fill_(1.7)  # not 1, so that the scale's place in the formula matters
    return m


def test_outputs_and_gradients_match_the_per_sequence_definition():
    m = _layer()
    x = torch.randn(3, 7, 12, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone().requires_grad_(True)
    want = reference(m, x2)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    ref_grads = torch.autograd.grad((want * g).sum(), [x2, *m.parameters()])
    names = ["x", *[n for n, _ in m.named_parameters()]]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert m.routers[0].scale.grad is None  # autograd.grad does not accumulate
    assert all(float(gr.abs().sum()) > 0 for gr in grads)  # every parameter gets a gradient (all slots are used)


def test_padding_is_kept_out_of_every_slot():
    m = _layer().eval()
    x = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    y = m(x, mask=mask)
    torch.testing.assert_close(y, reference(m, x, mask), rtol=1e-5, atol=1e-6)
    garbage = x.clone()
    garbage[0, 4:] = 1e3 * torch.randn(2, 12)  # whatever sits in the padding changes nothing
    torch.testing.assert_close(m(garbage, mask=mask), y)
    # the padded sequence equals its real tokens alone
    torch.testing.assert_close(m(x[:1, :4])[0], y[0, :4], rtol=1e-5, atol=1e-6)
    assert torch.equal(y[0, 4:], torch.zeros(2, 12))
    # an all-padding sequence gives zeros, not NaN
    empty = m(x, mask=torch.zeros(2, 6, dtype=torch.bool))
    assert torch.isfinite(empty).all() and float(empty.detach().abs().sum()) == 0


def test_statistics_task_routers_no_aux_and_active_parameters():
    m = _layer(num_tasks=2).train()
    x = torch.randn(2, 5, 12)
    y0 = m(x, task=0)
    y1 = m(x, task=1)
    torch.testing.assert_close(y1, reference(m, x, task=1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y0, y1)
    assert mmoe.aux_loss(m).item() == 0  # Soft MoE has no auxiliary loss
    st = m.last_stats
    assert st.tokens_per_expert.tolist() == [4, 4, 4, 4]  # B * soft_slots slot rows per expert, none dropped
    assert st.dropped_frac == 0 and st.activation == 1.0 and st.num_rows == 10 and st.task == 1
    d = st.as_dict()
    assert 0 < d["combine_max"] <= 1 and 0 < d["dispatch_max"] <= 1
    assert 0 < d["combine_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    assert 0 < d["dispatch_entropy"] <= torch.log(torch.tensor(5.0)).item() + 1e-6
    with pytest.raises(ValueError, match="one task per call"):
        m(x, task=torch.tensor([[0] * 5, [1] * 5]))
    pc = mmoe.count_params(m)
    assert pc.active == pc.total  # every token's output mixes every expert's slots


def test_soft_router_refusals_are_clear():
    m = _layer()
    with pytest.raises(ValueError, match=r"inputs must be \[batch, tokens, 12\]"):
        m(torch.randn(10, 12))
    with pytest.raises(ValueError, match="mask must be"):
        m(torch.randn(2, 5, 12), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask= \\(padding\\) applies to router='soft'"):
        mmoe.MoE(mmoe.MoEConfig(dim=12))(torch.randn(2, 5, 12), mask=torch.ones(2, 5, dtype=torch.bool))
    for bad, field in ((dict(heads=2), "heads"), (dict(dense_backprop="default"), "dense_backprop"),
                       (dict(capacity_factor=1.0), "capacity_factor"), (dict(soft_slots=0), "soft_slots")):
        with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
            mmoe.MoEConfig(dim=12, router="soft", **bad)
    with pytest.raises(ConfigError, match="moe.heads"):
        mmoe.moe_config_from_section({"router": "soft", "heads": 2}, dim=12)


def test_soft_moe_trains_a_toy_regression():
    """The layer learns: a few Adam steps reduce a regression loss (all of phi, scale and experts move)."""
    m = _layer()
    torch.manual_seed(1)
    x = torch.randn(16, 6, 12)
    target = torch.tanh(x @ torch.randn(12, 12))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    before = F.mse_loss(m(x), target).item()
    for _ in range(60):
        opt.zero_grad()
        F.mse_loss(m(x), target).backward()
        opt.step()
    assert F.mse_loss(m(x), target).item() < 0.7 * before


def test_soft_moe_in_a_timm_vit_moe_on_the_last_half():
    import timm

    import vision.models  # noqa: F401 - registers vit_moe_* in timm

    torch.manual_seed(2)
    vit = timm.create_model("vit_moe_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                            num_classes=3, moe_layers="last_half",
                            moe={"router": "soft", "num_experts": 4, "soft_slots": 1})
    moes = [i for i, b in enumerate(vit.blocks) if isinstance(b.mlp, mmoe.MoE)]
    assert moes == [2, 3]
    x = torch.randn(2, 3, 32, 32)
    logits = vit(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert vit.blocks[2].mlp.routers[0].phi.grad.abs().sum() > 0
    st = vit.blocks[3].mlp.last_stats
    assert st.tokens_per_expert.tolist() == [2, 2, 2, 2] and st.num_rows == 2 * 17  # 16 patches + class token


def test_language_models_refuse_the_soft_router():
    from language.models import LMConfig

    for kind, why in (("causal", "later tokens"), ("masked", "packed documents")):
        with pytest.raises(ConfigError, match=f"moe.router: 'soft'.*{why}"):
            LMConfig(vocab_size=50, dim=16, depth=2, num_heads=2, max_seq_len=16, kind=kind,
                     moe={"router": "soft", "num_experts": 4})
