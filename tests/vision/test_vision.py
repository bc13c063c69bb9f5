"""vision: ViT-MoE in timm's registry, sparse upcycling, image classification through the engine,
``mmoe predict`` and ``mmoe demo``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import mmoe
import vision
import vision.models  # noqa: F401 - registers the vit_moe_* models in timm
from vision.models import VisionTransformerMoE, moe_block_indices
from vision.tasks import ImageClassificationTask, WeightEMA, layer_lr_scales

from tests.helpers import run_mmoe  # noqa: E402 - tests/helpers.py

SMALL = dict(img_size=32, patch_size=8, num_classes=7)


def tiny_moe(**kw):
    args = dict(SMALL, embed_dim=32, depth=4, num_heads=2, num_experts=4)
    args.update(kw)
    return timm.create_model("vit_moe_tiny_patch16_224", **args)


# ------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("size,width,heads", [("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)])
def test_registered_sizes_build_and_run(size, width, heads):
    name = f"vit_moe_{size}_patch16_224"
    assert name in timm.list_models("vit_moe_*")
    m = timm.create_model(name, img_size=32, num_experts=2, num_classes=5)
    assert isinstance(m, VisionTransformerMoE)
    assert m.embed_dim == width and m.blocks[0].attn.num_heads == heads and len(m.blocks) == 12
    assert m.moe_layers == [1, 3, 5, 7, 9, 11]  # V-MoE "every 2"
    for i, blk in enumerate(m.blocks):
        assert isinstance(blk.mlp, mmoe.MoE) == (i in m.moe_layers)
    assert m.moe_config.hidden == 4 * width
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    assert float(mmoe.aux_loss(m)) > 0


OPTIONS = [
    dict(router="softmax", normalize_topk=True),
    dict(router="xmoe", xmoe_dim=8),
    dict(router="sparsemixer", top_k=1),
    dict(router="expert_choice", capacity_factor=1.0),
    dict(heads=2, dense_backprop="default"),
    dict(dense_backprop="expert_group"),
    dict(dense_backprop="dense_oracle"),
    dict(capacity_factor=1.25, batch_prioritized=True, eval_capacity_factor=2.0),
    dict(activation="swiglu", shared_experts=1),
    dict(score_func="sigmoid", balance_bias_rate=0.01, z_loss_weight=1e-3),
    dict(router_noise_std=0.25, balance_loss="vmoe"),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_moe_option_is_reachable(opts):
    m = tiny_moe(**opts)  # flat keywords
    m2 = tiny_moe(moe=dict(opts))  # or collected in moe=
    for key, value in opts.items():
        assert getattr(m.moe_config, key) == value and getattr(m2.moe_config, key) == value
    for i in m.moe_layers:
        assert m.blocks[i].mlp.cfg is m.moe_config
    x = torch.randn(4, 3, 32, 32)
    loss = m(x).logsumexp(-1).mean() + mmoe.aux_loss(m)
    loss.backward()
    routers = [p for n, p in m.named_parameters() if ".routers." in n]
    assert routers and all(p.grad is not None and torch.isfinite(p.grad).all() for p in routers)
    assert any(float(p.grad.abs().sum()) > 0 for p in routers)
    stats = mmoe.routing_stats(m)
    assert len(stats) == len(m.moe_layers)


def test_placement_and_errors():
    assert moe_block_indices("every_2", 12) == [1, 3, 5, 7, 9, 11]
    assert moe_block_indices("last_2", 12) == [9, 11]
    assert moe_block_indices("every_3", 12) == [2, 5, 8, 11]
    assert moe_block_indices([0, 2], 4) == [0, 2]
    assert moe_block_indices("all", 4) == [0, 1, 2, 3] and moe_block_indices("none", 4) == []
    assert tiny_moe(moe_layers="last_1").moe_layers == [3]
    with pytest.raises(ValueError, match="moe_layers"):
        moe_block_indices([5], 4)
    with pytest.raises(ValueError, match="moe_layers"):
        moe_block_indices("sometimes", 4)
    with pytest.raises(ValueError, match="moe.top_k"):
        tiny_moe(top_k=9)
    with pytest.raises(ValueError, match="heads"):
        tiny_moe(heads=3)  # 32 is not divisible by 3
    with pytest.raises(ValueError, match="routr"):
        tiny_moe(moe=dict(routr="xmoe"))  # unknown field named


def test_timm_checkpoint_round_trip(tmp_path):
    m = tiny_moe(heads=2, dense_backprop="default").eval()
    m.train()
    m(torch.randn(4, 3, 32, 32))  # fills the Default-MoE EMA buffers: they must travel too
    m.eval()
    f = tmp_path / "vit_moe.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(f))
    args = dict(SMALL, embed_dim=32, depth=4, num_heads=2, num_experts=4, heads=2, dense_backprop="default")
    m2 = timm.create_model("vit_moe_tiny_patch16_224", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(f), num_classes=7), **args).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    m3 = timm.create_model("vit_moe_tiny_patch16_224", **args).eval()
    timm.models.load_checkpoint(m3, str(f))
    torch.testing.assert_close(m3(x), m(x), rtol=0, atol=0)
    ema = [n for n, _ in m.named_buffers() if "default" in n]
    assert ema and all(torch.equal(dict(m3.named_buffers())[n], dict(m.named_buffers())[n]) for n in ema)


# ------------------------------------------------------------------------------------------ upcycling


def dense_vit(**kw):
    args = dict(SMALL, embed_dim=32, depth=4, num_heads=2)
    args.update(kw)
    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", **args)
    with torch.no_grad():  # non-zero biases so that copying them is checked
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("router", ["softmax", "xmoe"])
def test_upcycled_model_equals_dense_at_step0(router):
    dense = dense_vit()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    up = vision.upcycle_vit(dense, num_experts=4, top_k=2, router=router)
    assert isinstance(up, VisionTransformerMoE) and up.moe_layers == [1, 3]
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # dense untouched
    x = torch.randn(5, 3, 32, 32)
    for mode in ("eval", "train"):
        getattr(dense, mode)()
        getattr(up, mode)()
        torch.testing.assert_close(up(x), dense(x), rtol=1e-5, atol=1e-5)
    ex = up.blocks[1].mlp.experts
    for e in range(4):
        assert torch.equal(ex.w1[e], dense.blocks[1].mlp.fc1.weight.t())
        assert torch.equal(ex.b2[e], dense.blocks[1].mlp.fc2.bias)
    # raw (not renormalised) top-k weights scale the MLP branch: step-0 equality is lost, as documented
    raw = vision.upcycle_vit(dense, num_experts=4, top_k=2, normalize_topk=False).eval()
    dense.eval()
    assert (raw(x) - dense(x)).abs().max() > 1e-3
    # the upcycled model trains: the router gets a gradient
    up.train()
    (up(x).logsumexp(-1).mean() + mmoe.aux_loss(up)).backward()
    grads = [p.grad for p in up.blocks[1].mlp.routers.parameters()]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_upcycle_from_local_checkpoint_with_remapping_and_resizing(tmp_path):
    dense = dense_vit().eval()
    # a training-script checkpoint: wrapped in "state_dict", DataParallel "module." prefixes
    f = tmp_path / "dense.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in dense.state_dict().items()}, "epoch": 3}, f)
    up = vision.upcycle_vit(f, model_name="vit_tiny_patch16_224", num_experts=4,
                            model_kwargs=dict(SMALL, embed_dim=32, depth=4, num_heads=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(up(x), dense(x), rtol=1e-5, atol=1e-5)
    # at another resolution the position embedding is resampled the way timm does it
    from timm.layers import resample_abs_pos_embed

    big = vision.upcycle_vit(f, model_name="vit_tiny_patch16_224", num_experts=4,
                             model_kwargs=dict(SMALL, img_size=48, embed_dim=32, depth=4, num_heads=2))
    want = resample_abs_pos_embed(dense.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed, want)
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 7)
    # a safetensors file and a new number of classes: the head starts fresh, with a warning
    s = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(s))
    with pytest.warns(UserWarning, match="head.weight"):
        new = vision.upcycle_vit(s, model_name="vit_tiny_patch16_224", num_experts=4,
                                 model_kwargs=dict(SMALL, num_classes=3, embed_dim=32, depth=4, num_heads=2))
    assert new.head.weight.shape == (3, 32)
    torch.testing.assert_close(new.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)


def test_upcycle_errors(tmp_path):
    dense = dense_vit()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vision.upcycle_vit(tmp_path / "nope.pth", model_name="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="model_name"):
        vision.upcycle_vit(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="heads"):
        vision.upcycle_vit(dense, heads=2)
    with pytest.raises(ValueError, match="already has MoE"):
        vision.upcycle_vit(tiny_moe())
    bad = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in dense_vit(depth=2).state_dict().items()}, str(bad))
    with pytest.raises(ValueError, match="other.safetensors.*missing"):
        vision.upcycle_vit(bad, model_name="vit_tiny_patch16_224",
                           model_kwargs=dict(SMALL, embed_dim=32, depth=4, num_heads=2))


# ------------------------------------------------------------------------------------------ task pieces


def test_layer_decay_scales_follow_depth():
    m = tiny_moe()
    s = layer_lr_scales(m, 0.5)
    L = len(m.blocks)
    assert s["pos_embed"] == pytest.approx(0.5 ** (L + 1))
    assert s["patch_embed.proj.weight"] == pytest.approx(0.5 ** (L + 1))
    for i in range(L):
        assert s[f"blocks.{i}.norm1.weight"] == pytest.approx(0.5 ** (L - i))
    assert s["blocks.1.mlp.experts.w1"] == pytest.approx(0.5 ** (L - 1))
    assert s["head.weight"] == 1.0 and s["norm.weight"] == 0.5  # as timm's param_groups_layer_decay
    from mmoe.train.config import OptimConfig
    from mmoe.train.optim import param_groups

    groups = param_groups(m, OptimConfig(), s)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(m.pos_embed)] == pytest.approx(0.5 ** (L + 1))
    assert scale_of[id(m.blocks[1].mlp.experts.w1)] == pytest.approx(0.5 ** (L - 1))


def test_weight_ema_update_and_swap():
    m = torch.nn.Linear(3, 2)
    ema = WeightEMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # warm-up decay min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["weight"], d * w0 + (1 - d) * (w0 + 1))
    live = m.weight.detach().clone()
    ema.swap_in(m)
    torch.testing.assert_close(m.weight.detach(), ema.shadow["weight"])
    ema.swap_out(m)
    assert torch.equal(m.weight.detach(), live)
    state = ema.state_dict()
    ema2 = WeightEMA(m, decay=0.9)
    ema2.load_state_dict(state)
    assert ema2.updates == 1 and torch.equal(ema2.shadow["weight"], ema.shadow["weight"])


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_topk_and_per_class_accuracy():
    from vision.tasks import ClassifierConfig

    task = ImageClassificationTask(ClassifierConfig(num_classes=4),
                                   ImageClassificationTask.Options(topk=2, per_class=True))
    logits = torch.tensor([[5.0, 4, 0, 0], [0, 5, 4, 0], [0, 0, 1, 5], [4, 0, 5, 0], [0, 0, 1, 5]])
    y = torch.tensor([0, 2, 2, 0, 1])
    sums = task.eval_step(_FixedLogits(logits), (torch.zeros(5, 1), y))
    met = task.eval_metrics(sums)
    assert met["acc"] == pytest.approx(1 / 5)  # only sample 0
    assert met["acc2"] == pytest.approx(4 / 5)  # samples 0, 1, 2, 3
    assert met["acc_class/0"] == pytest.approx(1 / 2) and met["acc_class/2"] == 0.0 and met["acc_class/1"] == 0.0
    assert "acc_class/3" not in met  # no sample of class 3


def test_task_option_errors():
    from vision.tasks import ClassifierConfig

    from mmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"task_options\.mixupp: unknown key \(did you mean 'mixup'"):
        ImageClassificationTask.parse_options({"mixupp": 0.8})
    with pytest.raises(ConfigError, match=r"task_options\.layer_decay: must be in \(0, 1\]"):
        ImageClassificationTask.parse_options({"layer_decay": 1.5})
    with pytest.raises(ValueError, match="^topk: must be >= 1"):
        ImageClassificationTask.Options(topk=0)
    with pytest.raises(TypeError, match="parse_options"):
        ImageClassificationTask(ClassifierConfig(num_classes=4), {"topk": 2})
    with pytest.raises(ValueError, match="dense model"):
        ImageClassificationTask(ClassifierConfig(arch="vit_tiny_patch16_224", moe={"top_k": 1})).build_model()


# ------------------------------------------------------------------------------------------ engine runs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from vision.digits import write_digits_shards

    d = tmp_path_factory.mktemp("digits") / "shards"
    write_digits_shards(d, samples_per_shard=300, val_fraction=0.2)
    return d


CONFIG = """\
task: image_classification
model:
  arch: vit_moe_tiny_patch16_224
  num_classes: 10
  img_size: 16
  in_chans: 1
  kwargs: {{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 4}}
  moe: {{num_experts: 4, top_k: 2, heads: 2, dense_backprop: default}}
