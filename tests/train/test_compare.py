"""`mmoe compare` (mmoe.tools.compare): variants parsing and override application (MH-MoE matching included),
error messages, and a tiny end-to-end comparison on synthetic causal-LM data: results, table, plot,
skipping finished runs, resuming an interrupted one, refusing a run folder of another config."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from mmoe import MoEConfig, mh_moe_config
from mmoe.tools import compare
from mmoe.errors import MMoEError
from mmoe.train.configfile import ConfigError
from mmoe.train.runlog import read_jsonl, truncate_after

BASE = """\
task: causal_lm
model:
  vocab_size: 64
  seq_len: 32
  dim: 32
  depth: 2
  num_heads: 2
  ffn: swiglu
  moe_layers: every_2
  moe: {num_experts: 4, top_k: 1, expert_hidden: 64, aux_loss_weight: 0.01}
data: {train: synthetic, val: synthetic, batch_size: 4}
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {max_steps: 4, log_every: 1, eval_every: 2, eval_batches: 2, save_every: 2, keep_last: 3, stats_every: 2,
        progress: false}
run: {dir: runs/unused, seed: 7, tensorboard: false}
"""

COMPARE = """\
base: base.yaml
train: {grad_clip: 0.5}
variants:
  topk: {model.moe.dense_backprop: none}
  mh: {mh_moe: {heads: 2, match: flops}}
  mh_params:
    mh_moe: {heads: 2, match: params}
  default:
    model.moe: {dense_backprop: default, default_beta: 0.5}
    model.moe.aux_loss_weight: 0.02
    model.languages: [syn0, syn1]
