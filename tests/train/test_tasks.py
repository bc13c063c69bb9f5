"""The task contract (`mmoe.train.tasks`): typed ``Options`` validated with file and line, the `TaskContext`
that ``setup`` gets, and the evaluator protocol (gathering over two gloo ranks equals one process; the engine
drives it end to end on the digits task, one rank and two expert-parallel ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmoe.errors import ConfigError
from mmoe.train.tasks import CollectingEvaluator, NoOptions, SumEvaluator, Task, TaskContext, data_manifest

from tests.helpers import _env, _free_port, run_mmoe  # noqa: F401 (tests/helpers.py)


# ------------------------------------------------------------------------------------------ options
@dataclass
class _Opts:
    label_smoothing: float = 0.1
    ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")


class _OptTask(Task):
    Options = _Opts


def test_options_are_typed_and_strict():
    opts = _OptTask.parse_options({"label_smoothing": 0, "ids": [1, 2]})
    assert opts == _Opts(label_smoothing=0.0, ids=[1, 2]) and isinstance(opts.label_smoothing, float)
    assert _OptTask(None, opts).options is opts
    assert _OptTask(None).options == _Opts()  # None: the defaults
    with pytest.raises(ConfigError, match=r"^<dict>: task_options\.lable_smoothing: unknown key \(did you mean "
                                          r"'label_smoothing'\?\)$"):
        _OptTask.parse_options({"lable_smoothing": 0.2})
    with pytest.raises(ConfigError, match=r"task_options\.ids\[1\]: expected an int"):
        _OptTask.parse_options({"ids": [1, "x"]})
    with pytest.raises(ConfigError, match=r"task_options\.label_smoothing: must be in \[0, 1\), got 1\.5"):
        _OptTask.parse_options({"label_smoothing": 1.5})
    with pytest.raises(TypeError, match="parse_options"):  # a raw mapping is not an Options
        _OptTask(None, {"label_smoothing": 0.2})
    # a task without options takes no keys
    assert Task.Options is NoOptions and Task.parse_options(None) == NoOptions()
    with pytest.raises(ConfigError, match="task_options.x: unknown key .this section takes no keys"):
        Task.parse_options({"x": 1})


def test_load_config_keeps_the_origins_for_task_options(tmp_path):
    from mmoe.train.config import load_train_config

    f = tmp_path / "run.yaml"
    f.write_text("task: digits_mlp\nmodel: {dim: 8}\ntask_options:\n  ids: [1]\n  lable_smoothing: 0.2\n")
    cfg = load_train_config(f, ["task_options.label_smoothing=2.0"])
    assert cfg._origins["task_options.lable_smoothing"] == f"{f}:5"
    with pytest.raises(ConfigError) as err:
        _OptTask.parse_options(cfg.task_options, source=str(f), origins=cfg._origins)
    assert str(err.value) == f"{f}:5: task_options.lable_smoothing: unknown key (did you mean 'label_smoothing'?)"
    cfg = load_train_config(f, ["task_options={label_smoothing: 2.0}"])
    with pytest.raises(ConfigError) as err:  # an override is named as the origin
        _OptTask.parse_options(cfg.task_options, source=str(f), origins=cfg._origins)
    assert str(err.value).startswith("command line: override 'task_options={label_smoothing: 2.0}': "
                                     "task_options.label_smoothing: must be in [0, 1)")


# ------------------------------------------------------------------------------------------ context
def test_task_context_from_config(tmp_path):
    from mmoe.train.config import TrainConfig
    from mmoe.train.configfile import from_dict
    from vision.digits import write_digits_shards

    data = tmp_path / "digits"
    write_digits_shards(data, samples_per_shard=500)
    cfg = from_dict(TrainConfig, {"task": "digits_mlp", "data": {"train": str(data), "val": "synthetic"},
                                  "run": {"dir": str(tmp_path / "run"), "seed": 7}})
    ctx = TaskContext.from_config(cfg, rank=1, world_size=2)
    assert (ctx.run_dir, ctx.rank, ctx.world_size, ctx.seed) == (tmp_path / "run", 1, 2, 7)
    assert ctx.train_data == str(data) and ctx.train_manifest.info["classes"] == [str(i) for i in range(10)]
    assert ctx.val_data == "synthetic" and ctx.val_manifest is None
    assert data_manifest(str(data / "manifest.json")).num_samples == 1797
    assert data_manifest(str(data / "train-*.tar")) is None and data_manifest(str(tmp_path / "none")) is None
    assert ctx.sources == ()

    # with data.sources the task sees every source's manifest, and the first one as train_manifest
    other = tmp_path / "other"
    other.mkdir()
    cfg = from_dict(TrainConfig, {"task": "digits_mlp", "run": {"dir": str(tmp_path / "run")},
                                  "data": {"sources": [{"path": str(data), "task": "cls", "weight": 2.0},
                                                       {"path": str(other), "task": "det"}]}})
    ctx = TaskContext.from_config(cfg)
    assert ctx.train_data == str(data) and ctx.train_manifest.num_samples == 1797
    assert [(src.task, m is not None) for src, m in ctx.sources] == [("cls", True), ("det", False)]


# ------------------------------------------------------------------------------------------ evaluators
def _records_step(model, batch):
    """Per-sample outputs of a batch ``(keys [B], x [B, 4])``."""
    keys, x = batch
    return {"key": keys, "score": model(x).squeeze(-1)}


def _whole_split(records):
    """Metrics no sum of per-batch scalars can give: the median, and the key of the best score."""
    keys = torch.cat([r["key"] for r in records])
    score = torch.cat([r["score"] for r in records])
    return {"count": float(score.numel()), "median": float(score.median()), "best_key": float(keys[score.argmax()]),
            "mean": float(score.mean())}


def _sum_step(model, batch):
    keys, x = batch
    out = {"score_sum": float(model(x).sum()), "count": float(x.shape[0])}
    odd = int((keys % 2).sum())
    if odd:  # a key only some batches (and, over two ranks, only rank 1) report
        out["odd"] = float(odd)
    return out


def _data(n=37):
    g = torch.Generator().manual_seed(3)
    return torch.arange(n), torch.randn(n, 4, generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def _batches(keys, x, size):
    return [(keys[i:i + size], x[i:i + size]) for i in range(0, len(keys), size)]


def _evaluators():
    return {"collect": CollectingEvaluator(_records_step, _whole_split), "sum": SumEvaluator(_sum_step)}


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        keys, x = _data()
        mine = torch.arange(len(keys)) % world == rank  # an uneven split: 19 and 18 samples
        model = _model()
        out = {}
        for name, ev in _evaluators().items():
            ev.reset()
            with torch.no_grad():
                for b in _batches(keys[mine], x[mine], size=5 + rank):  # different batch counts per rank
                    ev.process(b, ev.run(model, b))
            ev.gather(dist.group.WORLD)
            out[name] = ev.summarize()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_evaluators_gathered_over_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert r0 == r1  # every rank summarizes the same gathered state
    keys, x = _data()
    model = _model()
    for name, ev in _evaluators().items():
        want = ev.evaluate(model, _batches(keys, x, size=8))
        assert r0[name].keys() == want.keys(), name
        for k in want:
            assert r0[name][k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), (name, k)
    assert r0["collect"]["count"] == 37 and r0["sum"] == {"score_sum": pytest.approx(r0["sum"]["score_sum"]),
                                                        "count": 37.0, "odd": 18.0}


def test_evaluator_state_round_trip_and_empty_pass():
    keys, x = _data()
    model = _model()
    for ev in _evaluators().values():
        assert ev.evaluate(model, []) == {}  # no batch: no metrics
        full = ev.evaluate(model, _batches(keys, x, size=8))
        state = ev.state()
        ev.merge([state])  # its own state alone changes nothing
        assert ev.summarize() == full
        ev.reset()
        assert ev.summarize() == {}
    # a collecting evaluator moves tensors to the CPU and keeps one record per batch
    ev = CollectingEvaluator(_records_step, _whole_split)
    ev.evaluate(model, _batches(keys, x, size=10))
    assert len(ev.records) == 4 and all(r["score"].device.type == "cpu" for r in ev.records)


def test_default_evaluator_is_the_sum_of_eval_step():
    class T(Task):
        def eval_step(self, model, batch):
            return {"n": float(len(batch)), "s": float(sum(batch))}

        def eval_metrics(self, sums):
            return {"mean": sums["s"] / sums["n"]}

    ev = T(None).evaluator()
    assert isinstance(ev, SumEvaluator)
    assert ev.evaluate(None, [[1, 2], [3, 4, 5]]) == {"mean": 3.0}


# ------------------------------------------------------------------------------------------ through mmoe train
BAD = """\
task: TASK
model: MODEL
data: {train: synthetic, batch_size: 16}
train: {max_steps: 2, progress: false}
run: {dir: RUN}
task_options:
  OPTION