task_options: {{scale: [1.0, 1.0], hflip: 0.0, color_jitter: 0.0, crop_pct: 1.0, per_class: true{extra}}}
data: {{train: {data}, train_split: train, val: {data}, val_split: val, batch_size: 32, shuffle_buffer: 200}}
optim: {{lr: 3.0e-3, warmup_steps: 5}}
train: {{max_steps: {steps}, log_every: 5, save_every: {save}, stats_every: 0, progress: false}}
run: {{dir: {run}}}
"""


def write_config(tmp: Path, data: Path, name: str, steps: int, save: int = 0, extra: str = "") -> Path:
    f = tmp / f"{name}.yaml"
    f.write_text(CONFIG.format(data=data, run=tmp / name, steps=steps, save=save, extra=extra))
    return f


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    cfg = write_config(tmp, digits, "run", steps=150)
    p = run_mmoe(["train", str(cfg)], timeout=400)
    return tmp / "run", json.loads(p.stdout.strip().splitlines()[-1])


def test_training_on_digits_learns(trained):
    run, final = trained
    assert final["step"] == 150
    assert final["val_acc"] > 0.5, final  # chance is 0.1 (this config reaches about 0.7)
    assert final["val_acc5"] >= final["val_acc"]
    per_class = {k: v for k, v in final.items() if k.startswith("val_acc_class/")}
    assert sorted(per_class) == [f"val_acc_class/{i}" for i in range(10)]  # names from the manifest
    meta = json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["task_state"]["classes"] == [str(i) for i in range(10)]


def test_predict_matches_the_model(trained, digits, tmp_path):
    from PIL import Image

    from vision.digits import digits_samples
    from vision.predict import Predictor

    run, _ = trained
    samples = digits_samples()[:20]
    files = []
    for s in samples:
        f = tmp_path / f"{s['__key__']}.png"
        f.write_bytes(s["png"])
        files.append(f)
    pred = Predictor(run)
    res = pred.predict(files, topk=3)
    assert [r["image"] for r in res] == [str(f) for f in files]
    # the same numbers as the model on the evaluation transform
    xs = torch.stack([pred.task.decode_eval({"png": f.read_bytes(), "cls": 0})[0] for f in files])
    with torch.no_grad():
        probs = pred.model(xs).softmax(-1)
    for r, p in zip(res, probs):
        scores = [t["score"] for t in r["top"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        assert r["top"][0]["class"] == str(int(p.argmax()))
        assert scores[0] == pytest.approx(float(p.max()), abs=1e-6)
    right = sum(r["top"][0]["class"] == str(s["cls"]) for r, s in zip(res, samples))
    assert right >= 10  # the model is about 70% accurate; chance is 2 of 20
    # the command line
    p = run_mmoe(["predict", str(run), str(files[0]), "--topk", "2", "--json"])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["top"][0]["class"] == res[0]["top"][0]["class"] and len(out["top"]) == 2
    bad = run_mmoe(["predict", str(run), str(tmp_path / "missing.png")], check=False)
    assert bad.returncode == 2 and "missing.png" in bad.stderr
    Image.open(files[0])  # the files are real images


def test_predict_reports_a_bad_file_and_predicts_the_others(trained, tmp_path):
    import numpy as np
    from PIL import Image

    from vision.digits import digits_samples

    run, _ = trained
    good = tmp_path / "good.png"
    good.write_bytes(digits_samples()[0]["png"])
    deep = tmp_path / "deep.png"  # a 16-bit PNG: read, not refused
    Image.fromarray((np.arange(256).reshape(1, 256) * 257).astype(np.uint16).repeat(16, 0)[:, :16]).save(deep)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    missing = tmp_path / "missing.png"
    p = run_mmoe(["predict", str(run), str(good), str(bad), str(missing), str(deep), "--topk", "2",
                  "--json"], check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if str(bad) in line]
    assert len(errors) == 1 and errors[0].startswith(f"mmoe predict: {bad}: not a readable image ("), p.stderr
    assert f"mmoe predict: {missing}: no such image file" in p.stderr.splitlines()
    assert str(good) not in p.stderr and str(deep) not in p.stderr
    out = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["image"] for r in out] == [str(good), str(deep)]  # the good images are still predicted
    assert all(len(r["top"]) == 2 for r in out)


def test_resume_with_ema_and_augmentation_is_exact(digits, tmp_path):
    import shutil

    from mmoe.train.runlog import read_jsonl

    extra = ", ema_decay: 0.99, auto_augment: rand-m5-n1, mixup: 0.4, cutmix: 0.4, layer_decay: 0.8"
    cfg = write_config(tmp_path, digits, "straight", steps=16, save=8, extra=extra)
    a = json.loads(run_mmoe(["train", str(cfg), "train.log_every=1"]).stdout.strip().splitlines()[-1])
    # a run that stopped after its step-8 checkpoint, resumed from it
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000016")
    (tmp_path / "resumed" / "checkpoints" / "latest").unlink(missing_ok=True)
    b = json.loads(run_mmoe(["train", str(cfg), "--resume", f"run.dir={tmp_path / 'resumed'}", "train.log_every=1"])
                   .stdout.strip().splitlines()[-1])
    # evaluated with the EMA weights: EMA, data order, RNG (mixup, RandAugment) all resumed
    assert a == b
    la = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r}
    assert sorted(la) == list(range(1, 17)) and la == lb
    # the EMA is what evaluation used: evaluating the raw weights gives other numbers
    ck = tmp_path / "straight" / "checkpoints"
    ema = json.loads(run_mmoe(["eval", str(cfg), "--checkpoint", str(ck)]).stdout.strip().splitlines()[-1])
    raw = json.loads(run_mmoe(["eval", str(cfg), "--checkpoint", str(ck), "task_options.ema_eval=false"])
                     .stdout.strip().splitlines()[-1])
    assert ema["loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    assert raw["loss"] != pytest.approx(ema["loss"], rel=1e-6)
    # mmoe predict uses the EMA of a one-process run too, unless told not to
    from vision.digits import digits_samples
    from vision.predict import Predictor

    img = tmp_path / "digit.png"
    img.write_bytes(digits_samples()[0]["png"])
    with_ema, without = Predictor(tmp_path / "straight"), Predictor(tmp_path / "straight", use_ema=False)
    assert with_ema.used_ema and not without.used_ema
    assert with_ema.predict([img])[0]["top"] != without.predict([img])[0]["top"]


def test_demo_quick(tmp_path):
    p = run_mmoe(["demo", "--quick", "--steps", "12", "--out", str(tmp_path / "demo"), "--no-progress"], timeout=400)
    out = tmp_path / "demo"
    res = json.loads((out / "results.json").read_text())
    for name in ("vit_moe", "vit_dense"):
        r = res[name]
        assert 0.0 <= r["test_acc"] <= 1.0 and r["throughput"] > 0 and len(r["per_class"]) == 10
    # equal active compute: the dense MLP ratio was chosen from the MoE model's active multiply-adds
    assert res["vit_moe"]["params"] > res["vit_dense"]["params"]
    assert res["vit_moe"]["moe_layers"] and all(0 < v["activation"] <= 1 for v in res["vit_moe"]["moe_layers"].values())
    from PIL import Image

    for png in ("loss_curves.png", "expert_load.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100
    assert "test top-1" in p.stdout and "ViT-MoE" in p.stdout


def test_config_init_and_upcycle_from(tmp_path):
    from vision.tasks import ClassifierConfig, build_classifier

    dense = dense_vit().eval()
    f = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(f))
    common = dict(num_classes=7, img_size=32, kwargs=dict(patch_size=8, embed_dim=32, depth=4, num_heads=2))
    x = torch.randn(2, 3, 32, 32)
    # model.init into the same dense architecture
    same = build_classifier(ClassifierConfig(arch="vit_tiny_patch16_224", init=str(f), **common)).eval()
    torch.testing.assert_close(same(x), dense(x), rtol=0, atol=0)
    # model.upcycle_from: the dense checkpoint becomes the ViT-MoE's starting point
    up = build_classifier(ClassifierConfig(arch="vit_moe_tiny_patch16_224", init=str(f), moe_layers="last_1",
                                           upcycle_from="vit_tiny_patch16_224", moe=dict(num_experts=4),
                                           **common)).eval()
    assert up.moe_layers == [3]
    torch.testing.assert_close(up(x), dense(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="upcycle_from"):
        build_classifier(ClassifierConfig(arch="vit_moe_tiny_patch16_224", upcycle_from="vit_tiny_patch16_224"))
    with pytest.raises(FileNotFoundError, match="model.init"):
        build_classifier(ClassifierConfig(arch="vit_tiny_patch16_224", init=str(tmp_path / "no.pth"), **common))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches_and_updates_state_once(reentrant):
    """timm's grad checkpointing re-runs each block's forward inside backward: outputs, gradients, the
    Default-MoE EMA and the aux-loss-free load must be those of one ordinary forward."""
    import functools

    import torch.utils.checkpoint as cp

    kw = dict(heads=2, dense_backprop="default", balance_bias_rate=0.01, router_jitter=0.1)
    torch.manual_seed(3)
    plain = tiny_moe(**kw)
    ckpt = tiny_moe(**kw)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    orig = cp.checkpoint
    cp.checkpoint = functools.partial(orig, use_reentrant=reentrant)
    try:
        ckpt.set_grad_checkpointing(True)
        for m in (plain, ckpt):
            torch.manual_seed(7)
            (m(x).square().mean() + mmoe.aux_loss(m)).backward()
    finally:
        cp.checkpoint = orig
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert b.grad is not None, n
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)
    for (n, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=n)  # EMA and load updated once