"""


def write_configs(folder: Path, compare_text: str = COMPARE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(BASE)
    path = folder / "compare.yaml"
    path.write_text(compare_text)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmoe compare")
    compare.add_args(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# variants and overrides


def test_variants_are_parsed_and_applied_in_order(tmp_path):
    path = write_configs(tmp_path)
    cf = compare.load_compare_file(path)
    assert list(cf.variants) == ["topk", "mh", "mh_params", "default"]
    assert "variants" not in cf.data and not any(k.startswith("variants") for k in cf.origins)
    assert cf.data["train"]["grad_clip"] == 0.5 and cf.data["task"] == "causal_lm"  # base: merged
    default = cf.variants["default"]
    assert default.overrides == ["model.moe.dense_backprop=default", "model.moe.default_beta=0.5",
                                 "model.moe.aux_loss_weight=0.02", 'model.languages=["syn0", "syn1"]']
    assert default.origin.endswith("compare.yaml:8")

    cfg = compare.variant_config(cf, default, overrides=["optim.lr=1e-3", "model.moe.dense_backprop=expert_group"],
                                 seed=3, run_dir=tmp_path / "out" / "default" / "seed3", steps=9)
    moe = cfg.model["moe"]
    assert moe["dense_backprop"] == "default"  # the variant's key wins over the command line
    assert moe["default_beta"] == 0.5 and isinstance(moe["default_beta"], float)
    assert moe["aux_loss_weight"] == 0.02 and moe["num_experts"] == 4  # merged, not replaced
    assert cfg.model["languages"] == ["syn0", "syn1"]
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 9 and cfg.train.grad_clip == 0.5
    assert cfg.run.seed == 3 and Path(cfg.run.dir) == tmp_path / "out" / "default" / "seed3"

    topk = compare.variant_config(cf, cf.variants["topk"], overrides=["model.moe.dense_backprop=expert_group"])
    assert topk.model["moe"]["dense_backprop"] == "none" and topk.run.seed == 7 and topk.train.max_steps == 4


def test_override_values_keep_their_types():
    from mmoe.train.configfile import parse_override

    for value in ["default", "2", "1e-3", "null", "true", 0.001, 2, None, True, [1, "a"], "a b", ""]:
        text = compare._override_text("a.b", value)
        assert parse_override(text)[1] == value and type(parse_override(text)[1]) is type(value), text


@pytest.mark.parametrize("match", ["flops", "params"])
def test_mh_moe_variant_rewrites_model_moe(tmp_path, match):
    cf = compare.load_compare_file(write_configs(tmp_path))
    name = "mh" if match == "flops" else "mh_params"
    assert cf.variants[name].mh_moe == compare.MHMoESpec(heads=2, match=match)
    cfg = compare.variant_config(cf, cf.variants[name], overrides=["model.moe.num_experts=8"])
    base = MoEConfig(dim=32, num_experts=8, top_k=1, expert_hidden=64, activation="swiglu", expert_bias=False,
                     aux_loss_weight=0.01)
    want = mh_moe_config(base, 2, match)
    moe = cfg.model["moe"]
    assert (moe["num_experts"], moe["top_k"], moe["expert_hidden"], moe["heads"]) == (
        want.num_experts, want.top_k, want.expert_hidden, 2)
    if match == "flops":  # v2 regime: k*h experts per sub-token, more and narrower experts
        assert moe["num_experts"] > 8 and moe["top_k"] == 2 and moe["expert_hidden"] < 64
    else:  # v1 regime: same E and k, wider experts (parameter parity)
        assert (moe["num_experts"], moe["top_k"]) == (8, 1) and moe["expert_hidden"] > 64
    assert moe["aux_loss_weight"] == 0.01  # the rest of the section is kept


def test_mh_moe_variant_errors(tmp_path):
    bad = COMPARE.replace("{heads: 2, match: params}", "{heads: 2, match: flop}")
    with pytest.raises(ConfigError, match=r"compare\.yaml:\d+: variants\.mh_params\.mh_moe\.match: .*'flops'"):
        compare.load_compare_file(write_configs(tmp_path, bad))
    cf = compare.load_compare_file(write_configs(tmp_path / "b", COMPARE.replace("heads: 2, match: flops", "heads: 3")))
    with pytest.raises(ConfigError, match=r"variant 'mh': mh_moe: model\.moe: .*heads=3 must divide dim=32"):
        compare.variant_config(cf, cf.variants["mh"])


def test_unknown_variant_names_the_file_and_the_choices(tmp_path):
    path = write_configs(tmp_path)
    with pytest.raises(MMoEError) as err:
        compare.run(parse([str(path), "--variants", "topk,nope", "--out", str(tmp_path / "out")]))
    msg = str(err.value)
    assert str(path) in msg and "'nope'" in msg and "available: topk, mh, mh_params, default" in msg
    assert not (tmp_path / "out").exists()


def test_bad_keys_are_reported_before_training(tmp_path):
    path = write_configs(tmp_path, COMPARE + "  typo: {optim.lrr: 0.1}\n")
    want = r"compare\.yaml:\d+: variant 'typo': override 'optim\.lrr=0\.1'.*did you mean 'lr'"
    with pytest.raises(MMoEError, match=want):
        compare.run(parse([str(path), "--out", str(tmp_path / "out")]))
    path = write_configs(tmp_path / "m", COMPARE + "  typo: {model.moe.dense_backprp: none}\n")
    with pytest.raises(MMoEError, match=r"compare\.yaml:\d+: variant 'typo': .*dense_backprp"):
        compare.run(parse([str(path), "--out", str(tmp_path / "m" / "out")]))
    path = write_configs(tmp_path / "r", COMPARE + "  seeded: {run.seed: 3}\n")
    with pytest.raises(MMoEError, match=r"variants\.seeded\.run\.seed: set by mmoe compare"):
        compare.run(parse([str(path), "--out", str(tmp_path / "r" / "out")]))
    text = COMPARE.replace("train: {grad_clip: 0.5}", "train: {eval_batches: null}")
    no_eval = write_configs(tmp_path / "e", text)
    with pytest.raises(MMoEError, match="train.eval_batches"):
        compare.run(parse([str(no_eval), "--out", str(tmp_path / "e" / "out")]))
    for r in [tmp_path / "out", tmp_path / "m" / "out", tmp_path / "r" / "out", tmp_path / "e" / "out"]:
        assert not r.exists()


def test_runs_interleave_seeds(tmp_path):
    cf = compare.load_compare_file(write_configs(tmp_path))
    vs = compare.select_variants(cf, ["mh", "topk"])
    runs = compare.plan_runs(cf, vs, [0, 1], tmp_path / "out")
    assert [(r.variant.name, r.seed) for r in runs] == [("mh", 0), ("topk", 0), ("mh", 1), ("topk", 1)]
    assert [r.dir for r in runs][1] == tmp_path / "out" / "topk" / "seed0"


# ------------------------------------------------------------------------------------------------
# end to end: 2 variants x 2 seeds, 4 steps each


@contextlib.contextmanager
def _compare_in_process(argv: list[str]):
    """Run ``mmoe compare argv`` in this process on one thread; torch.distributed, the thread count and the
    environment are restored after."""
    import torch.distributed as dist

    saved_env = dict(os.environ)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert compare.run(parse(argv)) == 0
        yield
    finally:
        torch.set_num_threads(threads)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One tiny comparison, run in this process."""
    tmp = tmp_path_factory.mktemp("compare")
    path = write_configs(tmp)
    out = tmp / "out"
    with _compare_in_process([str(path), "--variants", "topk,mh", "--seeds", "0,1", "--out", str(out)]):
        yield path, out


