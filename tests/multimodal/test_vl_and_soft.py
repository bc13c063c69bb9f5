"""The multiway model's VL-FFN (``vl_layers``: BEiT-3's vision-language expert in the top blocks, used by
image-text pairs only) and Soft MoE in the multiway model (``moe.router: soft``: one call per modality per
sequence, a pair's joint sequence in VL blocks), checked against plain computations of their definitions."""

from __future__ import annotations

import pytest
import torch

import mmoe
from multimodal.models import MultiwayConfig, MultiwayMoETransformer, routing_by_modality
from tests.helpers import soft_moe_reference

V = 40


def make(routing: str = "shared", **kw) -> MultiwayMoETransformer:
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(vocab_size=V, img_size=16, patch_size=4, dim=32, depth=4, num_heads=4, max_text_len=12,
                itc_dim=16, moe={"num_experts": 4, "top_k": 2}, moe_routing=routing)
    args.update(kw)
    return MultiwayMoETransformer(MultiwayConfig(**args))


def inputs(B: int = 2, L: int = 8):
    torch.manual_seed(1)
    img = torch.randn(B, 3, 16, 16)
    txt = torch.randint(1, V, (B, L))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, L - 3:] = True
    return img, txt, pad


def perturb(*modules: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(0.5 * torch.randn_like(p))


def run(m, img, txt, pad):
    with torch.no_grad():
        return m(image=img, text=txt, text_padding_mask=pad)


def close(a, b) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-6) for k in ("vision", "text") if a[k] is not None)


# ------------------------------------------------------------------------------------------------ VL-FFN


def test_vl_layers_config():
    cfg = MultiwayConfig(vocab_size=V, depth=6, vl_layers=3)
    assert cfg.vl_layer_ids() == [3, 4, 5]
    assert MultiwayConfig(vocab_size=V, depth=6).vl_layer_ids() == []
    assert cfg.moe_config().num_tasks == 1 and cfg.moe_config(vl=True).num_tasks == 1
    mod = MultiwayConfig(vocab_size=V, depth=6, vl_layers=3, moe_routing="modality")
    assert mod.moe_config().num_tasks == 2 and mod.moe_config(vl=True).num_tasks == 3
    for bad in (7, -1, True, 1.5):
        with pytest.raises(ValueError, match="vl_layers: must be an integer in \\[0, depth=6\\]"):
            MultiwayConfig(vocab_size=V, depth=6, vl_layers=bad)


def test_dense_vl_blocks_have_a_third_ffn_used_by_pairs_only():
    m = make(moe_layers="none", vl_layers=2).eval()
    names = [n for n, _ in m.named_parameters()]
    assert {n.split(".")[1] for n in names if ".ffn.vl." in n} == {"2", "3"}  # the top 2 blocks only
    extra = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in make(moe_layers="none").parameters())
    assert extra == 2 * sum(p.numel() for p in m.blocks[3].ffn.vl.parameters())
    img, txt, pad = inputs()
    pair, alone_i, alone_t = run(m, img, txt, pad), run(m, img, None, None), run(m, None, txt, pad)

    # a pair's tokens in the VL blocks use ffn.vl, never the V-/L-FFN there ...
    perturb(m.blocks[2].ffn.vision, m.blocks[2].ffn.text, m.blocks[3].ffn.vision, m.blocks[3].ffn.text)
    assert close(run(m, img, txt, pad), pair)
    assert not close(run(m, img, None, None), alone_i) and not close(run(m, None, txt, pad), alone_t)
    # ... and image-only / text-only forwards never use ffn.vl
    i2, t2 = run(m, img, None, None), run(m, None, txt, pad)
    perturb(m.blocks[2].ffn.vl, m.blocks[3].ffn.vl)
    assert close(run(m, img, None, None), i2) and close(run(m, None, txt, pad), t2)
    assert not close(run(m, img, txt, pad), pair)


