"""``task: detection`` end to end: torchvision Mask R-CNN on the ViT-MoE pyramid, trained by the engine on the
generated shapes shards; AP above zero after a short run, exact resume, ``mmoe predict`` drawings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mmoe
from mmoe.errors import ConfigError
from vision.detection.backbone import BackboneConfig
from vision.detection.maskrcnn import DetectionModelConfig, build_maskrcnn
from vision.detection.tasks import DetectionOptions, DetectionTask

from tests.helpers import run_mmoe

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CONFIG = """\
task: detection
model:
  num_classes: 4
  backbone: {{img_size: 64, patch_size: 8, scale_factors: [2.0, 1.0, 0.5], embed_dim: 48, depth: 2, num_heads: 2,
             window_size: 4, global_blocks: [1], drop_path_rate: 0.0, out_channels: 32,
             moe: {{num_experts: 4, top_k: 2}}}}
  min_size: 64
  max_size: 64
  anchor_scale: 4.0
  head_dim: 32
  box_fc_dim: 128
  rpn_pre_nms_top_n_train: 300
  rpn_post_nms_top_n_train: 150
  rpn_pre_nms_top_n_test: 300
  rpn_post_nms_top_n_test: 150
  box_batch_size_per_image: 64
task_options: {{image_size: 64, scale_range: [0.8, 1.25], area_scale: 0.01, per_class: true}}
data: {{train: {data}, train_split: train, val: {data}, val_split: val, batch_size: 4, eval_batch_size: 8,
       shuffle_buffer: 50}}