def _snapshot(out: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("*/seed*/metrics.jsonl"))}


def test_compare_writes_results_table_and_plot(compared, capsys):
    path, out = compared
    res = json.loads((out / "results.json").read_text())
    assert list(res["variants"]) == ["topk", "mh"] and res["seeds"] == [0, 1] and res["max_steps"] == 4
    tokens = {}
    for name in ("topk", "mh"):
        v = res["variants"][name]
        assert sorted(v["runs"]) == ["0", "1"] and v["finished_seeds"] == [0, 1]
        for seed, m in v["runs"].items():
            assert m["status"] == "finished" and m["step"] == 4
            assert math.isfinite(m["final_val_ppl"])
            assert m["final_val_ppl"] == pytest.approx(math.exp(m["final_val_loss"]))
            assert m["best_val_ppl"] <= m["final_val_ppl"] and [s for s, _ in m["val_curve"]] == [2, 4]
            assert m["tokens_per_s"] > 0 and m["load_max_over_mean"] >= 1.0 and m["load_cv"] >= 0.0
            assert 0 < m["activation"] <= 1 and m["routing_step"] == 4
            assert m["tokens_seen"] > 4 * 4 * 16  # 4 steps of 4 documents of >= 16 tokens
            tokens.setdefault(seed, set()).add(m["tokens_seen"])
        s = v["summary"]["final_val_ppl"]
        finals = [m["final_val_ppl"] for m in v["runs"].values()]
        assert s["n"] == 2 and s["mean"] == pytest.approx(sum(finals) / 2)
        assert s["std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
    assert all(len(t) == 1 for t in tokens.values())  # the same data stream for every variant of a seed
    p_topk, p_mh = res["variants"]["topk"]["params"], res["variants"]["mh"]["params"]
    assert p_topk["moe"]["heads"] == 1 and p_mh["moe"] == {**p_mh["moe"], "heads": 2, "num_experts": 24, "top_k": 2}
    assert p_mh["moe_macs_per_token"] == pytest.approx(p_topk["moe_macs_per_token"], rel=0.05)  # FLOP-matched
    assert p_topk["total"] > p_topk["active"] > 0

    md = (out / "results.md").read_text()
    rows = [line for line in md.split("\n\n")[0].splitlines() if line.startswith("| ")]  # the first table
    assert rows[0].startswith("| variant | seeds | final val ppl | best val ppl |") and "expert activation" in rows[0]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["topk", "mh"]
    assert all(r.split("|")[2].strip() == "2/2" and " ± " in r.split("|")[3] for r in rows[1:])
    # the seed statistics: intervals and paired differences from the per-seed values, in JSON and a table
    from mmoe.tools.stats import paired_difference, t_interval

    base = {int(k): m["final_val_ppl"] for k, m in res["variants"]["topk"]["runs"].items()}
    mh = {int(k): m["final_val_ppl"] for k, m in res["variants"]["mh"]["runs"].items()}
    st = res["variants"]["mh"]["stats"]
    assert st["interval"]["low"] == pytest.approx(t_interval(list(mh.values()))["low"])
    assert st["paired"]["mean"] == pytest.approx(paired_difference(mh, base)["mean"])
    assert st["verdict"] in ("better", "worse", "inconclusive") and res["variants"]["topk"]["stats"]["verdict"] == "base"
    assert st["target_ppl"] == pytest.approx(sum(base.values()) / 2)
    assert st["tokens_to_target"]["n"] == st["tokens_to_target"]["reached"] <= 2
    stats_rows = [line for line in md.split("\n\n")[2].splitlines() if line.startswith("| ")]
    assert stats_rows[0].startswith("| variant | n | final ppl (95% CI) | Δ vs topk (paired, 95% CI) |")
    assert [r.split("|")[1].strip() for r in stats_rows[1:]] == ["topk", "mh"]
    png = (out / "val_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for name in ("topk", "mh"):
        for seed in (0, 1):
            run_dir = out / name / f"seed{seed}"
            assert json.loads((run_dir / "compare.json").read_text())["resumed"] is False
            assert (run_dir / "tokens_seen.json").is_file()


def test_second_invocation_skips_finished_runs(compared, tmp_path, capsys):
    path, out0 = compared
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    before = _snapshot(out)
    assert len(before) == 4
    (out / "results.json").unlink()
    capsys.readouterr()
    assert compare.run(parse([str(path), "--variants", "topk,mh", "--seeds", "0,1", "--out", str(out), "--json"])) == 0
    captured = capsys.readouterr()
    assert _snapshot(out) == before  # nothing retrained
    assert captured.err.count("finished run in") == 4 and "training" not in captured.err
    printed = json.loads(captured.out)
    assert printed["variants"]["mh"]["finished_seeds"] == [0, 1] and (out / "results.json").is_file()


def test_interrupted_run_resumes_and_plot_only(compared, tmp_path, capsys):
    path, out0 = compared
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    victim = out / "mh" / "seed1"
    shutil.rmtree(victim / "checkpoints" / "step_0000004")  # killed after the checkpoint of step 2: its
    (victim / "checkpoints" / "latest").write_text("step_0000002")  # pointer was the last thing written
    for name in ("metrics.jsonl", "routing.jsonl", "events.jsonl"):
        truncate_after(victim / name, 2)
    before = _snapshot(out)
    args = [str(path), "--variants", "topk,mh", "--seeds", "0,1", "--out", str(out)]

    assert compare.run(parse([*args, "--plot-only"])) == 0  # trains nothing; the partial run is not averaged
    assert _snapshot(out) == before
    res = json.loads((out / "results.json").read_text())
    assert res["variants"]["mh"]["finished_seeds"] == [0] and res["variants"]["mh"]["runs"]["1"]["step"] == 2
    assert "| mh | 1/2 |" in capsys.readouterr().out

    assert compare.run(parse(args)) == 0
    after = _snapshot(out)
    assert {p: v for p, v in after.items() if victim not in p.parents} == {
        p: v for p, v in before.items() if victim not in p.parents}
    recs = read_jsonl(victim / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert any(r["step"] == 4 and "val/loss" in r for r in recs)
    assert json.loads((victim / "compare.json").read_text())["resumed"] is True
    res = json.loads((out / "results.json").read_text())
    assert res["variants"]["mh"]["finished_seeds"] == [0, 1]


def test_run_folder_of_another_config_is_refused(compared, tmp_path):
    path, out = compared
    before = _snapshot(out)
    with pytest.raises(MMoEError, match=r"seed0 \(train\.max_steps\).*another --out"):
        compare.run(parse([str(path), "--variants", "topk", "--seeds", "0", "--out", str(out), "--steps", "6"]))
    assert _snapshot(out) == before
    with pytest.raises(MMoEError, match="no runs"):
        compare.run(parse([str(path), "--out", str(tmp_path / "empty"), "--plot-only"]))


def test_throughput_header_uses_the_task_unit(compared):
    _, out = compared
    res = json.loads((out / "results.json").read_text())
    assert res["unit"] == "tokens" and res["report"] == [] and res["plot"] == "val_loss.png"
    head = (out / "results.md").read_text().splitlines()[0]
    assert "| Δ ppl vs topk | tokens/s | params total / active |" in head
    m = res["variants"]["topk"]["runs"]["0"]
    assert m["throughput"] == m["tokens_per_s"] > 0 and "loss" in m["val_metrics"]
    assert compare.task_unit(argparse.Namespace(task="no_such_task")) == "units"


# ------------------------------------------------------------------------------------------------
# report: other validation metrics (the digits task: val/acc, val/loss; images/s)

DIGITS = """\
task: digits_mlp
model: {dim: 16, depth: 2, moe: {num_experts: 4, top_k: 2, expert_hidden: 16}}
data: {train: synthetic, val: synthetic, batch_size: 8}
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {max_steps: 4, log_every: 1, eval_every: 2, eval_batches: 2, save_every: 4, stats_every: 2, progress: false}
run: {dir: runs/unused, tensorboard: false}
report:
  - acc
  - {name: loss, better: lower}
variants:
  top2: {}
  top1: {model.moe.top_k: 1}
"""


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A digits comparison with ``report: [acc, loss (lower)]``, 2 variants x 2 seeds of 4 steps."""
    tmp = tmp_path_factory.mktemp("report")
    path = tmp / "digits.yaml"
    path.write_text(DIGITS)
    out = tmp / "out"
    with _compare_in_process([str(path), "--seeds", "0,1", "--out", str(out)]):
        yield path, out


def test_report_metrics_replace_perplexity(reported):
    path, out = reported
    res = json.loads((out / "results.json").read_text())
    assert res["unit"] == "images" and res["plot"] == "val_acc.png"
    assert res["report"] == [{"name": "acc", "better": "higher"}, {"name": "loss", "better": "lower"}]
    for name in ("top2", "top1"):
        v = res["variants"][name]
        assert v["finished_seeds"] == [0, 1]
        for m in v["runs"].values():
            recs = read_jsonl(Path(m["dir"]) / "metrics.jsonl")
            final = next(r for r in recs if r["step"] == 4 and "val/acc" in r)
            assert m["final_val/acc"] == final["val/acc"] and 0 <= m["final_val/acc"] <= 1
            assert m["best_val/acc"] >= m["final_val/acc"] and m["best_val/loss"] <= m["final_val/loss"]
            assert m["report_curves"]["acc"][-1] == [4, final["val/acc"]] and len(m["report_curves"]["loss"]) == 2
            assert m["best_step_val/acc"] in (2, 4) and m["throughput"] > 0
        finals = [m["final_val/acc"] for m in v["runs"].values()]
        s = v["summary"]["final_val/acc"]
        assert s["n"] == 2 and s["mean"] == pytest.approx(sum(finals) / 2)
        assert v["summary"]["best_val/loss"]["n"] == 2

    rows = [line for line in (out / "results.md").read_text().split("\n\n")[0].splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | seeds | final acc | best acc | final loss | best loss | Δ acc vs top2 | "
                              "images/s | params total / active | MoE MACs/token |")
    assert "ppl" not in rows[0] and "tokens/s" not in rows[0]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows[1:]]
    assert [c[0] for c in cells] == ["top2", "top1"] and cells[0][6] == "0 (base)"
    a0, a1 = (res["variants"][n]["summary"]["final_val/acc"]["mean"] for n in ("top2", "top1"))
    assert float(cells[1][6]) == pytest.approx(a1 - a0, abs=1e-3)
    assert all(" ± " in c[2] and "–" not in c[2:7] for c in cells)
    png = (out / "val_acc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and not (out / "val_loss.png").exists()


def test_runs_without_val_loss_count_as_finished(reported, tmp_path, capsys):
    """A detection run logs no val/loss: its final validation is any val/ metric at max_steps."""
    path, out0 = reported
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    for f in out.glob("*/seed*/metrics.jsonl"):
        recs = [{k: v for k, v in r.items() if k not in ("val/loss", "val/count")} for r in read_jsonl(f)]
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = path.read_text().replace("  - {name: loss, better: lower}\n", "  - AP\n")
    (tmp_path / "digits.yaml").write_text(text)
    before = _snapshot(out)
    capsys.readouterr()
    assert compare.run(parse([str(tmp_path / "digits.yaml"), "--seeds", "0,1", "--out", str(out)])) == 0
    captured = capsys.readouterr()
    assert _snapshot(out) == before and captured.err.count("finished run in") == 4  # nothing retrained
    assert "report: no run logs val/AP (they log: acc)" in captured.err
    head = captured.out.splitlines()[0]
    assert head.startswith("| variant | seeds | final acc | best acc | final AP | best AP | Δ acc vs top2 | images/s")
    res = json.loads((out / "results.json").read_text())
    assert res["variants"]["top1"]["finished_seeds"] == [0, 1]
    assert res["variants"]["top1"]["runs"]["0"]["final_val_loss"] is None

    # the same runs without report: a warning that names what they log
    (tmp_path / "plain.yaml").write_text(text.replace("report:\n  - acc\n  - AP\n", ""))
    assert compare.run(parse([str(tmp_path / "plain.yaml"), "--seeds", "0,1", "--out", str(out), "--plot-only"])) == 0
    assert "the runs log no val/loss" in capsys.readouterr().err and (out / "val_loss.png").is_file()


@pytest.mark.parametrize("report, want", [
    ("{acc: 1}", r"compare\.yaml:1: report: expected a non-empty list"),
    ("[]", r"compare\.yaml:1: report: expected a non-empty list"),
    ("[acc, 3]", r"compare\.yaml:1: report\[1\]: expected a metric name or a mapping"),
    ("[val/acc]", r"compare\.yaml:1: report\[0\]: give the metric without its 'val/' prefix \('acc'"),
    ("\n  - acc\n  - {name: loss, better: low}", r"compare\.yaml:3: report\[1\]\.better: .*did you mean 'lower'"),
    ("[{nam: acc}]", r"compare\.yaml:1: report\[0\]\.nam: unknown key"),
    ("[acc, acc]", r"compare\.yaml:1: report\[1\]: 'acc' is listed twice"),
])
def test_malformed_report_is_a_config_error(tmp_path, report, want):
    path = tmp_path / "compare.yaml"
    path.write_text(f"report: {report}\n" + DIGITS.split("report:")[0])
    with pytest.raises(ConfigError, match=want) as err:
        compare.run(parse([str(path), "--out", str(tmp_path / "out")]))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


COMPARE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "compare"


@pytest.mark.parametrize("name", sorted(p.name for p in COMPARE_CONFIGS.glob("*.yaml")))
def test_shipped_compare_configs_validate_every_variant(name, tmp_path):
    path = COMPARE_CONFIGS / name
    cf = compare.load_compare_file(path)
    runs = compare.plan_runs(cf, compare.select_variants(cf, None), [0], tmp_path)
    assert runs and len({r.variant.name for r in runs}) == len(cf.variants)
