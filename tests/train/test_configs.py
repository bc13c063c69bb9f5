"""`mmoe.train.configfile`: strict YAML configs over dataclasses (types, line numbers, overrides, inheritance)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from mmoe import MoEConfig
from mmoe.train.configfile import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    weight_decay: float = 0.05
    milestones: list[int] = field(default_factory=list)
    name: Literal["adamw", "sgd", "lion"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Data:
    root: Path
    batch_size: int = 8
    sizes: tuple[int, ...] = (224,)


@dataclass
class Run:
    steps: int
    data: Data
    optim: Optim = field(default_factory=Optim)
    moe: MoEConfig | None = None
    model: dict[str, Any] = field(default_factory=dict)
    capacity_factor: float | None = None
    tags: dict[str, int] = field(default_factory=dict)
    seed: int = 0


@dataclass
class TaskModel:
    depth: int
    width: int = 32


TINY = """\
steps: 100
data:
  root: /data/x
  sizes: [224, 256]
optim:
  lr: 1e-3
  milestones: [10, 20]
moe:
  dim: 16
  num_experts: 4
  top_k: 2
  router: xmoe
model:
  depth: 4
  extra: {anything: [1, 2]}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_nested_dataclasses_load(tmp_path):
    cfg = load_config(Run, _write(tmp_path, "tiny.yaml", TINY))
    assert cfg.steps == 100
    assert cfg.data == Data(root=Path("/data/x"), batch_size=8, sizes=(224, 256))
    assert isinstance(cfg.data.root, Path) and isinstance(cfg.data.sizes, tuple)
    # "1e-3" is a string for plain PyYAML; it is a float here
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    # a partial section keeps the defaults of the keys it does not set
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.betas == (0.9, 0.999)
    assert isinstance(cfg.moe, MoEConfig) and cfg.moe.router == "xmoe" and cfg.moe.num_experts == 4
    # dict[str, Any] passes through unvalidated
    assert cfg.model == {"depth": 4, "extra": {"anything": [1, 2]}}
    assert cfg.capacity_factor is None


def test_moeconfig_section_error_is_prefixed_with_key_path_and_line(tmp_path):
    p = _write(tmp_path, "bad.yaml", TINY.replace("  top_k: 2", "  top_k: 8"))
    with pytest.raises(ConfigError) as info:
        load_config(Run, p)
    msg = str(info.value)
    assert msg.startswith(f"{p}:11: moe.top_k: "), msg
    assert "num_experts=4" in msg and "MoEConfig." not in msg
    assert info.value.key == "moe.top_k"
    assert isinstance(info.value, ValueError)


def test_unknown_key_suggests_close_match_with_file_and_line(tmp_path):
    p = _write(tmp_path, "configs/tiny.yaml", TINY.replace("  lr: 1e-3", "  lrr: 1e-3"))
    msg = _error(load_config, Run, p)
    assert msg == f"{p}:6: optim.lrr: unknown key (did you mean 'lr'?)"
    # no close match: the valid keys are listed
    msg = _error(load_config, Run, _write(tmp_path, "b.yaml", TINY + "zzzqqq: 1\n"))
    assert "zzzqqq: unknown key (valid keys: steps, data, optim" in msg and ":16:" in msg


def test_missing_required_key(tmp_path):
    msg = _error(load_config, Run, _write(tmp_path, "m.yaml", "steps: 3\n"))
    assert msg == f"{tmp_path / 'm.yaml'}: data: missing required key (expected a mapping (section Data))"
    msg = _error(load_config, Run, _write(tmp_path, "n.yaml", "steps: 3\ndata:\n  batch_size: 2\n"))
    assert msg.startswith(f"{tmp_path / 'n.yaml'}:2: data.root: missing required key")


@pytest.mark.parametrize(
    "line, key, expected",
    [
        ("steps: true", "steps", "expected an int, got True (bool)"),
        ("steps: 2.0", "steps", "expected an int, got 2.0 (float)"),
        ("capacity_factor: abc", "capacity_factor", "expected a float or null, got 'abc' (str)"),
        ("capacity_factor: '0.5'", "capacity_factor", "expected a float or null, got '0.5' (str)"),
        ("capacity_factor: false", "capacity_factor", "expected a float or null, got False (bool)"),
        ("seed: [1]", "seed", "expected an int, got [1] (list)"),
        ("tags: {a: x}", "tags.a", "expected an int, got 'x' (str)"),
        ("optim: 3", "optim", "expected a mapping (section Optim), got 3 (int)"),
    ],
)
def test_wrong_types_are_errors(tmp_path, line, key, expected):
    text = "data: {root: r}\n" + ("" if key == "steps" else "steps: 1\n") + line + "\n"
    p = _write(tmp_path, "t.yaml", text)
    msg = _error(load_config, Run, p)
    lineno = text.splitlines().index(line) + 1
    assert msg == f"{p}:{lineno}: {key}: {expected}"


