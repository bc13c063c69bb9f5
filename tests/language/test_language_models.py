"""language: MoE transformer LMs (causal and masked), their engine tasks, and generation."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from language.data import IGNORE_INDEX, sample_text_dir
from language.generate import generate, generate_ids, load_lm, run as generate_run
from language.models import (KVCache, LMConfig, MoETransformerLM, count_params, document_mask, mask_tokens,
                             routing_by_language)
from language.tasks import CausalLMTask, LMModelConfig, MaskedLMTask
from mmoe.layer import moe_layers

LANGS = ["ar", "de", "el", "en", "es", "fr", "hi", "ja", "ko", "ru", "zh"]
ROOT = Path(__file__).resolve().parents[2]


def tiny(kind: str = "causal", dense_backprop: str = "none", heads: int = 1, **kw) -> MoETransformerLM:
    moe = {"num_experts": 4, "top_k": 2, "dense_backprop": dense_backprop, "heads": heads}
    cfg = LMConfig(**{"vocab_size": 97, "dim": 32, "depth": 2, "num_heads": 4, "moe": moe, "kind": kind,
                      "max_seq_len": 64, **kw})
    return MoETransformerLM(cfg)


def warm_default_ema(model: MoETransformerLM) -> None:
    """Two training-mode forwards fill the Default-MoE EMA vectors (zeros at init)."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(4, model.cfg.vocab_size, (3, 16)))
    for _, m in moe_layers(model):
        if m.default is not None:
            assert m.default.vectors.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("dense_backprop,heads", [("none", 1), ("default", 1), ("default", 2)])
def test_causal_lm_is_causal_in_eval_mode(dense_backprop, heads):
    model = tiny(dense_backprop=dense_backprop, heads=heads)
    assert model.moe_layer_ids == [0, 1]
    if dense_backprop == "default":
        warm_default_ema(model)
    model.eval()
    x = torch.randint(4, 97, (2, 14))
    with torch.no_grad():
        base = model(x)
        for j in (0, 5, 13):
            y = x.clone()
            y[:, j] = (y[:, j] + 11) % 97
            out = model(y)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert (out[:, j] - base[:, j]).abs().max() > 1e-4  # the change itself is visible


def test_masked_lm_sees_the_future():
    model = tiny(kind="masked").eval()
    x = torch.randint(4, 97, (1, 10))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 97
    with torch.no_grad():
        assert (model(x)[0, :9] - model(y)[0, :9]).abs().max() > 1e-4


@pytest.mark.parametrize("dense_backprop", ["none", "default"])
def test_training_mode_default_ema_leaks_a_batch_statistic(dense_backprop):
    """Documented (language/models.py): in training mode the Default-MoE EMA update uses the current batch
    before the forward reads it, so a future token changes earlier outputs by a tiny amount; 'none' does not."""
    model = tiny(dense_backprop=dense_backprop)
    if dense_backprop == "default":
        warm_default_ema(model)
    model.train()
    x = torch.randint(4, 97, (2, 14))
    y = x.clone()
    y[:, 13] = (y[:, 13] + 11) % 97
    a, b = copy.deepcopy(model), copy.deepcopy(model)  # same EMA state before each forward
    with torch.no_grad():
        diff = (a(x)[:, :13] - b(y)[:, :13]).abs().max().item()
    # (expert GEMMs batch rows differently when the routing of a token changes: ~1e-8 of float noise)
    if dense_backprop == "none":
        assert diff < 1e-6
    else:
        assert 1e-5 < diff < 1e-2


