"""Multilingual SentencePiece tokenizer: training with temperature-based language sampling, and loading.

Training (`train_tokenizer`)
----------------------------
The input is text in the layout `mmoe.data.TextSource` writes: WebDataset shards whose samples carry the
document in ``txt`` and its language in ``json["lang"]`` (a shard directory with ``manifest.json``, a
manifest path, a brace pattern or a list of shard paths), or a ``.txt`` file / a folder of ``.txt`` files,
which are first written to temporary shards with `mmoe.data.write_text` (one document per line, language
from the file name: ``en.txt``, ``de/news.txt``). ``train_tokenizer(language.data.sample_text_dir(), ...)``
trains on the shipped samples.

Languages are balanced as in XLM-R / mT5: with ``n_l`` the amount of text of language ``l`` and
``N = sum(n_l)``, language ``l`` gets the share ``p_l = (n_l / N) ** temperature / Z`` of the training text
(`language.mixing.temperature_ratios`). ``temperature=1`` keeps the natural proportions, ``0`` gives every
language the same share; 0.3 (the default, XLM-R's alpha) upsamples small languages strongly.

*What ``n_l`` counts*: characters (Unicode code points) by default (``count_by="chars"``), because
documents differ in length between sources and languages and characters measure the amount of text
better than documents do; ``count_by="docs"`` counts documents instead. Either way, ``p_l`` is the share of
that same unit in the sampled training text: with ``D = min(max_sentences, total documents)`` documents in
the sample, language ``l`` gets ``round(p_l * D)`` documents (``docs``), or documents until its character
count reaches ``p_l * D * (total chars / total docs)`` (``chars``). A language whose quota exceeds its data
repeats documents (reshuffled on every pass); one below it uses a random subset. Everything is seeded by
``seed``: the same input and options give the same sample and the same model.

The input is read twice (counting, then a per-language reservoir sample sized to the quota), so memory
holds only the sampled documents. The sample, one sentence per text line of a document (lines longer
than ``max_sentence_length`` bytes are cut at a space), in a seeded random order, is streamed to
SentencePiece (``sentence_iterator``; a file path would be recorded in the model and make it differ from
run to run), which trains with ``unk=0, bos=1, eos=2, pad=3``, ``split_digits``, byte fallback and the
chosen normalization. The results are ``<out_prefix>.model`` (byte-identical for the same input and
options), ``<out_prefix>.vocab`` (``piece<TAB>score`` per line, as SentencePiece writes it) and
``<out_prefix>.json`` (per-language document and character counts, sampling probabilities, what was
sampled, all options); they are written to a temporary folder next to the output and moved into place
only when complete.

Round trip
----------
Byte fallback turns any character that is not in the vocabulary (emoji, rare CJK characters) into its
UTF-8 bytes, and whitespace is kept as it is (``remove_extra_whitespaces=False``: runs of spaces, leading
and trailing spaces, newlines and tabs survive), so ``decode(encode(text)) == normalize(text)`` for every
string, where ``normalize`` is the model's normalization. With the default ``"nfkc"`` that is
``unicodedata.normalize("NFKC", text)``: exact for ordinary text in every script, while compatibility
characters are folded (full-width ``，`` and ``！`` become ``,`` and ``!``, ``ﬁ`` becomes ``fi``, a no-break
space becomes a space). Train with ``normalization="identity"`` for an exact round trip of every string.
The one exception either way is U+2581 ``▁``, SentencePiece's own space marker, which decodes as a space.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .mixing import temperature_ratios

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
_LANG_PIECE = re.compile(r"^<2([^<>\s]+)>$")
_FORMAT = "mmoe-language-tokenizer"
_MODEL_TYPES = ("unigram", "bpe", "char", "word")


def lang_token(lang: str) -> str:
    """The language tag piece of ``lang``: ``"<2en>"``."""
    return f"<2{lang}>"


# ------------------------------------------------------------------------------------------------
# reading documents


def _decode_doc(sample: Mapping[str, Any]) -> tuple[str, str]:
    """Raw shard sample -> ``(text, lang)``; errors name the sample (ShardLoader adds the shard)."""
    from mmoe.data.decode import decode_json, decode_text

    text = decode_text(sample)
    meta = decode_json(sample) if "json" in sample else None
    lang = meta.get("lang") if isinstance(meta, dict) else None
    if not isinstance(lang, str) or not lang:
        raise KeyError(f"sample {sample.get('__key__')!r} has no language: expected a json field with a "
                       f"non-empty string \"lang\" (as mmoe.data.TextSource writes), got {meta!r}")
    return text, lang


def _as_list(batch: list) -> list:
    return batch


def _is_text_input(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".txt"
    return path.is_dir() and not (path / "manifest.json").exists()


def _iter_docs(urls: Any, split: str | None) -> Iterator[tuple[str, str]]:
    from mmoe.data import ShardLoader

    loader = ShardLoader(urls, batch_size=256, decode=_decode_doc, collate=_as_list, shuffle_buffer=0,
                         epochs=1, drop_last=False, split=split)
    for batch in loader:
        yield from batch


# ------------------------------------------------------------------------------------------------
# sampling


def _quotas(docs: Mapping[str, int], chars: Mapping[str, int], probs: Mapping[str, float], count_by: str,
            max_sentences: int) -> tuple[int, dict[str, float]]:
    """Total documents to sample and the per-language quota in the counting unit."""
    total_docs = sum(docs.values())
    budget_docs = min(max_sentences, total_docs)
    if count_by == "docs":
        return budget_docs, {lang: float(max(1, round(p * budget_docs))) if p > 0 else 0.0
                             for lang, p in probs.items()}
    budget_chars = budget_docs * sum(chars.values()) / total_docs
    return budget_docs, {lang: p * budget_chars for lang, p in probs.items()}


def _reservoir_sizes(docs: Mapping[str, int], chars: Mapping[str, int], quotas: Mapping[str, float],
                     count_by: str) -> dict[str, int]:
    sizes = {}
    for lang, quota in quotas.items():
        if quota <= 0:
            sizes[lang] = 0
        elif count_by == "docs":
            sizes[lang] = min(docs[lang], int(quota))
        else:
            mean = chars[lang] / docs[lang]
            sizes[lang] = min(docs[lang], math.ceil(quota / max(mean, 1.0) * 1.25) + 8)
    return sizes


def _take(pool: list[str], quota: float, count_by: str, rng: random.Random) -> list[str]:
    """Documents from ``pool`` (shuffled, reshuffled on every further pass) until ``quota`` is reached."""
    if quota <= 0 or not pool:
        return []
    out: list[str] = []
    amount = 0
    order = list(pool)
    while True:
        rng.shuffle(order)
        for text in order:
            out.append(text)
            amount += 1 if count_by == "docs" else len(text)
            if amount >= quota:
                return out


def _lines(text: str, max_bytes: int) -> Iterator[str]:
    """The non-empty lines of a document, each cut to at most ``max_bytes`` UTF-8 bytes (at a space if
    there is one in the second half of the piece)."""
    for line in text.splitlines():
        while len(line.encode("utf-8")) > max_bytes:
            cut, size = 0, 0
            for i, ch in enumerate(line):
                size += len(ch.encode("utf-8"))
                if size > max_bytes:
                    cut = i
                    break
            space = line.rfind(" ", cut // 2, cut)
            if space > 0:
                cut = space
            head, line = line[:cut], line[cut:]
            if head.strip():
                yield head
        if line.strip():
            yield line


# ------------------------------------------------------------------------------------------------
# training


def train_tokenizer(
    source: str | os.PathLike | Sequence[str],
    out_prefix: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    temperature: float = 0.3,
    count_by: str = "chars",
    max_sentences: int = 1_000_000,
    character_coverage: float = 0.9995,
    normalization: str = "nfkc",
    lang_tokens: bool | Iterable[str] = False,
    user_defined_symbols: Sequence[str] = (),
    hard_vocab_limit: bool = False,
    max_sentence_length: int = 8192,
    split: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> "Tokenizer":
    """Train a SentencePiece model on multilingual text with temperature-based language sampling.

    Args:
        source: shard directory (with ``manifest.json``), manifest path, brace pattern or list of shards
            whose samples have ``txt`` and ``json["lang"]``; or a ``.txt`` file or folder of ``.txt``
            files (languages from the file or folder names, see `mmoe.data.TextSource`).
        out_prefix: writes ``<out_prefix>.model``, ``.vocab`` and ``.json`` (folders are created; a
            trailing ``.model`` is dropped).
        vocab_size: pieces in the vocabulary, including the 4 special pieces, the 256 byte pieces (with
            ``byte_fallback``) and the user-defined symbols. With ``hard_vocab_limit=False`` (default)
            SentencePiece may stop below it when the text is too small for more pieces.
        model_type: ``"unigram"`` or ``"bpe"`` (also ``"char"``, ``"word"``).
        byte_fallback: unknown characters become UTF-8 byte pieces instead of ``<unk>``.
        temperature: language sampling exponent: ``p_l ∝ (n_l / N) ** temperature``.
        count_by: ``"chars"`` (default) or ``"docs"``: what ``n_l`` counts (module docstring).
        max_sentences: at most this many documents in the training sample (all languages together).
        character_coverage: share of characters the vocabulary must cover (rarer ones fall back to bytes).
        normalization: SentencePiece normalization rule: ``"nfkc"`` (default), ``"identity"``,
            ``"nmt_nfkc"``, ``"nfkc_cf"``, ``"nmt_nfkc_cf"``.
        lang_tokens: ``True`` adds a ``<2xx>`` user-defined piece for every language of the input; an
            iterable of language tags adds those instead.
        user_defined_symbols: further pieces that are never split (after the language tokens).
        hard_vocab_limit: make ``vocab_size`` a hard limit (SentencePiece fails if it cannot be reached).
        max_sentence_length: longer lines (in UTF-8 bytes) are cut before training.
        split: split of a manifest with several (``"train"``).
        seed: seed of the sampling.
        progress: show SentencePiece's log.

    Returns:
        The trained `Tokenizer` (``tokenizer.info`` holds the JSON written next to the model).
    Raises:
        ValueError: bad options (the message names them); `mmoe.data.DataError` for bad input data;
        RuntimeError: SentencePiece failed (its message is included).
    """
    import sentencepiece as spm
    from mmoe.data import write_text

    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(_MODEL_TYPES)}, got {model_type!r}")
    if count_by not in ("chars", "docs"):
        raise ValueError(f"count_by must be 'chars' or 'docs', got {count_by!r}")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if max_sentence_length < 16:
        raise ValueError(f"max_sentence_length must be >= 16 bytes, got {max_sentence_length}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    out_prefix = Path(out_prefix)
    if out_prefix.suffix == ".model":
        out_prefix = out_prefix.with_suffix("")
    if out_prefix.name in ("", ".", "..") or out_prefix.is_dir():
        raise ValueError(f"out_prefix must name the files to write (<prefix>.model), got a folder: {out_prefix}")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="mmoe-tokenizer-shards-") as shard_tmp:
        urls: Any = source
        if isinstance(source, (str, os.PathLike)) and _is_text_input(Path(source)):
            urls = Path(shard_tmp) / "shards"
            write_text(source, urls, samples_per_shard=10_000)
        elif isinstance(source, os.PathLike):
            urls = os.fspath(source)

        # Pass 1: how much text each language has.
        docs: dict[str, int] = {}
        chars: dict[str, int] = {}
        for text, lang in _iter_docs(urls, split):
            docs[lang] = docs.get(lang, 0) + 1
            chars[lang] = chars.get(lang, 0) + len(text)
        if not docs:
            raise ValueError(f"{source}: no documents to train a tokenizer on")
        languages = sorted(docs)
        docs = {lang: docs[lang] for lang in languages}
        chars = {lang: chars[lang] for lang in languages}
        counts = chars if count_by == "chars" else docs
        if sum(counts.values()) == 0:
            raise ValueError(f"{source}: all {sum(docs.values())} documents are empty")
        probs = temperature_ratios(counts, temperature)
        budget_docs, quotas = _quotas(docs, chars, probs, count_by, max_sentences)
        sizes = _reservoir_sizes(docs, chars, quotas, count_by)

        # Pass 2: a seeded reservoir sample per language, as large as its quota needs.
        pools: dict[str, list[str]] = {lang: [] for lang in languages}
        seen = {lang: 0 for lang in languages}
        rngs = {lang: random.Random(f"reservoir:{seed}:{lang}") for lang in languages}
        for text, lang in _iter_docs(urls, split):
            if lang not in pools:
                raise RuntimeError(f"{source}: language {lang!r} appeared only on the second reading")
            seen[lang] += 1
            pool, size = pools[lang], sizes[lang]
            if len(pool) < size:
                pool.append(text)
            elif size > 0:
                j = rngs[lang].randrange(seen[lang])
                if j < size:
                    pool[j] = text

    sampled = {lang: _take(pools[lang], quotas[lang], count_by, random.Random(f"take:{seed}:{lang}"))
               for lang in languages}
    del pools

    if lang_tokens is True:
        tag_langs = languages
    elif lang_tokens is False or lang_tokens is None:
        tag_langs = []
    elif isinstance(lang_tokens, str):
        raise ValueError(f"lang_tokens must be True/False or a list of language tags, got the string "
                         f"{lang_tokens!r}")
    else:
        tag_langs = list(dict.fromkeys(lang_tokens))
    symbols = [lang_token(lang) for lang in tag_langs] + [s for s in user_defined_symbols
                                                          if s not in {lang_token(t) for t in tag_langs}]
    reserved = 4 + len(symbols) + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces: 4 special pieces"
                         f"{' + 256 byte pieces' if byte_fallback else ''} + {len(symbols)} user-defined "
                         f"symbols = {reserved}")

    options = {
        "source": [str(u) for u in source] if isinstance(source, (list, tuple)) else str(source),
        "vocab_size": vocab_size, "model_type": model_type, "byte_fallback": byte_fallback,
        "temperature": temperature, "count_by": count_by, "max_sentences": max_sentences,
        "character_coverage": character_coverage, "normalization": normalization,
        "lang_tokens": tag_langs, "user_defined_symbols": list(user_defined_symbols),
        "hard_vocab_limit": hard_vocab_limit, "max_sentence_length": max_sentence_length, "split": split,
        "seed": seed,
    }

    lines = [line for lang in languages for text in sampled[lang] for line in _lines(text, max_sentence_length)]
    random.Random(f"lines:{seed}").shuffle(lines)
    if not lines:
        raise ValueError(f"{source}: the sampled documents hold no non-empty lines")
    model = io.BytesIO()
    try:
        # Sentences go in through an iterator and the model comes back in memory, so no file names end up
        # in the model's trainer spec: the same input and options give a byte-identical model.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=byte_fallback,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"], pad_piece=SPECIAL_PIECES["pad"],
            split_digits=True, normalization_rule_name=normalization, remove_extra_whitespaces=False,
            user_defined_symbols=symbols, hard_vocab_limit=hard_vocab_limit,
            max_sentence_length=max_sentence_length, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=2, minloglevel=0 if progress else 2)
    except RuntimeError as err:
        raise RuntimeError(f"SentencePiece training on {source} failed (vocab_size={vocab_size}, "
                           f"model_type={model_type!r}): {err}") from err

    with tempfile.TemporaryDirectory(prefix=f".{out_prefix.name}-training-", dir=out_prefix.parent) as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "spm.model").write_bytes(model.getvalue())
        tokenizer = Tokenizer(tmp_dir / "spm.model")
        info = {
            "format": _FORMAT,
            "version": 1,
            "model": out_prefix.name + ".model",
            "sentencepiece_version": getattr(spm, "__version__", None),
            "vocab_size": tokenizer.vocab_size,
            "special_ids": {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID},
            "lang_tokens": {lang: tokenizer.piece_to_id(lang_token(lang)) for lang in tag_langs},
            "sampling": {
                "temperature": temperature, "count_by": count_by, "max_sentences": max_sentences,
                "total_docs": sum(docs.values()), "total_chars": sum(chars.values()),
                "sampled_docs": sum(len(v) for v in sampled.values()), "sampled_lines": len(lines),
                "budget_docs": budget_docs,
            },
            "languages": {lang: {"docs": docs[lang], "chars": chars[lang], "probability": probs[lang],
                                 "quota": quotas[lang], "sampled_docs": len(sampled[lang]),
                                 "sampled_chars": sum(len(t) for t in sampled[lang])} for lang in languages},
            "options": options,
        }
        sp = tokenizer.sp
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(tokenizer.vocab_size))
        (tmp_dir / "spm.vocab").write_text(vocab, encoding="utf-8")
        (tmp_dir / "spm.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for ext in ("vocab", "json", "model"):  # the model last: its presence means the rest is there
            os.replace(tmp_dir / f"spm.{ext}", out_prefix.parent / f"{out_prefix.name}.{ext}")
    return Tokenizer(out_prefix.parent / f"{out_prefix.name}.model")


# ------------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A trained SentencePiece model: ``Tokenizer(path)`` or ``Tokenizer.load(path)``.

    ``path`` is the ``.model`` file or its prefix (``tok`` for ``tok.model``). A ``.json`` next to it (as
    `train_tokenizer` writes) is read into `info`. A missing file raises `FileNotFoundError`, a file that
    is not a SentencePiece model `ValueError`, both naming the path.

    Token ids are plain ``int``; `decode` drops padding and negative ids (such as the ``-100`` of masked
    labels) and the control pieces ``<s>``/``</s>``. Language tag pieces (``<2en>``, from
    ``train_tokenizer(..., lang_tokens=True)``) are user-defined symbols: never split, looked up with
    `lang_id`, decoded as their text. The object pickles (DataLoader workers).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        given = Path(path)
        model = given
        if not model.is_file() and model.suffix != ".model":
            model = given.with_name(given.name + ".model")
        if not model.is_file():
            where = str(given) if model == given else f"{given} (nor {model})"
            raise FileNotFoundError(f"tokenizer model not found: {where}")
        try:
            data = model.read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"cannot read the tokenizer model {model}: {err}") from err
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as err:  # sentencepiece raises RuntimeError for a bad protobuf
            raise ValueError(f"{model}: not a valid SentencePiece model ({str(err).strip() or type(err).__name__})"
                             ) from None
        if sp.get_piece_size() == 0:
            raise ValueError(f"{model}: not a valid SentencePiece model (no pieces; empty or truncated file?)")
        self.sp = sp
        self.path = model
        sidecar = model.with_suffix(".json")
        self.info: dict[str, Any] = {}
        if sidecar.is_file():
            try:
                self.info = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{sidecar}: unreadable tokenizer info ({err})") from None
        self._lang_ids: dict[str, int] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Same as ``Tokenizer(path)``."""
        return cls(path)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    # -- vocabulary ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range for {self.path} (vocab_size {self.vocab_size})")
        return self.sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``, or `unk_id` if the vocabulary does not have it."""
        return self.sp.piece_to_id(piece)

    @property
    def languages(self) -> list[str]:
        """Languages with a ``<2xx>`` tag piece, sorted."""
        return sorted(self._lang_table())

    def _lang_table(self) -> dict[str, int]:
        if self._lang_ids is None:
            table = {}
            for i in range(self.vocab_size):
                if self.sp.is_control(i) or self.sp.is_byte(i) or self.sp.is_unknown(i):
                    continue
                match = _LANG_PIECE.match(self.sp.id_to_piece(i))
                if match:
                    table[match.group(1)] = i
            self._lang_ids = table
        return self._lang_ids

    def lang_id(self, lang: str) -> int:
        """The id of the language tag piece ``<2{lang}>``; `KeyError` naming the language if there is none."""
        table = self._lang_table()
        if lang not in table:
            known = ", ".join(sorted(table)) or "none: train with lang_tokens=True"
            raise KeyError(f"no language token {lang_token(lang)!r} for language {lang!r} in {self.path} "
                           f"(language tokens: {known})")
        return table[lang]

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (optionally framed by `bos_id` / `eos_id`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_batch for a list")
        return self.sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """`encode` of every text."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: item {i} is a {type(text).__name__}, not a str")
        return self.sp.encode(texts, add_bos=add_bos, add_eos=add_eos) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, tuple, 1-d tensor or array); padding and negative ids are skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        pad, size = self.pad_id, self.vocab_size
        clean = []
        for token in ids:
            token = int(token)
            if token < 0 or token == pad:
                continue
            if token >= size:
                raise ValueError(f"token id {token} is out of range for {self.path} (vocab_size {size})")
            clean.append(token)
        return self.sp.decode(clean)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """`decode` of every sequence (a list of lists or a 2-d tensor)."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode(ids) for ids in batch]
