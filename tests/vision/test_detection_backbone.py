"""The ViTDet-style ViT-MoE backbone, its pyramid, the weight mapping from classification checkpoints and
layer-wise lr decay (vision/detection/backbone.py)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import mmoe
import vision.models  # noqa: F401 - registers vit_moe_* in timm
from mmoe.errors import ConfigError
from vision.detection.backbone import (BackboneConfig, ViTDetMoE, build_backbone, load_backbone_weights,
                                       lr_decay_scales, vitdet_global_blocks)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, window_size=2, global_blocks=[1, 3],
            drop_path_rate=0.0, out_channels=16, moe={"num_experts": 4, "top_k": 2})


def tiny(**kw) -> BackboneConfig:
    return BackboneConfig(**{**TINY, **kw})


@pytest.mark.parametrize("hw", [(32, 32), (37, 53), (70, 24), (9, 9)])
def test_pyramid_shapes_and_strides_for_odd_sizes_never_crop(hw):
    H, W = hw
    bb = build_backbone(tiny())
    assert bb.strides == [2, 4, 8, 16, 32] and bb.names == ["p1", "p2", "p3", "p4", "p5"]
    x = torch.randn(1, 3, H, W, requires_grad=True)
    out = bb(x)
    s = bb.net.size_divisibility
    Hp, Wp = math.ceil(H / s) * s, math.ceil(W / s) * s  # padded, never cropped
    for name, stride in zip(bb.names[:4], bb.strides[:4]):
        assert out[name].shape == (1, 16, Hp // stride, Wp // stride), name
    assert out["p5"].shape[-2:] == (math.ceil(out["p4"].shape[-2] / 2), math.ceil(out["p4"].shape[-1] / 2))
    # the last row and column of the input reach the features: nothing was cut off
    out["p3"].sum().backward()
    assert float(x.grad[0, :, -1, :].abs().sum()) > 0 and float(x.grad[0, :, :, -1].abs().sum()) > 0


def test_window_and_global_layout_and_moe_placement():
    assert vitdet_global_blocks(12) == [2, 5, 8, 11]  # ViTDet-B
    assert vitdet_global_blocks(24) == [5, 11, 17, 23]
    net = ViTDetMoE(BackboneConfig(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=3, window_size=2))
    assert net.global_blocks == [2, 5, 8, 11]
    assert [b.window_size for b in net.blocks] == [0 if i in (2, 5, 8, 11) else 2 for i in range(12)]
    assert net.moe_layers == [1, 3, 5, 7, 9, 11]  # V-MoE every-2 by default
    assert [isinstance(b.mlp, mmoe.MoE) for b in net.blocks] == [i % 2 == 1 for i in range(12)]
    net = ViTDetMoE(tiny(moe_layers=[0], window_size=0))
    assert net.global_blocks == [0, 1, 2, 3] and [isinstance(b.mlp, mmoe.MoE) for b in net.blocks] == [
        True, False, False, False]
    # every MoEConfig option is reachable; errors name the key
    net = ViTDetMoE(tiny(moe={"num_experts": 4, "top_k": 1, "router": "xmoe", "heads": 2, "dense_backprop": "default"}))
    cfg = net.moe_modules()[0].cfg
    assert (cfg.router, cfg.heads, cfg.dense_backprop, cfg.top_k) == ("xmoe", 2, "default", 1)
    with pytest.raises(ConfigError, match="moe.top_k"):
        tiny(moe={"num_experts": 2, "top_k": 3})
    with pytest.raises(ConfigError, match="moe_layers"):
        tiny(moe_layers="every_x")
    with pytest.raises(ValueError, match="global_blocks"):
        tiny(global_blocks=[7])


def test_window_attention_padding_and_rel_pos_run_at_other_sizes():
    bb = build_backbone(tiny(window_size=3, use_rel_pos=True))  # 4x4 grid: windows of 3 pad it to 6x6
    assert any(".rel_pos_h" in n for n, _ in bb.named_parameters())
    for hw in ((32, 32), (48, 80)):  # rel-pos tables interpolated to the global grid
        out = bb(torch.randn(2, 3, *hw))
        assert all(torch.isfinite(v).all() for v in out.values())


def test_task_ids_reach_every_moe_layer():
    torch.manual_seed(0)
    net = ViTDetMoE(tiny(moe={"num_experts": 4, "top_k": 2, "num_tasks": 2})).eval()
    for moe in net.moe_modules():  # different routers per task
        torch.nn.init.normal_(moe.routers[1].weight, std=1.0)
    x = torch.randn(2, 3, 32, 32)
    mixed = net(x, task=torch.tensor([0, 1]))["last_feat"]
    stats = mmoe.routing_stats(net)  # every MoE layer saw both tasks' tokens
    assert len(stats) == 2 and all(set(s.per_task) == {0, 1} for s in stats.values())
    a = net(x[:1], task=0)["last_feat"]
    b = net(x[1:], task=1)["last_feat"]
    torch.testing.assert_close(mixed, torch.cat([a, b]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(net(x[1:], task=0)["last_feat"], b)  # the task's router matters


def _save_vit(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_weights_from_a_saved_vit_moe_classifier(tmp_path):
    torch.manual_seed(1)
    clf = timm.create_model("vit_moe_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=4,
                            num_heads=2, num_classes=5, moe_layers="every_2", moe={"num_experts": 4, "top_k": 2})
    _save_vit(clf, tmp_path / "clf.safetensors")
    net = ViTDetMoE(tiny())  # pre-training grid 4x4, the classifier's 2x2: the position embedding is resized
    info = load_backbone_weights(net, tmp_path / "clf.safetensors")
    assert {"head.weight", "cls_token", "norm.weight"} <= set(info["skipped"])
    state = net.state_dict()
    for k in ("blocks.1.mlp.experts.w1", "blocks.0.attn.qkv.weight", "blocks.2.norm2.weight"):
        torch.testing.assert_close(state[k], clf.state_dict()[k])
    assert state["pos_embed"].shape == (1, 17, 32)
    from timm.layers import resample_abs_pos_embed

    want = resample_abs_pos_embed(clf.pos_embed[:, 1:].detach(), new_size=[4, 4], old_size=[2, 2], num_prefix_tokens=0)
    torch.testing.assert_close(state["pos_embed"][:, 1:], want)
    # a layout that does not fit is an error naming the file
    with pytest.raises(ValueError, match="clf.safetensors.*dense in the backbone"):
        load_backbone_weights(ViTDetMoE(tiny(moe_layers="none")), tmp_path / "clf.safetensors")


def test_dense_checkpoint_upcycled_into_the_moe_backbone_keeps_the_function(tmp_path):
    torch.manual_seed(2)
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                              num_classes=3)
    _save_vit(dense, tmp_path / "dense.safetensors")
    plain = ViTDetMoE(tiny(moe_layers="none")).eval()
    load_backbone_weights(plain, tmp_path / "dense.safetensors")
    moe = ViTDetMoE(tiny(moe={"num_experts": 4, "top_k": 2, "normalize_topk": True})).eval()
    with pytest.raises(ValueError, match="upcycle"):
        load_backbone_weights(moe, tmp_path / "dense.safetensors")
    load_backbone_weights(moe, tmp_path / "dense.safetensors", upcycle=True)
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(moe(x)["last_feat"], plain(x)["last_feat"], rtol=1e-4, atol=1e-5)


def test_weights_from_a_run_folder(tmp_path):
    from mmoe.train.checkpoint import save_checkpoint

    torch.manual_seed(3)
    clf = timm.create_model("vit_moe_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4,
                            num_heads=2, num_classes=5, moe={"num_experts": 4, "top_k": 2})
    save_checkpoint(tmp_path / "run" / "checkpoints", 10, model=clf)
    net = ViTDetMoE(tiny())
    load_backbone_weights(net, tmp_path / "run" / "checkpoints")
    torch.testing.assert_close(net.state_dict()["blocks.3.mlp.experts.w2"], clf.state_dict()["blocks.3.mlp.experts.w2"])
    with pytest.raises(FileNotFoundError, match="model.init: .*nowhere"):
        load_backbone_weights(net, tmp_path / "nowhere")


def test_weights_from_a_detection_run_take_its_vit_only(tmp_path):
    """A detection / segmentation run of this project is a valid ``model.init``: its ``backbone.net.*`` (the
    ViT) is loaded, the pyramid and the heads are left behind (here a pyramid of another width)."""
    from mmoe.train.checkpoint import save_checkpoint
    from vision.detection.maskrcnn import DetectionModelConfig, build_maskrcnn

    torch.manual_seed(4)
    det = build_maskrcnn(DetectionModelConfig(backbone=tiny(), num_classes=3, min_size=32, max_size=32))
    save_checkpoint(tmp_path / "det" / "checkpoints", 5, model=det)
    seg_backbone = build_backbone(tiny(out_channels=24))
    load_backbone_weights(seg_backbone.net, tmp_path / "det")
    theirs = det.backbone.net.state_dict()
    for k, v in seg_backbone.net.state_dict().items():
        torch.testing.assert_close(v, theirs[k], msg=k)


def test_layer_decay_follows_vitdet():
    bb = build_backbone(tiny())
    scales = lr_decay_scales(bb, 0.5)
    L = 4
    assert scales["net.pos_embed"] == 0.5 ** (L + 1) and scales["net.patch_embed.proj.weight"] == 0.5 ** (L + 1)
    assert scales["net.blocks.0.attn.qkv.weight"] == 0.5 ** L
    assert scales["net.blocks.3.norm1.weight"] == 0.5 ** 1
    assert not any(k.startswith("stages") for k in scales)  # the pyramid keeps the full lr
