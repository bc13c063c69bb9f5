"""The optional detectron2 adapter (vision/detection/d2.py, d2cli.py, configs/detection/*.py).

`test_without_detectron2_*` run everywhere (detectron2 hidden in a subprocess); the rest need detectron2
and are skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "detection"
TINY = CONFIGS / "mask_rcnn_vitmoe_tiny_shapes.py"
SEMSEG = CONFIGS / "semantic_fpn_vitmoe_tiny_shapes.py"
INSTALL = "python -m pip install 'git+https://github.com/facebookresearch/detectron2.git'"

needs_d2 = pytest.mark.skipif(find_spec("detectron2") is None,
                              reason="detectron2 not installed (optional extra; see README)")

# detectron2 / pycocotools / fvcore warn under numpy 2 and new torch (their code, not ours)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

# runs the mmoe CLI with detectron2 made unimportable (as if it were not installed)
_HIDDEN = """
import sys
sys.modules["detectron2"] = None
import mmoe.cli, vision.cli
mmoe.cli.COMMANDS.setdefault("d2", vision.cli.D2)
sys.exit(mmoe.cli.main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def test_without_detectron2_the_command_explains_the_install(tmp_path):
    for argv in (["d2", "train", "x.py"], ["d2", "eval", "x.py", "--checkpoint", "m.pth"]):
        r = subprocess.run([sys.executable, "-c", _HIDDEN, *argv], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmoe: error: detectron2 is not installed"), r.stderr
        assert INSTALL in lines[0]
    # the module imports without detectron2; its classes say how to install it
    code = ("import sys; sys.modules['detectron2'] = None\nimport vision.detection.d2 as d2\n"
            "try:\n    d2.D2ViTMoE\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and INSTALL in r.stdout, r.stderr


def test_d2_command_is_registered():
    from importlib.metadata import EntryPoint

    from mmoe.cli import Command

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mmoe.commands"]
    assert eps["d2"] == "vision.cli:D2"
    cmd = EntryPoint("d2", eps["d2"], "mmoe.commands").load()
    assert isinstance(cmd, Command)


# ------------------------------------------------------------------------------------------ with detectron2
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from vision.detection_data import write_shapes_det

    out = tmp_path_factory.mktemp("d2") / "shapes"
    write_shapes_det(out, num_images=24, img_size=64, seed=1, progress=False)
    return out


def _tiny_backbone(**kw):
    from vision.detection.d2 import D2ViTMoE

    args = dict(img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=2, global_blocks=[1],
                use_rel_pos=True, moe_layers="every_2", moe={"num_experts": 4, "top_k": 2}, out_channels=32)
    return D2ViTMoE(**{**args, **kw})


@needs_d2
def test_backbone_output_shape_matches_padded_outputs():
    from detectron2.structures import ImageList

    b = _tiny_backbone().eval()
    shapes = b.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert b.size_divisibility == 64
    assert b.padding_constraints == {"size_divisibility": 64, "square_size": 0}  # the key ImageList reads
    images = ImageList.from_tensors([torch.rand(3, 70, 90), torch.rand(3, 101, 57)], b.size_divisibility,
                                    padding_constraints=b.padding_constraints)
    assert tuple(images.tensor.shape[-2:]) == (128, 128)  # padded, not cropped
    with torch.no_grad():
        out = b(images.tensor)
    for name, spec in shapes.items():
        assert tuple(out[name].shape) == (2, spec.channels, 128 // spec.stride, 128 // spec.stride)
    # square padding (ViTDet's square_pad) through the same constraints
    sq = _tiny_backbone(square_pad=192)
    images = ImageList.from_tensors([torch.rand(3, 70, 90)], sq.size_divisibility,
                                    padding_constraints=sq.padding_constraints)
    assert tuple(images.tensor.shape[-2:]) == (192, 192)


def _batch(n: int, size: int = 64) -> list[dict]:
    """Generated images as detectron2 inputs (CHW float 0-255, Instances with XYXY boxes, 0-based classes)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    from vision.detection_data import shapes_det_sample

    out = []
    for i in range(n):
        s = shapes_det_sample(i, seed=2, img_size=size)
        inst = Instances((size, size))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in s.instances)]
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor([a["category_id"] - 1 for a in s.instances])
        inst.gt_masks = BitMasks(torch.stack([torch.from_numpy(a["mask"]) for a in s.instances]))
        out.append({"image": torch.from_numpy(s.image).permute(2, 0, 1).float(), "instances": inst,
                    "height": size, "width": size})
    assert all(len(x["instances"]) for x in out)
    return out


@needs_d2
def test_training_step_has_moe_aux_loss_and_every_expert_a_gradient():
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    import mmoe
    from vision.detection.d2 import MoEGeneralizedRCNN

    cfg = LazyConfig.load(str(TINY))
    cfg.model.backbone.moe.balance_bias_rate = 1e-3  # a selection bias we can use to starve expert 0
    model = instantiate(cfg.model)
    assert isinstance(model, MoEGeneralizedRCNN)
    layers = mmoe.moe_layers(model)
    assert len(layers) == 2
    for _, m in layers:
        m.balance_bias[:, 0] = -1e4  # expert 0 gets no token in this step
    model.train()
    with EventStorage(0):
        losses = model(_batch(2))
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc", "loss_moe_aux"} <= set(losses)
    assert float(losses["loss_moe_aux"]) > 0 and losses["loss_moe_aux"].requires_grad
    assert all(m.pending_aux_forwards == 0 for _, m in layers)  # collected by the forward
    sum(losses.values()).backward()
    stats = mmoe.routing_stats(model)
    for name, m in layers:
        assert int(stats[name].tokens_per_expert[0]) == 0 and int(stats[name].tokens_per_expert.sum()) > 0
        for pname, p in m.experts.named_parameters():
            assert p.grad is not None, pname
            assert torch.count_nonzero(p.grad[0]) == 0 and torch.count_nonzero(p.grad[1:]) > 0, pname
    # DDP with find_unused_parameters=False needs a gradient for every parameter
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    # inference leaves no pending aux terms (and has no loss)
    model.eval()
    with torch.no_grad():
        out = model(_batch(1))
    assert "instances" in out[0] and all(m.pending_aux_forwards == 0 for _, m in layers)


@needs_d2
def test_semantic_segmentor_adds_the_aux_loss(shapes):
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    from vision.detection.d2 import MoESemanticSegmentor

    model = instantiate(LazyConfig.load(str(SEMSEG)).model)
    assert isinstance(model, MoESemanticSegmentor)
    batch = _batch(2)
    for x in batch:
        x["sem_seg"] = torch.zeros(64, 64, dtype=torch.long)
    with EventStorage(0):
        losses = model.train()(batch)
    assert set(losses) == {"loss_sem_seg", "loss_moe_aux"} and float(losses["loss_moe_aux"]) > 0


@needs_d2
@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.py")))
def test_configs_load_and_dump(name, tmp_path):
    from detectron2.config import LazyConfig, instantiate
    from omegaconf import OmegaConf

    from vision.detection.d2 import D2ViTMoE

    cfg = LazyConfig.load(str(CONFIGS / name))
    for key in ("model", "dataloader", "optimizer", "lr_multiplier", "train"):
        assert key in cfg, key
    assert cfg.model.backbone._target_ is D2ViTMoE
    # the model section dumps as yaml (targets by name) and loads back
    LazyConfig.save(OmegaConf.create({"model": cfg.model}), str(tmp_path / "model.yaml"))
    text = (tmp_path / "model.yaml").read_text()
    assert "vision.detection.d2.D2ViTMoE" in text and not (tmp_path / "model.yaml.pkl").exists()
    if "tiny" not in name:
        assert cfg.train.max_iter == 184375 and cfg.train.amp.enabled and cfg.train.init_upcycle
        assert cfg.model.backbone.embed_dim == 768 and list(cfg.model.backbone.global_blocks) == [2, 5, 8, 11]
        return
    model = instantiate(LazyConfig.load(str(tmp_path / "model.yaml")).model)
    names = list(model.backbone.output_shape())
    if hasattr(model, "roi_heads"):
        assert model.proposal_generator.in_features == names  # all 5 levels to the RPN
        assert model.roi_heads.box_in_features == names[:4] == model.roi_heads.mask_in_features
    else:
        assert model.sem_seg_head.in_features == names[:4]


@needs_d2
def test_lr_decay_of_the_b_config_matches_lr_decay_scales():
    from detectron2.config import LazyConfig
    from torch import nn

    from vision.detection.backbone import lr_decay_scales

    factor = LazyConfig.load(str(CONFIGS / "mask_rcnn_vitmoe_b_100ep.py")).optimizer.params.lr_factor_func
    wrapper = nn.Module()
    wrapper.backbone = _tiny_backbone(depth=12, global_blocks=[2, 5, 8, 11])
    scales = lr_decay_scales(wrapper, 0.7)
    assert len(scales) == sum(1 for n, _ in wrapper.named_parameters() if ".pyramid.net." in n)
    for n, s in scales.items():
        assert factor(n) == pytest.approx(s), n
    assert factor("backbone.pyramid.stages.0.0.weight") == 1.0 and factor("roi_heads.box_head.fc1.weight") == 1.0


@needs_d2
def test_init_checkpoint_a_dense_timm_vit_is_upcycled_into_the_backbone(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate
    from timm.models.vision_transformer import VisionTransformer

    from mmoe.errors import CheckpointError
    from vision.detection.d2cli import load_init

    dense = VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    path = tmp_path / "vit.pth"
    torch.save(dense.state_dict(), path)
    model = instantiate(LazyConfig.load(str(TINY)).model)
    checkpointer = DetectionCheckpointer(model, str(tmp_path))
    with pytest.raises(CheckpointError, match="set train.init_upcycle=True"):
        load_init(model, checkpointer, str(path), upcycle=False)
    load_init(model, checkpointer, str(path), upcycle=True)
    vit = model.backbone.vit
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(vit.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc1.weight)  # dense block
    w1 = vit.blocks[1].mlp.experts.w1  # an MoE block: every expert a copy of the dense MLP
    for e in range(w1.shape[0]):
        torch.testing.assert_close(w1[e], dense.blocks[1].mlp.fc1.weight.t())
    # a detectron2 checkpoint goes through DetectionCheckpointer
    checkpointer.save("d2ckpt")
    with torch.no_grad():
        vit.pos_embed.zero_()
    load_init(model, checkpointer, str(tmp_path / "d2ckpt.pth"), upcycle=False)
    assert vit.pos_embed.abs().sum() > 0
    with pytest.raises(CheckpointError, match="no such file"):
        load_init(model, checkpointer, str(tmp_path / "nothing.pth"), upcycle=False)


def _mmoe(*argv: str) -> int:
    import mmoe.cli
    import vision.cli

    mmoe.cli.COMMANDS.setdefault("d2", vision.cli.D2)  # the entry point of an installed checkout may be older
    return mmoe.cli.main(list(argv))


@needs_d2
def test_cli_train_resume_eval(shapes, tmp_path):
    out = tmp_path / "run"
    common = [f"data.root={shapes}", "data.image_size=64", "dataloader.train.total_batch_size=2",
              "train.eval_period=10", "train.checkpointer.period=10", "train.log_period=5"]
    assert _mmoe("d2", "train", str(TINY), *common, "train.max_iter=20", "--output", str(out)) == 0
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 19
    assert all("loss_moe_aux" in m for m in metrics if "total_loss" in m)
    # EvalHook: after iteration 9 (period 10) and after training (logged as iteration 20)
    assert [m["iteration"] for m in metrics if "bbox/AP" in m and "segm/AP" in m] == [9, 20]
    assert (out / "model_final.pth").is_file() and (out / "model_0000009.pth").is_file()
    routing = [json.loads(line) for line in (out / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in routing] == [10, 20]
    assert sorted(routing[-1]["layers"]) == ["backbone.pyramid.net.blocks.1.mlp", "backbone.pyramid.net.blocks.3.mlp"]
    assert sum(routing[-1]["layers"]["backbone.pyramid.net.blocks.1.mlp"]["tokens_per_expert"]) > 0
    assert (out / "plots" / "expert_load_step0000020.png").is_file()

    # --resume continues from the last checkpoint (iteration 19) to the new max_iter
    assert _mmoe("d2", "train", str(TINY), *common, "train.max_iter=30", "--output", str(out), "--resume") == 0
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 29
    assert [r["step"] for r in map(json.loads, (out / "routing.jsonl").read_text().splitlines())] == [10, 20, 30]
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 29

    assert "Starting training from iteration 20" in (out / "log.txt").read_text()

    # eval prints bbox / segm AP (a fresh process, as a user runs it)
    r = _subprocess_mmoe("d2", "eval", str(TINY), "--checkpoint", str(out / "model_final.pth"),
                         f"data.root={shapes}", "data.image_size=64", "--output", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = [line for line in r.stdout.splitlines() if line.startswith("bbox: ")]
    assert summary and "AP=" in summary[-1] and "segm: AP=" in summary[-1], r.stdout[-2000:]


def _subprocess_mmoe(*argv: str) -> subprocess.CompletedProcess:
    code = ("import sys, mmoe.cli, vision.cli; mmoe.cli.COMMANDS.setdefault('d2', vision.cli.D2); "
            "sys.exit(mmoe.cli.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)


@needs_d2
def test_cli_errors_are_one_line(tmp_path, capsys):
    assert _mmoe("d2", "train", str(tmp_path / "missing.py")) == 2
    assert capsys.readouterr().err.strip() == f"mmoe: error: {tmp_path / 'missing.py'}: no such config file"
    assert _mmoe("d2", "eval", str(TINY), "--checkpoint", str(tmp_path / "none.pth")) == 2
    assert "none.pth: no such file" in capsys.readouterr().err
    # an error inside the loop (here: no data at data.root) is one line too (a subprocess: detectron2 sets up
    # its loggers on the streams of the moment)
    r = _subprocess_mmoe("d2", "train", str(TINY), "data.root=/nonexistent/set", "--output", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("mmoe: error: /nonexistent/set/coco/annotations/instances_train.json: no such file")
    assert "mmoe shards shapes-det" in err
