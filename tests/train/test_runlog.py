"""`mmoe.train.runlog`: metrics/routing/events JSON lines, non-finite values, resume, TensorBoard, plots."""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

import mmoe
from mmoe.train.runlog import RunLogger, plot_curves, read_jsonl, truncate_after


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG (and a check that it is one)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    return struct.unpack(">II", data[16:24])


def _quiet(tmp_path: Path, **kw) -> RunLogger:
    kw.setdefault("tensorboard", False)
    kw.setdefault("progress", False)
    kw.setdefault("total_steps", 10)
    return RunLogger(tmp_path / "run", **kw)


def test_metrics_jsonl_content(tmp_path):
    log = _quiet(tmp_path)
    log.log(1, loss=2.5, lr=1e-3)
    log.log(2, loss=torch.tensor(1.25), lr=torch.tensor(5e-4, dtype=torch.float64), **{"val/acc": 0.5})
    log.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"step", "time", "loss", "lr"}
    assert first["step"] == 1 and first["loss"] == 2.5 and first["lr"] == 1e-3
    assert abs(first["time"] - __import__("time").time()) < 60
    second = json.loads(lines[1])
    assert second["loss"] == 1.25 and second["lr"] == 5e-4 and second["val/acc"] == 0.5
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == [first, second]
    with pytest.raises(TypeError, match="loss"):
        RunLogger(tmp_path / "r2", total_steps=None, tensorboard=False, progress=False).log(1, loss="high")


def test_nonfinite_values_are_valid_json_and_restored(tmp_path):
    log = _quiet(tmp_path)
    log.log(3, loss=float("nan"), grad_norm=torch.tensor(float("inf")), lr=0.1, low=-math.inf)
    log.event(3, "nonfinite_step", "skipped a step with a NaN loss", values=[1.0, float("nan")])
    log.close()
    raw = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    rec = json.loads(raw)  # strict JSON for any reader
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["low"] is None and rec["lr"] == 0.1
    assert rec["nonfinite"] == {"loss": "nan", "grad_norm": "inf", "low": "-inf"}
    back = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and back["low"] == -math.inf
    assert "nonfinite" not in back and back["lr"] == 0.1
    ev = read_jsonl(tmp_path / "run" / "events.jsonl")[0]
    assert ev["kind"] == "nonfinite_step" and ev["values"][0] == 1.0 and math.isnan(ev["values"][1])
    raw_ev = json.loads((tmp_path / "run" / "events.jsonl").read_text())
    assert raw_ev["values"] == [1.0, None] and raw_ev["nonfinite"] == {"values": {"1": "nan"}}
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl", restore_nonfinite=False)[0]["loss"] is None


def test_events_are_printed_and_recorded(tmp_path, capsys):
    log = _quiet(tmp_path)
    log.event(40, "checkpoint", "saved ckpt_40.pt", path=tmp_path / "ckpt_40.pt")
    log.close()
    assert "[train step 40] checkpoint: saved ckpt_40.pt" in capsys.readouterr().out
    (ev,) = read_jsonl(tmp_path / "run" / "events.jsonl")
    assert ev["step"] == 40 and ev["message"] == "saved ckpt_40.pt" and ev["path"] == str(tmp_path / "ckpt_40.pt")


def test_truncate_after_and_resume(tmp_path):
    log = _quiet(tmp_path)
    for s in range(1, 7):
        log.log(s, loss=float(s))
    log.event(4, "checkpoint", "saved")
    log.event(6, "checkpoint", "saved")
    log.close()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 7, "loss"')  # a write cut short by a crash
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2, 3, 4, 5, 6]  # partial last line ignored
    # resume from the checkpoint of step 4: later lines go, the files continue from there
    log = _quiet(tmp_path, start_step=4)
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "events.jsonl")] == [4]
    log.log(5, loss=50.0)
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(metrics)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    # the function itself, on one file and on a run directory
    truncate_after(metrics, 2)
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2]
    truncate_after(tmp_path / "run", 0)
    assert read_jsonl(metrics) == [] and read_jsonl(tmp_path / "run" / "events.jsonl") == []
    truncate_after(tmp_path / "absent.jsonl", 3)  # no file: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_read_jsonl_reports_a_corrupt_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: invalid JSON"):
        read_jsonl(p)
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(tmp_path / "run", total_steps=5, progress=False)
    log.log(1, loss=0.75, lr=torch.tensor(0.01))
    log.log(2, loss=0.5, **{"val/acc": 0.9})
    log.close()
    tb = tmp_path / "run" / "tb"
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/acc"} <= set(tags)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 0.75), (2, 0.5)]
    assert acc.Scalars("val/acc")[0].value == pytest.approx(0.9)
    assert acc.Scalars("train/lr")[0].value == pytest.approx(0.01)


