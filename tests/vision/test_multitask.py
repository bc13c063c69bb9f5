"""``task: multitask_vision`` (AdaMV-MoE): task ids reach every MoE layer, the per-task loss and aux sums, the loss
ratio, the adaptive expert count acting on the next forward, exact resume across a k change, initialisation from a
classification ViT-MoE, and a whole run through ``mmoe train`` / ``mmoe eval``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmoe
from mmoe.data import MultiBatch
from mmoe.errors import ConfigError
from mmoe.layer import moe_layers, routing_stats
from mmoe.train.tasks import TaskContext
from vision.detection.backbone import BackboneConfig, ViTDetMoE
from vision.multitask import MultiTaskModelConfig, MultiTaskOptions, MultiTaskViTMoE, MultiTaskVisionTask

from tests.helpers import _env, run_mmoe

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]

BACKBONE = dict(img_size=64, patch_size=8, scale_factors=[2.0, 1.0, 0.5], embed_dim=32, depth=2, num_heads=2,
                window_size=4, global_blocks=[1], drop_path_rate=0.0, out_channels=16, moe_layers=[0, 1],
                moe={"num_experts": 4, "top_k": 1})
HEADS = dict(min_size=64, max_size=64, anchor_scale=4.0, head_dim=16, box_fc_dim=32, rpn_pre_nms_top_n_train=100,
             rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
             box_batch_size_per_image=32)

CONFIG = """\
task: multitask_vision
model:
  num_classes: 4
  cls_num_classes: 4
  routers: {routers}
  backbone: {backbone}
  {heads}
task_options:
  cls_image_size: 32
  det: {{image_size: 64, scale_range: [0.8, 1.2], area_scale: 0.01}}
  adaptive: {{enabled: {adaptive}, check_every: 2, patience: 1, initial_k: 1, max_k: 3, val_batches: 1,
             initial_best_loss: .inf, initial_best_step: 0}}
data:
  mix: all
  sources:
    - {{path: {cls}, split: train, task: cls, batch_size: 8}}
    - {{path: {det}, split: train, task: det, batch_size: 2}}
  val_sources:
    - {{path: {cls}, split: val, task: cls, batch_size: 16}}
    - {{path: {det}, split: val, task: det, batch_size: 4}}
  shuffle_buffer: 20
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{max_steps: {steps}, log_every: 1, eval_every: 0, save_every: {save}, stats_every: 4, progress: false}}
run: {{dir: {run}, seed: 0, tensorboard: false}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from vision.detection_data import write_shapes_cls, write_shapes_det

    tmp = tmp_path_factory.mktemp("mtdata")
    # several shards per split, so that two ranks can share them
    write_shapes_cls(tmp / "cls", num_images=120, img_size=32, samples_per_shard=24, progress=False)
    write_shapes_det(tmp / "det", num_images=40, img_size=64, max_instances=3, scale_range=(0.15, 0.3),
                     samples_per_shard=4, progress=False)
    return {"cls": tmp / "cls", "det": tmp / "det"}


def write_config(tmp: Path, data: dict, name: str, *, steps: int = 8, save: int | None = None,
                 routers: str = "task", adaptive: bool = True) -> Path:
    heads = "\n  ".join(f"{k}: {v}" for k, v in HEADS.items())
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(CONFIG.format(routers=routers, backbone=json.dumps(BACKBONE), heads=heads,
                                 adaptive=str(adaptive).lower(), cls=data["cls"], det=data["det"], steps=steps,
                                 save=save or steps, run=tmp / name))
    return cfg


def model_cfg(**kw) -> MultiTaskModelConfig:
    return MultiTaskModelConfig(backbone=BackboneConfig(**{**BACKBONE, **kw.pop("backbone", {})}),
                                **{"num_classes": 4, "cls_num_classes": 4, **HEADS, **kw})


def _targets(n: int, size: int = 64) -> list[dict]:
    out = []
    for i in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 4:30, 6:28] = 1
        masks[1, 30:60, 34:62] = 1
        boxes = torch.tensor([[6.0, 4.0, 28.0, 30.0], [34.0, 30.0, 62.0, 60.0]])
        out.append({"boxes": boxes, "labels": torch.tensor([1 + i % 4, 2]), "masks": masks,
                    "iscrowd": torch.zeros(2, dtype=torch.long)})
    return out