def test_dense_vl_block_output_is_the_vl_mlp_of_every_token():
    m = make(moe_layers="none", vl_layers=1).eval()
    block = m.blocks[3]
    seen = {}
    block.norm2.register_forward_hook(lambda mod, args, out: seen.update(h=out))
    block.register_forward_hook(lambda mod, args, out: seen.update(x_in=args[0], out=out))
    attn_out = {}
    block.attn.register_forward_hook(lambda mod, args, out: attn_out.update(a=out))
    img, txt, pad = inputs()
    run(m, img, txt, pad)
    x_mid = seen["x_in"] + attn_out["a"]
    torch.testing.assert_close(seen["out"], x_mid + block.ffn.vl(seen["h"]))


@pytest.mark.parametrize("routing", ["shared", "modality"])
def test_moe_vl_blocks_route_a_pairs_tokens_by_the_vl_router(routing):
    # every block is a VL block, so for a pair the vision/text routers are never used under modality routing
    m = make(routing, vl_layers=4, moe={"num_experts": 4, "top_k": 2, "capacity_factor": 1.0}).eval()
    moes = [b.ffn for b in m.blocks if b.is_moe]
    assert [x.cfg.num_tasks for x in moes] == ([3, 3] if routing == "modality" else [1, 1])
    img, txt, pad = inputs()
    alone_i, pair = run(m, img, None, None), run(m, img, txt, pad)
    stats = mmoe.routing_stats(m)
    if routing == "modality":
        assert all(s.task == 2 and set(s.per_task) == {2} for s in stats.values())
        perturb(*[x.routers[0] for x in moes], *[x.routers[1] for x in moes])
        assert close(run(m, img, txt, pad), pair)  # routers 0/1 unused by pairs in VL blocks
        assert not close(run(m, img, None, None), alone_i)
        i2 = run(m, img, None, None)
        perturb(*[x.routers[2] for x in moes])
        assert close(run(m, img, None, None), i2)  # the VL router is unused by single-modality inputs
        assert not close(run(m, img, txt, pad), pair)
    # slots are still counted by token position: every valid vision token counts top_k slots
    run(m, img, txt, pad)
    for c in routing_by_modality(m).values():
        assert sum(c["vision"]) == 2 * 17 * 2 and sum(c["text"]) == int((~pad).sum()) * 2


def test_moe_vl_block_equals_one_call_with_task_2():
    m = make("modality", vl_layers=1, moe_layers=[3]).eval()
    block, seen = m.blocks[3], {}
    block.norm2.register_forward_hook(lambda mod, args, out: seen.update(h=out))
    block.ffn.register_forward_hook(lambda mod, args, out: seen.update(rows=args[0], out=out))
    img, txt, pad = inputs()
    run(m, img, txt, pad)
    valid = torch.cat([torch.ones(2, 17, dtype=torch.bool), ~pad], 1)
    rows = seen["h"][valid]
    torch.testing.assert_close(seen["rows"], rows)
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], block.ffn(rows, task=2))


def test_vl_model_trains_and_every_branch_gets_gradients():
    m = make("modality", vl_layers=2, moe_layers="every_2")
    img, txt, pad = inputs()
    o = m(image=img, text=txt, text_padding_mask=pad)
    (o["vision"].square().mean() + o["text"][~pad].square().mean() + mmoe.aux_loss(m)).backward()
    assert m.blocks[2].ffn.vl.fc1.weight.grad.abs().sum() > 0  # dense VL block
    assert m.blocks[3].ffn.routers[2].weight.grad.abs().sum() > 0  # MoE VL block's VL router
    assert m.blocks[3].ffn.routers[0].weight.grad is None  # unused by the pair
    assert m.blocks[1].ffn.routers[0].weight.grad.abs().sum() > 0  # non-VL MoE block: modality routers


# ------------------------------------------------------------------------------------------------ Soft MoE

SOFT = {"router": "soft", "num_experts": 4, "soft_slots": 2}


def _scaled(m):
    with torch.no_grad():
        for b in m.blocks:
            if b.is_moe:
                for r in b.ffn.routers:
                    r.scale.fill_(1.7)
                    r.phi.mul_(1 + 0.1 * torch.arange(r.phi.shape[1], dtype=r.phi.dtype))
    return m


