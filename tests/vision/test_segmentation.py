"""Semantic segmentation: the semantic FPN head on the ViT-MoE pyramid, the mIoU metrics and their evaluator,
and ``task: semantic_segmentation`` through the engine (training, exact resume, predict) on the shapes set."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmoe.data import DataError
from mmoe.errors import ConfigError
from vision.detection.backbone import BackboneConfig, build_backbone
from vision.detection.segmentation import (ConfusionEvaluator, SemanticSegmentor, SemSegFPNHead, confusion_matrix,
                                           segmentation_metrics)
from vision.detection.segtask import SegmentationModelConfig, SegmentationOptions, SemanticSegmentationTask, palette

from tests.helpers import _env

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["background", "square", "circle", "triangle", "cross"]
TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4, global_blocks=[1],
            out_channels=32, moe={"num_experts": 4, "top_k": 2})


def tiny_segmentor(num_classes: int = 5) -> SemanticSegmentor:
    backbone = build_backbone(BackboneConfig(**TINY))
    n = len(backbone.stages)
    return SemanticSegmentor(backbone, SemSegFPNHead(32, backbone.strides[:n], num_classes, conv_dims=32))


# ------------------------------------------------------------------------------------------ the model


def test_logits_have_the_input_size_for_odd_sizes_and_padding_is_the_backbones():
    model = tiny_segmentor().eval()
    assert model.levels == ["p1", "p2", "p3", "p4"]  # patch 8: strides 2..16; not the RPN level p5
    x = torch.randn(2, 3, 70, 45)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5, 70, 45)
        # the input is padded (to 80 x 48), never cropped: the same as padding it ourselves
        padded = torch.nn.functional.pad(x, (0, 3, 0, 10))
        torch.testing.assert_close(out, model(padded)[..., :70, :45])
        assert model(torch.randn(1, 3, 64, 64), task=0).shape == (1, 5, 64, 64)
    # the head alone: detectron2's layout (levels coarser than the common stride get one conv + 2x up per octave)
    head = SemSegFPNHead([16, 16, 16], [4, 8, 32], 3, conv_dims=16)
    assert [sum(isinstance(m, torch.nn.Conv2d) for m in h) for h in head.scale_heads] == [1, 1, 3]
    assert head([torch.randn(1, 16, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 16, 2, 2)]).shape == \
        (1, 3, 64, 64)
    with pytest.raises(ValueError, match="common_stride"):
        SemSegFPNHead(16, [4, 8], 3, common_stride=8)
    with pytest.raises(ValueError, match="common_stride"):
        SemSegFPNHead(16, [4, 12], 3)


# ------------------------------------------------------------------------------------------ metrics


def test_confusion_matrix_leaves_out_ignored_pixels():
    target = torch.tensor([[0, 0, 1, 255], [2, 1, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 0]])
    cm = confusion_matrix(pred, target, 3, 255)
    # rows: ground truth; 0->0 twice, 0->1 once, 1->1 once, 1->0 once, 2->2 once; the two 255 pixels are out
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="target values outside"):
        confusion_matrix(pred, torch.full_like(target, 3), 3, 255)


def test_miou_and_friends_on_a_hand_built_matrix():
    cm = torch.tensor([[50, 2, 0, 0],   # ground truth 0: 52 pixels
                       [3, 20, 0, 5],   # ground truth 1: 28 pixels
                       [0, 0, 0, 0],    # class 2: neither in the ground truth nor predicted -> not in the mean
                       [0, 0, 0, 0]])   # class 3: predicted 5 times, never true -> IoU 0, in the mean
    m = segmentation_metrics(cm, ["bg", "a", "b", "c"], per_class=True)
    # IoU = tp / (gt + pred - tp): class 0: 50 / (52 + 53 - 50) = 50/55; class 1: 20 / (28 + 22 - 20) = 20/30;
    # class 3: 0 / (0 + 5 - 0) = 0
    assert m["mIoU"] == pytest.approx(100 * (50 / 55 + 20 / 30 + 0) / 3)  # 52.525...
    assert m["pixel_acc"] == pytest.approx(100 * 70 / 80)  # 87.5
    assert m["mean_acc"] == pytest.approx(100 * (50 / 52 + 20 / 28) / 2)  # classes with ground truth only
    assert m["fwIoU"] == pytest.approx(100 * (52 / 80 * 50 / 55 + 28 / 80 * 20 / 30))
    assert m["IoU-bg"] == pytest.approx(100 * 50 / 55) and m["IoU-c"] == 0.0
    assert "IoU-b" not in m  # empty union: no IoU
    assert set(segmentation_metrics(cm)) == {"mIoU", "pixel_acc", "mean_acc", "fwIoU"}
    assert segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64)) == {}
    # a perfect prediction
    assert segmentation_metrics(torch.diag(torch.tensor([5, 0, 7])))["mIoU"] == pytest.approx(100.0)


def _fake_step(model, batch):
    pred, target = batch
    valid = target != 255
    return {"cm": confusion_matrix(pred, target, 4, 255), "loss_sum": float(valid.sum()) * 0.5,
            "pixels": float(valid.sum())}


def test_confusion_evaluator_merge_of_two_ranks_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        target = torch.randint(0, 4, (2, 5, 7), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        batches.append((torch.randint(0, 4, (2, 5, 7), generator=g), target))
    one = ConfusionEvaluator(_fake_step, 4, class_names=list("wxyz"), per_class=True)
    want = one.evaluate(None, batches)
    assert want["loss"] == pytest.approx(0.5) and want["pixels"] == float(sum((t != 255).sum() for _, t in batches))
    ranks = [ConfusionEvaluator(_fake_step, 4, class_names=list("wxyz"), per_class=True) for _ in range(2)]
    for r, ev in enumerate(ranks):
        ev.reset()
        for b in batches[r::2]:
            ev.process(b, ev.run(None, b))
        ev.run(None, batches[r])  # a repeated forward (expert parallelism): outputs dropped, nothing changes
    states = [ev.state() for ev in ranks]
    for ev in ranks:
        ev.merge(states)
        assert ev.summarize() == want
    before = ranks[0].summarize()
    ranks[0].merge([ranks[0].state()])
    assert ranks[0].summarize() == before


# ------------------------------------------------------------------------------------------ the task: units


def _task(**options) -> SemanticSegmentationTask:
    return SemanticSegmentationTask(SegmentationModelConfig(num_classes=5, backbone=BackboneConfig(**TINY),
                                                            head_dim=32), SegmentationOptions(**options))


def _sample(h: int = 40, w: int = 52, key: str = "k1", seed: int | None = 7, top: int = 4) -> dict:
    rng = np.random.default_rng(1)
    img, lab = io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img, format="PNG")
    label = rng.integers(0, top + 1, (h, w), dtype=np.uint8)
    label[:3] = 255
    Image.fromarray(label).save(lab, format="PNG")
    s = {"__key__": key, "__url__": "shard-000.tar", "png": img.getvalue(), "seg.png": lab.getvalue()}
    if seed is not None:
        s["__seed__"] = seed
    return s


def _label_of(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["seg.png"])))


def test_decode_is_seeded_checks_labels_and_eval_keeps_the_image():
    task = _task(image_size=32, scale_range=(0.5, 2.0))
    a, b = task.decode(_sample(seed=7)), task.decode(_sample(seed=7))
    assert a["image"].shape == (3, 32, 32) and a["label"].shape == (32, 32) and a["label"].dtype == torch.int64
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    others = [task.decode(_sample(seed=s)) for s in range(8)]
    assert any(not torch.equal(o["label"], a["label"]) for o in others)
    assert all(set(o["label"].unique().tolist()) <= {0, 1, 2, 3, 4, 255} for o in others)
    # the shorter side goes to image_size * scale = 40, the image's own size: no resizing; the 56 crop is larger
    # than the image (padded right and bottom), then always flipped
    task = _task(image_size=56, scale_range=(40 / 56, 40 / 56), hflip=1.0)
    s = _sample(h=40, w=40)
    ex = task.decode(s)
    want = torch.full((56, 56), 255, dtype=torch.int64)
    want[:40, :40] = torch.from_numpy(_label_of(s).astype(np.int64))
    assert torch.equal(ex["label"], want.flip(-1))
    assert torch.equal(ex["image"][:, 40:, :], torch.zeros(3, 16, 56))  # padding = 0 after normalisation
    # scale 2 of a 40 x 52 image at image_size 32: resized to 64 x 83 (nearest for labels), then cropped
    task = _task(image_size=32, scale_range=(2.0, 2.0), hflip=0.0)
    big = Image.fromarray(_label_of(_sample())).resize((83, 64), Image.NEAREST)
    crop = task.decode(_sample())["label"].numpy()
    hits = [(y, x) for y in range(64 - 32 + 1) for x in range(83 - 32 + 1)
            if np.array_equal(np.asarray(big)[y:y + 32, x:x + 32], crop)]
    assert hits  # a window of the resized label map
    # image and label are cropped and flipped together: an image whose red channel is the label
    task = _task(image_size=32, scale_range=(40 / 32, 40 / 32), hflip=0.5)
    sample = _sample()
    rgb = np.zeros((40, 52, 3), np.uint8)
    rgb[..., 0] = _label_of(sample)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    sample["png"] = buf.getvalue()
    opts = SegmentationOptions()
    for seed in range(6):
        sample["__seed__"] = seed
        ex = task.decode(sample)
        red = (ex["image"][0] * opts.std[0] + opts.mean[0]) * 255
        np.testing.assert_allclose(red.numpy(), ex["label"].numpy(), atol=1e-3)
    # evaluation: the whole image, the label as stored
    ev = _task().decode_eval(_sample(h=40, w=52))
    assert ev["image"].shape == (3, 40, 52)
    np.testing.assert_array_equal(ev["label"].numpy(), _label_of(_sample(h=40, w=52)))
    mean = torch.tensor(SegmentationOptions().mean).view(3, 1, 1)
    std = torch.tensor(SegmentationOptions().std).view(3, 1, 1)
    raw = np.asarray(Image.open(io.BytesIO(_sample(h=40, w=52)["png"])), dtype=np.float32) / 255
    torch.testing.assert_close(ev["image"], (torch.from_numpy(raw).permute(2, 0, 1) - mean) / std)
    # a label value >= num_classes (not the ignore value) names the sample and shard
    with pytest.raises(DataError, match=r"sample 'k9' of shard shard-000\.tar: label values \[5, 6\] outside") as e:
        _task().decode(_sample(key="k9", top=6))
    assert e.value.key == "k9" and e.value.url == "shard-000.tar"
    bad = _sample()
    del bad["seg.png"]
    with pytest.raises(DataError, match="no 'seg.png' label map"):
        _task().decode_eval(bad)


def test_collate_pads_eval_batches_and_eval_size_scores_at_label_resolution():
    task = _task()
    exs = [task.decode_eval(_sample(h=40, w=52)), task.decode_eval(_sample(h=33, w=60))]
    batch = task.collate(exs)
    assert batch["image"].shape == (2, 3, 40, 60) and batch["label"].shape == (2, 40, 60)
    assert batch["sizes"].tolist() == [[40, 52, 40, 52], [33, 60, 33, 60]]
    assert (batch["label"][0, :, 52:] == 255).all() and (batch["label"][1, 33:] == 255).all()
    torch.manual_seed(0)
    model = task.build_model().eval()
    out = task.eval_step(model, batch)
    labelled = sum(int((e["label"] != 255).sum()) for e in exs)
    assert int(out["cm"].sum()) == out["pixels"] == labelled
    # eval_size: the image is resized, the logits resized back: every labelled pixel is scored once
    small = _task(eval_size=24)
    ex = small.decode_eval(_sample(h=40, w=52))
    assert ex["image"].shape == (3, 24, 31) and ex["label"].shape == (40, 52)
    out = small.eval_step(model, small.collate([ex]))
    assert int(out["cm"].sum()) == int((ex["label"] != 255).sum())
    ev = small.evaluator()
    ev.process(None, out)
    assert set(ev.summarize()) >= {"mIoU", "pixel_acc", "mean_acc", "fwIoU", "loss", "pixels"}


def test_options_config_and_setup_errors(tmp_path):
    from mmoe.data import write_segfolder
    from mmoe.train.tasks import TaskContext, data_manifest

    with pytest.raises(ValueError, match=r"^scale_range: must be 0 < low <= high"):
        SegmentationOptions(scale_range=(2.0, 1.0))
    with pytest.raises(ConfigError, match=r"task_options\.hflip: must be a probability"):
        SemanticSegmentationTask.parse_options({"hflip": 2})
    with pytest.raises(ConfigError, match=r"task_options\.imgsize: unknown key"):
        SemanticSegmentationTask.parse_options({"imgsize": 2})
    with pytest.raises(ValueError, match=r"^num_classes: must be in \[1, 255\]"):
        SegmentationModelConfig(num_classes=300)
    with pytest.raises(ValueError, match=r"^upcycle: needs model.init"):
        SegmentationModelConfig(num_classes=3, upcycle=True)
    # against the training manifest
    imgs, labs = tmp_path / "i", tmp_path / "l"
    imgs.mkdir()
    labs.mkdir()
    lab = np.zeros((8, 8), np.uint8)
    lab[0, 0] = 6
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(imgs / "a.png")
    Image.fromarray(lab).save(labs / "a.png")
    write_segfolder(imgs, labs, tmp_path / "s", classes=["a", "b"])

    def ctx():
        return TaskContext(run_dir=tmp_path, train_data=str(tmp_path / "s"), train_manifest=data_manifest(tmp_path / "s"))

    with pytest.raises(ValueError, match=r"model.num_classes=5 but the shards in .* have 2 classes"):
        _task().setup(ctx())
    task = SemanticSegmentationTask(SegmentationModelConfig(num_classes=2), SegmentationOptions())
    with pytest.raises(ValueError, match=r"label maps in .* hold the values \[6\]"):
        task.setup(ctx())
    with pytest.raises(ValueError, match="task_options.ignore_index: 1 is a class index"):
        SemanticSegmentationTask(SegmentationModelConfig(num_classes=2), SegmentationOptions(ignore_index=1)).setup(
            TaskContext(run_dir=tmp_path))
    assert palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


# ------------------------------------------------------------------------------------------ the engine

STEPS = 30
CONFIG = """\
task: semantic_segmentation
model:
  num_classes: 5
  backbone: {{img_size: 64, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, window_size: 4, global_blocks: [1],
             drop_path_rate: 0.1, out_channels: 32, moe: {{num_experts: 4, top_k: 2, router_jitter: 0.05}}}}
  head_dim: 32
