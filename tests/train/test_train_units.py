"""Engine pieces that need no process group: parameter groups, LR schedules, config loading."""

from __future__ import annotations

import math

import pytest

from mmoe.train.configfile import ConfigError
from mmoe.train.sharding import shard_experts
from mmoe.train.config import OptimConfig, load_train_config
from mmoe.train.optim import lr_lambda, param_groups
from vision.digits import DigitsModelConfig, MLPMoE


def _groups(**opt):
    model = MLPMoE(DigitsModelConfig(dim=16, depth=1, moe=dict(num_experts=4, top_k=2, expert_bias=True)))
    shard_experts(model, None)  # marks expert parameters for DeepSpeed (ep_size 1)
    return model, param_groups(model, OptimConfig(weight_decay=0.1, **opt))


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_decay_and_moe():
    model, groups = _groups()
    by = {}
    for g in groups:
        by.setdefault((g["weight_decay"] > 0, bool(g.get("moe"))), []).extend(_names(model, g))
    assert sorted(by[(True, True)]) == ["blocks.0.experts.w1", "blocks.0.experts.w2"]
    assert sorted(by[(False, True)]) == ["blocks.0.experts.b1", "blocks.0.experts.b2"]
    assert sorted(by[(True, False)]) == ["head.weight", "inp.weight"]
    no_decay = by[(False, False)]
    assert "blocks.0.routers.0.weight" in no_decay and "norms.0.weight" in no_decay and "head.bias" in no_decay
    assert all(g["name"] == "ep_size_1" for g in groups if g.get("moe"))
    # every trainable parameter exactly once
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())


def test_param_groups_options():
    model, groups = _groups(decay_router=True, decay_norm_and_bias=True, router_lr_scale=0.1)
    router = [g for g in groups if "blocks.0.routers.0.weight" in _names(model, g)][0]
    assert router["weight_decay"] == 0.1 and router["lr_scale"] == 0.1
    norm = [g for g in groups if "norms.0.weight" in _names(model, g)][0]
    assert norm["weight_decay"] == 0.1 and norm["lr_scale"] == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules(schedule):
    f = lr_lambda(OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])  # linear warmup
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    mid, end = f(60), f(110)
    if schedule == "cosine":
        assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert end == pytest.approx(0.1)
    elif schedule == "linear":
        assert mid == pytest.approx(0.55) and end == pytest.approx(0.1)
    else:
        assert mid == end == 1.0


def test_train_config_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: digits_mlp\ntrain: {max_steps: 0}\n")
    with pytest.raises(ConfigError, match="train.max_steps: must be >= 1"):
        load_train_config(f)
    f.write_text("task: digits_mlp\ndata: {batch_size: 8.5}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: data.batch_size"):
        load_train_config(f)
    f.write_text("model: {}\n")
    with pytest.raises(ConfigError, match="task: required"):
        load_train_config(f)
    f.write_text("task: digits_mlp\n")
    cfg = load_train_config(f, ["dist.ep_size=2", "optim.betas=[0.9, 0.95]"])
    assert cfg.dist.ep_size == 2 and tuple(cfg.optim.betas) == (0.9, 0.95)


def test_data_sources_config(tmp_path):
    f = tmp_path / "c.yaml"
    good = "task: digits_mlp\ndata:\n  sources:\n    - {path: a, weight: 2, task: cls}\n    - {path: b, split: train}\n"
    f.write_text(good)
    cfg = load_train_config(f)
    assert [(s.path, s.weight, s.task, s.split) for s in cfg.data.sources] == [("a", 2.0, "cls", None),
                                                                               ("b", 1.0, None, "train")]
    assert cfg.data.train_sources() == cfg.data.sources
    one = load_train_config(f, ["data.sources=[]", "data.train=x", "data.train_split=train"]).data.train_sources()
    assert [(s.path, s.weight, s.split) for s in one] == [("x", 1.0, "train")]
    for old, new, problem in (("weight: 2", "weight: 0", r"data.sources\[0\].weight: must be > 0, got 0.0"),
                              ("weight: 2", "weight: -1.5", r"data.sources\[0\].weight: must be > 0, got -1.5"),
                              ("path: a", "path: ''", r"data.sources\[0\].path: required")):
        f.write_text(good.replace(old, new))
        with pytest.raises(ConfigError, match=f"^{f}:4: {problem}"):  # file:line of the key
            load_train_config(f)
    f.write_text(good)
    with pytest.raises(ConfigError, match=r"data.sources: give data.train or data.sources, not both"):
        load_train_config(f, ["data.train=x"])
    with pytest.raises(ConfigError, match=r"data.train_split: with data.sources each source sets its own split"):
        load_train_config(f, ["data.train_split=train"])
    with pytest.raises(ConfigError, match=r"data.sources\[1\].wieght: unknown key"):
        load_train_config(f, ["data.sources=[{path: a}, {path: b, wieght: 2}]"])


def test_model_section_is_validated_by_the_task():
    from mmoe.train.configfile import from_dict

    with pytest.raises(ConfigError, match="model.dimm"):
        from_dict(DigitsModelConfig, {"dimm": 3}, source="x.yaml", path="model")
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        MLPMoE(from_dict(DigitsModelConfig, {"moe": {"num_experts": 2, "top_k": 3}}, path="model"))