@pytest.mark.parametrize("routing", ["shared", "modality"])
@pytest.mark.parametrize("vl", [False, True])
def test_soft_block_matches_the_per_sequence_reference(routing, vl):
    m = _scaled(make(routing, moe=SOFT, vl_layers=4 if vl else 0))
    block = m.blocks[1]
    moe = block.ffn
    split, B, L = 17, 2, 8
    torch.manual_seed(3)
    h = torch.randn(B, split + L, 32, requires_grad=True)
    valid = torch.ones(B, split + L, dtype=torch.bool)
    valid[1, -3:] = False
    y = block._soft_moe(h, split, valid, vl)
    h2 = h.detach().clone().requires_grad_(True)
    def task(t: int) -> int:
        return t if routing == "modality" else 0

    if vl:  # the pair's joint sequence, router 2
        want = soft_moe_reference(moe, h2, valid, task(2))
    else:  # vision part (router 0), text part with its padding masked (router 1)
        want = torch.cat([soft_moe_reference(moe, h2[:, :split], None, task(0)),
                          soft_moe_reference(moe, h2[:, split:], valid[:, split:], task(1))], 1)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    params = [p for p in moe.parameters()]
    got = torch.autograd.grad((y * g).sum(), [h, *params], allow_unused=True)
    ref = torch.autograd.grad((want * g).sum(), [h2, *params], allow_unused=True)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert torch.equal(y[1, -3:].detach(), torch.zeros(3, 32))
    # statistics: the merge of the calls
    st = moe.last_stats
    calls = 1 if vl else 2
    assert st.tokens_per_expert.tolist() == [calls * B * 2] * 4
    assert st.num_rows == int(valid.sum())
    assert st.dropped_frac == 0.0 and st.activation == 1.0
    if routing == "modality":
        assert set(st.per_task) == ({2} if vl else {0, 1})
        if not vl:
            assert st.per_task[0].num_rows == B * split and st.per_task[1].num_rows == int(valid[:, split:].sum())
    for key in ("combine_max", "dispatch_max", "combine_entropy", "dispatch_entropy"):
        assert key in st.extra
    assert 0 < st.extra["dispatch_max"] <= 1 and 0 < st.extra["combine_max"] <= 1


def test_soft_stats_merge_weights_each_call():
    m = _scaled(make("modality", moe=SOFT)).eval()
    moe = m.blocks[1].ffn
    img, txt, pad = inputs()
    split = 17
    run(m, img, txt, pad)
    parts = m.blocks[1].soft_stats
    assert set(parts) == {"vision", "text"}
    nv, nt = parts["vision"].num_rows, parts["text"].num_rows
    assert (nv, nt) == (2 * split, int((~pad).sum()))
    st = moe.last_stats
    assert st.entropy == pytest.approx((parts["vision"].entropy * nv + parts["text"].entropy * nt) / (nv + nt))
    # dispatch statistics are per slot: both calls have 2 sequences x 8 slots
    assert st.extra["dispatch_max"] == pytest.approx((parts["vision"].extra["dispatch_max"]
                                                      + parts["text"].extra["dispatch_max"]) / 2)
    assert mmoe.routing_stats(m)["blocks.1.ffn"] is st
    assert float(mmoe.aux_loss(m)) == 0.0