task_options: {{image_size: 64, scale_range: [0.75, 1.5], layer_decay: 0.8, per_class: true}}
data: {{train: {data}, train_split: train, val: {data}, val_split: val, batch_size: 4, shuffle_buffer: 50}}
optim: {{lr: 3.0e-3, warmup_steps: 3}}
train: {{max_steps: {steps}, log_every: 1, save_every: {save}, stats_every: 0, progress: false}}
run: {{dir: {run}, tensorboard: false}}
"""

# one process: the uninterrupted run, then a copy of it cut back to its middle checkpoint and resumed (the task
# is registered by importing its module: the engine looks in TASKS before the entry points)
SCRIPT = """
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import vision.detection.segtask  # noqa: F401
from mmoe.train.config import load_train_config
from mmoe.train.engine import Trainer
cfg_path, straight, resumed, half = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
out = {"straight": Trainer(load_train_config(cfg_path), config_source=cfg_path).fit()}
shutil.copytree(straight, resumed)
for ck in (resumed / "checkpoints").glob("step_*"):
    if int(ck.name.split("_")[1]) > half:
        shutil.rmtree(ck)
(resumed / "checkpoints" / "latest").unlink(missing_ok=True)
(resumed / "metrics.jsonl").unlink()  # the resumed run logs its own steps
cfg = load_train_config(cfg_path, [f"run.dir={resumed}"])
out["resumed"] = Trainer(cfg, config_source=cfg_path, resume=True).fit()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mmoe.data import write_segfolder
    from vision.detection_data import write_shapes_det

    tmp = tmp_path_factory.mktemp("semseg")
    write_shapes_det(tmp / "det", num_images=40, img_size=64)
    coco = tmp / "det" / "coco"
    write_segfolder(coco / "images", coco / "semantic", tmp / "seg", val_fraction=0.2, classes=CLASSES)
    cfg = tmp / "run.yaml"
    cfg.write_text(CONFIG.format(data=tmp / "seg", run=tmp / "straight", steps=STEPS, save=STEPS // 2))
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(cfg), str(tmp / "straight"),
                        str(tmp / "resumed"), str(STEPS // 2)], env=_env(), capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-5000:]
    return tmp, cfg, json.loads(p.stdout.strip().splitlines()[-1])


def _losses(run: Path) -> dict[int, float]:
    from mmoe.train.runlog import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def test_training_on_shapes_learns_and_reports_miou(trained):
    tmp, _, out = trained
    losses = _losses(tmp / "straight")
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < 0.6 * first, losses
    m = out["straight"]
    assert {"mIoU", "pixel_acc", "mean_acc", "fwIoU", "loss", "pixels", "IoU-background"} <= set(m)
    assert all(0 <= m[k] <= 100 for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"))
    assert m["pixel_acc"] > 60  # background alone is about 80% of the pixels
    assert set(k[4:] for k in m if k.startswith("IoU-")) <= set(CLASSES)
    meta = json.loads(next((tmp / "straight" / "checkpoints").glob(f"step_{STEPS:07d}/meta.json")).read_text())
    assert meta["task_state"]["classes"] == CLASSES


def test_resumed_run_is_exact(trained):
    from mmoe.train import checkpoint as ckpt_lib

    tmp, _, out = trained
    assert out["resumed"] == out["straight"]
    straight, resumed = _losses(tmp / "straight"), _losses(tmp / "resumed")
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
    assert resumed == {s: straight[s] for s in resumed}
    a = ckpt_lib.full_state_dict(tmp / "straight" / "checkpoints" / f"step_{STEPS:07d}")
    b = ckpt_lib.full_state_dict(tmp / "resumed" / "checkpoints" / f"step_{STEPS:07d}")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_predict_writes_colour_and_label_pngs(trained, tmp_path):
    from mmoe.train import checkpoint as ckpt_lib
    from mmoe.train.config import load_train_config
    from mmoe.train.configfile import from_dict

    tmp, cfg_path, _ = trained
    cfg = load_train_config(str(cfg_path))
    task = SemanticSegmentationTask(from_dict(SegmentationModelConfig, cfg.model, path="model"),
                                    SemanticSegmentationTask.parse_options(cfg.task_options))
    ck = ckpt_lib.find_latest(tmp / "straight" / "checkpoints")
    task.load_state_dict(ckpt_lib.read_meta(ck)["task_state"])
    model = task.build_model()
    ckpt_lib.load_model_state(model, ck)
    images = tmp / "det" / "coco" / "images"
    paths = [images / "000001.png", images / "000002.png", tmp_path / "sub" / "000001.png"]
    paths[2].parent.mkdir()
    paths[2].write_bytes(paths[0].read_bytes())  # the same stem twice
    res = task.predict(model, [str(p) for p in paths], tmp_path / "out")
    assert [r["image"] for r in res] == [str(p) for p in paths]
    assert [Path(r["output"]).name for r in res] == ["000001_seg.png", "000002_seg.png", "000001_1_seg.png"]
    assert model.training  # mode restored
    for r, p in zip(res, paths):
        seg, label = Image.open(r["output"]), Image.open(r["label_map"])
        assert seg.mode == "RGB" and label.mode == "L" and seg.size == label.size == (64, 64)
        lab = np.asarray(label)
        # the label map is the model's argmax on the evaluation input
        x = task.decode_eval({"png": p.read_bytes(), "seg.png": _png_zeros(64)})["image"]
        model.eval()
        with torch.no_grad():
            want = model(x[None])[0].argmax(0).numpy()
        model.train()
        np.testing.assert_array_equal(lab, want)
        assert set(r["classes_present"]) <= set(CLASSES)
        assert sum(r["classes_present"].values()) == pytest.approx(1.0)
        # background is black in the palette: blended half and half over the image
        img = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        bg = lab == 0
        if bg.any():
            np.testing.assert_array_equal(np.asarray(seg)[bg], np.round(0.5 * img[bg]).astype(np.uint8))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        task.predict(model, [str(tmp_path / "missing.png")], tmp_path / "out")


def _png_zeros(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