# ------------------------------------------------------------------------------------------ routing per task
def test_mixed_task_ids_equal_each_task_alone_with_its_router_and_embeddings():
    """One forward over images of both tasks (a task id per image) equals each task's images alone, through
    every MoE layer's router of that task and that task's patch + position embedding."""
    torch.manual_seed(0)
    net = ViTDetMoE(BackboneConfig(**{**BACKBONE, "moe": {"num_experts": 4, "top_k": 2, "num_tasks": 2}},
                                   task_embeddings=2)).eval()
    x = torch.randn(4, 3, 32, 32)
    task = torch.tensor([0, 1, 1, 0])
    mixed = net(x, task)["last_feat"]
    alone0 = net(x[[0, 3]], 0)["last_feat"]
    alone1 = net(x[[1, 2]], 1)["last_feat"]
    torch.testing.assert_close(mixed[[0, 3]], alone0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[[1, 2]], alone1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(net(x[[1, 2]], 0)["last_feat"], alone1, atol=1e-4)  # task 1's parts matter
    with pytest.raises(ValueError, match="task_embeddings"):
        net(x, 2)


def _single_router_copy(mt: MultiTaskViTMoE, task_id: int) -> MultiTaskViTMoE:
    """A one-router model with ``mt``'s weights and task ``task_id``'s router as its only one."""
    ref = MultiTaskViTMoE(model_cfg(routers="shared"))
    state = {}
    for k, v in mt.state_dict().items():
        if ".routers." in k:
            head, _, rest = k.partition(".routers.")
            idx, _, tail = rest.partition(".")
            if int(idx) == task_id:
                state[f"{head}.routers.0.{tail}"] = v
        elif k.endswith("task_top_k"):
            state[k] = v[task_id:task_id + 1]
        else:
            state[k] = v
    ref.load_state_dict(state)
    return ref


def test_each_task_uses_its_own_router_in_every_moe_layer():
    """The multi-task model's classification output equals a one-router model holding the cls routers, its
    detection features and losses one holding the det routers; the other task's routers give other outputs."""
    torch.manual_seed(1)
    mt = MultiTaskViTMoE(model_cfg())
    assert [m.cfg.num_tasks for _, m in moe_layers(mt)] == [2, 2]
    for _, m in moe_layers(mt):  # distinct routers, so that a mix-up shows
        torch.nn.init.normal_(m.routers[1].weight, std=1.0)
    cls_ref, det_ref = _single_router_copy(mt, 0), _single_router_copy(mt, 1)
    mt.eval(), cls_ref.eval(), det_ref.eval()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(mt("cls", x), cls_ref("cls", x))
    assert not torch.allclose(mt("cls", x), det_ref("cls", x), atol=1e-4)
    images = torch.rand(2, 3, 64, 64)
    mt.det.backbone.task = 1
    feats = mt.det.backbone(images)
    mt.det.backbone.task = None
    ref_feats = det_ref.det.backbone(images)
    for k in feats:
        torch.testing.assert_close(feats[k], ref_feats[k])
    assert not torch.allclose(mt.det.backbone(images, 0)["p3"], feats["p3"], atol=1e-4)
    mt.train(), det_ref.train()
    torch.manual_seed(5)
    a = mt("det", list(images), _targets(2))
    torch.manual_seed(5)
    b = det_ref("det", list(images), _targets(2))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert mt.det.backbone.task is None  # restored after the detection forward


# ------------------------------------------------------------------------------------------ loss
def _task(options: MultiTaskOptions | None = None, **model_kw) -> tuple[MultiTaskVisionTask, MultiTaskViTMoE]:
    from mmoe.train.config import DataSource, OptimConfig

    task = MultiTaskVisionTask(model_cfg(**model_kw), options)
    ctx = TaskContext(run_dir=Path("."), sources=((DataSource("c", task="cls"), None), (DataSource("d", task="det"), None)),
                      val_sources=((DataSource("c", task="cls"), None), (DataSource("d", task="det"), None)),
                      mix="all", max_steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine"))
    task.setup(ctx)
    model = task.build_model()
    task.model_ready(model)
    return task, model


def test_loss_is_r_times_det_plus_aux_det_plus_cls_plus_aux_cls():
    torch.manual_seed(2)
    opts = MultiTaskOptions(loss_ratio=2.5)
    task, model = _task(opts, backbone={"moe": {"num_experts": 4, "top_k": 1, "aux_loss_weight": 0.5}})
    model.train()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    images = torch.rand(2, 3, 64, 64)
    batch = MultiBatch({"cls": (x, y), "det": (images, _targets(2))})
    torch.manual_seed(7)
    total, scalars, units = task.loss(model, batch)
    assert units == 6
    assert mmoe.aux_loss(model).item() == 0  # the task collected every aux term itself
    # recompute each part separately under the same random draws
    torch.manual_seed(7)
    cls_loss = torch.nn.functional.cross_entropy(model("cls", x), y)
    aux_cls = mmoe.aux_loss(model).detach()
    det_losses = model("det", list(images), [{k: t[k] for k in ("boxes", "labels", "masks")} for t in _targets(2)])
    det_loss = sum(det_losses.values())
    aux_det = mmoe.aux_loss(model).detach()
    assert aux_cls > 0 and aux_det > 0
    want = 2.5 * (det_loss + aux_det) + (cls_loss + aux_cls)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    assert scalars["aux/cls"] == pytest.approx(float(aux_cls), rel=1e-5)
    assert scalars["aux/det"] == pytest.approx(float(aux_det), rel=1e-5)
    assert scalars["aux_loss"] == pytest.approx(float(aux_cls + aux_det), rel=1e-5)
    assert scalars["loss_ratio"] == 2.5 and scalars["cls/loss"] == pytest.approx(float(cls_loss.detach()), rel=1e-5)
    # per-task routing statistics: each task's own forward, and its aux equals the layers' per-task terms
    groups = task.routing_groups(model)
    assert set(groups) == {"cls", "det"}
    cls_rows = sum(s.num_rows for s in groups["cls"].values())
    assert cls_rows == 2 * 4 * 16  # two MoE layers x 4 images x 16 tokens of 32 px at patch 8
    assert sum(sum(s.aux.values()) for s in groups["cls"].values()) == pytest.approx(float(aux_cls), rel=1e-5)
    assert sum(sum(s.aux.values()) for s in groups["det"].values()) == pytest.approx(float(aux_det), rel=1e-5)
    total.backward()
    for _, m in moe_layers(model):  # both tasks' routers got gradients from their own forward
        assert m.routers[0].weight.grad.abs().sum() > 0 and m.routers[1].weight.grad.abs().sum() > 0


def test_loss_ratio_follows_the_two_lr_schedules():
    from mmoe.train.config import OptimConfig
    from mmoe.train.optim import lr_lambda

    task, _ = _task(MultiTaskOptions(det_lr=4e-3, det_warmup_steps=40, det_schedule="linear"))
    cls_f = lr_lambda(OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine"), 100)
    det_f = lr_lambda(OptimConfig(lr=4e-3, warmup_steps=40, schedule="linear"), 100)
    for step in (0, 5, 20, 60, 99):
        assert task.loss_ratio(step) == pytest.approx(4e-3 * det_f(step) / (1e-3 * cls_f(step)))
    assert task.loss_ratio(0) != task.loss_ratio(60)
    fixed, _ = _task(MultiTaskOptions(loss_ratio=0.7))
    assert fixed.loss_ratio(0) == fixed.loss_ratio(50) == 0.7


# ------------------------------------------------------------------------------------------ adaptive k
def test_scripted_validation_losses_change_k_in_every_layer_at_once(monkeypatch):
    from vision.multitask import AdaptiveOptions

    opts = MultiTaskOptions(adaptive=AdaptiveOptions(enabled=True, check_every=2, patience=1, initial_k=1, max_k=3,
                                                     initial_best_loss=math.inf, initial_best_step=0))
    task, model = _task(opts)
    trace = {2: {"cls": 1.0, "det": 1.0}, 4: {"cls": 2.0, "det": 0.5}, 6: {"cls": 0.9, "det": 0.6},
             8: {"cls": 1.0, "det": 0.7}}
    monkeypatch.setattr(task, "validation_losses", lambda m: trace[task._step])
    x = torch.rand(2, 3, 32, 32)
    model.eval()

    def used_k() -> int:
        model("cls", x)
        st = routing_stats(model)
        ks = {int(s.tokens_per_expert.sum()) // s.num_rows for s in st.values()}
        assert len(ks) == 1  # every layer routes with the same k
        return ks.pop()

    assert used_k() == 1 and task.current_k() == {"cls": 1, "det": 1}
    for step in range(1, 9):
        task.after_step(model, step)
        if step == 4:  # cls plateaued for more than `patience` steps: one more expert, used at once
            assert task.current_k() == {"cls": 2, "det": 1} and used_k() == 2
        if step == 6:  # det plateaued
            assert task.current_k() == {"cls": 2, "det": 2}
        if step == 8:  # cls again without a new best right after a change: the revert, then frozen
            assert task.current_k() == {"cls": 1, "det": 2} and used_k() == 1
    assert task.controller.stopped
    assert [[s, dict(k)] for s, k in task.k_trace] == [
        [0, {"cls": 1, "det": 1}], [2, {"cls": 1, "det": 1}], [4, {"cls": 2, "det": 1}], [6, {"cls": 2, "det": 2}],
        [8, {"cls": 1, "det": 2}]]
    for _, m in moe_layers(model):
        assert m.top_k(0) == 1 and m.top_k(1) == 2
    # the state restores the k's into a fresh model
    fresh_task, fresh = _task(opts)
    fresh_task.load_state_dict(json.loads(json.dumps(task.state_dict())))
    assert fresh_task.current_k() == {"cls": 1, "det": 2} and fresh_task.controller.stopped


RESUME = """
import json, shutil, sys
from pathlib import Path
import vision.multitask as vm
from mmoe.train.config import load_train_config
from mmoe.train.engine import Trainer

TRACE = {2: {"cls": 1.0, "det": 1.0}, 4: {"cls": 2.0, "det": 0.5}, 6: {"cls": 0.9, "det": 0.6},
         8: {"cls": 1.0, "det": 0.7}}
real = []
original = vm.MultiTaskVisionTask.validation_losses

def scripted(self, model):
    real.append([self._step, original(self, model)])  # the real losses: the validation iterators' positions
    return TRACE[self._step]

vm.MultiTaskVisionTask.validation_losses = scripted
cfg_path, straight, resumed = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
out = {}
t = Trainer(load_train_config(cfg_path), config_source=cfg_path)
t.fit()
out["straight"] = {"k": t.task.current_k(), "real": list(real), "history": t.task.controller.state_dict()["history"]}
shutil.copytree(straight, resumed)
shutil.rmtree(resumed / "checkpoints" / "step_0000008")
(resumed / "checkpoints" / "latest").unlink(missing_ok=True)
(resumed / "metrics.jsonl").unlink()
real.clear()
t = Trainer(load_train_config(cfg_path, [f"run.dir={resumed}"]), config_source=cfg_path, resume=True)
assert t.task.current_k() == {"cls": 2, "det": 1}, t.task.current_k()  # restored with the checkpoint of step 4
t.fit()
out["resumed"] = {"k": t.task.current_k(), "real": list(real), "history": t.task.controller.state_dict()["history"]}
print(json.dumps(out))
"""


def test_resume_across_a_k_change_is_exact(data, tmp_path):
    from mmoe.train.runlog import read_jsonl

    cfg = write_config(tmp_path, data, "straight", steps=8, save=4)
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    p = subprocess.run([sys.executable, str(script), str(cfg), str(tmp_path / "straight"), str(tmp_path / "resumed")],
                       env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    a, b = out["straight"], out["resumed"]
    assert a["k"] == b["k"] == {"cls": 1, "det": 2}
    assert a["history"] == b["history"] and len(a["history"]) == 3
    # the checks after the resume saw the same validation batches (the iterators' positions were restored)
    assert [s for s, _ in a["real"]] == [2, 4, 6, 8] and b["real"] == a["real"][2:]
    la = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r}
    assert sorted(lb) == [5, 6, 7, 8] and all(lb[s] == la[s] for s in lb)
    from mmoe.train.checkpoint import full_state_dict

    wa = full_state_dict(tmp_path / "straight" / "checkpoints" / "step_0000008")
    wb = full_state_dict(tmp_path / "resumed" / "checkpoints" / "step_0000008")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    events = [e for e in read_jsonl(tmp_path / "straight" / "events.jsonl") if e["kind"] == "top_k"]
    assert [(e["step"], e["task"], e["old_k"], e["new_k"], e["reason"]) for e in events] == [
        (4, "cls", 1, 2, "grow"), (6, "det", 1, 2, "grow"), (8, "cls", 2, 1, "revert")]
    rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "adaptive/k/cls" in r]
    assert [(r["step"], r["adaptive/k/cls"], r["adaptive/k/det"]) for r in rows] == [
        (2, 1, 1), (4, 2, 1), (6, 2, 2), (8, 1, 2)]
    assert (tmp_path / "straight" / "plots" / "top_k.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ initialisation
def test_init_from_a_classification_vit_moe_gives_its_router_to_the_cls_task(tmp_path):
    import timm
    from safetensors.torch import save_file

    import vision.models  # noqa: F401 - registers vit_moe_* in timm

    torch.manual_seed(3)
    clf = timm.create_model("vit_moe_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=4, moe_layers=[0, 1], moe={"num_experts": 4, "top_k": 1})
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp_path / "clf.safetensors"))
    theirs = clf.state_dict()
    torch.manual_seed(4)
    fresh = MultiTaskViTMoE(model_cfg(task_embeddings=True))
    torch.manual_seed(4)
    mt = MultiTaskViTMoE(model_cfg(task_embeddings=True, init=str(tmp_path / "clf.safetensors")))
    net = mt.net.state_dict()
    for i in (0, 1):
        torch.testing.assert_close(net[f"blocks.{i}.mlp.routers.0.weight"], theirs[f"blocks.{i}.mlp.routers.0.weight"])
        torch.testing.assert_close(net[f"blocks.{i}.mlp.experts.w1"], theirs[f"blocks.{i}.mlp.experts.w1"])
        # the detection router starts fresh (as in a model built without init)
        torch.testing.assert_close(net[f"blocks.{i}.mlp.routers.1.weight"],
                                   fresh.net.state_dict()[f"blocks.{i}.mlp.routers.1.weight"])
        assert net[f"blocks.{i}.mlp.task_top_k"].tolist() == [1, 1]
    # both tasks' embeddings start from the file's
    torch.testing.assert_close(net["task_patch_embeds.0.proj.weight"], net["patch_embed.proj.weight"])
    torch.testing.assert_close(net["patch_embed.proj.weight"], theirs["patch_embed.proj.weight"])
    torch.testing.assert_close(net["task_pos_embeds.0"], net["pos_embed"])
    assert any(k.endswith("routers.1.weight") for k in mt.init_report["fresh"])


# ------------------------------------------------------------------------------------------ the whole run
def test_a_short_run_trains_both_tasks_and_evaluates_each(data, tmp_path):
    from mmoe.train.runlog import read_jsonl

    cfg = write_config(tmp_path, data, "run", steps=12, save=12)
    p = run_mmoe(["train", str(cfg), "train.eval_every=12"], timeout=400)
    final = json.loads(p.stdout.strip().splitlines()[-1])
    run = tmp_path / "run"
    assert {"val_cls/top1", "val_cls/loss", "val_bbox/AP", "val_segm/AP", "val_k/cls", "val_k/det",
            "val_active_M/cls", "val_active_M/det"} <= set(final), sorted(final)
    assert 0 <= final["val_cls/top1"] <= 100 and final["val_k/cls"] >= 1
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    for key in ("cls/loss", "cls/acc", "det/loss_classifier", "det/loss_mask", "aux/cls", "aux/det", "loss_ratio"):
        assert all(key in r for r in rows), key
    assert all(r["aux_loss"] == pytest.approx(r["aux/cls"] + r["aux/det"], rel=1e-6, abs=1e-9) for r in rows)
    assert sum(1 for r in read_jsonl(run / "metrics.jsonl") if "adaptive/val_loss/cls" in r) == 6
    tags = {r.get("tag") for r in read_jsonl(run / "routing.jsonl")}
    assert tags == {"cls", "det"}
    plots = {q.name for q in (run / "plots").iterdir()}
    assert {"expert_load_cls_step0000004.png", "expert_load_det_step0000004.png", "top_k.png"} <= plots
    # `mmoe eval` of the checkpoint: the same per-task metrics, with the run's final k's
    ev = run_mmoe(["eval", str(cfg), "--checkpoint", str(run / "checkpoints" / "step_0000012")])
    again = json.loads(ev.stdout.strip().splitlines()[-1])
    assert again["cls/top1"] == pytest.approx(final["val_cls/top1"])
    assert again["bbox/AP"] == pytest.approx(final["val_bbox/AP"])
    assert again["k/cls"] == final["val_k/cls"] and again["k/det"] == final["val_k/det"]
    # `mmoe predict`: the detections drawn and the classification head's classes
    image = next((data["det"] / "coco" / "images").glob("*.png"))
    pred = run_mmoe(["predict", str(run), str(image), "--out", str(tmp_path / "pred"), "--json"])
    rec = json.loads(pred.stdout.strip().splitlines()[-1])
    assert Path(rec["output"]).is_file()
    assert [c["label"] for c in rec["classes"]][:1] and {c["label"] for c in rec["classes"]} <= {
        "square", "circle", "triangle", "cross"}
    assert rec["classes"] == sorted(rec["classes"], key=lambda c: -c["score"])


def test_a_single_task_source_trains_only_that_task(data, tmp_path):
    cfg = write_config(tmp_path, data, "cls_only", steps=3, adaptive=False)
    p = run_mmoe(["train", str(cfg), "train.eval_every=3",
                  f"data.sources=[{{path: {data['cls']}, split: train, task: cls, batch_size: 8}}]",
                  f"data.val_sources=[{{path: {data['cls']}, split: val, task: cls}}]"])
    final = json.loads(p.stdout.strip().splitlines()[-1])
    assert "val_cls/top1" in final and not any(k.startswith("val_bbox") for k in final)
    assert "val_k/det" not in final


def test_layout_mistakes_are_one_line_errors(data, tmp_path):
    cfg = write_config(tmp_path, data, "bad", steps=2)
    cases = [
        (["data.mix=weighted"], "data.mix: multitask_vision takes one batch of every task"),
        (["model.routers=shared"], "adaptive.enabled: the adaptive expert count needs task routers"),
        ([f"data.sources=[{{path: {data['cls']}, task: cls, weight: 2}}]"],
         "data.sources[0].weight: unused with data.mix: all"),
        ([f"data.sources=[{{path: {data['cls']}, task: cls}}, {{path: {data['det']}, task: seg}}]"],
         "data.sources: task labels ['seg']"),
        (["model.routers=private"], "model.routers: must be 'task' or 'shared'"),
        ([f"data.val={data['cls']}"], "data.val_sources: give data.val or data.val_sources"),
    ]
    for overrides, message in cases:
        p = run_mmoe(["train", str(cfg), *overrides], check=False)
        assert p.returncode != 0, overrides
        err = p.stderr.strip().splitlines()
        assert message in p.stderr, (overrides, p.stderr[-1500:])
        assert not any(line.startswith("Traceback") for line in err), p.stderr[-1500:]


def test_model_config_checks():
    with pytest.raises(ValueError, match="backbone.moe.num_tasks"):
        model_cfg(backbone={"moe": {"num_experts": 4, "top_k": 1, "num_tasks": 2}})
    with pytest.raises(ValueError, match="cls_num_classes"):
        model_cfg(cls_num_classes=0)
    with pytest.raises(ConfigError, match="adaptive.check_every"):
        MultiTaskVisionTask.parse_options({"adaptive": {"check_every": 0}})


@pytest.mark.distributed
def test_two_ranks_with_expert_parallelism_train_evaluate_and_adapt_together(data, tmp_path):
    """Two CPU ranks, experts split between them (all-to-all in every MoE layer of both task streams): the
    per-task evaluation gathers both ranks' shares, and the validation losses are averaged over the ranks so
    that both take the same top-k decisions (a divergent k would hang the all-to-all)."""
    from mmoe.train.runlog import read_jsonl

    cfg = write_config(tmp_path, data, "ep", steps=6)
    one = tmp_path / "one_shard"
    from vision.detection_data import write_shapes_cls

    write_shapes_cls(one, num_images=20, img_size=32, val_fraction=0.0, progress=False)
    bad = run_mmoe(["train", str(cfg), f"data.sources=[{{path: {one}, task: cls}}, {{path: {data['det']}, split: "
                                       "train, task: det}]"], world=2, check=False)
    assert bad.returncode != 0 and "data.sources[0] (" in bad.stderr and "cannot be split over 2 rank" in bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr[-2000:]
    val = (f"data.val_sources=[{{path: {data['cls']}, split: val, task: cls, batch_size: 2}}, "
           f"{{path: {data['det']}, split: val, task: det, batch_size: 2}}]")  # each rank holds a few val images
    p = run_mmoe(["train", str(cfg), "dist.ep_size=2", "train.eval_every=6", val], world=2, timeout=400)
    final = json.loads([line for line in p.stdout.strip().splitlines() if line.startswith('{"step"')][-1])
    assert {"val_cls/top1", "val_bbox/AP", "val_k/cls", "val_k/det"} <= set(final)
    meta = json.loads((tmp_path / "ep" / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["ep_size"] == 2
    checks = [r for r in read_jsonl(tmp_path / "ep" / "metrics.jsonl") if "adaptive/k/cls" in r]
    assert [r["step"] for r in checks] == [2, 4, 6]
    assert meta["task_state"]["adaptive"]["k"] == {"cls": final["val_k/cls"], "det": final["val_k/det"]}
