"""``mmoe tokenizer SOURCE OUT_PREFIX``: train the multilingual SentencePiece tokenizer
(`language.tokenizer.train_tokenizer`) from text shards or a folder of ``.txt`` files."""

from __future__ import annotations

import argparse
import json


def add_args(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    from mmoe.cli import CLIError
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