def test_accepted_numeric_forms():
    base = {"steps": 1, "data": {"root": "r"}}
    cfg = from_dict(Run, {**base, "capacity_factor": 2, "optim": {"lr": "3E-4", "weight_decay": 0}})
    assert cfg.capacity_factor == 2.0 and isinstance(cfg.capacity_factor, float)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.weight_decay, float)
    msg = _error(from_dict, Run, {**base, "optim": {"lr": "abc"}}, source="configs/tiny.yaml")
    assert msg == "configs/tiny.yaml: optim.lr: expected a float, got 'abc' (str)"


def test_literal_error_lists_allowed_values(tmp_path):
    p = _write(tmp_path, "l.yaml", TINY.replace("  milestones: [10, 20]", "  name: adma"))
    msg = _error(load_config, Run, p)
    assert msg == f"{p}:7: optim.name: expected one of 'adamw', 'sgd', 'lion'; got 'adma' (str) (did you mean 'adamw'?)"
    msg = _error(load_config, Run, p, ["optim.name=sgd", "moe.router=fancy"])
    assert "moe.router=fancy" in msg
    assert "expected one of 'softmax', 'xmoe', 'sparsemixer', 'expert_choice', 'soft'; got 'fancy' (str)" in msg


def test_parse_override_uses_yaml_scalar_rules():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("ep_size=2") == (["ep_size"], 2)
    assert parse_override("moe.router=xmoe") == (["moe", "router"], "xmoe")
    assert parse_override("milestones=[1,2]") == (["milestones"], [1, 2])
    assert parse_override("capacity_factor=null") == (["capacity_factor"], None)
    assert parse_override("flag=true") == (["flag"], True)
    assert parse_override("name='2'") == (["name"], "2")
    assert parse_override("cmd=a=b") == (["cmd"], "a=b")
    for bad in ("no_equals", "=3", "a..b=1", "x=[1,"):
        with pytest.raises(ConfigError, match="override"):
            parse_override(bad)


