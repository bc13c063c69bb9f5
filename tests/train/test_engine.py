"""The training engine end to end, as users run it: `mmoe train` in fresh processes, one rank or two
(`deepspeed --num_gpus 2`, CPU ranks over gloo), on the digits MLP-MoE task."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmoe.train.runlog import read_jsonl
from mmoe.train import checkpoint as ckpt_lib

from tests.helpers import _env, _free_port, kill_after_checkpoint, mmoe_cmd, run_mmoe  # noqa: F401 (tests/helpers.py)

pytestmark = pytest.mark.distributed

BASE = """\
task: digits_mlp
model: {dim: 32, depth: 2, moe: {num_experts: 4, top_k: 2, expert_hidden: 32, dense_backprop: default}}
data: {train: synthetic, batch_size: 16}
optim: {lr: 3.0e-3, warmup_steps: 2}
train: {max_steps: 6, log_every: 1, stats_every: 3, progress: false, grad_clip: 0.05}
run: {dir: RUN}
"""


def write_cfg(tmp: Path, name: str, text: str = BASE) -> Path:
    f = tmp / f"{name}.yaml"
    f.write_text(text.replace("RUN", str(tmp / name)))
    return f


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_rank")
    cfg = write_cfg(tmp, "run")
    run_mmoe(["train", str(cfg), "data.batch_size=32", "train.save_every=3"])
    return tmp / "run"


def resumable_copy(run: Path, step: int, dest: Path) -> Path:
    """A copy of ``run`` as a kill right after checkpoint ``step`` would have left it (later ones removed)."""
    shutil.copytree(run, dest)
    for c in (dest / "checkpoints").glob("step_*"):
        if int(c.name.split("_")[1]) > step:
            shutil.rmtree(c)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:07d}")
    return dest


def resume_event(run: Path) -> str:
    return next(e["message"] for e in read_jsonl(run / "events.jsonl") if e["kind"] == "resume_topology")


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_rank_expert_parallel_matches_one_rank(tmp_path, one_rank, zero):
    cfg = write_cfg(tmp_path, "ep2")
    # persistent expert weight-gradient buffers: on by default in the one-rank run and under ZeRO 0, turned off
    # under ZeRO 1 and forced on under ZeRO 2 (whose default is off): every combination gives the same curve
    buffers = {0: [], 1: ["train.grad_buffers=false"], 2: ["train.grad_buffers=true"]}[zero]
    run_mmoe(["train", str(cfg), "dist.ep_size=2", f"dist.zero_stage={zero}", "train.save_every=3", *buffers],
             world=2)
    run = tmp_path / "ep2"
    want, got = losses(one_rank), losses(run)
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    if zero == 2:  # portable resume: EP 2 under ZeRO 2 on 2 ranks -> one rank, ZeRO 0, the same global batch
        moved = resumable_copy(run, 3, tmp_path / "to_one")
        run_mmoe(["train", str(cfg), f"run.dir={moved}", "data.batch_size=32", "--resume"])
        assert [r["step"] for r in read_jsonl(moved / "metrics.jsonl") if "loss" in r] == list(range(1, 7))
        assert losses(moved) == pytest.approx(want, rel=1e-5, abs=1e-6)  # optimizer moments resharded
        msg = resume_event(moved)
        assert "saved with world_size=2, ep_size=2, zero_stage=2" in msg
        assert "the optimizer state (resharded)" in msg and "the data position" in msg
    # the clip is active (grad norm > 0.05), so this also checks the global norm over sharded experts
    assert all(r["grad_norm"] > 0.05 for r in read_jsonl(run / "metrics.jsonl") if "grad_norm" in r)
    a = ckpt_lib.full_state_dict(ckpt_lib.find_latest(one_rank / "checkpoints"))
    b = ckpt_lib.full_state_dict(ckpt_lib.find_latest(run / "checkpoints"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)
    # both expert-parallel ranks wrote their experts
    names = {f.name for f in ckpt_lib.find_latest(run / "checkpoints").iterdir()}
    assert {"experts-ep0-of2.safetensors", "experts-ep1-of2.safetensors"} <= names


def test_one_rank_run_resumes_on_two_ranks_with_its_optimizer_and_data(tmp_path, one_rank):
    # portable resume, 1 -> 2: one rank, ZeRO 0 -> expert parallel over 2 ranks under ZeRO 1, batch halved
    moved = resumable_copy(one_rank, 3, tmp_path / "to_two")
    cfg = write_cfg(tmp_path, "to_two")
    run_mmoe(["train", str(cfg), "dist.ep_size=2", "dist.zero_stage=1", "--resume"], world=2)
    assert [r["step"] for r in read_jsonl(moved / "metrics.jsonl") if "loss" in r] == list(range(1, 7))
    assert losses(moved) == pytest.approx(losses(one_rank), rel=1e-5, abs=1e-6)
    assert "the optimizer state (resharded)" in resume_event(moved)
    # both expert-parallel ranks wrote their experts' optimizer state for the next resume
    names = {f.name for f in ckpt_lib.find_latest(moved / "checkpoints").iterdir()}
    assert {"optim-dense.safetensors", "optim-experts-ep0-of2.safetensors", "optim-experts-ep1-of2.safetensors"} <= names


def test_run_dir_outputs(one_rank):
    rows = read_jsonl(one_rank / "metrics.jsonl")
    for key in ("step", "loss", "lr", "aux_loss", "throughput"):
        assert all(key in r for r in rows), key
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (one_rank / "config.yaml").is_file()
    assert sorted(p.name for p in (one_rank / "plots").glob("expert_load_step*.png")) == [
        "expert_load_step0000003.png", "expert_load_step0000006.png"]
    routing = read_jsonl(one_rank / "routing.jsonl")
    assert [r["step"] for r in routing] == [3, 6] and len(routing[0]["layers"]) == 2
    assert list((one_rank / "tb").glob("events.out.tfevents.*"))
    meta = ckpt_lib.read_meta(ckpt_lib.find_latest(one_rank / "checkpoints"))
    assert meta["step"] == 6


def test_nonfinite_loss_skips_the_micro_batch(tmp_path, one_rank):
    # example 40 is in the 2nd micro-batch (indices 32..63) of the one-rank run: that batch is dropped,
    # so from then on the run sees the next batches one step early
    cfg = write_cfg(tmp_path, "nan")
    run_mmoe(["train", str(cfg), "data.batch_size=32", "task_options.corrupt_examples=[40]"])
    events = read_jsonl(tmp_path / "nan" / "events.jsonl")
    bad = [e for e in events if e.get("kind") == "nonfinite_loss"]
    assert len(bad) == 1 and bad[0]["step"] == 1
    got = losses(tmp_path / "nan")
    assert len(got) == 6 and all(map(lambda v: v == v, got))
    assert got[0] == pytest.approx(losses(one_rank)[0])  # step 0 untouched
    state = ckpt_lib.full_state_dict(ckpt_lib.find_latest(tmp_path / "nan" / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_consecutive_nonfinite_losses_stop_the_run(tmp_path):
    cfg = write_cfg(tmp_path, "diverge")
    bad = list(range(32, 32 * 8, 5))  # one NaN example in each micro-batch from step 1 on
    p = run_mmoe(["train", str(cfg), "data.batch_size=32", f"task_options.corrupt_examples={bad}",
                  "train.max_bad_steps=3"], check=False)
    assert p.returncode == 2
    assert "3 consecutive non-finite losses" in p.stderr


def test_bad_config_names_file_and_key(tmp_path):
    cfg = write_cfg(tmp_path, "bad", BASE.replace("lr: 3.0e-3", "lrr: 3.0e-3"))
    p = run_mmoe(["train", str(cfg)], check=False)
    assert p.returncode == 2
    assert str(cfg) in p.stderr and "optim.lrr" in p.stderr and "did you mean 'lr'" in p.stderr
    p = run_mmoe(["train", str(write_cfg(tmp_path, "ok")), "model.moe.top_k=9"], check=False)
    assert p.returncode == 2 and "model.moe.top_k" in p.stderr
    p = run_mmoe(["train", str(write_cfg(tmp_path, "ok2")), "dist.zero_stage=3"], check=False)
    assert p.returncode == 2 and "dist.zero_stage" in p.stderr


# ------------------------------------------------------------------------------ shards, resume, EP reload
SHARDS = """\
task: digits_mlp
model: {dim: 32, depth: 2, dropout: 0.1, moe: {num_experts: 4, top_k: 2, expert_hidden: 32,
        dense_backprop: default, router_jitter: 0.05}}