@pytest.mark.parametrize("routing", ["shared", "modality"])
@pytest.mark.parametrize("vl", [0, 4])
def test_soft_multiway_padding_invariance(routing, vl):
    m = _scaled(make(routing, moe=SOFT, vl_layers=vl)).eval()
    img, txt, pad = inputs()
    a = run(m, img, txt, pad)
    counts_a = routing_by_modality(m)
    stats_a = {k: (s.tokens_per_expert.clone(), s.num_rows, s.extra) for k, s in mmoe.routing_stats(m).items()}
    txt2 = torch.cat([torch.where(pad, torch.randint(1, V, txt.shape), txt), torch.randint(1, V, (2, 3))], 1)
    pad2 = torch.cat([pad, torch.ones(2, 3, dtype=torch.bool)], 1)
    b = run(m, img, txt2, pad2)
    valid = ~pad
    torch.testing.assert_close(b["text"][:, :8][valid], a["text"][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["vision"], a["vision"], atol=1e-5, rtol=1e-5)
    for k, s in mmoe.routing_stats(m).items():
        tpe, rows, extra = stats_a[k]
        assert torch.equal(s.tokens_per_expert, tpe) and s.num_rows == rows
        assert s.extra["combine_max"] == pytest.approx(extra["combine_max"], abs=1e-6)
    for k, c in routing_by_modality(m).items():
        for mod in ("vision", "text"):
            assert c[mod] == pytest.approx(counts_a[k][mod], abs=1e-5)


@pytest.mark.parametrize("vl", [0, 4])
def test_soft_routing_by_modality_adds_up_to_the_slots(vl):
    m = _scaled(make("shared", moe=SOFT, vl_layers=vl))
    img, txt, pad = inputs()
    m(image=img, text=txt, text_padding_mask=pad)
    for name, c in routing_by_modality(m).items():
        total = mmoe.routing_stats(m)[name].tokens_per_expert.float()
        torch.testing.assert_close(torch.tensor(c["vision"]) + torch.tensor(c["text"]), total, atol=1e-4, rtol=0)
        if vl:  # a joint sequence's slots are split by dispatch weight: both modalities hold part of them
            assert all(0 < v < t for v, t in zip(c["vision"], total.tolist()))
        else:
            assert c["vision"] == [2.0 * 2] * 4  # 2 images x 2 slots of every expert
    m(image=img)
    assert all(sum(c["text"]) == 0 for c in routing_by_modality(m).values())


def test_soft_multiway_trains_with_checkpointing_and_gradients_reach_every_router():
    m = make("modality", moe=SOFT, vl_layers=2)
    img, txt, pad = inputs()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    target = torch.randn(2, 17, 32)
    losses = []
    for _ in range(15):
        o = m(image=img, text=txt, text_padding_mask=pad)
        loss = (o["vision"] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert m.blocks[3].ffn.routers[2].phi.grad.abs().sum() > 0  # VL block: the pair's router
    assert m.blocks[1].ffn.routers[0].phi.grad.abs().sum() > 0 and m.blocks[1].ffn.routers[1].phi.grad.abs().sum() > 0
    # activation checkpointing recomputes the soft calls without corrupting the statistics
    from torch.utils.checkpoint import checkpoint

    block = m.blocks[1]
    x = torch.randn(2, 25, 32, requires_grad=True)
    valid = torch.ones(2, 25, dtype=torch.bool)
    y = checkpoint(block, x, 17, None, valid, False, use_reentrant=False)
    before = block.ffn.last_stats
    y.sum().backward()
    assert block.ffn.last_stats is before and before.num_rows == 50


@pytest.mark.parametrize("router", ["softmax", "soft"])
def test_masked_multimodal_task_with_vl_layers(tmp_path, router):
    from mmoe.data import ShardLoader
    from mmoe.train.tasks import get_task
    from multimodal.data import write_shapes

    write_shapes(tmp_path, num_samples=16, seed=0, val_fraction=0.0, progress=False)
    cls = get_task("masked_multimodal")
    moe = {"num_experts": 4, "top_k": 2} if router == "softmax" else {"router": "soft", "num_experts": 4}
    task = cls(cls.ModelConfig(dim=32, depth=2, num_heads=2, max_text_len=16, moe=moe, moe_routing="modality",
                               vl_layers=1, itc_weight=0.5))
    loader = ShardLoader(str(tmp_path), batch_size=8, shuffle_buffer=0, seed=0, decode=task.decode,
                         collate=lambda xs: xs)
    batch = task.collate(next(iter(loader)))
    torch.manual_seed(0)
    model = task.build_model()
    assert model.blocks[1].is_moe and model.blocks[1].is_vl and model.blocks[1].ffn.cfg.num_tasks == 3
    loss, scalars, n = task.loss(model, batch)
    aux = mmoe.aux_loss(model)
    assert torch.isfinite(loss) and n == 8 and (float(aux.detach()) == 0.0) == (router == "soft")
    (loss + aux).backward()
    assert next(model.blocks[1].ffn.routers[2].parameters()).grad.abs().sum() > 0  # the pair stream's router
    metrics = task.eval_metrics(task.eval_step(model, batch))
    assert 0 <= metrics["i2t_r1"] <= 1 and metrics["mlm_loss"] > 0
    assert set(routing_by_modality(model)) == {"blocks.1.ffn"}