# ------------------------------------------------------------------------------------------------
# packing: a document inside a packed row gets the logits it gets alone


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_packed_documents_match_documents_alone(kind):
    model = tiny(kind=kind, dense_backprop="default")
    warm_default_ema(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, 97, (n,), generator=g) for n in (5, 9, 4)]
    row = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids)
        # the same with an explicit mask and positions (what pack_documents gives)
        pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
        explicit = model(row, positions=pos, attn_mask=document_mask(doc_ids, causal=kind == "causal"))
        torch.testing.assert_close(explicit, packed)
        start = 0
        for d in docs:
            alone = model(d[None])
            torch.testing.assert_close(packed[:, start:start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)
        unmasked = model(row)  # without document masking the later documents see the earlier ones
        assert (unmasked[:, 5:14] - packed[:, 5:14]).abs().max() > 1e-4


def test_packing_through_the_task_collate_matches_documents_alone():
    task = CausalLMTask(LMModelConfig(vocab_size=64, seq_len=24, dim=32, depth=2, num_heads=4,
                                      moe={"num_experts": 4, "top_k": 1}, languages=["syn0", "syn1"]))
    torch.manual_seed(0)
    model = task.build_model().eval()
    docs = [task.synthetic_example(i) for i in range(3)]
    batch = task.collate(docs)
    assert batch["input_ids"].shape[1] == 24 and batch["input_ids"].shape[0] >= 3
    first = docs[0][0]
    alone = model(torch.tensor([[1] + first]))  # [bos] doc, as add_bos frames it
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    n = min(len(first) + 1, 24)
    torch.testing.assert_close(packed[0, :n], alone[0, :n], rtol=1e-5, atol=1e-5)
    # per-token languages follow the documents; padding is -1 and has no target
    assert set(batch["lang_ids"].unique().tolist()) <= {-1, 0, 1}
    pad = batch["input_ids"] == 3
    assert (batch["lang_ids"][pad] == -1).all() and (batch["labels"][pad] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------------
# masked LM


def test_mask_tokens_follows_the_80_10_10_rule():
    special = {1, 2, 3}
    V, mask_id = 1000, 1000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (64, 256), generator=g)
    ids[:, 0], ids[:, -1], ids[::3, 100:110] = 1, 2, 3
    inputs, labels = mask_tokens(ids, mask_id, V, special, prob=0.15, generator=torch.Generator().manual_seed(5))
    sel = labels != IGNORE_INDEX
    is_special = torch.isin(ids, torch.tensor(sorted(special)))
    assert not sel[is_special].any() and (inputs[is_special] == ids[is_special]).all()
    frac = sel.sum() / (~is_special).sum()
    assert abs(frac - 0.15) < 0.01
    assert (labels[sel] == ids[sel]).all()
    masked = sel & (inputs == mask_id)
    kept = sel & (inputs == ids)
    rand = sel & (inputs != mask_id) & (inputs != ids)
    n = sel.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02
    assert abs(rand.sum() / n - 0.1) < 0.02
    assert not torch.isin(inputs[rand], torch.tensor([1, 2, 3, mask_id])).any()
    assert (inputs[~sel] == ids[~sel]).all()
    again = mask_tokens(ids, mask_id, V, special, prob=0.15, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


# ------------------------------------------------------------------------------------------------
# structure


def test_weight_tying_is_one_parameter_and_checkpointable(tmp_path):
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.output_weight is tied.embed.weight
    names = [n for n, _ in tied.named_parameters()]
    assert "embed.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert count_params(untied).total - count_params(tied).total == 97 * 32
    assert untied.output_weight is not untied.embed.weight
    tied(torch.randint(4, 97, (1, 6))).sum().backward()
    assert tied.embed.weight.grad is not None
    from safetensors.torch import save_file  # shared tensors would make safetensors refuse the state dict

    save_file({k: v.contiguous() for k, v in tied.state_dict().items()}, str(tmp_path / "m.safetensors"))


def test_layer_layout_widths_and_init():
    cfg = LMConfig(vocab_size=50, dim=96, depth=6, num_heads=4, moe_layers="every_2", first_dense=1,
                   moe={"num_experts": 4, "top_k": 1, "heads": 2})
    assert cfg.moe_layer_ids() == [2, 4]
    assert cfg.hidden == 256 and cfg.moe_config().expert_hidden == 128 and cfg.moe_config().activation == "swiglu"
    assert LMConfig(vocab_size=50, dim=96, ffn="gelu", moe_layers="none").hidden == 384
    assert LMConfig(vocab_size=50, dim=96, moe_layers="none").moe_layer_ids() == []
    torch.manual_seed(0)
    m = MoETransformerLM(LMConfig(vocab_size=50, dim=256, depth=8, num_heads=4, moe_layers="every_2",
                                  moe={"num_experts": 4, "top_k": 2}))
    out_std = 0.02 / math.sqrt(16)
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].attn.proj.weight.std().item() - out_std) < 5e-4
    assert abs(m.blocks[0].ffn.fc2.weight.std().item() - out_std) < 5e-4
    assert abs(m.blocks[1].ffn.experts.w2.std().item() - out_std) < 5e-4
    assert abs(m.blocks[1].ffn.experts.w1.std().item() - 0.02) < 2e-3
    with pytest.raises(ValueError, match="num_heads"):
        LMConfig(vocab_size=50, dim=96, num_heads=5)
    with pytest.raises(ValueError, match="top_k"):
        LMConfig(vocab_size=50, dim=96, moe={"num_experts": 2, "top_k": 3})