def test_overrides_apply_typed_values_and_create_unset_keys(tmp_path):
    p = _write(tmp_path, "tiny.yaml", TINY)
    cfg = load_config(
        Run,
        p,
        [
            "optim.lr=3e-4",
            "optim.weight_decay=0",  # not in the file: created
            "moe.top_k=1",
            "moe.capacity_factor=1.25",
            "capacity_factor=2",
            "tags.x=5",  # open dict[str, int] section
            "data.sizes=[128]",
            "model.extra=null",
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.0 and cfg.optim.milestones == [10, 20]
    assert cfg.moe.top_k == 1 and cfg.moe.capacity_factor == 1.25 and cfg.moe.router == "xmoe"
    assert cfg.capacity_factor == 2.0 and cfg.tags == {"x": 5} and cfg.data.sizes == (128,)
    assert cfg.model == {"depth": 4, "extra": None}
    cfg = load_config(Run, p, ["moe=null", "capacity_factor=null"])
    assert cfg.moe is None and cfg.capacity_factor is None


def test_override_errors_name_the_override(tmp_path):
    p = _write(tmp_path, "tiny.yaml", TINY)
    msg = _error(load_config, Run, p, ["optim.lrr=1"])
    assert msg == "command line: override 'optim.lrr=1': optim.lrr: unknown key (did you mean 'lr'?)"
    msg = _error(load_config, Run, p, ["optim.lr=abc"])
    assert msg == "command line: override 'optim.lr=abc': optim.lr: expected a float, got 'abc' (str)"
    msg = _error(load_config, Run, p, ["moe.top_k=9"])
    assert msg.startswith("command line: override 'moe.top_k=9': moe.top_k: must be <= num_experts=4")
    msg = _error(load_config, Run, p, ["steps.x=1"])
    assert "override 'steps.x=1'" in msg and "not a section" in msg
    # a key of an open dict[str, Any] section is fine; a wrong type inside dict[str, int] is not
    assert load_config(Run, p, ["model.new.deep=1"]).model["new"] == {"deep": 1}
    assert "override 'tags.a=b'" in _error(load_config, Run, p, ["tags.a=b"])


def test_apply_overrides_copies_and_checks_against_cls():
    data = {"steps": 1, "optim": {"lr": 0.1}}
    out = apply_overrides(data, ["optim.lr=0.5", "data.root=/x"])
    assert out == {"steps": 1, "optim": {"lr": 0.5}, "data": {"root": "/x"}}
    assert data == {"steps": 1, "optim": {"lr": 0.1}}  # input untouched
    msg = _error(apply_overrides, data, ["optim.lrr=1"], cls=Run, source="cli")
    assert msg == "cli: override 'optim.lrr=1': optim.lrr: unknown key (did you mean 'lr'?)"


def test_base_inheritance_deep_merges_relative_to_including_file(tmp_path):
    _write(tmp_path, "common/base.yaml", "steps: 10\ndata:\n  root: /base\n  batch_size: 4\noptim:\n  lr: 0.5\n  name: sgd\n")
    child = _write(tmp_path, "exp/child.yaml", "base: ../common/base.yaml\ndata:\n  batch_size: 16\noptim:\n  lr: 0.1\n")
    cfg = load_config(Run, child)
    assert cfg.steps == 10 and cfg.data.root == Path("/base") and cfg.data.batch_size == 16
    assert cfg.optim.lr == 0.1 and cfg.optim.name == "sgd"
    # a bad value inherited from the base file is reported at the base file's line
    _write(tmp_path, "common/base.yaml", "steps: 10\ndata:\n  root: /base\noptim:\n  name: sgdd\n")
    msg = _error(load_config, Run, child)
    assert msg.startswith(f"{tmp_path / 'exp' / '../common/base.yaml'}:5: optim.name: expected one of")
    # _base_ spelling, and a list of bases merged in order
    _write(tmp_path, "b1.yaml", "steps: 1\ndata: {root: /one}\n")
    _write(tmp_path, "b2.yaml", "steps: 2\n")
    top = _write(tmp_path, "top.yaml", "_base_: [b1.yaml, b2.yaml]\nseed: 3\n")
    cfg = load_config(Run, top)
    assert (cfg.steps, cfg.data.root, cfg.seed) == (2, Path("/one"), 3)


def test_base_cycle_and_missing_base_are_errors(tmp_path):
    a = _write(tmp_path, "a.yaml", "base: b.yaml\nsteps: 1\n")
    _write(tmp_path, "b.yaml", "steps: 2\nbase: c.yaml\n")
    _write(tmp_path, "c.yaml", "base: a.yaml\n")
    msg = _error(load_config, Run, a)
    assert msg == f"{tmp_path / 'c.yaml'}:1: base: inheritance cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml"
    selfref = _write(tmp_path, "s.yaml", "base: s.yaml\n")
    assert "inheritance cycle: s.yaml -> s.yaml" in _error(load_config, Run, selfref)
    missing = _write(tmp_path, "m.yaml", "steps: 1\nbase: nope.yaml\n")
    assert _error(load_config, Run, missing).startswith(f"{missing}:2: base: base file not found")


def test_file_level_errors(tmp_path):
    assert _error(load_config, Run, tmp_path / "absent.yaml") == f"{tmp_path / 'absent.yaml'}: file not found"
    dup = _write(tmp_path, "dup.yaml", "steps: 1\ndata: {root: r}\nsteps: 2\n")
    assert _error(load_config, Run, dup) == f"{dup}:3: steps: duplicate key"
    syntax = _write(tmp_path, "syn.yaml", "steps: 1\ndata: [1,\n")
    assert _error(load_config, Run, syntax).startswith(f"{syntax}:")
    lst = _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    assert "must be a mapping" in _error(load_config, Run, lst)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        Run, _write(tmp_path, "tiny.yaml", TINY), ["optim.lr=3e-4", "moe.capacity_factor=1.5", "tags.a=1"]
    )
    cfg.model["name"] = "1e-3"  # a string that looks like a float must stay a string
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert saved == tmp_path / "run" / "config.yaml" and saved.exists()
    back = load_config(Run, saved)
    assert back == cfg
    assert back.model["name"] == "1e-3" and isinstance(back.data.sizes, tuple)
    plain = to_dict(cfg)
    assert plain["data"]["root"] == "/data/x" and plain["data"]["sizes"] == [224, 256]
    assert plain["moe"]["router"] == "xmoe" and type(plain["moe"]) is dict


def test_from_dict_path_prefix_for_task_sections(tmp_path):
    cfg = load_config(Run, _write(tmp_path, "tiny.yaml", TINY.replace("  extra: {anything: [1, 2]}\n", "")))
    assert from_dict(TaskModel, cfg.model, source="tiny.yaml", path="model") == TaskModel(depth=4)
    msg = _error(from_dict, TaskModel, {"depht": 4}, source="tiny.yaml", path="model")
    assert msg == "tiny.yaml: model.depht: unknown key (did you mean 'depth'?)"
    msg = _error(from_dict, TaskModel, {"depth": "4"}, source="tiny.yaml", path="model")
    assert msg == "tiny.yaml: model.depth: expected an int, got '4' (str)"
    with pytest.raises(TypeError):
        from_dict(dict, {})
