"""Nothing lost, nothing silent: run folders (a fresh run never writes over another one), checkpoint
integrity (every file's SHA-256 and a sealed meta.json, checked on load; a fault-injection loop), the
``latest`` pointer, ``keep_last``, and resume falling back past a damaged checkpoint, said in events.jsonl."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import mmoe
from mmoe.errors import CheckpointError
from mmoe.train import checkpoint as ckpt_lib
from mmoe.train.runlog import read_jsonl
from tests.helpers import run_mmoe


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, expert_hidden=8)))


def _save(root: Path, step: int, model=None, keep_last=None) -> Path:
    model = model or _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    return ckpt_lib.save_checkpoint(root, step, model=model, optimizer=opt, rank_state={"loader": {"pos": step}},
                                    meta={"scheduler": {"last_epoch": step}}, keep_last=keep_last)


def _flip(f: Path, pos: int, rng: random.Random) -> bytes:
    data = bytearray(f.read_bytes())
    old = bytes(data)
    data[pos] = (data[pos] + rng.randrange(1, 256)) % 256  # a different byte
    f.write_bytes(bytes(data))
    return old


def test_every_random_byte_flip_in_a_checkpoint_is_detected(tmp_path):
    ckpt = _save(tmp_path, 10)
    files = sorted(p for p in ckpt.iterdir())
    assert {p.name for p in files} >= {"model.safetensors", "experts-ep0-of1.safetensors", "optim-rank0.pt",
                                       "rank0.pt", "meta.json"}
    model = _model()
    ckpt_lib.load_model_state(model, ckpt)  # intact: loads
    rng = random.Random(1234)
    undetected = []
    for trial in range(300):
        f = rng.choice(files)
        pos = rng.randrange(f.stat().st_size)
        old = _flip(f, pos, rng)
        try:
            ckpt_lib.verify_checkpoint(ckpt)
            undetected.append((f.name, pos))
        except CheckpointError as err:
            assert f.name in str(err), (f.name, str(err))  # the message names the damaged file
        finally:
            f.write_bytes(old)
    assert undetected == []
    ckpt_lib.verify_checkpoint(ckpt)  # restored


def test_damaged_weights_fail_to_load_naming_the_file(tmp_path):
    ckpt = _save(tmp_path, 10)
    f = ckpt / "experts-ep0-of1.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-4] ^= 0x80  # one sign bit of the last expert bias
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"experts-ep0-of1\.safetensors: damaged"):
        ckpt_lib.load_model_state(_model(), ckpt)
    # meta.json edited into valid JSON with another step: caught by its seal
    ckpt2 = _save(tmp_path / "b", 20)
    meta = json.loads((ckpt2 / "meta.json").read_text())
    meta["step"] = 21
    (ckpt2 / "meta.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(CheckpointError, match="meta.json: damaged"):
        ckpt_lib.read_meta(ckpt2)


def test_checkpoints_without_checksums_still_load(tmp_path):
    ckpt = _save(tmp_path, 10)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["meta_sha256"]
    meta["files"] = {k: v["bytes"] for k, v in meta["files"].items()}  # the older format: sizes only
    (ckpt / "meta.json").write_text(json.dumps(meta))
    ckpt_lib.load_model_state(_model(), ckpt)


def test_keep_last_never_deletes_the_new_checkpoint_and_latest_is_followed(tmp_path):
    for step in (70, 80):
        _save(tmp_path, step)
    new = _save(tmp_path, 10, keep_last=1)  # a run with lower steps in the same folder
    assert new.is_dir() and [p.name for p in ckpt_lib.list_checkpoints(tmp_path)] == ["step_0000010"]
    assert ckpt_lib.find_latest(tmp_path) == new
    _save(tmp_path, 90)
    (tmp_path / "latest").write_text("step_0000010")
    assert ckpt_lib.find_latest(tmp_path) == new  # the pointer, not the highest step
    (tmp_path / "latest").write_text("step_0000050")
    with pytest.raises(CheckpointError, match="latest: points at 'step_0000050'"):
        ckpt_lib.find_latest(tmp_path)  # a pointer naming nothing is an error, not a silent choice
    with pytest.raises(CheckpointError, match="step_0000050"):
        ckpt_lib.resolve_checkpoint(tmp_path)


BASE = """\
task: digits_mlp
model: {dim: 16, depth: 2, moe: {num_experts: 4, top_k: 2, expert_hidden: 16}}
data: {train: synthetic, batch_size: 16}
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {max_steps: 6, log_every: 1, stats_every: 0, save_every: 3, keep_last: 3, progress: false}
run: {dir: RUN, tensorboard: false}
"""


def _cfg(tmp: Path) -> tuple[Path, Path]:
    run = tmp / "run"
    f = tmp / "cfg.yaml"
    f.write_text(BASE.replace("RUN", str(run)))
    return f, run


def test_fresh_train_into_an_existing_run_refuses_or_moves_it_aside(tmp_path):
    cfg, run = _cfg(tmp_path)
    run_mmoe(["train", str(cfg)])
    before = (run / "metrics.jsonl").read_text()
    p = run_mmoe(["train", str(cfg), "train.max_steps=4"], check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(err) == 1, p.stderr
    assert "holds another run (checkpoints, metrics.jsonl" in err[0] and "--resume" in err[0]
    assert "--overwrite" in err[0] and str(run) in err[0]
    assert (run / "metrics.jsonl").read_text() == before  # nothing written over
    assert [p.name for p in ckpt_lib.list_checkpoints(run / "checkpoints")] == ["step_0000003", "step_0000006"]
    p = run_mmoe(["train", str(cfg), "train.max_steps=4", "--overwrite"])
    aside = [d for d in tmp_path.iterdir() if d.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == before
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert ckpt_lib.find_latest(run / "checkpoints").name == "step_0000004"
    assert any(e["kind"] == "overwrite" for e in read_jsonl(run / "events.jsonl"))


def test_resume_falls_back_past_a_damaged_checkpoint_and_eval_names_it(tmp_path):
    cfg, run = _cfg(tmp_path)
    run_mmoe(["train", str(cfg), "train.max_steps=6"])
    bad = run / "checkpoints" / "step_0000006" / "experts-ep0-of1.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    # eval of the damaged latest (explicit or through the run folder) fails naming the file
    for target in (run / "checkpoints" / "step_0000006", run):
        p = run_mmoe(["eval", str(cfg), "--checkpoint", str(target), "data.val=synthetic",
                      "train.eval_batches=2"], check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert f"{bad}: damaged" in p.stderr
    # resume passes over it for step 3, says so on the console and in events.jsonl, and trains on to 9
    p = run_mmoe(["train", str(cfg), "train.max_steps=9", "--resume"])
    assert "step_0000006" in p.stderr and "passed over" in p.stderr
    events = read_jsonl(run / "events.jsonl")
    fallback = [e for e in events if e["kind"] == "checkpoint_fallback"]
    assert len(fallback) == 1 and "experts-ep0-of1.safetensors: damaged" in fallback[0]["message"]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 10))  # steps 4.. retrained from step 3's checkpoint
    assert ckpt_lib.verify_checkpoint(run / "checkpoints" / "step_0000006")  # saved again, swapped in whole
    assert not list((run / "checkpoints").glob(".replaced-*"))
    assert ckpt_lib.find_latest(run / "checkpoints").name == "step_0000009"
    # the newest checkpoint deleted by hand: resume refuses in one line naming the pointer; once the
    # pointer is deleted as the message says, step 6 resumes
    shutil.rmtree(run / "checkpoints" / "step_0000009")
    p = run_mmoe(["train", str(cfg), "train.max_steps=10", "--resume"], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "latest: points at 'step_0000009'" in lines[0] and "delete the pointer" in lines[0]
    (run / "checkpoints" / "latest").unlink()
    run_mmoe(["train", str(cfg), "train.max_steps=10", "--resume"])
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps[-4:] == [7, 8, 9, 10]


@pytest.mark.parametrize("yaml_text,line,problem", [
    ("optim:\n  lr: -1\n", 3, "optim.lr: must be > 0, got -1.0"),
    ("optim:\n  betas: [0.9, 1.5]\n", 3, "optim.betas: must be two numbers in [0, 1), got [0.9, 1.5]"),
    ("optim:\n  min_lr_ratio: 2\n", 3, "optim.min_lr_ratio: must be in [0, 1], got 2.0"),
    ("train:\n  grad_clip: -0.5\n", 3, "train.grad_clip: must be >= 0 (0 = off), got -0.5"),
    ("optim:\n  weight_decay: -0.1\n", 3, "optim.weight_decay: must be >= 0, got -0.1"),
])
def test_bad_optimizer_values_name_the_file_line(tmp_path, yaml_text, line, problem):
    from mmoe.train.config import load_train_config
    from mmoe.train.configfile import ConfigError

    f = tmp_path / "bad.yaml"
    f.write_text("task: digits_mlp\n" + yaml_text)
    with pytest.raises(ConfigError) as err:
        load_train_config(f)
    assert str(err.value) == f"{f}:{line}: {problem}"


def test_bad_config_inputs_are_one_line_errors(tmp_path):
    cfg, _ = _cfg(tmp_path)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"task: x\n\xff\xfe\x00garbage")
    cases = [
        ([str(cfg), "optim.lr=-1"], "command line: override 'optim.lr=-1': optim.lr: must be > 0, got -1.0"),
        ([str(tmp_path)], f"{tmp_path}: is a directory, not a YAML config file"),
        ([str(binary)], f"{binary}: not a YAML text file (byte 8 is not UTF-8)"),
    ]
    for args, message in cases:
        p = run_mmoe(["train", *args], check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert message in lines[0]


SHARD_RUN = """\
task: digits_mlp
model: {dim: 16, depth: 2, moe: {num_experts: 4, top_k: 2, expert_hidden: 16}}
data: {train: DATA, train_split: train, val: DATA, val_split: val, batch_size: 32, shuffle_buffer: 0,
       num_workers: 0, on_error: skip}
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {max_steps: 4, log_every: 1, stats_every: 0, save_every: 2, eval_every: 2, progress: false}
run: {dir: RUN, tensorboard: false}
"""


def test_data_mistakes_are_said_before_training_and_validation_skips_are_logged(tmp_path):
    from vision.digits import write_digits_shards

    data = tmp_path / "data"
    write_digits_shards(data, samples_per_shard=100)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(SHARD_RUN.replace("DATA", str(data)).replace("RUN", str(tmp_path / "run")))
    for override, message in (("data.val_split=vall", f"data.val ({data}): {data / 'manifest.json'} has no split 'vall'"),
                              (f"data.train={tmp_path / 'nothere'}",
                               f"no such shard file or directory: {tmp_path / 'nothere'}")):
        p = run_mmoe(["train", str(cfg), override], check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "run" / "checkpoints").exists()  # said before the first step, nothing trained
    victim = sorted(data.glob("val-*.tar"))[0]
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])
    run_mmoe(["train", str(cfg)])
    skipped = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["kind"] == "val_data_skipped"]
    assert [e["step"] for e in skipped] == [2, 4]  # every validation pass that lost samples
    assert "corrupt_shard" in skipped[0]["message"] and skipped[0]["corrupt_shard"] > 0
