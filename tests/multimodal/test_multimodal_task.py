"""Multimodal data (generated shapes, block masks, caption masking) and the masked_multimodal task through
the engine."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal.data import (COLORS, CaptionTokenizer, block_mask, load_image, mask_caption, shapes_sample,
                             write_shapes)

ROOT = Path(__file__).resolve().parents[2]


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


def test_write_shapes_is_deterministic_and_split(tmp_path):
    m1 = write_shapes(tmp_path / "a", num_samples=120, seed=3, val_fraction=0.25, progress=False)
    write_shapes(tmp_path / "b", num_samples=120, seed=3, val_fraction=0.25, progress=False)
    write_shapes(tmp_path / "c", num_samples=120, seed=4, val_fraction=0.25, progress=False)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _digests(tmp_path / "a") != _digests(tmp_path / "c")
    assert m1.num_samples == 120
    assert 10 < m1.splits["val"].samples < 50 and m1.splits["train"].samples + m1.splits["val"].samples == 120


def test_captions_match_the_drawn_shapes():
    import random

    rng = random.Random(0)
    relations = set()
    for _ in range(60):
        png, caption, meta = shapes_sample(rng, 32)
        img = load_image(png, 32)
        words = caption.split()
        for s in meta["shapes"]:
            assert s["color"] in words and s["shape"] in words
            # the pixel at the shape's centre has the colour the caption names (triangles: a bit lower)
            y = int(s["cy"] + (s["r"] * 0.4 if s["shape"] == "triangle" else 0))
            got = (img[:, y, int(s["cx"])] * 255).round().tolist()
            assert got == list(COLORS[s["color"]]), (caption, s, got)
        if len(meta["shapes"]) == 2:
            a, b = meta["shapes"]
            rel = " ".join(words[3:5]) if words[3] in ("left", "right") else words[3]
            relations.add(rel)
            expected = {"left of": a["cx"] < b["cx"], "right of": a["cx"] > b["cx"], "above": a["cy"] < b["cy"],
                        "below": a["cy"] > b["cy"]}[rel]
            assert expected, (caption, meta)
        else:
            assert words[1] in ("small", "large")
    assert relations == {"left of", "right of", "above", "below"}


def test_block_mask_exact_deterministic_and_blocky():
    masks = [block_mask(14, 14, 78, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(int(m.sum()) == 78 for m in masks)
    assert torch.equal(block_mask(14, 14, 78, torch.Generator().manual_seed(5)), masks[5])
    assert int(block_mask(8, 8, 64, torch.Generator().manual_seed(0)).sum()) == 64
    assert int(block_mask(8, 8, 3, torch.Generator().manual_seed(0)).sum()) == 3

    def neighbour_share(m: torch.Tensor) -> float:
        # masked cells whose right or lower neighbour is masked too
        pairs = (m[:, :-1] & m[:, 1:]).sum() + (m[:-1] & m[1:]).sum()
        return float(pairs) / float(m.sum())

    g = torch.Generator().manual_seed(0)
    random_masks = []
    for _ in range(20):
        m = torch.zeros(14 * 14, dtype=torch.bool)
        m[torch.randperm(196, generator=g)[:78]] = True
        random_masks.append(m.view(14, 14))
    blocky = sum(map(neighbour_share, masks)) / 20
    scattered = sum(map(neighbour_share, random_masks)) / 20
    assert blocky > scattered + 0.4, (blocky, scattered)
    with pytest.raises(ValueError, match="num_masked"):
        block_mask(4, 4, 17, torch.Generator())


def test_caption_tokenizer_and_masking():
    tok = CaptionTokenizer(context_length=12)
    ids, pad = tok.batch(["a small red circle", "a blue square left of a yellow triangle below a cat"])
    assert ids.shape == pad.shape and ids.shape[1] == 12  # the long caption is cut to the context
    assert ids[0, 0] == tok.sot_id and ids[1, -1] == tok.eot_id and pad[0].sum() > 0 and not pad[1].any()
    assert tok.decode(ids[0]) == "a small red circle"
    assert tok.mask_id == tok.vocab_size - 1 and tok.mask_id not in ids
    with pytest.raises(ValueError, match="empty"):
        tok.encode("  ")
    caps = [f"a {c} {s} left of a {c2} {s}" for c in COLORS for c2 in COLORS for s in ("circle", "square")]
    ids, pad = tok.batch(caps)
    g = torch.Generator().manual_seed(0)
    special = torch.isin(ids, torch.tensor(tok.special_ids)) | pad
    for ratio in (0.15, 0.5):
        inputs, labels = mask_caption(ids, pad, ratio, tok, g)
        sel = labels != -100
        assert not (sel & special).any()  # never special ids or padding
        assert sel.any(1).all()  # every caption has a masked token
        assert abs(float(sel.sum()) / float((~special).sum()) - ratio) < 0.06
        assert torch.equal(labels[sel], ids[sel]) and torch.equal(inputs[~sel], ids[~sel])
        assert (inputs[sel] == tok.mask_id).float().mean() > 0.6
    # a single short caption at a low ratio still gets one masked token
    one, one_pad = tok.batch(["a red circle"])
    _, labels = mask_caption(one, one_pad, 0.01, tok, torch.Generator().manual_seed(0))
    assert int((labels != -100).sum()) >= 1


def test_load_image_errors_name_the_sample():
    with pytest.raises(ValueError, match="shard-3:000042"):
        load_image(b"not a png", 32, key="shard-3:000042")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(buf, format="PNG")
    img = load_image(buf.getvalue(), 32)
    assert img.shape == (3, 32, 32) and float(img[0].min()) == 1.0 and float(img[1].max()) == 0.0


def _task(**model):
    from mmoe.train.tasks import get_task

    cls = get_task("masked_multimodal")
    cfg = cls.ModelConfig(**{"dim": 32, "depth": 2, "num_heads": 2, "max_text_len": 16,
                             "moe": {"num_experts": 4, "top_k": 2}, **model})
    return cls(cfg)


def test_collate_is_deterministic_and_losses_are_finite(tmp_path):
    write_shapes(tmp_path, num_samples=40, seed=0, val_fraction=0.0, progress=False)
    from mmoe.data import ShardLoader

    task = _task(moe_routing="modality", itc_weight=0.5)
    samples = []
    loader = ShardLoader(str(tmp_path), batch_size=8, shuffle_buffer=0, seed=0, decode=task.decode,
                         collate=lambda xs: xs)
    for batch in loader:
        samples = batch
        break
    b1, b2 = task.collate(samples), task.collate(samples)
    for k in b1:
        assert torch.equal(b1[k], b2[k]), k
    grid = 8
    assert (b1["pair_image_mask"].sum(1) == round(0.4 * grid * grid)).all()
    assert not torch.equal(b1["pair_image_mask"], b1["image_mask"])  # fresh masks per stream
    torch.manual_seed(0)
    model = task.build_model()
    loss, scalars, n = task.loss(model, b1)
    assert torch.isfinite(loss) and n == 8 and set(scalars) >= {"mlm", "mim", "itc", "aux"}
    assert abs(scalars["mlm"] - torch.log(torch.tensor(float(task.tokenizer.vocab_size))).item()) < 1.0
    assert scalars["aux"] > 0  # the aux losses of every forward (pair, image, text, two ITC) are summed in
    loss.backward()
    assert model.token_embed.weight.grad is not None and model.logit_scale.grad is not None
    sums = task.eval_step(model, b1)
    metrics = task.eval_metrics(sums)
    assert 0 <= metrics["i2t_r1"] <= 1 and metrics["mlm_loss"] > 0 and "mim_loss/image" in metrics
    with pytest.raises(ValueError, match="model.streams"):
        _task(streams=["pair", "video"])
    with pytest.raises(ValueError, match="model.image_mask_ratio"):
        _task(image_mask_ratio=1.5)


def test_retrieval_recall_over_the_whole_set():
    from multimodal.tasks import retrieval_recall

    # 3 pairs; image i is closest to text i except image 2, whose caption is only its 2nd best match
    image = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.7, 0, 0.6]])
    text = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    got = retrieval_recall(image, text, ks=(1, 2), chunk=2)  # chunks of 2 rows: 2 + 1
    assert got == {"i2t_r1": pytest.approx(2 / 3), "i2t_r2": 1.0, "t2i_r1": 1.0, "t2i_r2": 1.0, "pairs": 3.0}
    # an identical caption ties with the true one and does not push it down
    assert retrieval_recall(image[:2], torch.stack([text[0], text[0]]), ks=(1,), prefix="x_")["x_i2t_r1"] == 1.0


def test_evaluator_keeps_the_in_batch_metrics_and_adds_whole_split_retrieval(tmp_path):
    """The task's evaluator (a CollectingEvaluator) gives exactly `eval_metrics` of the summed `eval_step`s
    plus recall among all the pairs of the split, which equals `retrieval_recall` of every pair's embeddings."""
    from mmoe.data import ShardLoader
    from mmoe.train.tasks import CollectingEvaluator

    from multimodal.tasks import retrieval_recall

    write_shapes(tmp_path, num_samples=40, seed=0, val_fraction=0.0, progress=False)
    task = _task(moe_routing="modality")
    torch.manual_seed(0)
    model = task.build_model().eval()
    batches = list(ShardLoader(str(tmp_path), batch_size=8, shuffle_buffer=0, seed=0, decode=task.decode,
                               collate=task.collate, epochs=1, drop_last=False))
    ev = task.evaluator()
    assert isinstance(ev, CollectingEvaluator)
    got = ev.evaluate(model, batches)
    sums: dict[str, float] = {}
    images, texts = [], []
    with torch.no_grad():
        for b in batches:
            for k, v in task.eval_step(model, b).items():
                sums[k] = sums.get(k, 0.0) + v
            img, txt = task._itc_embeddings(model, b)
            images.append(img)
            texts.append(txt)
    want = task.eval_metrics(sums)
    assert {k: got[k] for k in want} == pytest.approx(want)
    split = retrieval_recall(torch.cat(images), torch.cat(texts), prefix="split_")
    assert {k: got[k] for k in split} == pytest.approx(split) and got["split_pairs"] == 40
    assert set(got) == set(want) | set(split)


