"""BEiT-3-style multiway MoE transformer (multimodal.models): shapes, padding, the modality split, two-router
aux losses and statistics, masked patches, MIM targets, option composition, config errors, state dicts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mmoe
from mmoe import MoE
from multimodal.models import (MultiwayConfig, MultiwayMoETransformer, build_multiway, mim_targets, patchify,
                               routing_by_modality)

V = 40  # vocabulary


def make(routing: str = "shared", **kw) -> MultiwayMoETransformer:
    moe = kw.pop("moe", {"num_experts": 4, "top_k": 2})
    args = dict(vocab_size=V, img_size=16, patch_size=4, dim=32, depth=4, num_heads=4, max_text_len=12,
                itc_dim=16, moe=moe, moe_routing=routing)
    args.update(kw)
    return MultiwayMoETransformer(MultiwayConfig(**args))


def inputs(B: int = 2, L: int = 8):
    img = torch.randn(B, 3, 16, 16)
    txt = torch.randint(1, V, (B, L))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, L - 3:] = True
    return img, txt, pad


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("routing", ["shared", "modality"])
def test_output_shapes_and_heads(routing):
    m = make(routing)
    img, txt, pad = inputs()
    o = m(image=img)
    assert o["vision"].shape == (2, 17, 32) and o["text"] is None
    o = m(text=txt, text_padding_mask=pad)
    assert o["text"].shape == (2, 8, 32) and o["vision"] is None
    o = m(image=img, text=txt, text_padding_mask=pad)
    assert o["vision"].shape == (2, 17, 32) and o["text"].shape == (2, 8, 32)
    assert m.mlm_logits(o["text"]).shape == (2, 8, V)
    assert m.mim_pred(o["vision"]).shape == (2, 16, 4 * 4 * 3)
    iv, it = m.itc_embeddings(o["vision"], o["text"])
    assert iv.shape == it.shape == (2, 16)
    torch.testing.assert_close(iv.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(it.norm(dim=-1), torch.ones(2))
    assert m.itc_embeddings(vision_hidden=o["vision"])[1] is None
    assert math.isclose(float(m.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    assert m.moe_layer_ids == [1, 3]
    assert [n for n, _ in m.moe_layers] == ["blocks.1.ffn", "blocks.3.ffn"]


def test_mlm_head_is_tied_to_the_embedding():
    m = make()
    assert not any(p is m.token_embed.weight for n, p in m.named_parameters() if n != "token_embed.weight")
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        m.token_embed.weight[5] += 1.0
    ref = torch.nn.functional.layer_norm(h, (32,), eps=1e-6) @ m.token_embed.weight.t() + m.mlm_bias
    torch.testing.assert_close(m.mlm_logits(h), ref)


def test_pair_attention_is_joint():
    m = make().eval()
    img, txt, _ = inputs()
    with torch.no_grad():
        alone = m(image=img)["vision"]
        paired = m(image=img, text=txt)["vision"]
    assert not torch.allclose(alone, paired, atol=1e-4)


def test_dense_model_and_no_multiway_attention():
    m = make(moe_layers="none")
    assert m.moe_layer_ids == [] and mmoe.moe_layers(m) == []
    img, txt, pad = inputs()
    m(image=img, text=txt, text_padding_mask=pad)
    assert float(mmoe.aux_loss(m)) == 0.0
    shared = make(multiway_attention=False)
    names = [n for n, _ in shared.named_parameters()]
    assert not any(".attn." in n and (".vision." in n or ".text." in n) for n in names)
    assert any(".ffn.vision." in n for n in names)  # the dense FFNs stay per modality
    n_multi = sum(p.numel() for p in make().parameters())
    assert sum(p.numel() for p in shared.parameters()) < n_multi
    o = shared(image=img, text=txt, text_padding_mask=pad)
    assert torch.isfinite(o["vision"]).all() and torch.isfinite(o["text"]).all()


# ------------------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("routing", ["shared", "modality"])
@pytest.mark.parametrize("with_image", [True, False])
def test_padding_invariance(routing, with_image):
    # capacity-limited dispatch makes the check strict: the capacity depends on the number of routed tokens
    m = make(routing, moe={"num_experts": 4, "top_k": 2, "capacity_factor": 1.0}).eval()
    img, txt, pad = inputs()
    img = img if with_image else None
    with torch.no_grad():
        a = m(image=img, text=txt, text_padding_mask=pad)
        stats_a = {k: s.tokens_per_expert.clone() for k, s in mmoe.routing_stats(m).items()}
        counts_a = routing_by_modality(m)
        aux_a = float(mmoe.aux_loss(m))
        # other ids at padded positions, plus 3 more padded columns
        txt2 = torch.cat([torch.where(pad, torch.randint(1, V, txt.shape), txt), torch.randint(1, V, (2, 3))], 1)
        pad2 = torch.cat([pad, torch.ones(2, 3, dtype=torch.bool)], 1)
        b = m(image=img, text=txt2, text_padding_mask=pad2)
    valid = ~pad
    torch.testing.assert_close(b["text"][:, :8][valid], a["text"][valid], atol=1e-5, rtol=1e-5)
    if with_image:
        torch.testing.assert_close(b["vision"], a["vision"], atol=1e-5, rtol=1e-5)
    for k, s in mmoe.routing_stats(m).items():
        assert torch.equal(s.tokens_per_expert, stats_a[k])
    assert routing_by_modality(m) == counts_a
    assert float(mmoe.aux_loss(m)) == pytest.approx(aux_a, abs=1e-7)
    # only the valid tokens were routed
    n_tok = int(valid.sum()) + (2 * 17 if with_image else 0)
    for s in mmoe.routing_stats(m).values():
        assert s.num_rows == n_tok


def test_fully_padded_text_row_stays_finite():
    m = make()
    _, txt, pad = inputs()
    pad[1] = True
    o = m(text=txt, text_padding_mask=pad)
    assert torch.isfinite(o["text"]).all()
    o["text"][0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------ modality split


@torch.no_grad()
def test_vffn_is_used_by_vision_tokens_only():
    m = make().eval()
    img, txt, pad = inputs()
    v0, t0 = m(image=img)["vision"], m(text=txt, text_padding_mask=pad)["text"]
    m.blocks[0].ffn.vision.fc1.weight.add_(torch.randn_like(m.blocks[0].ffn.vision.fc1.weight))
    torch.testing.assert_close(m(text=txt, text_padding_mask=pad)["text"], t0)
    assert not torch.allclose(m(image=img)["vision"], v0, atol=1e-4)
    # and the L-FFN by text tokens only
    v1 = m(image=img)["vision"]
    m.blocks[2].ffn.text.fc1.weight.add_(torch.randn_like(m.blocks[2].ffn.text.fc1.weight))
    torch.testing.assert_close(m(image=img)["vision"], v1)
    assert not torch.allclose(m(text=txt, text_padding_mask=pad)["text"], t0, atol=1e-4)


@torch.no_grad()
def test_multiway_attention_params_split_by_modality():
    m = make().eval()
    img, txt, pad = inputs()
    v0, t0 = m(image=img)["vision"], m(text=txt, text_padding_mask=pad)["text"]
    m.blocks[1].attn.qkv.text.weight.mul_(3.0)
    m.blocks[1].norm1.text.weight.mul_(2.0)
    torch.testing.assert_close(m(image=img)["vision"], v0)
    assert not torch.allclose(m(text=txt, text_padding_mask=pad)["text"], t0, atol=1e-4)


@torch.no_grad()
def test_modality_routers():
    m = make("modality").eval()
    img, txt, pad = inputs()
    for _, layer in mmoe.moe_layers(m):
        assert layer.cfg.num_tasks == 2 and len(layer.routers) == 2
    v0, t0 = m(image=img)["vision"], m(text=txt, text_padding_mask=pad)["text"]
    for _, layer in mmoe.moe_layers(m):
        for p in layer.routers[1].parameters():
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(m(image=img)["vision"], v0)
    assert not torch.allclose(m(text=txt, text_padding_mask=pad)["text"], t0, atol=1e-5)
    t1 = m(text=txt, text_padding_mask=pad)["text"]
    for _, layer in mmoe.moe_layers(m):
        for p in layer.routers[0].parameters():
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(m(text=txt, text_padding_mask=pad)["text"], t1)
    assert not torch.allclose(m(image=img)["vision"], v0, atol=1e-5)


def test_modality_aux_loss_and_stats_sum_both_calls(monkeypatch):
    """mmoe.aux_loss(model) = the aux losses of the vision rows + the text rows of every layer, computed by
    hand with a plain mmoe.MoE holding the same weights, called once per modality on the rows the layer routed
    (the layer itself is called once, with the modality of each row as its task id)."""
    m = make("modality", moe={"num_experts": 4, "top_k": 2, "z_loss_weight": 1e-3}).train()
    img, txt, pad = inputs()
    calls: list[tuple[MoE, torch.Tensor, torch.Tensor]] = []
    orig = MoE.forward

    def spy(self, x, task=None):
        calls.append((self, x.detach().clone(), task))
        return orig(self, x, task)

    monkeypatch.setattr(MoE, "forward", spy)
    m(image=img, text=txt, text_padding_mask=pad)
    monkeypatch.setattr(MoE, "forward", orig)
    layer_aux = {name: layer.aux_loss() for name, layer in mmoe.moe_layers(m)}
    total = mmoe.aux_loss(m)
    layers = [layer for _, layer in mmoe.moe_layers(m)]
    assert [c[0] for c in calls] == layers  # one call per layer
    task = calls[0][2]
    assert isinstance(task, torch.Tensor) and task.shape == (calls[0][1].shape[0],)
    assert [int((task == i).sum()) for i in (0, 1)] == [2 * 17, int((~pad).sum())]
    expect = 0.0
    stats = mmoe.routing_stats(m)
    counts = routing_by_modality(m)
    for name, layer in mmoe.moe_layers(m):
        ref = MoE(layer.cfg).train()
        ref.load_state_dict(layer.state_dict())
        (_, x, t), = [c for c in calls if c[0] is layer]
        ref(x[t == 0], task=0)
        a_v, s_v = ref.aux_loss(), ref.last_stats
        ref.clear_aux()
        ref(x[t == 1], task=1)
        a_t, s_t = ref.aux_loss(), ref.last_stats
        assert set(s_v.aux) == {"balance", "z"}
        torch.testing.assert_close(layer_aux[name], a_v + a_t)
        assert float(a_v.detach()) > 0 and float(layer_aux[name].detach()) > float(a_t.detach())  # not only one
        expect = expect + a_v + a_t
        assert torch.equal(stats[name].tokens_per_expert, s_v.tokens_per_expert + s_t.tokens_per_expert)
        assert stats[name].num_rows == s_v.num_rows + s_t.num_rows
        assert stats[name].aux["balance"] == pytest.approx(s_v.aux["balance"] + s_t.aux["balance"], rel=1e-5)
        assert counts[name] == {"vision": s_v.tokens_per_expert.tolist(), "text": s_t.tokens_per_expert.tolist()}
        assert torch.equal(stats[name].per_task[0].tokens_per_expert, s_v.tokens_per_expert)
        assert stats[name].per_task[1].task == 1 and stats[name].task == -1
    torch.testing.assert_close(total, expect)
    assert float(mmoe.aux_loss(m)) == 0.0  # collected
    total.backward()
    for layer in layers:  # both routers get the balance-loss gradient
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for r in layer.routers for p in r.parameters())


def test_shared_routing_counts_by_modality():
    m = make("shared", moe={"num_experts": 4, "top_k": 2, "heads": 2})
    img, txt, pad = inputs()
    m(image=img, text=txt, text_padding_mask=pad)
    counts = routing_by_modality(m)
    stats = mmoe.routing_stats(m)
    assert set(counts) == {"blocks.1.ffn", "blocks.3.ffn"}
    for name, c in counts.items():
        assert sum(c["vision"]) == 2 * 17 * 2 * 2  # tokens * heads * top_k
        assert sum(c["text"]) == int((~pad).sum()) * 2 * 2
        assert [a + b for a, b in zip(c["vision"], c["text"])] == stats[name].tokens_per_expert.tolist()
    m(image=img)
    assert all(sum(c["text"]) == 0 for c in routing_by_modality(m).values())
    for _, layer in mmoe.moe_layers(m):
        assert layer.last_routing is None  # routing not kept unless asked for


# ------------------------------------------------------------------------------------------------ masking / MIM


@torch.no_grad()
def test_masked_patch_pixels_are_not_seen():
    m = make().eval()
    img, _, _ = inputs()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True  # patch (row 1, col 1): pixels [4:8, 4:8]
    a = m(image=img, image_mask=mask)["vision"]
    img2 = img.clone()
    img2[:, :, 4:8, 4:8] += torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(m(image=img2, image_mask=mask)["vision"], a)
    assert not torch.allclose(m(image=img2)["vision"], m(image=img)["vision"], atol=1e-5)
    assert not torch.allclose(a, m(image=img)["vision"], atol=1e-5)
    # the masked position holds the mask token's embedding at the input
    emb = m.embed_image(img, mask)
    torch.testing.assert_close(emb[:, 6], (m.mask_token[0, 0] + m.vision_pos[0, 6]).expand(2, -1))


def test_patchify_and_mim_targets():
    img = torch.randn(2, 3, 16, 16) * 3 + 1
    p = patchify(img, 4)
    assert p.shape == (2, 16, 48)
    # patch 1 = rows 0..3, columns 4..7, pixels ordered (row, column, channel)
    torch.testing.assert_close(p[:, 1], img[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, 48))
    t = mim_targets(img, 4)
    assert t.shape == (2, 16, 48)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-3, rtol=0)
    x = p[0, 3]
    torch.testing.assert_close(t[0, 3], (x - x.mean()) / (x.var() + 1e-6).sqrt())
    with pytest.raises(ValueError, match="patch_size"):
        patchify(img, 5)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_gradients_reach_experts_from_each_modality(modality):
    m = make("shared").train()
    img, txt, pad = inputs()
    o = m(image=img) if modality == "vision" else m(text=txt, text_padding_mask=pad)
    (o[modality].square().mean() + mmoe.aux_loss(m)).backward()
    for _, layer in mmoe.moe_layers(m):
        assert layer.experts.w1.grad is not None and layer.experts.w1.grad.abs().sum() > 0
        assert layer.router.weight.grad.abs().sum() > 0
    other = m.blocks[0].ffn.text if modality == "vision" else m.blocks[0].ffn.vision
    assert other.fc1.weight.grad is None


def test_padding_gets_no_gradient_through_moe_and_mask_token_learns():
    m = make("shared").train()
    img, txt, pad = inputs()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True
    o = m(image=img, text=txt, text_padding_mask=pad, image_mask=mask)
    loss = m.mim_pred(o["vision"])[mask].square().mean() + m.mlm_logits(o["text"])[~pad].logsumexp(-1).mean()
    loss.backward()
    assert m.mask_token.grad.abs().sum() > 0
    assert m.token_embed.weight.grad.abs().sum() > 0 and m.mlm_bias.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ options


OPTION_SETS = [
    {"router": "xmoe"},
    {"heads": 2},
    {"dense_backprop": "default"},
    {"capacity_factor": 1.0, "batch_prioritized": True},
    {"router": "expert_choice", "capacity_factor": 1.0},
    {"router": "sparsemixer"},
    {"shared_experts": 1, "activation": "swiglu"},
    {"dense_backprop": "expert_group", "top_k": 1},
    {"balance_loss": "vmoe", "router_noise_std": 0.25},
    {"router": "xmoe", "heads": 2, "dense_backprop": "default", "capacity_factor": 1.5},
]


@pytest.mark.parametrize("routing", ["shared", "modality"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_moe_options_compose(routing, opts):
    m = make(routing, depth=2, moe={"num_experts": 4, "top_k": 2, **opts}).train()
    img, txt, pad = inputs()
    o = m(image=img, text=txt, text_padding_mask=pad)
    loss = o["vision"].square().mean() + o["text"].square().mean() + mmoe.aux_loss(m)
    assert torch.isfinite(loss)
    loss.backward()
    (_, layer), = mmoe.moe_layers(m)
    assert layer.experts.w1.grad is not None and torch.isfinite(layer.experts.w1.grad).all()
    assert layer.experts.w1.grad.abs().sum() > 0
    assert set(routing_by_modality(m)["blocks.1.ffn"]) == {"vision", "text"}


def test_default_moe_vectors_with_two_routers():
    """Default MoE in modality mode: the EMA is updated by both calls and stays the saved buffer."""
    m = make("modality", depth=2, moe={"num_experts": 4, "top_k": 1, "dense_backprop": "default"}).train()
    img, txt, pad = inputs()
    layer = m.blocks[1].ffn
    m(image=img)
    after_vision = layer.default.vectors.clone()
    o = m(image=img, text=txt, text_padding_mask=pad)
    (o["vision"].sum() + o["text"].sum()).backward()
    assert not torch.equal(layer.default.vectors, after_vision)
    assert layer.state_dict()["default.vectors"].data_ptr() == layer.default.vectors.data_ptr()
    assert dict(m.named_buffers())["blocks.1.ffn.default.vectors"] is layer.default.vectors


def test_expert_hidden_defaults():
    m = make(moe={"num_experts": 4, "top_k": 1, "heads": 2}, mlp_ratio=2.0)
    layer = m.blocks[1].ffn
    assert layer.cfg.hidden == 64 // 2 and layer.cfg.activation == "gelu" and layer.cfg.dim == 32
    assert make(moe={"num_experts": 4, "expert_hidden": 24}).blocks[1].ffn.cfg.hidden == 24


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("changes, field", [
    ({"patch_size": 5}, "patch_size"),
    ({"num_heads": 5}, "num_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"moe_layers": "every_0"}, "moe_layers"),
    ({"moe_layers": [5]}, "moe_layers"),
    ({"moe_routing": "task"}, "moe_routing"),
    ({"drop_path": 1.0}, "drop_path"),
    ({"itc_dim": 0}, "itc_dim"),
    ({"mlp_ratio": 0.0}, "mlp_ratio"),
    ({"moe": {"num_experts": 4, "topk": 2}}, "topk"),
    ({"moe": {"num_experts": 4, "top_k": 9}}, "top_k"),
    ({"moe": {"dim": 16}}, "moe.dim"),
    ({"moe": {"num_tasks": 3}}, "moe.num_tasks"),
    ({"moe": "softmax"}, "moe"),
])
def test_config_errors_name_the_field(changes, field):
    args = dict(vocab_size=V, img_size=16, patch_size=4, dim=32, depth=2, num_heads=4,
                moe={"num_experts": 4, "top_k": 2})
    args.update(changes)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        MultiwayConfig(**args)


def test_input_errors():
    m = make()
    img, txt, pad = inputs()
    with pytest.raises(ValueError, match="image"):
        m()
    with pytest.raises(ValueError, match="max_text_len"):
        m(text=torch.zeros(2, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="image must be"):
        m(image=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="batch sizes"):
        m(image=img, text=txt[:1])
    with pytest.raises(ValueError, match="text_padding_mask"):
        m(text=txt, text_padding_mask=pad[:, :3])


# ------------------------------------------------------------------------------------------------ init / state


@torch.no_grad()
def test_init():
    m = make()
    assert all(float(mod.weight.std()) < 0.03 for mod in m.modules() if isinstance(mod, torch.nn.Linear)
               and not any(mod is x for _, l in mmoe.moe_layers(m) for x in l.modules()))
    assert float(m.blocks[0].attn.qkv.vision.bias.abs().sum()) == 0.0
    assert torch.equal(m.norm.vision.weight, torch.ones(32))
    # BEiT rescale: block i's output projections are scaled by 1/sqrt(2(i+1))
    assert float(m.blocks[3].attn.proj.vision.weight.std()) < 0.6 * float(m.blocks[0].attn.proj.vision.weight.std())
    assert float(m.blocks[3].ffn.experts.w2.std()) < 0.6 * float(m.blocks[3].ffn.experts.w1.std())
    plain = make(init_rescale=False)
    assert float(plain.blocks[3].attn.proj.vision.weight.std()) == pytest.approx(0.0176, rel=0.15)  # trunc 2 std


@pytest.mark.parametrize("routing", ["shared", "modality"])
def test_state_dict_round_trip_and_deepcopy(routing):
    m = make(routing, drop_path=0.1).eval()
    img, txt, pad = inputs()
    torch.manual_seed(123)
    other = build_multiway(dict(m.cfg.__dict__)).eval()
    other.load_state_dict(m.state_dict())
    with torch.no_grad():
        a, b = m(image=img, text=txt, text_padding_mask=pad), other(image=img, text=txt, text_padding_mask=pad)
    torch.testing.assert_close(a["vision"], b["vision"])
    torch.testing.assert_close(a["text"][~pad], b["text"][~pad])
    m.train()
    m(image=img, text=txt, text_padding_mask=pad)
    c = copy.deepcopy(m)  # after a forward: aux losses and routing (autograd graphs) are not copied
    assert all(layer.pending_aux_forwards == 0 and layer.last_routing is None for _, layer in mmoe.moe_layers(c))
    assert float(mmoe.aux_loss(c)) == 0.0 and float(mmoe.aux_loss(m).detach()) > 0
