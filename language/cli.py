"""The language family's commands, found by ``mmoe`` through the ``mmoe.commands`` entry points (standard
library only at module level: ``mmoe tokenizer --help`` loads no torch):

- ``mmoe tokenizer SOURCE OUT_PREFIX``: train the multilingual SentencePiece tokenizer
  (`language.tokenizer.train_tokenizer`) from text shards or a folder of ``.txt`` files;
- ``mmoe generate CHECKPOINT --prompt TEXT``: generate text with a trained causal LM (`language.generate`);
- ``mmoe router-grad RUN``: the dense-backprop estimators' router gradient against the exact one, by
  micro-batch size (`language.router_grad`).
"""

from __future__ import annotations

import argparse
import json

from mmoe.cli import Command, lazy


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="text shards (a folder with manifest.json, a manifest, a brace pattern) "
                        "or a .txt file / folder of .txt files named by language (en.txt, de/...)")
    parser.add_argument("out_prefix", help="writes OUT_PREFIX.model, .vocab and .json")
    parser.add_argument("--vocab-size", type=int, default=8000, help="pieces, specials and bytes included (8000)")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    parser.add_argument("--temperature", type=float, default=0.3,
                        help="language sampling p ~ share**T (XLM-R: 0.3; 1 = proportional, 0 = uniform)")
    parser.add_argument("--count-by", choices=("chars", "docs"), default="chars",
                        help="measure a language's share in characters (default) or documents")
    parser.add_argument("--split", default=None, help="split of a shard folder's manifest (e.g. train)")
    parser.add_argument("--max-sentences", type=int, default=1_000_000, help="documents sampled at most")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--normalization", default="nfkc", help="SentencePiece normalisation rule "
                        "(nfkc, identity for exact round trips, ...)")
    parser.add_argument("--lang-tokens", action="store_true", help="add <2xx> language tokens")
    parser.add_argument("--no-byte-fallback", action="store_true", help="no byte pieces for unseen characters")
    parser.add_argument("--seed", type=int, default=0)


def run_tokenizer(args: argparse.Namespace) -> int:
    from mmoe.errors import CLIError
    from mmoe.data import DataError

    from .tokenizer import train_tokenizer

    try:
        tok = train_tokenizer(args.source, args.out_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
                              byte_fallback=not args.no_byte_fallback, temperature=args.temperature,
                              count_by=args.count_by, max_sentences=args.max_sentences,
                              character_coverage=args.character_coverage, normalization=args.normalization,
                              lang_tokens=args.lang_tokens, split=args.split, seed=args.seed, progress=True)
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    langs = tok.info.get("languages", {})
    print(json.dumps({"model": str(tok.path), "vocab_size": tok.vocab_size,
                      "sampling_probability": {k: round(v["probability"], 4) for k, v in langs.items()}}))
    return 0


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder, a run's checkpoints folder, or a run folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); > 0 samples from softmax(logits / T)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0: reproducible)")
    parser.add_argument("--config", default=None, help="the run's YAML config (default: RUN/config.yaml)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer .model (default: from the config / run)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")


TOKENIZER = Command(add_tokenizer_args, run_tokenizer,
                    "train a multilingual SentencePiece tokenizer from text shards or .txt files")
ROUTER_GRAD = Command(lazy("language.router_grad", "add_args"), lazy("language.router_grad", "run"),
                      "router gradient of the dense-backprop estimators vs the exact dense one, by micro-batch size")
GENERATE = Command(add_generate_args, lazy("language.generate", "run"),
                   "generate text from a trained language-model checkpoint (greedy or sampled)")
