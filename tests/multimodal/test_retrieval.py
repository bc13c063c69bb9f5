"""task: retrieval (multimodal/retrieval.py): recall with several captions per image against a per-query
reference, the chance levels, the contrastive loss gathered over two gloo ranks against one process, the
hard shapes data and multi-caption pair shards, and the task through the engine: from a masked_multimodal
run, 2-rank evaluation equal to one process, mmoe predict."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multimodal.data import CaptionTokenizer, hard_shapes_sample, write_shapes
from multimodal.retrieval import (RetrievalModelConfig, RetrievalOptions, RetrievalTask, contrastive_loss,
                                  retrieval_recall_multi)
from tests.helpers import run_mmoe

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ metrics
def _reference_recall(image, text, owner, ks):
    """Per query, with plain loops: the number of candidates strictly more similar than the best true one."""
    n = image.shape[0]
    out = {}
    t2i, i2t = [], []
    for j in range(text.shape[0]):
        if owner[j] < 0:
            continue
        sims = [float(text[j] @ image[i]) for i in range(n)]
        t2i.append(sum(s > sims[owner[j]] for s in sims))
    for i in range(n):
        sims = [float(image[i] @ text[j]) for j in range(text.shape[0])]
        best = max(sims[j] for j in range(text.shape[0]) if owner[j] == i)
        i2t.append(sum(s > best for s in sims))
    for k in ks:
        out[f"t2i_r{k}"] = sum(r < k for r in t2i) / len(t2i)
        out[f"i2t_r{k}"] = sum(r < k for r in i2t) / len(i2t)
    return out


def test_recall_with_several_captions_and_distractors_matches_a_per_query_reference():
    g = torch.Generator().manual_seed(0)
    n, d = 23, 8
    owner = torch.tensor([i for i in range(n) for _ in range(1 + i % 3)] + [-1] * 9)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(image[owner.clamp_min(0)] + 0.9 * torch.randn(owner.numel(), d, generator=g), dim=-1)
    text[owner < 0] = F.normalize(torch.randn(9, d, generator=g), dim=-1)
    text[5] = text[4]  # an exact tie between two captions does not count against either
    got = retrieval_recall_multi(image, text, owner, (1, 2, 5), chunk=7)
    want = _reference_recall(image, text, owner, (1, 2, 5))
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k
    assert 0 < got["i2t_r1"] < got["i2t_r5"] < 1  # the data is neither trivial nor hopeless
    assert got["rsum"] == pytest.approx(sum(want.values()))
    assert (got["images"], got["captions"], got["distractors"]) == (n, owner.ge(0).sum(), 9)
    # perfect embeddings: every recall is 1
    perfect = retrieval_recall_multi(image, image[owner.clamp_min(0)].clone(), owner.clamp_min(0), (1,))
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 1.0
    with pytest.raises(ValueError, match="have no caption"):
        retrieval_recall_multi(image, text[:3], owner[:3], (1,))


def test_chance_levels_are_the_exact_expectations_of_a_random_ranking():
    owner = torch.tensor([0, 0, 0, 1, 2, 2, -1, -1])  # 3 images with 3 / 1 / 2 captions, 2 distractors
    got = retrieval_recall_multi(torch.eye(3), torch.randn(8, 3), owner, (1, 2, 5))
    T = 8
    for k in (1, 2, 5):
        # by enumeration: every set of k texts equally likely to be the top k
        hits = [sum(any(owner[j] == i for j in top) for top in combinations(range(T), k)) / math.comb(T, k)
                for i in range(3)]
        assert got[f"chance_i2t_r{k}"] == pytest.approx(sum(hits) / 3)
        assert got[f"chance_t2i_r{k}"] == pytest.approx(min(k, 3) / 3)


# ------------------------------------------------------------------------------------------------ the loss
def test_contrastive_loss_is_clip_symmetric_infonce_with_a_clamped_learnable_scale():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    scale = torch.tensor([math.log(10.0)], requires_grad=True)
    loss, s = contrastive_loss(img, txt, scale, gather=True)
    logits = 10.0 * img @ txt.t()
    manual = sum(-logits[i].log_softmax(0)[i] - logits[:, i].log_softmax(0)[i] for i in range(6)) / 12
    assert float(loss.detach()) == pytest.approx(float(manual), rel=1e-6) and float(s.detach()) == pytest.approx(10.0)
    loss.backward()
    assert scale.grad is not None and float(scale.grad) != 0.0
    big = torch.tensor([math.log(500.0)], requires_grad=True)
    _, s = contrastive_loss(img, txt, big, max_logit_scale=100.0)
    assert float(s) == pytest.approx(100.0)


_GATHER = r"""
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from multimodal.retrieval import contrastive_loss