"""


@pytest.mark.parametrize("task,model,option,message", [
    ("digits_mlp", "{dim: 16, moe: {num_experts: 4, top_k: 2}}", "corrupt_exampels: [3]",
     "task_options.corrupt_exampels: unknown key (did you mean 'corrupt_examples'?)"),
    ("image_classification", "{num_classes: 10}", "topk: 0", "task_options.topk: must be >= 1, got 0"),
])
def test_options_typo_in_a_config_file_names_file_and_line(tmp_path, task, model, option, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(BAD.replace("TASK", task).replace("MODEL", model).replace("OPTION", option)
                   .replace("RUN", str(tmp_path / "run")))
    p = run_mmoe(["train", str(cfg)], check=False, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == f"mmoe: error: {cfg}:7: {message}"
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # nothing was trained or written


# ------------------------------------------------------------------------------------------ the engine drives it
ENGINE_SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
from mmoe.train.config import load_train_config
from mmoe.train.deepspeed import finish
from mmoe.train.engine import Trainer
from mmoe.train.tasks import CollectingEvaluator, register_task
from vision.digits import DigitsTask


@register_task("digits_collect")
class DigitsCollect(DigitsTask):
    collect = True

    def evaluator(self):
        return CollectingEvaluator(self.per_sample, self.whole_split) if self.collect else super().evaluator()

    @torch.no_grad()
    def per_sample(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y, reduction="none"), "correct": logits.argmax(-1) == y}

    def whole_split(self, records):
        loss = torch.cat([r["loss"] for r in records])
        correct = torch.cat([r["correct"] for r in records])
        return {"count": float(loss.numel()), "acc": float(correct.double().mean()),
                "loss": float(loss.double().mean()), "median_loss": float(loss.median())}


args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
trainer = Trainer(load_train_config(args[0], args[1:]), config_source=args[0], train=False)
out = {"collect": trainer.evaluate()}
trainer.task.collect = False
out["sum"] = trainer.evaluate()
if trainer.rank == 0:
    print("RESULT " + json.dumps(out))
finish()
"""

