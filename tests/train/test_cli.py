"""The ``mmoe`` command line: help, one-line errors, and a tiny ``mmoe bench layer`` run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _mmoe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmoe", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands():
    proc = _mmoe("--help")
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout


def test_bench_layer_help_lists_flags():
    proc = _mmoe("bench", "layer", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--experts", "--topk", "--tokens", "--dim", "--repeats", "--no-deepspeed", "--json"):
        assert flag in proc.stdout


def test_unknown_subcommand_is_one_clear_line():
    proc = _mmoe("frobnicate")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "frobnicate" in lines[0] and "error" in lines[0]


def test_bad_list_value_is_one_clear_line():
    proc = _mmoe("bench", "layer", "--experts", "8,many")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--experts" in lines[0] and "8,many" in lines[0]


def test_topk_above_experts_is_one_clear_line():
    proc = _mmoe("bench", "layer", "--experts", "2", "--topk", "4", "--no-deepspeed")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--topk" in lines[0]


def test_bench_layer_tiny_writes_ratios(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = _mmoe("bench", "layer", "--tokens", "64", "--dim", "32", "--experts", "4", "--topk", "1",
                 "--repeats", "1", "--no-deepspeed", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    assert report["settings"]["tokens"] == 64 and report["settings"]["expert_hidden"] == 64
    (cell,) = report["cells"]
    assert (cell["experts"], cell["top_k"], cell["dense_hidden"]) == (4, 1, 64)
    variants = cell["variants"]
    assert set(variants) == {"dense", "mmoe_dropless", "mmoe_dropless_floor", "mmoe_cf1.25", "mmoe_soft"}  # no DeepSpeed
    assert variants["dense"]["median_ms"] > 0
    assert variants["dense"]["ratio_vs_dense"] == 1.0
    for name in ("mmoe_dropless", "mmoe_dropless_floor", "mmoe_cf1.25", "mmoe_soft"):
        v = variants[name]
        assert v["error"] is None, v["error"]
        assert len(v["times_ms"]) == 1
        assert v["ratio_vs_dense"] > 0
        assert v["ratio_vs_dense"] == v["median_ms"] / variants["dense"]["median_ms"]
    assert variants["mmoe_dropless"]["dropped_frac"] in (None, 0.0)
    dropped = variants["mmoe_cf1.25"]["dropped_frac"]
    assert dropped is None or 0.0 <= dropped <= 1.0

    overhead = report["overhead"]
    assert (overhead["experts"], overhead["top_k"]) == (4, 1)
    assert overhead["variants"]["topk"]["overhead_pct"] == 0.0
    for name in ("topk_floor", "mh_moe_flops_floor", "mh_moe_flops"):
        assert overhead["variants"][name]["error"] is None, overhead["variants"][name]["error"]
        assert overhead["variants"][name]["overhead_pct"] is not None
    assert "compute floor x" in proc.stdout
    assert "mmoe dropless x" in proc.stdout  # the table reached stdout
    # --loop both (the default): the same cell measured again in a plain-loop child (glibc's defaults)
    assert report["plain_loop_error"] is None and "allocator tuned" in proc.stdout
    (plain,) = report["plain_loop_cells"]
    assert (plain["experts"], plain["top_k"]) == (4, 1) and plain["variants"]["mmoe_dropless"]["ratio_vs_dense"] > 0
    assert "mmoe dropless x (plain loop)" in proc.stdout
    # live tensor memory from its own child, beside the resident-set growth
    assert report["live_memory_error"] is None and "peak live tensor memory" in proc.stdout
    assert all(v["live_peak_mib"] is not None and v["live_peak_mib"] >= 0 for v in variants.values())


def test_bench_paired_ratios_cancel_drift():
    """Per-round ratios: a variant always 10% slower than the base reads 1.10 even when the machine's speed
    drifts 3x between rounds (a ratio of medians would not)."""
    from mmoe.tools.layer_bench import _paired

    base = [100.0, 300.0, 120.0, 250.0]
    results = {"base": {"times_ms": base}, "slow": {"times_ms": [1.1 * t for t in base]},
               "failed": {"times_ms": []}}
    _paired(results, "base")
    assert results["base"]["ratio_vs_base"] == 1.0
    assert abs(results["slow"]["ratio_vs_base"] - 1.1) < 1e-12
    lo, hi = results["slow"]["ratio_iqr_vs_base"]
    assert abs(lo - 1.1) < 1e-12 and abs(hi - 1.1) < 1e-12
    assert results["failed"]["ratio_vs_base"] is None


def test_bench_floor_runs_the_experts_backward_from_a_fixed_gradient():
    """The compute floor's "loss" is a zero scalar whose backward hands a fixed gradient to the expert rows (and
    to the MH-MoE projections): the same gradient on every call, reaching every weight, with no loss math."""
    import torch

    import mmoe
    from mmoe.tools.layer_bench import _floor_variant, _mmoe_variant

    torch.manual_seed(0)
    x = torch.randn(32, 16)
    base = mmoe.MoEConfig(dim=16, num_experts=4, top_k=2, expert_hidden=32)
    with pytest.raises(ValueError, match="no positive expert width"):
        mmoe.mh_moe_config(base.replace(expert_hidden=8), heads=2, match="flops")
    for cfg in (base, mmoe.mh_moe_config(base, heads=2, match="flops")):
        floor = _floor_variant("floor", _mmoe_variant("layer", x, lambda cfg=cfg: cfg), x)
        assert floor.error is None
        grads = []
        for _ in range(2):
            loss = floor.forward_loss()
            assert loss.item() == 0.0
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in floor.module.named_parameters() if p.grad is not None})
            floor.module.zero_grad(set_to_none=True)
        assert {"experts.w1", "experts.w2"} <= set(grads[0])
        assert ("head_proj.weight" in grads[0]) == (cfg.heads > 1)
        for n, g in grads[0].items():
            assert g.abs().sum() > 0, n
            torch.testing.assert_close(grads[1][n], g)


def test_a_missing_family_is_an_explained_error(monkeypatch, capsys):
    """Families plug in by entry points; one that is declared but cannot be imported is one explained line."""
    from importlib.metadata import EntryPoint

    import mmoe.cli
    import mmoe.plugins
    import mmoe.train.tasks as tasks

    ghost = {"ghost": EntryPoint(name="ghost", value="no_such_family.tasks:GhostTask", group="mmoe.tasks")}
    monkeypatch.setattr(mmoe.plugins, "family_entry_points", lambda group: ghost)
    with pytest.raises(KeyError, match=r"task 'ghost' comes from no_such_family.tasks:GhostTask, which cannot be "
                                       r"imported \(No module named 'no_such_family'\)"):
        tasks.get_task("ghost")
    with pytest.raises(KeyError, match=r"unknown task 'nope'; known tasks: .*ghost"):
        tasks.get_task("nope")

    broken = {"ghost": EntryPoint(name="ghost", value="no_such_family.cli:COMMAND", group="mmoe.commands")}
    monkeypatch.setattr(mmoe.cli, "family_entry_points", lambda group: broken if group == "mmoe.commands" else {})
    assert mmoe.cli.main(["--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "command 'ghost' comes from no_such_family.cli:COMMAND" in err[0], err


def test_bench_model_quick_measures_every_family_group(tmp_path: Path):
    """`mmoe bench model --quick`: the vision family's ViT group (dense, two ViT-MoEs, DeepSpeed's layer) and
    the language family's decoding group, each with a throughput and a paired ratio to its dense model."""
    out = tmp_path / "model.json"
    proc = _mmoe("bench", "model", "--quick", "--rounds", "1", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = {g["key"]: g for g in json.loads(out.read_text())["groups"]}
    assert set(groups) == {"vit_demo", "lm_tiny"}
    vit = groups["vit_demo"]["variants"]
    assert list(vit) == ["dense", "vit_moe mh+default", "vit_moe top-2", "deepspeed top-2"]
    lm = groups["lm_tiny"]["variants"]
    assert list(lm) == ["dense", "moe top-2"]
    for v in [*vit.values(), *lm.values()]:
        assert v["error"] is None, v["error"]
        assert v["throughput"] > 0 and v["ratio_vs_first"] > 0 and len(v["times_ms"]) == 1
    # equal active compute: the MoE models' active parameters are within 1% of the dense model's
    for name in ("vit_moe mh+default", "vit_moe top-2", "deepspeed top-2"):
        assert abs(vit[name]["active_params"] / vit["dense"]["params"] - 1) < 0.01, name
    assert vit["vit_moe top-2"]["params"] > 2 * vit["dense"]["params"]
    assert groups["vit_demo"]["unit"] == "images/s" and groups["lm_tiny"]["unit"] == "tokens/s"
    assert "ViT training, demo" in proc.stdout and "LM decoding" in proc.stdout