def test_masked_multimodal_trains_through_the_engine(tmp_path):
    data = tmp_path / "shapes"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "mmoe", "shards", "shapes", str(data), "--num", "300",
                        "--val-fraction", "0.2", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmoe", "train", str(ROOT / "configs" / "beit3_moe_shapes.yaml"),
           f"data.train={data}", f"data.val={data}", f"run.dir={run}", "model.dim=32", "model.depth=2",
           "model.num_heads=2", "data.batch_size=16", "data.eval_batch_size=32", "train.max_steps=30",
           "train.eval_every=15", "train.save_every=0", "train.progress=false", "train.log_every=5",
           "optim.warmup_steps=5", "optim.lr=2.0e-3", "run.tensorboard=false"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/mlm_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val/mlm_loss"] < evals[0]["val/mlm_loss"] < 10.8  # ln(49409) = 10.8 at chance
    assert evals[-1]["val/i2t_r1"] > 1 / 32 and "val/mim_loss/pair" in evals[-1]
    # retrieval among all validation pairs (not only within a batch of 32)
    from mmoe.data import Manifest

    assert evals[-1]["val/split_pairs"] == Manifest.load(data).splits["val"].samples > 32
    for d in ("i2t", "t2i"):
        assert 0 < evals[-1][f"val/split_{d}_r1"] <= evals[-1][f"val/split_{d}_r5"] <= 1
    routing = json.loads((run / "routing_by_modality.json").read_text())
    assert set(routing) == {"blocks.1.ffn"}
    for counts in routing.values():
        assert set(counts) == {"vision", "text"} and len(counts["vision"]) == 8
        assert sum(counts["vision"]) > sum(counts["text"]) > 0
    assert (run / "routing_by_modality.png").stat().st_size > 1000