def test_count_params_active_per_token():
    m = tiny(heads=1)  # 2 MoE layers, 4 experts, top-2
    experts = sum(p.numel() for _, layer in moe_layers(m) for p in layer.experts.parameters())
    total, active, expert = count_params(m)
    assert total == sum(p.numel() for p in m.parameters()) and expert == experts
    assert active == total - experts // 2
    dense = MoETransformerLM(LMConfig(vocab_size=97, dim=32, depth=2, num_heads=4, moe_layers="none"))
    assert count_params(dense).total == count_params(dense).active


def test_kv_cache_matches_full_recompute():
    model = tiny(dense_backprop="default", heads=2)
    warm_default_ema(model)
    model.eval()
    x = torch.randint(4, 97, (1, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(len(model.blocks))
        parts = [model(x[:, :5], kv_cache=cache), model(x[:, 5:6], kv_cache=cache), model(x[:, 6:12], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    # generation past max_seq_len slides the window; cached and recomputed decoding agree
    small = tiny(max_seq_len=8).eval()
    a = generate_ids(small, [1, 5, 6], 12, use_cache=True)
    b = generate_ids(small, [1, 5, 6], 12, use_cache=False)
    assert a == b and len(a) == 12


# ------------------------------------------------------------------------------------------------
# tasks, engine run, generation


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    from language.tokenizer import train_tokenizer
    from mmoe.data import write_text

    tmp = tmp_path_factory.mktemp("lm")
    write_text(sample_text_dir(), tmp / "shards", val_fraction=0.1)
    train_tokenizer(tmp / "shards", tmp / "tok" / "spm", vocab_size=2000, split="train")
    return tmp


def _ctx(lm_data):
    from mmoe.train.tasks import TaskContext, data_manifest

    shards = str(lm_data / "shards")
    return TaskContext(run_dir=lm_data / "norun", train_data=shards, train_manifest=data_manifest(shards))


def _task(lm_data, cls=CausalLMTask, **kw):
    cfg = LMModelConfig(tokenizer=str(lm_data / "tok" / "spm.model"), seq_len=64, dim=32, depth=2, num_heads=4,
                        moe={"num_experts": 4, "top_k": 2, "heads": 2}, **kw)
    task = cls(cfg)
    task.setup(_ctx(lm_data))
    return task


def _val_batches(task, lm_data, batch_size=16):
    from mmoe.data import ShardLoader

    return list(ShardLoader(str(lm_data / "shards"), split="val", batch_size=batch_size, decode=task.decode,
                            collate=task.collate, shuffle_buffer=0, epochs=1, drop_last=False))


def test_tasks_metrics_per_language_and_routing_by_language(lm_data):
    task = _task(lm_data)
    assert task.languages == LANGS and task.vocab_size() == 2000
    torch.manual_seed(0)
    model = task.build_model().eval()
    batches = _val_batches(task, lm_data)
    sums: dict[str, float] = {}
    for b in batches:
        out = task.eval_step(model, b)
        assert {f"nll_sum/{lang}" for lang in LANGS} <= set(out)  # every language, every batch
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
    metrics = task.eval_metrics(sums)
    assert {"loss", "ppl", "acc"} | {f"ppl/{lang}" for lang in LANGS} <= set(metrics)
    assert sum(sums[f"tokens/{lang}"] for lang in LANGS) == sums["tokens"]
    assert abs(metrics["loss"] - math.log(2000)) < 0.5  # an untrained model is near uniform
    loss, _, n = task.loss(model, batches[0])
    assert n == int((batches[0]["input_ids"] != 3).sum()) and loss.requires_grad

    counts = routing_by_language(model, batches, languages=task.languages)
    assert set(counts) == {"blocks.0.ffn", "blocks.1.ffn"}
    tokens = torch.zeros(len(LANGS))
    for b in batches:
        lid = b["lang_ids"].reshape(-1)
        tokens += torch.bincount(lid[lid >= 0], minlength=len(LANGS)).float()
    for c in counts.values():
        assert c.shape == (len(LANGS), 4)
        # every token = heads (2) sub-tokens x top_k (2) slots, counted for its own language
        torch.testing.assert_close(c.sum(1).float(), tokens * 4)
    from language.models import plot_routing_by_language

    png = plot_routing_by_language(counts, task.languages, lm_data / "plots" / "routing.png")
    assert png.stat().st_size > 1000


def test_masked_lm_task_masks_deterministically(lm_data):
    task = _task(lm_data, cls=MaskedLMTask)
    sp = task.specials()
    assert sp["mask"] == 2000 and task.vocab_size() == 2001  # no <mask> piece: one extra id
    b1, b2 = _val_batches(task, lm_data)[0], _val_batches(task, lm_data)[0]
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["labels"], b2["labels"])
    sel = b1["labels"] != IGNORE_INDEX
    assert 0.10 < sel.float().sum() / (b1["lang_ids"] >= 0).sum() < 0.2
    assert (b1["input_ids"] == 2000).sum() > 0
    torch.manual_seed(0)
    model = task.build_model()
    assert model.cfg.kind == "masked"
    loss, _, _ = task.loss(model, b1)
    assert abs(loss.item() - math.log(2001)) < 0.5
    with pytest.raises(ValueError, match="causal"):
        generate(model, task.tokenizer, "hello", 3)


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def trained_run(lm_data):
    """`mmoe train` with a tiny causal MoE LM on the sample shards (one process)."""
    run = lm_data / "run"
    cfg = lm_data / "lm.yaml"
    cfg.write_text(f"""\
task: causal_lm
model:
  tokenizer: {lm_data / 'tok' / 'spm.model'}
  seq_len: 64
  dim: 48
  depth: 2
  num_heads: 4
  moe: {{num_experts: 4, top_k: 2, dense_backprop: default}}
data: {{train: {lm_data / 'shards'}, train_split: train, val: {lm_data / 'shards'}, val_split: val, batch_size: 16,
        eval_batch_size: 32, shuffle_buffer: 200}}
optim: {{lr: 5.0e-3, warmup_steps: 5, weight_decay: 0.05}}
train: {{max_steps: 80, log_every: 1, eval_every: 40, stats_every: 0, progress: false}}
run: {{dir: {run}, seed: 0, tensorboard: false}}
""")
    p = subprocess.run([sys.executable, "-m", "mmoe", "train", str(cfg)], env=_env(), capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    if p.returncode != 0:
        raise AssertionError(f"mmoe train failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return run


def test_engine_training_lowers_validation_loss(trained_run, lm_data):
    from mmoe.train.runlog import read_jsonl

    rows = read_jsonl(trained_run / "metrics.jsonl")
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [40, 80]
    # the untrained model's validation loss (the engine builds the model after seeding with run.seed)
    from mmoe.train.engine import seed_everything

    task = _task(lm_data)
    task.model_cfg.dim, task.model_cfg.moe = 48, {"num_experts": 4, "top_k": 2, "dense_backprop": "default"}
    seed_everything(0)
    model = task.build_model().eval()
    sums: dict[str, float] = {}
    for b in _val_batches(task, lm_data, batch_size=32):
        for k, v in task.eval_step(model, b).items():
            sums[k] = sums.get(k, 0.0) + v
    initial = task.eval_metrics(sums)["loss"]
    assert val[-1]["val/loss"] < initial - 1.0, (initial, val)
    assert val[-1]["val/loss"] < val[0]["val/loss"]
    assert {f"val/ppl/{lang}" for lang in LANGS} <= set(val[-1])
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert len(train_losses) == 80 and sum(train_losses[-10:]) < sum(train_losses[:10]) - 10.0
    assert (trained_run / "tokenizer.model").is_file()
    meta = json.loads((trained_run / "checkpoints" / "step_0000080" / "meta.json").read_text())
    assert meta["task_state"]["languages"] == LANGS


def test_generation_from_checkpoint_is_reproducible(trained_run, capsys):
    lm = load_lm(trained_run)
    assert lm.checkpoint.name == "step_0000080" and not lm.model.training
    greedy = generate(lm.model, lm.tokenizer, "The morning", 20)
    assert greedy and greedy == generate(lm.model, lm.tokenizer, "The morning", 20)
    assert greedy == generate(lm.model, lm.tokenizer, "The morning", 20, use_cache=False)
    s1 = generate(lm.model, lm.tokenizer, "The morning", 25, temperature=1.0, top_k=50, seed=1)
    assert s1 == generate(lm.model, lm.tokenizer, "The morning", 25, temperature=1.0, top_k=50, seed=1)
    s2 = generate(lm.model, lm.tokenizer, "The morning", 25, temperature=1.0, top_k=50, seed=2)
    assert s1 != s2
    # reloading gives the same model (weights and Default-MoE buffers)
    again = load_lm(trained_run / "checkpoints")
    assert generate(again.model, again.tokenizer, "The morning", 20) == greedy
    # the CLI entry point (`mmoe generate CHECKPOINT --prompt ...`)
    args = argparse.Namespace(checkpoint=str(trained_run), prompt="The morning", max_new_tokens=20, temperature=0.0,
                              top_k=0, top_p=1.0, seed=0, config=None, tokenizer=None, no_cache=False)
    assert generate_run(args) == 0
    captured = capsys.readouterr()
    assert captured.out == "The morning" + greedy + "\n" and "warning" not in captured.err
    # a prompt longer than the context is said to be cut, in one line
    args.prompt, args.max_new_tokens = "The morning " * 200, 2
    assert generate_run(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens and the model's context" in err[0] and "only its last" in err[0]


def test_lm_tiny_config_is_valid():
    from mmoe.train.configfile import from_dict
    from mmoe.train.config import load_train_config

    cfg = load_train_config(str(ROOT / "configs" / "lm_tiny.yaml"))
    assert cfg.task == "causal_lm"
    mc = from_dict(LMModelConfig, cfg.model, path="model")
    lm = mc.lm_config(2000)
    assert lm.moe_layer_ids() == [1, 3] and lm.max_seq_len == mc.seq_len


def test_top_k_and_top_p_filtering():
    from language.generate import _filter_logits

    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    kept = lambda out: torch.isfinite(out).nonzero().squeeze(1).tolist()  # noqa: E731
    assert kept(_filter_logits(logits, 2, 1.0)) == [0, 1]
    assert kept(_filter_logits(logits, 0, 0.5)) == [0]
    assert kept(_filter_logits(logits, 0, 0.7)) == [0, 1]
    assert kept(_filter_logits(logits, 0, 1.0)) == [0, 1, 2]
    assert kept(_filter_logits(logits[[2, 0, 1]], 1, 1.0)) == [1]


def test_non_causal_moe_options_warn_in_a_causal_lm():
    from language.models import CausalityWarning

    base = dict(vocab_size=50, dim=32, depth=1, num_heads=4)
    for moe in ({"capacity_factor": 1.25}, {"router": "expert_choice"}, {"dense_backprop": "expert_group"}):
        with pytest.warns(CausalityWarning):
            MoETransformerLM(LMConfig(**base, moe={"num_experts": 4, "top_k": 2, **moe}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CausalityWarning)
        MoETransformerLM(LMConfig(**base, moe={"num_experts": 4, "top_k": 2, "dense_backprop": "default"}))
        MoETransformerLM(LMConfig(**base, kind="masked", moe={"num_experts": 4, "top_k": 2, "capacity_factor": 1.0}))


def test_evaluation_writes_routing_by_language(trained_run):
    """The final evaluation counts the experts each language's tokens use, per MoE layer: every routed
    slot of every validation token once (tokens x top_k), matching the per-language token counts."""
    from mmoe.train.runlog import read_jsonl

    data = json.loads((trained_run / "routing_by_language.json").read_text())
    assert data and all(set(per_lang) == set(LANGS) for per_lang in data.values())
    last_val = [r for r in read_jsonl(trained_run / "metrics.jsonl") if "val/loss" in r][-1]
    for per_lang in data.values():
        for counts in per_lang.values():
            assert len(counts) == 4 and min(counts) >= 0
        total = sum(sum(c) for c in per_lang.values())
        # slots of every language-tagged token of the validation rows (label-less ones included): >= 2 x the
        # tokens scored
        assert total >= 2 * last_val["val/tokens"]
    assert (trained_run / "plots" / "routing_by_language.png").is_file()


@pytest.mark.parametrize("options", [{"language_temperature": 0.0}, {"language_ratios": {"en": 3, "de": 1}}])
def test_language_mixture_of_the_training_stream(lm_data, options):
    """``task_options.language_ratios`` / ``language_temperature`` subsample training documents so that the
    stream follows the target mixture; evaluation keeps every document; decisions are seeded per sample."""
    from mmoe.data import Manifest, ShardLoader

    from language.data import temperature_ratios

    cfg = LMModelConfig(tokenizer=str(lm_data / "tok" / "spm.model"), seq_len=64, dim=32, depth=2, num_heads=4)
    task = CausalLMTask(cfg, CausalLMTask.parse_options(options))
    task.setup(_ctx(lm_data))
    counts = Manifest.load(lm_data / "shards").info["docs_per_language"]
    total = sum(counts.values())
    if "language_ratios" in options:
        w = options["language_ratios"]
        target = {lang: w.get(lang, 0) / sum(w.values()) for lang in counts}
    else:
        target = temperature_ratios(counts, 0.0)
    assert max(task.accept.values()) == pytest.approx(1.0)
    # expected kept share per language, then the realised one over 30 epochs of the training split
    expect = {lang: counts[lang] / total * task.accept[lang] for lang in counts}
    norm = sum(expect.values())
    for lang in counts:
        assert expect[lang] / norm == pytest.approx(target[lang], abs=1e-9)
    kept: dict[str, int] = {}
    loader = ShardLoader(str(lm_data / "shards"), split="train", batch_size=64, decode=task.decode,
                         collate=lambda xs: xs, shuffle_buffer=0, epochs=30, drop_last=False)
    for batch in loader:
        for ex in batch:
            if ex is not None:
                kept[ex[1]] = kept.get(ex[1], 0) + 1
    n = sum(kept.values())
    for lang, p in target.items():
        assert kept.get(lang, 0) / n == pytest.approx(p, abs=0.03), (lang, kept)
    # evaluation decodes every document; the same sample gets the same decision
    sample = next(iter(ShardLoader(str(lm_data / "shards"), split="train", batch_size=1, decode=None,
                                   collate=lambda xs: xs, shuffle_buffer=0, epochs=1)))[0]
    assert task.decode_eval(sample) is not None
    assert (task.decode(sample) is None) == (task.decode(dict(sample)) is None)
    with pytest.raises(ValueError, match="xx"):
        bad = CausalLMTask(cfg, CausalLMTask.parse_options({"language_ratios": {"xx": 1}}))
        bad.setup(_ctx(lm_data))


def test_language_mixture_options_are_validated_per_field(tmp_path):
    from mmoe.errors import ConfigError
    from mmoe.train.tasks import TaskContext

    parse = CausalLMTask.parse_options
    assert parse({"language_ratios": {"en": 3, "de": 0}}).language_ratios == {"en": 3.0, "de": 0.0}
    for options, message in [
        ({"language_ratios": {"en": 1}, "language_temperature": 0.3},
         r"task_options\.language_temperature: give language_ratios or language_temperature, not both"),
        ({"language_ratios": {"en": -1, "de": 2}}, r"task_options\.language_ratios: a mapping language -> weight"),
        ({"language_ratios": {"en": 0}}, r"task_options\.language_ratios: .*not all 0"),
        ({"language_temperature": 1.5}, r"task_options\.language_temperature: must be in \[0, 1\]"),
        ({"language_ratio": {"en": 1}}, r"task_options\.language_ratio: unknown key \(did you mean 'language_ratios'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse(options)
    # mixing needs the training shards' manifest (synthetic data has none)
    task = CausalLMTask(LMModelConfig(vocab_size=64, seq_len=24, dim=32, depth=2, num_heads=4),
                        parse({"language_temperature": 0.5}))
    with pytest.raises(ValueError, match="language mixing needs the training shards' manifest"):
        task.setup(TaskContext(run_dir=tmp_path, train_data="synthetic"))
    assert task.languages == ["syn0", "syn1"]


def test_router_grad_command_on_a_trained_run(trained_run, capsys, tmp_path):
    """`mmoe router-grad RUN`: one row per estimator and micro-batch, the oracle against itself at 1."""
    from language import router_grad
    from mmoe.errors import CLIError

    args = argparse.Namespace(checkpoint=str(trained_run), micro_batch="4,1", batch_size=4, batches=2,
                              estimators="none,expert_group,dense_oracle", init=False, json=str(tmp_path / "rg.json"))
    assert router_grad.run(args) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| estimator")]
    assert [ln.split(" | ")[0:2] for ln in lines] == [["| none", "4"], ["| none", "1"], ["| expert_group", "4"],
                                                     ["| expert_group", "1"], ["| dense_oracle", "4"],
                                                     ["| dense_oracle", "1"]]
    rows = json.loads((tmp_path / "rg.json").read_text())["rows"]
    assert len(rows) == 6 and all(-1.0 <= r["cos"] <= 1.0 + 1e-9 for r in rows)
    assert rows[4]["cos"] == pytest.approx(1.0, abs=1e-6) and rows[5]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert set(rows[0]["layers"]) == {"blocks.0.ffn", "blocks.1.ffn"} and 0.0 < rows[0]["cos"] < 0.9999
    # the trained run used Default MoE; its config is what the checkpoint keeps
    args.init, args.json, args.estimators = True, None, "none"
    assert router_grad.run(args) == 0
    init_out = capsys.readouterr().out
    assert "initialisation" in init_out and init_out.splitlines()[-1] != lines[0]
    for flag, value, want in (("micro_batch", "4,x", "--micro-batch: expected integers"),
                              ("micro_batch", "0", "expected integers >= 1"),
                              ("estimators", "none,default", "--estimators: unknown")):
        bad = argparse.Namespace(**{**vars(args), flag: value})
        with pytest.raises(CLIError, match=want) as err:
            router_grad.run(bad)
        assert "\n" not in str(err.value)