def test_log_routing_writes_jsonl_png_and_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = torch.nn.Sequential(
        mmoe.MoE(mmoe.MoEConfig(dim=16, num_experts=4, top_k=2)),
        mmoe.MoE(mmoe.MoEConfig(dim=16, num_experts=4, top_k=2, capacity_factor=1.0)),
    )
    model(torch.randn(2, 24, 16))
    stats = mmoe.routing_stats(model)
    assert len(stats) == 2
    log = RunLogger(tmp_path / "run", total_steps=100, progress=False)
    png = log.log_routing(12, stats)
    log.close()
    assert png == tmp_path / "run" / "plots" / "expert_load_step0000012.png"
    w, h = _png_size(png)
    assert w > 100 and h > 100
    (rec,) = read_jsonl(tmp_path / "run" / "routing.jsonl")
    assert rec["step"] == 12 and set(rec["layers"]) == set(stats)
    for name, s in stats.items():
        d = rec["layers"][name]
        assert d["tokens_per_expert"] == s.tokens_per_expert.tolist()
        assert sum(d["tokens_per_expert"]) == 2 * 24 * 2
        assert d["dropped_frac"] == pytest.approx(s.dropped_frac)
        assert d["entropy"] == pytest.approx(s.entropy)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    name = next(iter(stats))
    t = stats[name].tokens_per_expert.float()
    cv = (t.std(unbiased=False) / t.mean()).item()
    assert acc.Scalars(f"routing/{name}/load_cv")[0].value == pytest.approx(cv, rel=1e-5)
    assert acc.Scalars(f"routing/{name}/entropy")[0].value == pytest.approx(stats[name].entropy, rel=1e-5)
    assert acc.Scalars(f"routing/{name}/dropped_frac")[0].step == 12
    assert acc.Scalars(f"routing/{name}/weight_sum")[0].value == pytest.approx(stats[name].extra["weight_sum"], rel=1e-5)
    assert rec["layers"][name]["weight_sum"] == pytest.approx(stats[name].extra["weight_sum"])


def test_plot_curves_writes_png(tmp_path):
    for run, scale in (("a", 1.0), ("b", 2.0)):
        log = _quiet(tmp_path / run)
        for s in range(1, 30):
            log.log(s, loss=scale / s, acc=s / 30)
        log.log(30, loss=float("nan"))
        log.close()
    out = plot_curves(
        [tmp_path / "a" / "run", tmp_path / "b" / "run" / "metrics.jsonl"],
        tmp_path / "plots" / "loss.png",
        keys=("loss", "acc"),
        labels=["run a", "run b"],
        smooth=5,
    )
    assert out == tmp_path / "plots" / "loss.png"
    w, h = _png_size(out)
    assert w > 300 and h > 300
    assert _png_size(plot_curves([tmp_path / "a" / "run"], tmp_path / "t.png", x="time"))[0] > 300
    with pytest.raises(ValueError, match="none of the keys"):
        plot_curves([tmp_path / "a" / "run"], tmp_path / "x.png", keys=("bleu",))
    with pytest.raises(ValueError, match="labels"):
        plot_curves([tmp_path / "a" / "run"], tmp_path / "x.png", labels=["x", "y"])


def test_progress_bar_position_and_postfix(tmp_path, capsys):
    log = RunLogger(tmp_path / "run", total_steps=100, start_step=10, tensorboard=False, unit="tokens")
    assert log._bar.n == 10 and log._bar.total == 100
    log.log(25, loss=1.5, lr=3e-4, tokens_per_s=1234.0)
    assert log._bar.n == 25
    assert log._bar.postfix == "loss=1.5, lr=0.0003, 1234 tokens/s"
    log.close()


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    log = RunLogger(run, total_steps=10, enabled=False)
    log.log(1, loss=1.0)
    model = mmoe.MoE(mmoe.MoEConfig(dim=16, num_experts=4, top_k=2))
    model(torch.randn(8, 16))
    assert log.log_routing(1, mmoe.routing_stats(model)) is None
    log.event(1, "checkpoint", "saved")
    assert log.writer is None
    log.close()
    assert not run.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_disabled_logger_does_not_import_tensorboard(tmp_path):
    import subprocess

    code = (
        "import sys; from mmoe.train.runlog import RunLogger;"
        f"RunLogger({str(tmp_path / 'r')!r}, total_steps=3, enabled=False).log(1, loss=1.0);"
        "print('tensorboard' in sys.modules, 'torch.utils.tensorboard' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    assert not (tmp_path / "r").exists()