ENGINE_CFG = """\
task: digits_collect
model: {dim: 32, depth: 2, moe: {num_experts: 4, top_k: 2, expert_hidden: 32}}
data: {train: DATA, train_split: train, val: DATA, val_split: val, batch_size: 32, eval_batch_size: 24}
run: {dir: RUN, tensorboard: false}
"""


@pytest.mark.distributed
def test_engine_drives_the_evaluator_one_rank_and_two_expert_parallel_ranks(tmp_path):
    """An untrained model (the same weights on one and on two ranks) evaluated by the engine with a collecting
    evaluator (per-sample losses: a median is no sum of batch scalars) and with the default one. Two ranks hold
    200 and 138 validation samples, so under expert parallelism rank 1 repeats its last batch for three
    forwards: those must not be counted."""
    from vision.digits import write_digits_shards

    data = tmp_path / "digits"
    write_digits_shards(data, samples_per_shard=100)
    script = tmp_path / "evaluate.py"
    script.write_text(ENGINE_SCRIPT)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(ENGINE_CFG.replace("DATA", str(data)).replace("RUN", str(tmp_path / "run")))
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                   os.environ.get("PYTHONPATH", "")]))
    launcher = Path(sys.executable).with_name("deepspeed")
    results = {}
    for world, cmd in ((1, [sys.executable, str(script), str(cfg)]),
                       (2, [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(script),
                            str(cfg), "dist.ep_size=2"])):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        line = next(x for x in p.stdout.splitlines() if "RESULT " in x)
        results[world] = json.loads(line.split("RESULT ", 1)[1])
    for world, r in results.items():
        assert r["collect"]["count"] == r["sum"]["count"] == 338, world
        assert r["collect"]["acc"] == pytest.approx(r["sum"]["acc"], abs=1e-12), world
        assert r["collect"]["loss"] == pytest.approx(r["sum"]["loss"], rel=1e-6), world
    one, two = results[1]["collect"], results[2]["collect"]
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-5), k


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_task_options_validate(name):
    from mmoe.train.config import load_train_config
    from mmoe.train.tasks import get_task

    path = CONFIGS / name
    cfg = load_train_config(path)
    task_cls = get_task(cfg.task)
    opts = task_cls.parse_options(cfg.task_options, source=str(path), origins=cfg._origins)
    assert isinstance(opts, task_cls.Options)