data: {train: DATA, train_split: train, val: DATA, val_split: val, batch_size: 32, shuffle_buffer: 100,
       num_workers: WORKERS}
optim: {lr: 3.0e-3, warmup_steps: 5}
train: {max_steps: STEPS, log_every: 1, stats_every: 0, save_every: 10, keep_last: 2, progress: false}
run: {dir: RUN}
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from vision.digits import write_digits_shards

    out = tmp_path_factory.mktemp("digits")
    write_digits_shards(out, samples_per_shard=100)
    return out


def shard_cfg(tmp, name, digits, steps=100, workers=2):
    text = SHARDS.replace("DATA", str(digits)).replace("STEPS", str(steps)).replace("WORKERS", str(workers))
    return write_cfg(tmp, name, text)


def test_killed_run_resumes_with_the_same_loss_curve(tmp_path, digits):
    ref_cfg = shard_cfg(tmp_path, "ref", digits)
    run_mmoe(["train", str(ref_cfg)])
    want = losses(tmp_path / "ref")
    assert len(want) == 100

    cfg = shard_cfg(tmp_path, "killed", digits)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert kill_after_checkpoint(mmoe_cmd(["train", str(cfg)]), ckpts / "step_0000020") == -signal.SIGKILL
    at_kill = ckpt_lib.find_latest(ckpts)
    assert at_kill is not None and ckpt_lib.read_meta(at_kill)["step"] < 100

    run_mmoe(["train", str(cfg), "--resume"])
    got = losses(tmp_path / "killed")
    assert [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r] == list(range(1, 101))
    assert got == want  # bit-identical: same data order, RNG, optimizer and EMA state
    assert len(ckpt_lib.list_checkpoints(ckpts)) == 2  # keep_last


