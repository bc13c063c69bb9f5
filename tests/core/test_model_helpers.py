"""The "MoE in a model" helpers of the core: `mmoe.moe_config_from_section` (alone and through the YAML
loader of every family, errors at ``file:line``), the placement grammar `mmoe.moe_block_indices`,
`mmoe.count_params` (by hand, and with experts sharded) and `mmoe.RoutingCounter` (against a hand count
from ``route()``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmoe
from mmoe import MoE, MoEConfig, RoutingCounter, count_params, moe_block_indices, moe_config_from_section
from mmoe.errors import ConfigError

from tests.helpers import run_mmoe  # noqa: E402 (tests/helpers.py)


# ------------------------------------------------------------------------------------------------ section builder
def _err(section, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        moe_config_from_section(section, **{"dim": 64, **kw})
    assert info.value.origin == ""  # the loader fills in file:line
    return info.value


def test_section_builder_fills_dim_and_defaults():
    cfg = moe_config_from_section({"num_experts": 4, "top_k": 1, "router_jitter": 0}, dim=64)
    assert cfg == MoEConfig(dim=64, num_experts=4, top_k=1)
    assert isinstance(cfg.router_jitter, float)  # an int is fine for a float, and becomes one
    assert moe_config_from_section(None, dim=32) == MoEConfig(dim=32)
    assert moe_config_from_section({"dim": 64}, dim=64).dim == 64  # agreeing with the model is fine
    # expert_hidden from the dense MLP's width, split over the MH-MoE sub-tokens; null = that default
    assert moe_config_from_section({"heads": 2}, dim=64, mlp_hidden=256).expert_hidden == 128
    assert moe_config_from_section({"expert_hidden": None}, dim=64, mlp_hidden=256).expert_hidden == 256
    assert moe_config_from_section({"expert_hidden": 48}, dim=64, mlp_hidden=256).expert_hidden == 48
    got = moe_config_from_section({"expert_bias": True}, dim=64,
                                  defaults={"activation": "swiglu", "expert_bias": False})
    assert got.activation == "swiglu" and got.expert_bias is True  # defaults only where the section is silent


def test_section_builder_errors_name_the_relative_key():
    e = _err({"num_experts": 4, "top_kk": 1})
    assert e.key == "moe.top_kk" and "did you mean 'top_k'?" in e.problem
    e = _err({"top_k": 2.0})
    assert (e.key, e.problem) == ("moe.top_k", "expected an int, got 2.0 (float)")
    assert _err({"top_k": True}).key == "moe.top_k"  # a bool is never an int
    assert _err({"aux_loss_weight": False}).key == "moe.aux_loss_weight"  # nor a float
    assert _err({"aux_loss_weight": "0.1"}).key == "moe.aux_loss_weight"
    e = _err({"router": "xmo"})
    assert e.key == "moe.router" and "'xmoe'" in e.problem
    assert _err({"capacity_factor": "none"}).key == "moe.capacity_factor"  # float or null
    # MoEConfig's own cross-field validation, re-keyed relative to the calling section
    e = _err({"num_experts": 8, "top_k": 9}, key="experts")
    assert str(e) == "experts.top_k: must be <= num_experts=8 (got 9)"
    assert _err({"heads": 3}).key == "moe.heads"  # 64 is not divisible by 3
    # the model sets dim (and whatever else it fixes)
    e = _err({"dim": 32})
    assert e.key == "moe.dim" and "set by the model to 64" in e.problem
    assert _err({"activation": "gelu"}, activation="swiglu").key == "moe.activation"
    assert _err([1, 2]).key == "moe"


# ------------------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("spec, depth, first_dense, expected", [
    ("every_2", 12, 0, [1, 3, 5, 7, 9, 11]),  # V-MoE "Every 2"
    ("every_1", 4, 0, [0, 1, 2, 3]),
    ("every_3", 12, 0, [2, 5, 8, 11]),
    ("every_2", 6, 1, [2, 4]),  # counted from the first MoE-able block
    ("every_1", 4, 1, [1, 2, 3]),
    ("last_2", 12, 0, [9, 11]),  # V-MoE "Last 2": the last 2 of every_2
    ("last_1", 4, 0, [3]),
    ("last_half", 12, 0, [6, 7, 8, 9, 10, 11]),  # Soft MoE's contiguous second half
    ("last_half", 5, 0, [2, 3, 4]),
    ("last_half", 4, 3, [3]),
    ("all", 4, 0, [0, 1, 2, 3]),
    ("all", 4, 2, [2, 3]),
    ("ALL ", 3, 0, [0, 1, 2]),
    ("none", 4, 0, []),
    ([3, 0], 4, 0, [0, 3]),
    ((1,), 2, 1, [1]),
    ("every_2", 0, 0, []),
])
def test_placement_grammar(spec, depth, first_dense, expected):
    assert moe_block_indices(spec, depth, first_dense=first_dense) == expected


@pytest.mark.parametrize("spec, depth, first_dense, problem", [
    ("sometimes", 4, 0, "unknown placement"),
    ("every_0", 4, 0, "n >= 1"),
    ("last_3", 4, 0, "n <= 2"),
    ("last_0", 4, 0, "n >= 1"),
    ([4], 4, 0, "in [0, 4)"),
    ([-1], 4, 0, "in [0, 4)"),
    ([0], 4, 1, "in [1, 4)"),  # an explicit index inside the dense prefix contradicts first_dense
    ([1, 1], 4, 0, "duplicate"),
    ([True], 4, 0, "list of int"),
    (12, 4, 0, "list of int"),  # the (depth, spec) order of the old vision helper fails loudly
])
def test_placement_errors_name_the_spec_and_the_forms(spec, depth, first_dense, problem):
    with pytest.raises(ConfigError) as info:
        moe_block_indices(spec, depth, first_dense=first_dense)
    e = info.value
    assert isinstance(e, ValueError) and e.key == "moe_layers" and problem in e.problem
    assert repr(spec) in e.problem and "'every_<n>', 'last_<n>', 'last_half', 'all', 'none'" in e.problem


def test_placement_first_dense_is_checked():
    with pytest.raises(ConfigError, match="first_dense"):
        moe_block_indices("all", 4, first_dense=5)
    import vision.models

    assert vision.models.moe_block_indices is moe_block_indices  # vision's public name stays


# ------------------------------------------------------------------------------------------------ through the loader
DIGITS = """\
task: digits_mlp
model:
  dim: 32
  depth: 2
  moe:
    num_experts: 4
    top_k: 9
