"""Text generation with a trained causal MoE LM, and ``mmoe generate CHECKPOINT --prompt TEXT``.

`load_lm` rebuilds the model of a ``causal_lm`` / ``masked_lm`` run from its ``config.yaml`` and loads a
checkpoint's weights (`mmoe.train.checkpoint.load_model_state`, every expert, any expert-parallel size of
the saved run; the Default-MoE EMA buffers included). `generate` decodes greedily (``temperature=0``)
or samples (``temperature > 0``, optionally restricted by ``top_k`` and nucleus ``top_p``) with a seeded
generator, so the same seed gives the same text. Decoding uses a KV cache (each new token attends to
the cached keys and values; MoE layers route the new token alone, which in eval mode gives exactly what
a full recomputation gives); ``use_cache=False`` recomputes the whole context every step. The context
is the last ``max_seq_len`` tokens: when it is full the cache is dropped and the window recomputed with
positions from 0 (the positions the model was trained with).

``CHECKPOINT`` is a checkpoint folder (``RUN/checkpoints/step_NNNNNNN``), a run's ``checkpoints`` folder
or the run folder (then its latest complete checkpoint). The tokenizer is looked up at the config's
``model.tokenizer`` path, then relative to the config's folder, then at the absolute path the
checkpoint recorded, then ``RUN/tokenizer.model`` (the copy training leaves in the run folder); a
tokenizer whose SHA-256 differs from the recorded one is refused.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mmoe.layer import no_stats

from .models import KVCache, MoETransformerLM


class LoadedLM(NamedTuple):
    model: MoETransformerLM  # in eval mode, on CPU
    tokenizer: Any  # language.tokenizer.Tokenizer (None for a run without a tokenizer)
    task: Any  # the CausalLMTask / MaskedLMTask of the run (its model_cfg, languages, specials)
    checkpoint: Path


def _find_tokenizer(given: str, cfg_path: Path, run_dir: Path, recorded: dict | None) -> Path | None:
    cands = []
    if given:
        g = Path(given)
        cands += [g, cfg_path.parent / g] if not g.is_absolute() else [g]
    if recorded and recorded.get("path"):
        cands.append(Path(recorded["path"]))
    cands.append(run_dir / "tokenizer.model")
    for c in cands:
        if c.is_file():
            return c
    return None


def load_lm(checkpoint_dir: str | Path, config: str | Path | None = None, *,
            tokenizer: str | Path | None = None) -> LoadedLM:
    """Rebuild a language model from a checkpoint: ``(model, tokenizer, task, checkpoint)``.

    Args:
        checkpoint_dir: checkpoint, ``checkpoints`` or run folder.
        config: the run's YAML config (default ``RUN/config.yaml`` next to ``checkpoints``).
        tokenizer: override of the tokenizer's ``.model`` path (module docstring for the default lookup).
    Raises:
        CheckpointError: no checkpoint; FileNotFoundError: no config or tokenizer; ValueError: not a language-model run, or a
        tokenizer that differs from the one the run was trained with.
    """
    import dataclasses

    from mmoe.train.configfile import from_dict
    from mmoe.train import checkpoint as ckpt_lib
    from mmoe.train.config import load_train_config
    from mmoe.train.tasks import get_task

    from mmoe.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint_dir)
    run_dir = ckpt.parent.parent
    cfg_path = Path(config) if config else run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: config not found (pass config=, the run's config.yaml)")
    cfg = load_train_config(str(cfg_path))
    if cfg.task not in ("causal_lm", "masked_lm"):
        raise ValueError(f"{cfg_path}: task {cfg.task!r} is not a language model (causal_lm or masked_lm)")
    task_cls = get_task(cfg.task)
    model_cfg = from_dict(task_cls.ModelConfig, cfg.model, source=str(cfg_path), path="model")
    meta = ckpt_lib.read_meta(ckpt)
    state = meta.get("task_state") or {}
    recorded = state.get("tokenizer")
    if tokenizer is not None:
        tok_path: Path | None = Path(tokenizer)
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path}: tokenizer model not found")
    elif model_cfg.tokenizer or recorded:
        tok_path = _find_tokenizer(model_cfg.tokenizer, cfg_path, run_dir, recorded)
        if tok_path is None:
            raise FileNotFoundError(f"{cfg_path}: tokenizer {model_cfg.tokenizer!r} not found (also not in "
                                    f"{run_dir / 'tokenizer.model'}); pass tokenizer= / --tokenizer")
    else:
        tok_path = None
    if tok_path is not None:
        if recorded and recorded.get("sha256"):
            from .tasks import _file_sha256

            if _file_sha256(tok_path) != recorded["sha256"]:
                raise ValueError(f"{tok_path}: not the tokenizer {ckpt} was trained with (SHA-256 differs from "
                                 f"{recorded.get('path')})")
        model_cfg = dataclasses.replace(model_cfg, tokenizer=str(tok_path))
    task = task_cls(model_cfg, task_cls.parse_options(cfg.task_options, source=str(cfg_path),
                                                      origins=getattr(cfg, "_origins", None)))
    task.load_state_dict(state)
    if state.get("vocab_size") and task.vocab_size() != state["vocab_size"]:
        raise ValueError(f"{ckpt}: trained with vocab_size={state['vocab_size']}, the config and tokenizer give "
                         f"{task.vocab_size()}")
    torch.manual_seed(0)
    model = task.build_model()
    ckpt_lib.load_model_state(model, ckpt, ep_rank=0, ep_size=1)
    model.eval()
    return LoadedLM(model, task.tokenizer, task, ckpt)


# ------------------------------------------------------------------------------------------------
# decoding


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits ``[V]`` with everything outside the top-k / the nucleus set to -inf."""
    if top_k and top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate_ids(model: MoETransformerLM, prompt_ids: list[int], max_new_tokens: int = 50, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 eos_id: int | None = None, use_cache: bool = True, banned_ids: tuple[int, ...] = ()) -> list[int]:
    """New token ids after ``prompt_ids`` (the prompt not included); stops after ``eos_id`` (included) or
    ``max_new_tokens``. ``banned_ids`` are never produced (e.g. padding). See `generate`."""
    if getattr(model, "cfg", None) is not None and model.cfg.kind != "causal":
        raise ValueError("generate needs a causal LM (kind='causal'); this model is a masked LM")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens (and no bos): nothing to condition on")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    window = model.cfg.max_seq_len
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else torch.Generator().manual_seed(
        int(torch.randint(2**62, (1,))))
    tokens = list(prompt_ids)
    out: list[int] = []
    cache: KVCache | None = None
    try:
        with no_stats(model):  # no routing statistics per decoding step (the layers' latest stay)
            for _ in range(max_new_tokens):
                if cache is None:
                    ctx = tokens[-window:]  # (re)compute the context window from position 0
                    cache = KVCache(len(model.blocks)) if use_cache else None
                    logits = model(torch.tensor([ctx], device=dev), kv_cache=cache)[0, -1]
                else:
                    logits = model(torch.tensor([tokens[-1:]], device=dev), kv_cache=cache)[0, -1]
                if cache is not None and cache.length >= window:
                    cache = None  # the window is full: the next step recomputes the last `window` tokens
                logits = logits.float().cpu()
                if banned_ids:
                    logits[list(banned_ids)] = float("-inf")
                if temperature == 0:
                    nxt = int(logits.argmax())
                else:
                    probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                tokens.append(nxt)
                out.append(nxt)
                if eos_id is not None and nxt == eos_id:
                    break
    finally:
        model.train(was_training)
    return out