SOURCES = """\
task: digits_sources_test
model: {dim: 32, depth: 2, dropout: 0.1, moe: {num_experts: 4, top_k: 2, expert_hidden: 32,
        dense_backprop: default, router_jitter: 0.05}}
data:
  sources:
    - {path: DATA, split: train, weight: 3, task: big}
    - {path: DATA, split: val, weight: 1, task: small}
  batch_size: 16
  shuffle_buffer: 100
  num_workers: 2
optim: {lr: 3.0e-3, warmup_steps: 5}
train: {max_steps: 40, log_every: 1, stats_every: 0, save_every: 10, keep_last: 2, progress: false}
run: {dir: RUN}
"""


def test_two_weighted_sources_resume_exactly_after_a_kill(tmp_path, digits):
    """data.sources: each step's source and sample keys (logged by the task, tests/train/sources_task.py)
    and the loss curve of a run killed after a checkpoint and resumed equal an uninterrupted run's."""
    from mmoe.data import ShardLoader
    from sources_task import command

    def train(cfg, *extra):
        p = subprocess.run(command(["train", str(cfg), *extra]), env=_env(), capture_output=True, text=True,
                           timeout=240)
        assert p.returncode == 0, p.stderr[-5000:]

    def data_log(run):  # step -> [[source, label, keys], ...]; a redone step's last record wins
        return {r["step"]: r["batches"] for r in read_jsonl(run / "data_log.jsonl")}

    text = SOURCES.replace("DATA", str(digits))
    train(write_cfg(tmp_path, "ref", text))
    want = data_log(tmp_path / "ref")
    assert sorted(want) == list(range(1, 41))

    cfg = write_cfg(tmp_path, "killed", text)
    ckpts = tmp_path / "killed" / "checkpoints"
    kill_after_checkpoint(command(["train", str(cfg)]), ckpts / "step_0000010")
    at_kill = ckpt_lib.find_latest(ckpts)
    assert at_kill is not None and ckpt_lib.read_meta(at_kill)["step"] < 40
    state = ckpt_lib.load_rank_state(at_kill, 0)["loader"]
    assert state["kind"] == "mixed" and len(state["sources"]) == 2
    train(cfg, "--resume")

    got = data_log(tmp_path / "killed")
    assert got == want  # the same source and the same samples at every step
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")
    # batches are homogeneous (asserted in the task), each source reads its own split, by weight
    split_keys = {name: {k for batch in ShardLoader(digits, split=name, batch_size=100, decode=_key, collate=list,
                                                  shuffle_buffer=0, epochs=1, drop_last=False) for k in batch}
                  for name in ("train", "val")}
    for batches in want.values():
        (source, label, keys), = batches  # grad_accum 1: one micro-batch per step
        assert label == ("big", "small")[source] and set(keys) <= split_keys[("train", "val")[source]]
    share = sum(b[0][0] == 0 for b in want.values()) / 40
    assert 0.55 < share < 0.95  # weight 3 : 1
    # the metrics say which source each step trained on
    rows = [r for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert [0 if r.get("source/0") == 1.0 else 1 for r in rows] == [want[s][0][0] for s in range(1, 41)]


def _key(sample):
    return sample["__key__"]


NO_NOISE = ["model.dropout=0", "model.moe.router_jitter=0"]  # no per-rank randomness: runs comparable across layouts


def test_expert_parallel_checkpoint_reloads_under_another_ep_size(tmp_path, digits):
    cfg = shard_cfg(tmp_path, "ep2", digits, steps=22, workers=0)
    out = run_mmoe(["train", str(cfg), "dist.ep_size=2", *NO_NOISE], world=2)
    final = json.loads(next(l for l in out.stdout.splitlines() if l.startswith('{"step"')))
    ckpt = ckpt_lib.find_latest(tmp_path / "ep2" / "checkpoints")
    # one process, every expert: the same validation metrics
    one = run_mmoe(["eval", str(cfg), "--checkpoint", str(ckpt), *NO_NOISE])
    got = json.loads(one.stdout.strip().splitlines()[-1])
    assert got["count"] == final["val_count"] == 338
    assert got["acc"] == pytest.approx(final["val_acc"]) and got["loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    # training continues from step 20 on one rank with the global batch of 2 x 32: weights, optimizer state and
    # the shard order of both ranks (read as two streams) kept, so the loss curve continues as on 2 ranks
    moved = resumable_copy(tmp_path / "ep2", 20, tmp_path / "one")
    p = run_mmoe(["train", str(cfg), f"run.dir={moved}", "data.batch_size=64", *NO_NOISE, "--resume"])
    assert "saved with world_size=2, ep_size=2" in p.stderr and p.stderr.count("mmoe: warning") == 1
    assert [r["step"] for r in read_jsonl(moved / "metrics.jsonl") if "loss" in r][-2:] == [21, 22]
    assert losses(moved) == pytest.approx(losses(tmp_path / "ep2"), rel=1e-5, abs=1e-6)
    assert "the data position (in the order of the 2-rank layout" in resume_event(moved)
    # another global batch cannot keep the data order: said, and training goes on from a fresh position
    other = resumable_copy(tmp_path / "ep2", 20, tmp_path / "other")
    p = run_mmoe(["train", str(cfg), f"run.dir={other}", "train.max_steps=21", *NO_NOISE, "--resume"])
    fresh = p.stderr.split("starting fresh:")[1]
    assert "the data position (the global batch changed (2 rank(s) x 32 x 1 accumulation = 64 samples" in fresh
    assert [r["step"] for r in read_jsonl(other / "metrics.jsonl") if "loss" in r][-1] == 21


def test_one_rank_shard_run_resumes_on_two_ranks_in_its_data_order(tmp_path, digits):
    # portable resume, 1 -> 2 over shards: the two ranks each read the one saved stream and take their half
    cfg = shard_cfg(tmp_path, "one", digits, steps=22, workers=0)
    run_mmoe(["train", str(cfg), "data.batch_size=64", *NO_NOISE])
    moved = resumable_copy(tmp_path / "one", 20, tmp_path / "two")
    run_mmoe(["train", str(cfg), f"run.dir={moved}", "dist.ep_size=2", *NO_NOISE, "--resume"], world=2)
    assert [r["step"] for r in read_jsonl(moved / "metrics.jsonl") if "loss" in r][-2:] == [21, 22]
    assert losses(moved) == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    assert "the data position (in the order of the 1-rank layout" in resume_event(moved)


def test_corrupt_shard_fails_or_is_skipped_by_choice(tmp_path, digits):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    victim = sorted(data.glob("train-*.tar"))[1]
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])
    cfg = shard_cfg(tmp_path, "corrupt", data, steps=60, workers=0)
    p = run_mmoe(["train", str(cfg)], check=False)
    assert p.returncode == 2 and victim.name in p.stderr
    p = run_mmoe(["train", str(cfg), "data.on_error=skip", f"run.dir={tmp_path / 'skip'}"])
    events = read_jsonl(tmp_path / "skip" / "events.jsonl")
    skipped = [e for e in events if e.get("kind") == "data_skipped"]
    assert skipped and "corrupt_shard" in skipped[0]["message"]


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    # no batch-statistics terms (aux loss, EMA), so 2 x 16 accumulated equals one batch of 32
    text = BASE.replace("dense_backprop: default", "dense_backprop: none, aux_loss_weight: 0.0")
    big = write_cfg(tmp_path, "big", text)
    acc = write_cfg(tmp_path, "acc", text)
    run_mmoe(["train", str(big), "data.batch_size=32"])
    run_mmoe(["train", str(acc), "data.batch_size=16", "train.grad_accum=2"])
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)
    a = ckpt_lib.full_state_dict(ckpt_lib.find_latest(tmp_path / "big" / "checkpoints"))
    b = ckpt_lib.full_state_dict(ckpt_lib.find_latest(tmp_path / "acc" / "checkpoints"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_tiny_config_trains_to_a_working_classifier(tmp_path, digits):
    """configs/tiny.yaml as shipped (only the paths changed): the digits reach > 90% validation accuracy."""
    cfg = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    p = run_mmoe(["train", str(cfg), f"data.train={digits}", f"data.val={digits}", f"run.dir={tmp_path / 'tiny'}",
                  "train.progress=false"])
    final = json.loads(next(l for l in p.stdout.splitlines() if l.startswith('{"step"')))
    assert final["step"] == 400 and final["val_count"] == 338
    assert final["val_acc"] > 0.9, final
    assert (tmp_path / "tiny" / "plots" / "expert_load_step0000400.png").is_file()
    assert (tmp_path / "tiny" / "plots" / "loss.png").stat().st_size > 1000


ROUTER_OPTIONS = {
    "xmoe": {"router": "xmoe", "xmoe_dim": 8},
    "xmoe_torchscale": {"router": "xmoe", "xmoe_variant": "torchscale"},
    "sparsemixer": {"router": "sparsemixer", "top_k": 1},
    "expert_choice": {"router": "expert_choice", "capacity_factor": 1.0},
    "mh_default_bias": {"heads": 2, "dense_backprop": "default", "balance_bias_rate": 0.01,
                        "activation": "swiglu", "shared_experts": 1},
    "capacity_group": {"capacity_factor": 1.25, "batch_prioritized": True, "dense_backprop": "expert_group"},
}


def test_every_router_trains_through_deepspeed(tmp_path):
    """Each router and option set goes through DeepSpeed's engine (parameter flattening, ZeRO 2,
    checkpointing) and its loss moves: a regression test for parameters DeepSpeed cannot handle (the
    X-MoE temperature was once a 0-dim tensor that DeepSpeed could not flatten)."""
    script = tmp_path / "many.py"
    script.write_text("""
import json, sys
from mmoe.train.configfile import from_dict
from mmoe.train.config import TrainConfig
from mmoe.train.engine import Trainer
out = {}
for name, moe in json.loads(sys.argv[1]).items():
    cfg = from_dict(TrainConfig, {"task": "digits_mlp",
        "model": {"dim": 32, "depth": 2, "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, **moe}},
        "data": {"train": "synthetic", "batch_size": 16}, "optim": {"lr": 3e-3},
        "train": {"max_steps": 4, "log_every": 1, "stats_every": 2, "progress": False},
        "dist": {"zero_stage": 2}, "run": {"dir": sys.argv[2] + "/" + name, "tensorboard": False}})
    Trainer(cfg).fit()
    out[name] = True
print(json.dumps(out))
""")
    env = _env()
    p = subprocess.run([sys.executable, str(script), json.dumps(ROUTER_OPTIONS), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {k: True for k in ROUTER_OPTIONS}
    for name in ROUTER_OPTIONS:
        ls = losses(tmp_path / name)
        assert len(ls) == 4 and all(map(math.isfinite, ls)) and len(set(ls)) > 1, (name, ls)
        assert (tmp_path / name / "checkpoints" / "step_0000004" / "meta.json").is_file()