data: {train: synthetic, batch_size: 8}
"""

VIT = """\
task: image_classification
model:
  arch: vit_moe_tiny_patch16_224
  num_classes: 10
  img_size: 32
  kwargs: {patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}
  moe_layers: every_2
  moe:
    num_experts: 8
    top_k: 9
data: {train: synthetic, batch_size: 8}
"""

LM = """\
task: causal_lm
model:
  vocab_size: 64
  dim: 32
  depth: 2
  num_heads: 2
  moe_layers: every_2
  moe: {num_experts: 4, top_k: 9}
data: {train: synthetic, batch_size: 8}
"""


def _model_error(tmp_path, text: str, *edits: tuple[str, str]) -> ConfigError:
    """Load a run config, then its ``model:`` section the way the engine does (`Trainer.__init__`)."""
    from mmoe.train.config import load_train_config
    from mmoe.train.configfile import from_dict
    from mmoe.train.tasks import get_task

    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    cfg = load_train_config(path)
    with pytest.raises(ConfigError) as info:
        from_dict(get_task(cfg.task).ModelConfig, cfg.model, source=str(path), path="model",
                  origins=getattr(cfg, "_origins", None))
    return info.value


@pytest.mark.parametrize("text, line", [(DIGITS, 7), (VIT, 10), (LM, 8)], ids=["digits_mlp", "image_classification",
                                                                              "causal_lm"])
def test_bad_moe_section_names_file_line_and_key(tmp_path, text, line):
    path = tmp_path / "run.yaml"
    e = _model_error(tmp_path, text)
    num_experts = 8 if "vit_moe" in text else 4
    assert str(e) == f"{path}:{line}: model.moe.top_k: must be <= num_experts={num_experts} (got 9)"
    e = _model_error(tmp_path, text, ("top_k: 9", "top_kk: 1"))
    assert (e.origin, e.key) == (f"{path}:{line}", "model.moe.top_kk") and "did you mean 'top_k'?" in e.problem
    e = _model_error(tmp_path, text, ("top_k: 9", "top_k: 1.5"))
    assert (e.origin, e.key) == (f"{path}:{line}", "model.moe.top_k") and "expected an int" in e.problem


@pytest.mark.parametrize("text, edit, line", [
    (DIGITS, ("depth: 2", "depth: 2\n  moe_layers: [0, 2]"), 5),
    (VIT, ("moe_layers: every_2", "moe_layers: last_3"), 7),  # depth 4 (from kwargs) has 2 every_2 blocks
    (LM, ("moe_layers: every_2", "moe_layers: every_0"), 7),
], ids=["digits_mlp", "image_classification", "causal_lm"])
def test_bad_placement_names_file_line_and_key(tmp_path, text, edit, line):
    e = _model_error(tmp_path, text, edit, ("top_k: 9", "top_k: 1"))
    assert (e.origin, e.key) == (f"{tmp_path / 'run.yaml'}:{line}", "model.moe_layers")


def test_engine_reports_the_line_of_a_bad_moe_field(tmp_path):
    """`mmoe train` (the engine validating the task's model section) prints ``file:line: key: problem``."""
    path = tmp_path / "bad.yaml"
    path.write_text(DIGITS)
    p = run_mmoe(["train", str(path)], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{path}:7: model.moe.top_k: must be <= num_experts=4 (got 9)" in p.stderr


def test_family_configs_build_their_layers_through_the_helpers():
    from language.models import LMConfig, MoETransformerLM
    from vision.digits import DigitsModelConfig, MLPMoE

    m = MLPMoE(DigitsModelConfig(dim=16, depth=3, moe_layers="every_2", moe={"num_experts": 2, "top_k": 1}))
    assert [isinstance(b, MoE) for b in m.blocks] == [False, True, False]
    assert m(torch.randn(3, 64)).shape == (3, 10)
    assert all(isinstance(b, MoE) for b in MLPMoE(DigitsModelConfig(dim=16, depth=2)).blocks)  # default: all
    lm = MoETransformerLM(LMConfig(vocab_size=32, dim=32, depth=4, num_heads=2, moe_layers="every_2", first_dense=1,
                                   moe={"num_experts": 2, "top_k": 1}))
    assert lm.moe_layer_ids == [2]


# ------------------------------------------------------------------------------------------------ count_params
def _two_layer_model() -> nn.Module:
    # per expert (gelu, biases): 8*16 + 16 + 16*8 + 8 = 280; MH-MoE swiglu experts of width 4: 3 * 4*6 = 72
    return nn.Sequential(
        nn.Linear(4, 8),  # 40
        MoE(MoEConfig(dim=8, num_experts=4, top_k=2, expert_hidden=16)),  # router 32 + 4 * 280
        MoE(MoEConfig(dim=8, num_experts=4, top_k=1, expert_hidden=6, heads=2, shared_experts=1,
                      activation="swiglu", expert_bias=False)),  # router 16, head+merge 2*72, shared 3*96, 4*72
    )


def test_count_params_by_hand():
    model = _two_layer_model()
    c = count_params(model)
    assert c.total == 40 + (32 + 4 * 280) + (16 + 2 * 72 + 288 + 4 * 72) == sum(p.numel() for p in model.parameters())
    # a token: top-2 experts in the first layer, 2 sub-tokens x top-1 in the second
    assert c.active == 40 + (32 + 2 * 280) + (16 + 2 * 72 + 288 + 2 * 72)
    assert c.expert == 4 * 280 + 4 * 72
    model[1].set_top_k(1)  # the layer's current top_k counts (AdaMV changes it)
    assert count_params(model).active == c.active - 280
    assert mmoe.count_params is count_params
    import language.models
    import vision.models

    assert language.models.count_params is count_params and vision.models.count_params is count_params


def test_count_params_counts_every_expert_under_expert_parallelism(monkeypatch):
    """A rank of a 2-way expert-parallel group holds half of every layer's experts (`shard_experts`,
    here with the group size and rank faked); the counts are those of the whole model."""
    from mmoe.train import sharding

    full = _two_layer_model()
    sharded = copy.deepcopy(full)
    monkeypatch.setattr(sharding, "group_size", lambda group: 2)
    monkeypatch.setattr(sharding, "group_rank", lambda group: 1)
    sharding.shard_experts(sharded, ep_group=object())
    layers = [m for m in sharded.modules() if isinstance(m, MoE)]
    assert all(m.ep_size == 2 and m.experts.num_experts == 2 for m in layers)
    assert sum(p.numel() for p in sharded.parameters()) == count_params(full).total - count_params(full).expert // 2
    assert count_params(sharded) == count_params(full)
    layers[0].ep_size = 4  # 2 local experts x 4 != 4 experts
    with pytest.raises(ValueError, match="ep_size=4"):
        count_params(sharded)


# ------------------------------------------------------------------------------------------------ RoutingCounter
def _hand_count(moe: MoE, x: torch.Tensor, ids: torch.Tensor, G: int) -> torch.Tensor:
    r = moe.route(x)
    h, E = moe.cfg.heads, moe.cfg.num_experts
    out = torch.zeros(G, E, dtype=torch.long)
    flat = ids.reshape(-1).tolist()
    for row, slots in enumerate(r.indices.tolist()):
        g = flat[row // h]  # sub-tokens t*h .. t*h+h-1 belong to token t
        for e in slots:
            if e >= 0 and 0 <= g < G:
                out[g, e] += 1
    return out


@pytest.mark.parametrize("opts", [dict(top_k=2, heads=2), dict(top_k=1), dict(router="expert_choice", top_k=1,
                                                                             capacity_factor=0.5)],
                         ids=["mh_moe", "top1", "expert_choice"])
def test_routing_counter_matches_a_hand_count(opts):
    moe = MoE(MoEConfig(dim=8, num_experts=4, **opts)).eval()
    model = nn.Sequential(moe)
    counter = RoutingCounter(model, groups=["en", "de", "fr"])
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    ids = [torch.randint(-1, 3, (2, 5)) for _ in range(3)]  # -1: padding, not counted
    with torch.no_grad(), counter:
        assert moe.record_routing
        for x, i in zip(xs, ids):
            model(x)
            counter.add(i)
    assert not moe.record_routing and moe.last_routing is None  # restored
    with torch.no_grad():
        want = sum(_hand_count(moe, x, i, 3) for x, i in zip(xs, ids))
    got = counter.counts()
    assert list(got) == ["0"] and got["0"].dtype == torch.long
    torch.testing.assert_close(got["0"], want, rtol=0, atol=0)
    assert want.sum() > 0
    if "capacity_factor" not in opts:  # token choice: every valid token counts heads * top_k slots
        valid = sum(int((i >= 0).sum()) for i in ids)
        assert int(want.sum()) == valid * moe.cfg.heads * moe.cfg.top_k


def test_routing_counter_per_layer_ids_groups_state_and_plot(tmp_path):
    model = nn.ModuleDict({"a": MoE(MoEConfig(dim=8, num_experts=4, top_k=1)),
                           "b": MoE(MoEConfig(dim=8, num_experts=2, top_k=1))}).eval()
    counter = RoutingCounter(model, groups=2)
    assert counter.groups == ["0", "1"]
    x, keep = torch.randn(6, 8), torch.tensor([True, False, True, True, False, True])
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad(), counter:
        model["a"](x)
        model["b"](x[keep])  # a layer that sees only some tokens: ids per layer
        counter.add({"a": ids, "b": ids[keep]})
        model["a"](x)
        counter.add(1)  # one group for the whole call (a modality, a task); "b" did not run again
        model["a"](x)
        with pytest.raises(ValueError, match="per layer"):
            counter.add(ids[:4])
    with torch.no_grad():
        want_a = _hand_count(model["a"], x, ids, 2) + _hand_count(model["a"], x, torch.ones(6, dtype=torch.long), 2)
        want_b = _hand_count(model["b"], x[keep], ids[keep], 2)
    got = counter.counts()
    assert got["a"].shape == (2, 4) and got["b"].shape == (2, 2)
    torch.testing.assert_close(got["a"], want_a, rtol=0, atol=0)
    torch.testing.assert_close(got["b"], want_b, rtol=0, atol=0)
    state = counter.state_dict()
    other = RoutingCounter(model, groups=2)
    other.load_state_dict(state)
    assert all(torch.equal(other.counts()[k], got[k]) for k in got)
    other.reset()
    assert all(int(c.sum()) == 0 for c in other.counts().values())
    with pytest.raises(ValueError, match="groups"):
        RoutingCounter(model, groups=["x", "y"]).load_state_dict(state)
    png = counter.plot(tmp_path / "shares.png", "share per group")
    assert png.is_file() and png.stat().st_size > 0