def generate(model: MoETransformerLM, tokenizer, prompt: str, max_new_tokens: int = 50, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             add_bos: bool = True, stop_at_eos: bool = True, use_cache: bool = True) -> str:
    """The continuation of ``prompt`` (text, prompt not included).

    ``temperature=0``: greedy (argmax, deterministic). ``temperature > 0``: sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (0 = all) and to the
    smallest set holding ``top_p`` of the probability (1 = all), with a generator seeded by ``seed`` (the
    same seed gives the same text; ``None`` draws one from torch's global RNG). ``add_bos``: prepend the
    tokenizer's ``bos`` as training framed documents (``model.add_bos`` of the run). Stops at ``eos``
    (not returned) when ``stop_at_eos``; padding is never produced.
    """
    ids = tokenizer.encode(prompt)
    if add_bos:
        ids = [tokenizer.bos_id] + ids
    new = generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       eos_id=tokenizer.eos_id if stop_at_eos else None, use_cache=use_cache,
                       banned_ids=(tokenizer.pad_id,))
    if new and stop_at_eos and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    # decode with the prompt: SentencePiece drops the space marker of a text's first piece, so decoding the
    # new ids alone would glue the continuation to the prompt
    head, full = tokenizer.decode(ids), tokenizer.decode(ids + new)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


# ------------------------------------------------------------------------------------------------
# command line


def run(args: argparse.Namespace) -> int:
    """``mmoe generate``: prints the prompt followed by its continuation; returns the exit status."""
    from mmoe.errors import CLIError
    from mmoe.train.configfile import ConfigError
    from mmoe.train.checkpoint import CheckpointError

    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            lm = load_lm(args.checkpoint, getattr(args, "config", None), tokenizer=getattr(args, "tokenizer", None))
    except (FileNotFoundError, ValueError, ConfigError, CheckpointError) as err:
        raise CLIError(str(err)) from None
    if lm.tokenizer is None:
        raise CLIError(f"{lm.checkpoint}: the run has no tokenizer (synthetic data); nothing to decode text with")
    if lm.task.kind != "causal":
        raise CLIError(f"{lm.checkpoint}: a masked LM cannot generate text; train a causal_lm")
    n = len(lm.tokenizer.encode(args.prompt)) + (1 if lm.task.model_cfg.add_bos else 0)
    window = lm.model.cfg.max_seq_len
    if n > window:
        print(f"mmoe generate: warning: the prompt has {n} tokens and the model's context {window}: only its last "
              f"{window} tokens condition the continuation", file=sys.stderr)
    text = generate(lm.model, lm.tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, add_bos=lm.task.model_cfg.add_bos,
                    use_cache=not getattr(args, "no_cache", False))
    print(args.prompt + text)
    return 0
