"""Language-model data: shipped samples, language balancing, language mixing and sequence packing.

* `sample_text_dir` — the shipped multilingual sample text (``language/samples/<lang>.txt``, one
  document per line; `mmoe.data.TextSource` reads the language from the file name).
* `temperature_ratios`, `mix_languages` / `LanguageMixer` — language balancing and mixing, defined in
  `language.mixing` and re-exported here.
* `pack_documents` — documents -> fixed-length training rows with document ids, per-document positions
  and labels that never cross a document boundary; `attention_mask_from_doc_ids` turns the document ids
  into the block-diagonal causal mask for ``torch.nn.functional.scaled_dot_product_attention``;
  `collate_packed` batches rows.
* `TextPacker` — an ``IterableDataset`` that reads text shards (or ``(text, lang)`` pairs), tokenizes
  and packs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .mixing import LanguageMixer, mix_languages, temperature_ratios  # noqa: F401 (re-exported)

IGNORE_INDEX = -100  # label of positions that take no part in the loss (torch's cross_entropy default)
PAD_DOC = -1  # internal document number of padding tokens


def sample_text_dir() -> Path:
    """The folder of shipped sample text: ``<lang>.txt`` files, one short document per line (11
    languages in Latin, Cyrillic, Greek, Arabic, Devanagari, Han, Kana and Hangul script)."""
    return Path(__file__).resolve().parent / "samples"


# ------------------------------------------------------------------------------------------------
# packing


def _document(item: Any, index: int) -> tuple[list[int], str | None]:
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not (item[1] is None or isinstance(item[1], str)):
        raise TypeError(f"document {index}: expected a pair (token_ids, lang) with lang a str or None, got "
                        f"{str(item)[:120]}")
    ids, lang = item
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(t) for t in ids], lang


def _row(tokens: list[int], docs: list[int], langs: Mapping[int, str | None], seq_len: int,
         lang_index: Mapping[str, int] | None) -> dict[str, Any]:
    """One row from ``seq_len + 1`` tokens and their document numbers."""
    tok = torch.tensor(tokens, dtype=torch.long)
    doc = torch.tensor(docs, dtype=torch.long)
    src, dst = doc[:-1], doc[1:]
    same = (dst == src) & (dst != PAD_DOC)
    labels = torch.where(same, tok[1:], torch.full_like(tok[1:], IGNORE_INDEX))
    starts = torch.ones(seq_len, dtype=torch.bool)
    starts[1:] = src[1:] != src[:-1]
    doc_ids = torch.cumsum(starts.long(), 0) - 1
    idx = torch.arange(seq_len)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
    positions = idx - first
    segment_docs = src[starts].tolist()
    row_langs = [None if d == PAD_DOC else langs[d] for d in segment_docs]
    row = {"input_ids": tok[:-1], "labels": labels, "doc_ids": doc_ids, "positions": positions, "langs": row_langs}
    if lang_index is not None:
        ids = []
        for lang in row_langs:
            if lang is None:
                ids.append(-1)
            elif lang in lang_index:
                ids.append(int(lang_index[lang]))
            else:
                raise KeyError(f"language {lang!r} is not in lang_index ({', '.join(map(str, lang_index))})")
        row["lang_ids"] = torch.tensor(ids, dtype=torch.long)[doc_ids]
    return row


def pack_documents(
    docs: Iterable[tuple[Sequence[int], str | None]],
    seq_len: int,
    *,
    eos_id: int,
    pad_id: int,
    bos_id: int | None = None,
    drop_last: bool = False,
    lang_index: Mapping[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Pack a stream of tokenized documents into fixed-length next-token-prediction rows.

    Input: an iterable of ``(token_ids, lang)`` pairs (ids as a list, tuple, tensor or array; ``lang`` a
    str or None). Documents without tokens are skipped. Each document becomes
    ``[bos_id] + token_ids + [eos_id]`` (``bos_id`` only if given) and the documents are concatenated
    into one stream ``s``, consumed lazily (memory: about one row).

    Rows: row ``r`` covers the stream window ``s[r*L : r*L + L + 1]`` (``L = seq_len``), i.e. ``L + 1``
    tokens; ``input_ids = window[:-1]`` and the targets are ``window[1:]``. Consecutive windows overlap by
    one token (a row's last target is the next row's first input), so every stream token is an input
    exactly once, in order, and every transition between neighbouring tokens is a target exactly once.
    Documents are split across rows where the row boundary falls. The last, incomplete row is padded
    with ``pad_id`` (or left out with ``drop_last=True``).

    Each row is a dict of 1-d ``torch.long`` tensors of length ``L`` and one list:

    * ``input_ids``: the input tokens.
    * ``labels``: the target ``s[i + 1]`` of input ``s[i]``, or ``-100`` (ignored by ``cross_entropy``)
      when the target belongs to a different document than the input or is padding. With ``eos``
      appended to each document, the last real token of a document predicts its ``eos`` (kept: the model
      learns to end documents), and the input that *is* the ``eos`` (target: the first token, or ``bos``,
      of the next document) gets ``-100``: no document is predicted from the previous one. Padding inputs
      get ``-100`` too. The label at the last position of a row is decided the same way from the next
      row's first token.
    * ``doc_ids``: the segment of the row each input token belongs to: 0 for the first (possibly the
      continuation of a document from the previous row), +1 at every new document; padding forms one
      segment of its own after the last document. Equal ids = same document, so
      `attention_mask_from_doc_ids` gives block-diagonal causal attention that never crosses a document
      boundary (padding attends only to padding).
    * ``positions``: position of the token within its segment: 0 at every document start and at the
      start of the row (a document continued from the previous row counts from 0 again — its earlier
      part is invisible under the document mask anyway, RoPE depends only on position differences, and
      positions stay below ``seq_len`` for learned position tables).
    * ``langs``: list with the language of each segment (index it with ``doc_ids``; ``None`` for padding
      and for documents without a language). The language of token ``i`` is ``langs[doc_ids[i]]``.
    * ``lang_ids`` (only with ``lang_index``, a ``lang -> int`` map): per-token language index, -1 for
      padding; a language missing from the map raises `KeyError`.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokens: list[int] = []
    doc_of: list[int] = []
    langs: dict[int, str | None] = {}
    n = 0
    for index, item in enumerate(docs):
        ids, lang = _document(item, index)
        if not ids:
            continue
        framed = ([bos_id] if bos_id is not None else []) + ids + [eos_id]
        tokens.extend(framed)
        doc_of.extend([n] * len(framed))
        langs[n] = lang
        n += 1
        while len(tokens) >= seq_len + 1:
            yield _row(tokens[:seq_len + 1], doc_of[:seq_len + 1], langs, seq_len, lang_index)
            del tokens[:seq_len], doc_of[:seq_len]
            for d in [d for d in langs if d < doc_of[0]]:
                del langs[d]
    if tokens and not drop_last:
        pad = seq_len + 1 - len(tokens)
        yield _row(tokens + [pad_id] * pad, doc_of + [PAD_DOC] * pad, langs, seq_len, lang_index)


def attention_mask_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, L, L]`` from document ids ``[B, L]`` (or ``[L]``): entry
    ``[b, 0, i, j]`` is True (may attend) iff ``j <= i`` and tokens ``i`` and ``j`` have the same document
    id. Pass it as ``attn_mask`` to ``torch.nn.functional.scaled_dot_product_attention`` (True = take part);
    the diagonal is always True, so no query row is fully masked."""
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0)
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [L] or [B, L], got shape {tuple(doc_ids.shape)}")
    length = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal).unsqueeze(1)