optim: {{lr: 1.0e-3, weight_decay: 0.05, warmup_steps: 5, schedule: cosine}}
train: {{max_steps: {steps}, log_every: 1, eval_every: {steps}, save_every: {save}, stats_every: 10}}
run: {{dir: {run}, seed: 0}}
"""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from vision.detection_data import write_shapes_det

    out = tmp_path_factory.mktemp("shapes") / "det"
    write_shapes_det(out, num_images=80, img_size=64, seed=1, max_instances=4, scale_range=(0.12, 0.3),
                     samples_per_shard=8, progress=False)  # several shards per split: 2 ranks can share them
    return out


def write_config(tmp: Path, data: Path, name: str, steps: int, save: int | None = None) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(CONFIG.format(data=data, steps=steps, save=save or steps, run=tmp / name))
    return cfg


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detrun")
    cfg = write_config(tmp, shapes, "run", steps=120)
    p = run_mmoe(["train", str(cfg)], timeout=600)
    return tmp / "run", cfg, json.loads(p.stdout.strip().splitlines()[-1])


def test_short_detection_run_reaches_positive_ap(trained):
    from mmoe.train.runlog import read_jsonl

    run, _, final = trained
    assert final["step"] == 120
    assert final["val_bbox/AP"] > 0 and final["val_bbox/AP50"] > 0, final
    assert final["val_segm/AP"] > 0, final
    assert {"val_bbox/AP75", "val_bbox/APs", "val_bbox/APm", "val_segm/AP50"} <= set(final)
    assert {f"val_bbox/AP-{n}" for n in ("square", "circle", "triangle", "cross")} & set(final)  # per class
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    # every detection loss and the MoE aux loss are logged by name
    for key in ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"):
        assert all(key in r for r in rows), key
    assert any(k.startswith("aux") or "aux" in k for k in rows[-1]), sorted(rows[-1])
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < first
    meta = json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())
    assert [c["name"] for c in meta["task_state"]["categories"]] == ["square", "circle", "triangle", "cross"]


def test_resume_of_a_detection_run_is_exact(shapes, tmp_path):
    from mmoe.train.runlog import read_jsonl

    cfg = write_config(tmp_path, shapes, "straight", steps=8, save=4)
    run_mmoe(["train", str(cfg), "train.eval_every=0"])
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000008")
    (tmp_path / "resumed" / "checkpoints" / "latest").unlink(missing_ok=True)
    run_mmoe(["train", str(cfg), "--resume", f"run.dir={tmp_path / 'resumed'}", "train.eval_every=0"])
    la = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r}
    assert sorted(la) == list(range(1, 9)) and la == lb  # same augmentations, same data order, same RNG
    from mmoe.train.checkpoint import full_state_dict

    wa = full_state_dict(tmp_path / "straight" / "checkpoints" / "step_0000008")
    wb = full_state_dict(tmp_path / "resumed" / "checkpoints" / "step_0000008")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_predict_draws_the_detections(trained, shapes, tmp_path):
    from PIL import Image

    run, _, _ = trained
    image = next((shapes / "coco" / "images").glob("*.png"))
    out = tmp_path / "pred"
    p = run_mmoe(["predict", str(run), str(image), "--out", str(out), "--json"])
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    drawn = Path(rec["output"])
    assert drawn == out / f"{image.stem}_det.png" and drawn.is_file()
    with Image.open(drawn) as im, Image.open(image) as src:
        assert im.size == src.size
        assert im.convert("RGB").tobytes() != src.convert("RGB").tobytes() or not rec["detections"]
    for d in rec["detections"]:
        assert d["label"] in ("square", "circle", "triangle", "cross") and d["score"] >= 0.5 and len(d["box"]) == 4
    bad = run_mmoe(["predict", str(run), str(tmp_path / "missing.png")], check=False)
    assert bad.returncode == 2 and "missing.png" in bad.stderr


def _tiny_cfg(**kw) -> DetectionModelConfig:
    bb = BackboneConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                        global_blocks=[1], drop_path_rate=0.0, out_channels=16, moe={"num_experts": 4, "top_k": 2})
    return DetectionModelConfig(backbone=bb, num_classes=3, min_size=64, max_size=64, head_dim=16, box_fc_dim=32,
                                **kw)


def test_maskrcnn_heads_and_aux_loss_and_crowd_targets():
    torch.manual_seed(0)
    model = build_maskrcnn(_tiny_cfg())
    assert len(model.rpn.head.conv) == 2  # ViTDet's 2-conv RPN head
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.roi_heads.box_head.modules()) == 4
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.roi_heads.mask_head.modules()) == 4
    assert model.transform.size_divisible % model.backbone.size_divisibility == 0
    task = DetectionTask(_tiny_cfg(), DetectionOptions(image_size=64))
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 5:20, 5:30] = 1
    masks[1, 30:60, 30:60] = 1
    target = {"boxes": torch.tensor([[5.0, 5, 30, 20], [30, 30, 60, 60]]), "labels": torch.tensor([1, 2]),
              "masks": masks, "iscrowd": torch.tensor([0, 1])}
    kept = task.training_targets([target])[0]
    assert kept["labels"].tolist() == [1] and kept["masks"].shape == (1, 64, 64)  # the crowd box never trains
    model.train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
             "iscrowd": torch.zeros(0, dtype=torch.long)}
    loss, scalars, n = task.loss(model, ([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [target, empty]))
    aux = mmoe.aux_loss(model)
    assert n == 2 and torch.isfinite(loss) and float(aux.detach()) > 0  # the MoE layers ran and recorded their aux loss
    assert set(scalars) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    (loss + aux).backward()
    experts = [p for n_, p in model.named_parameters() if ".experts." in n_]
    assert experts and all(p.grad is not None for p in experts)


def test_config_errors_name_the_key(tmp_path):
    from mmoe.train.configfile import from_dict

    with pytest.raises(ConfigError, match="model.backbone.moe.top_k"):
        from_dict(DetectionModelConfig, {"backbone": {"moe": {"num_experts": 2, "top_k": 4}}}, path="model")
    with pytest.raises(ConfigError, match="task_options.scale_range"):
        DetectionTask.parse_options({"scale_range": [2.0, 1.0]})
    with pytest.raises(ConfigError, match="task_options.iou_types"):
        DetectionTask.parse_options({"iou_types": ["keypoints"]})
    from mmoe.train.tasks import TaskContext

    class Manifest:
        info = {"categories": [{"id": 1, "name": "a"}]}

    task = DetectionTask(_tiny_cfg(), DetectionOptions(image_size=64))
    with pytest.raises(ValueError, match="num_classes=3 but the shards .* have 1 categories"):
        task.setup(TaskContext(run_dir=tmp_path, train_data="x", train_manifest=Manifest()))


@pytest.mark.distributed
def test_evaluation_on_two_ranks_gathers_the_whole_split(trained):
    """COCOeval over both ranks' halves of the validation split equals the one-process evaluation."""
    run, cfg, _ = trained
    ck = run / "checkpoints"
    one = json.loads(run_mmoe(["eval", str(cfg), "--checkpoint", str(ck)]).stdout.strip().splitlines()[-1])
    two = run_mmoe(["eval", str(cfg), "--checkpoint", str(ck), "dist.ep_size=2"], world=2, timeout=400)
    two = json.loads([line for line in two.stdout.strip().splitlines() if line.startswith("{")][-1])
    assert one["bbox/AP"] > 0
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP75"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