rank = int(sys.argv[2]); port = sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
proj = torch.nn.Linear(5, 4)
scale = torch.nn.Parameter(torch.tensor([2.0]))
x = torch.randn(8, 5); y = torch.randn(8, 5)
rows = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal shares: 3 and 5 rows
img = torch.nn.functional.normalize(proj(x[rows]), dim=-1)
txt = torch.nn.functional.normalize(proj(y[rows]) + 0.5, dim=-1)
loss, _ = contrastive_loss(img, txt, scale, gather=True)
# the engine's data-parallel rule: each rank's gradient, averaged over ranks; each rank's loss is weighted by
# its share of rows so that the average is the global batch's mean
(loss * (rows.stop - rows.start) * 2 / 8).backward()
grads = [p.grad for p in (proj.weight, proj.bias, scale)]
for gr in grads:
    dist.all_reduce(gr); gr /= 2
losses = [torch.zeros(1), torch.zeros(1)]
dist.all_gather(losses, (loss.detach() * (rows.stop - rows.start) / 8).reshape(1))
if rank == 0:
    print(json.dumps({"loss": float(sum(losses)), "grads": [g.reshape(-1).tolist() for g in grads]}))
dist.barrier()
dist.destroy_process_group()
"""


def test_gathered_loss_over_two_gloo_ranks_equals_the_global_batch_in_one_process(tmp_path):
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "gather.py"
    script.write_text(_GATHER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(ROOT), str(r), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    two = json.loads(outs[0][0].strip().splitlines()[-1])
    torch.manual_seed(0)
    proj = torch.nn.Linear(5, 4)
    scale = torch.nn.Parameter(torch.tensor([2.0]))
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    loss, _ = contrastive_loss(F.normalize(proj(x), dim=-1), F.normalize(proj(y) + 0.5, dim=-1), scale)
    loss.backward()
    assert two["loss"] == pytest.approx(float(loss), rel=1e-5)
    for got, p in zip(two["grads"], (proj.weight, proj.bias, scale)):
        assert got == pytest.approx(p.grad.reshape(-1).tolist(), rel=1e-4, abs=1e-6)
    # without the gather the ranks' losses are in-batch only: a different (smaller) problem
    l3, _ = contrastive_loss(F.normalize(proj(x[:3]), dim=-1), F.normalize(proj(y[:3]) + 0.5, dim=-1), scale)
    assert float(l3) < float(loss)


# ------------------------------------------------------------------------------------------------ data
def test_hard_shapes_have_three_true_captions_and_two_distractors_one_change_away():
    rng = random.Random(5)
    for _ in range(40):
        png, captions, distractors, meta = hard_shapes_sample(rng, 32)
        shapes = meta["shapes"]
        assert png[:4] == b"\x89PNG" and len(shapes) in (2, 3) and len(captions) == 3 and len(distractors) == 2
        assert not set(distractors) & set(captions) and len(set(distractors)) == 2
        for s in shapes:
            phrase = f"a {s['size']} {'outlined ' if s['fill'] == 'outlined' else ''}{s['color']} {s['shape']}"
            assert all(phrase in c for c in captions)
        for o in shapes[1:]:  # no overlap
            a = shapes[0]
            assert max(abs(a["cx"] - o["cx"]), abs(a["cy"] - o["cy"])) > a["r"] + o["r"]
        # a distractor differs from the first caption by one word, or by the relation (two words)
        first = captions[0].replace(",", "").split()
        for dis in distractors:
            words = dis.replace(",", "").split()
            if len(words) == len(first):
                assert 1 <= sum(a != b for a, b in zip(first, words)) <= 2
            else:  # a fill word added or removed
                assert abs(len(words) - len(first)) == 1
    # the relation is read off the drawn positions
    rng = random.Random(9)
    for _ in range(20):
        _, captions, _, meta = hard_shapes_sample(rng, 32)
        a, b = meta["shapes"][:2]
        dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
        rel = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        assert f" {rel} " in captions[0]


def test_multi_caption_pair_shards_and_errors(tmp_path):
    from PIL import Image

    from mmoe.data import captions_of, write_pairs
    from mmoe.data.errors import DataError

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "l.jsonl").write_text(json.dumps({"image": "a.png", "caption": ["one red", "two red"]}) + "\n" +
                                      json.dumps({"image": "a.png", "caption": "three"}) + "\n")
    m = write_pairs(tmp_path / "l.jsonl", tmp_path / "out", progress=False)
    assert m.info["pairs"] == 3 and m.info["images"] == 1
    assert captions_of(b"one red\ntwo red\n") == ["one red", "two red"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "caption": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1.*list of captions"):
        write_pairs(tmp_path / "bad.jsonl", tmp_path / "bad", progress=False)


def _task(**model) -> RetrievalTask:
    base = dict(img_size=16, patch_size=4, dim=32, depth=2, num_heads=2, max_text_len=24,
                moe={"num_experts": 4, "top_k": 2})
    return RetrievalTask(RetrievalModelConfig(**{**base, **model}), RetrievalOptions())


def test_evaluation_groups_samples_of_one_image_and_ranks_against_distractors():
    task = _task()
    tok = CaptionTokenizer(24)
    img = F.normalize(torch.randn(3, 4), dim=-1)
    # image "x" appears in two records (one sample per caption), image "y" once with a distractor
    recs = [
        {"image": img[:2], "text": img[:2].clone(), "owner": torch.tensor([0, 1]), "image_ids": ["x", "y"],
         "loss_sum": 1.0, "n": 2},
        {"image": img[:1], "text": torch.stack([img[0], -img[1]]), "owner": torch.tensor([0, -1]),
         "image_ids": ["x"], "loss_sum": 2.0, "n": 1},
    ]
    out = task._eval_summary(recs)
    assert (out["images"], out["captions"], out["distractors"]) == (2, 3, 1)
    assert out["i2t_r1"] == out["t2i_r1"] == 1.0 and out["loss"] == pytest.approx(1.0)
    assert tok.vocab_size == task.multiway_config().vocab_size
    with pytest.raises(ValueError, match="task_options.caption"):
        RetrievalOptions(caption="best")
    with pytest.raises(ValueError, match="model.init_temperature"):
        _task(init_temperature=0)


# ------------------------------------------------------------------------------------------------ end to end
TINY = ["model.dim=32", "model.depth=2", "model.num_heads=2", "model.moe.expert_hidden=64",
        "model.moe.num_experts=4", "train.progress=false", "run.tensorboard=false", "train.log_every=5"]


@pytest.fixture(scope="module")
def hard_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard") / "shapes_hard"
    write_shapes(out, num_samples=240, hard=True, val_fraction=0.25, samples_per_shard=40, progress=False)
    return out


def test_retrieval_fine_tunes_a_masked_multimodal_run_and_evaluates_the_same_on_two_ranks(tmp_path, hard_data):
    from mmoe.train import checkpoint as ckpt_lib

    data = [f"data.train={hard_data}", f"data.val={hard_data}"]
    pre = tmp_path / "pre"
    run_mmoe(["train", str(ROOT / "configs" / "beit3_moe_shapes.yaml"), *data, *TINY, f"run.dir={pre}",
              "data.batch_size=16", "train.max_steps=6", "train.eval_every=0", "train.save_every=6",
              "optim.warmup_steps=2"], timeout=300)
    ft = tmp_path / "ft"
    run_mmoe(["train", str(ROOT / "configs" / "retrieval_shapes.yaml"), *data, *TINY, f"run.dir={ft}",
              f"model.init={pre}", "data.batch_size=16", "data.eval_batch_size=16", "train.max_steps=60",
              "train.eval_every=60", "train.save_every=60", "optim.warmup_steps=5", "optim.lr=2.0e-3"], timeout=300)
    # the start: every weight of the pre-trained model (built as the run builds it, before any step)
    cfg = RetrievalModelConfig(img_size=32, patch_size=4, dim=32, depth=2, num_heads=2, max_text_len=24,
                               moe={"num_experts": 4, "top_k": 2, "expert_hidden": 64}, moe_routing="modality",
                               init=str(pre))
    model = RetrievalTask(cfg).build_model()
    pre_state = ckpt_lib.full_state_dict(ckpt_lib.find_latest(pre / "checkpoints"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, pre_state[k]), k
    rows = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "val/rsum" in r][-1]
    n_img = ev["val/images"]
    assert ev["val/captions"] == 3 * n_img and ev["val/distractors"] == 2 * n_img and n_img > 40
    assert ev["val/chance_t2i_r1"] == pytest.approx(1 / n_img)
    # it learnt something: well above chance in both directions
    assert ev["val/t2i_r5"] > 2 * ev["val/chance_t2i_r5"] and ev["val/i2t_r5"] > 2 * ev["val/chance_i2t_r5"]
    train = [r for r in rows if "itc" in r]
    assert train[-1]["itc"] < train[0]["itc"] and "temperature" in train[-1]
    # the whole-split evaluation gathered over two ranks equals one process's
    one = run_mmoe(["eval", str(ft / "config.yaml"), "--checkpoint", str(ft / "checkpoints"),
                    "--json", str(tmp_path / "one.json")])
    two = run_mmoe(["eval", str(ft / "config.yaml"), "--checkpoint", str(ft / "checkpoints"),
                    "--json", str(tmp_path / "two.json")], world=2, timeout=300)
    assert one.returncode == two.returncode == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r10", "rsum", "images", "captions", "distractors"):
        assert a[k] == pytest.approx(b[k], abs=1e-9), k
    assert a["images"] == n_img and a["rsum"] == pytest.approx(ev["val/rsum"])
    # mmoe predict ranks given captions for each image and the images for each caption
    import tarfile

    with tarfile.open(next(hard_data.glob("val-*.tar"))) as tar:
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")][:2]
        for m in pngs:
            (tmp_path / m.name).write_bytes(tar.extractfile(m).read())
    p = run_mmoe(["predict", str(ft), str(tmp_path / pngs[0].name), str(tmp_path / pngs[1].name), "--captions",
                  "a small red circle", "a large outlined blue square", "a green triangle", "--topk", "2", "--json"])
    lines = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert [("image" in r, len(r["top"])) for r in lines] == [(True, 2)] * 2 + [(False, 2)] * 3
    scores = [t["score"] for t in lines[0]["top"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    bad = run_mmoe(["predict", str(ft), str(tmp_path / pngs[0].name)], check=False)
    assert bad.returncode != 0 and "--captions" in bad.stderr and "Traceback" not in bad.stderr


def test_init_of_another_shape_is_an_error_naming_the_weight(tmp_path):
    from safetensors.torch import save_file

    t = _task()
    model = t.build_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text_pos"] = torch.zeros(1, 12, 32)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"w.safetensors: shapes differ.*text_pos"):
        _task(init=str(tmp_path / "w.safetensors")).build_model()
    del state["text_pos"]
    save_file({k: v for k, v in state.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.warns(UserWarning, match="text_pos"):
        _task(init=str(tmp_path / "partial.safetensors")).build_model()