def collate_packed(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch rows of `pack_documents`: tensors stacked to ``[B, L]``, ``langs`` as a list of lists."""
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ------------------------------------------------------------------------------------------------
# a dataset over text shards


def _text_and_lang(sample: Mapping[str, Any]) -> tuple[str, str | None]:
    from mmoe.data.decode import decode_json, decode_text

    text = decode_text(sample)
    meta = decode_json(sample) if "json" in sample else None
    return text, meta.get("lang") if isinstance(meta, dict) else None


def _as_list(batch: list) -> list:
    return batch


class TextPacker(IterableDataset):
    """Packed rows (see `pack_documents`) from text shards or from ``(text, lang)`` pairs.

    Args:
        source: shards as `mmoe.data.ShardLoader` takes them (directory with ``manifest.json``, manifest,
            brace pattern, list of shard paths; samples with ``txt`` and ``json["lang"]``, as
            `mmoe.data.TextSource` writes), or an iterable of ``(text, lang)`` pairs (re-iterable, such as
            a list or a `LanguageMixer`, if the dataset is iterated more than once).
        tokenizer: a `language.tokenizer.Tokenizer` or the path of its model.
        seq_len: row length.
        add_bos: frame each document with the tokenizer's ``bos`` (``eos`` always).
        drop_last: leave out the padded last row.
        lang_index: adds per-token ``lang_ids`` (see `pack_documents`).
        shuffle_buffer, seed, epochs, split, rank, world_size: passed to the `ShardLoader` (shards only);
            ``rank``/``world_size`` split the shards over data-parallel ranks.

    Inside a ``DataLoader`` with several workers, worker ``w`` of ``W`` packs documents ``w, w+W, ...``
    (each worker still reads every shard, so for large data prefer rank splitting and few workers). Use
    `collate_packed` as the ``collate_fn``.
    """

    def __init__(self, source: Any, tokenizer: Any, seq_len: int, *, add_bos: bool = False, drop_last: bool = False,
                 lang_index: Mapping[str, int] | None = None, shuffle_buffer: int = 1000, seed: int = 0,
                 epochs: int | None = 1, split: str | None = None, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not hasattr(tokenizer, "encode_batch"):
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer(tokenizer)
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.add_bos, self.drop_last, self.lang_index = add_bos, drop_last, lang_index
        self.loader = None
        if isinstance(source, (str, os.PathLike)) or (
                isinstance(source, (list, tuple)) and source and isinstance(source[0], (str, os.PathLike))):
            from mmoe.data import ShardLoader

            urls = os.fspath(source) if isinstance(source, os.PathLike) else source
            self.loader = ShardLoader(urls, batch_size=64, decode=_text_and_lang, collate=_as_list,
                                      shuffle_buffer=shuffle_buffer, seed=seed, epochs=epochs, drop_last=False,
                                      split=split, rank=rank, world_size=world_size)
        self.source = source

    def _documents(self) -> Iterator[tuple[str, str | None]]:
        if self.loader is not None:
            for batch in self.loader:
                yield from batch
        else:
            yield from self.source

    def _tokenized(self) -> Iterator[tuple[list[int], str | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pending: list[tuple[str, str | None]] = []

        def flush() -> Iterator[tuple[list[int], str | None]]:
            ids = self.tokenizer.encode_batch([text for text, _ in pending])
            yield from zip(ids, [lang for _, lang in pending])
            pending.clear()

        for i, (text, lang) in enumerate(self._documents()):
            if i % workers != worker:
                continue
            pending.append((text, lang))
            if len(pending) == 256:
                yield from flush()
        if pending:
            yield from flush()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        tok = self.tokenizer
        return pack_documents(self._tokenized(), self.seq_len, eos_id=tok.eos_id, pad_id=tok.pad_id,
                              bos_id=tok.bos_id if self.add_bos else None, drop_last=self.drop_last,
                              lang_index=self.lang_index)
