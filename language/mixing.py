"""Language balancing and mixing.

* `temperature_ratios` — XLM-R / mT5 language sampling probabilities ``p_l ∝ (n_l / N) ** temperature``
  (used by `language.tokenizer.train_tokenizer` and the LM tasks' ``language_temperature``).
* `mix_languages` / `LanguageMixer` — seeded weighted interleaving of per-language document streams.

A run can also mix whole shard sets by weight (``data.sources`` of the training config, one homogeneous
batch per source); this module mixes languages *inside* one document stream.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence


# ------------------------------------------------------------------------------------------------
# language balancing


def temperature_ratios(counts: Mapping[str, float], temperature: float) -> dict[str, float]:
    """Language sampling probabilities ``p_l = q_l ** temperature / sum_k q_k ** temperature`` with
    ``q_l = n_l / N`` (XLM-R's and mT5's exponent "alpha").

    ``counts`` maps a language to its amount of data ``n_l`` (characters, documents, tokens: any unit).
    ``temperature=1`` keeps the proportions, ``0`` makes the languages with data equally likely, values in
    between upsample small languages. Languages with ``n_l == 0`` get probability 0. Returns a dict in the
    order of ``counts``; the values sum to 1.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not counts:
        raise ValueError("temperature_ratios needs at least one language count")
    for lang, n in counts.items():
        if not (isinstance(n, (int, float)) and math.isfinite(n) and n >= 0):
            raise ValueError(f"count of language {lang!r} must be a finite number >= 0, got {n!r}")
    total = float(sum(counts.values()))
    if total <= 0:
        raise ValueError(f"all language counts are zero: {dict(counts)}")
    weights = {lang: (n / total) ** temperature if n > 0 else 0.0 for lang, n in counts.items()}
    z = sum(weights.values())
    return {lang: w / z for lang, w in weights.items()}


# ------------------------------------------------------------------------------------------------
# mixing languages


def _open_stream(lang: str, stream: Any) -> Iterator:
    source = stream() if callable(stream) and not hasattr(stream, "__iter__") else stream
    try:
        return iter(source)
    except TypeError:
        raise TypeError(f"stream of language {lang!r} is not iterable (got {type(source).__name__}); pass an "
                        f"iterable or a zero-argument callable returning one") from None


def _is_one_shot(stream: Any) -> bool:
    """A plain iterator (``iter(x) is x``): it cannot be restarted."""
    if callable(stream) and not hasattr(stream, "__iter__"):
        return False
    try:
        return iter(stream) is stream
    except TypeError:
        return False


def _normalized_ratios(langs: Sequence[str], ratios: Mapping[str, float] | None) -> dict[str, float]:
    if ratios is None:
        return {lang: 1.0 / len(langs) for lang in langs}
    unknown = sorted(set(ratios) - set(langs))
    if unknown:
        raise ValueError(f"ratios name languages without a stream: {', '.join(map(repr, unknown))} "
                         f"(streams: {', '.join(langs)})")
    missing = sorted(set(langs) - set(ratios))
    if missing:
        raise ValueError(f"no ratio for the stream(s) {', '.join(map(repr, missing))}; give every language a "
                         f"weight (0 leaves it out)")
    for lang, w in ratios.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"ratio of language {lang!r} must be a finite number >= 0, got {w!r}")
    total = float(sum(ratios.values()))
    if total <= 0:
        raise ValueError(f"all ratios are zero: {dict(ratios)}")
    return {lang: ratios[lang] / total for lang in langs}


def mix_languages(
    streams_by_lang: Mapping[str, Iterable | Callable[[], Iterable]],
    ratios: Mapping[str, float] | None = None,
    seed: int = 0,
    *,
    on_exhausted: str = "cycle",
) -> Iterator[tuple[Any, str]]:
    """Interleave per-language document streams, drawing the language of each next item at random with
    probability proportional to ``ratios``; yields ``(item, lang)`` (the order `pack_documents` takes).

    Args:
        streams_by_lang: ``lang -> iterable`` of documents (any objects: texts, token id lists), or
            ``lang -> zero-argument callable`` that returns a fresh iterable.
        ratios: ``lang -> weight`` (normalized here; e.g. from `temperature_ratios`). Every stream needs a
            weight; weight 0 leaves the language out. ``None``: equal weights.
        seed: the draws are a deterministic function of ``seed`` (and of the streams): the same arguments
            give the same sequence. Languages are drawn in sorted order of their tags, so the dict order
            does not matter.
        on_exhausted: what happens when a language's stream ends: ``"cycle"`` restarts it (lists and other
            re-iterables, or callables; a one-shot iterator such as a generator object is rejected up
            front) — the mix then never ends; ``"drop"`` removes the language and renormalizes the others'
            weights — the mix ends when every stream has ended.

    The fraction of items of language ``l`` converges to its normalized weight (while no stream is
    dropped). A stream that yields nothing even right after a restart raises `ValueError`.
    """
    if on_exhausted not in ("cycle", "drop"):
        raise ValueError(f"on_exhausted must be 'cycle' or 'drop', got {on_exhausted!r}")
    if not streams_by_lang:
        raise ValueError("mix_languages needs at least one language stream")
    langs = sorted(streams_by_lang)
    weights = _normalized_ratios(langs, ratios)
    active = [lang for lang in langs if weights[lang] > 0]
    if on_exhausted == "cycle":
        one_shot = [lang for lang in active if _is_one_shot(streams_by_lang[lang])]
        if one_shot:
            raise ValueError(f"on_exhausted='cycle' restarts streams, but the stream(s) of "
                             f"{', '.join(map(repr, one_shot))} are one-shot iterators; pass lists, re-iterable "
                             f"objects or zero-argument callables, or use on_exhausted='drop'")
    iterators = {lang: _open_stream(lang, streams_by_lang[lang]) for lang in active}
    rng = random.Random(f"mix_languages:{seed}")

    def table() -> tuple[list[float], float]:
        cumulative, acc = [], 0.0
        for lang in active:
            acc += weights[lang]
            cumulative.append(acc)
        return cumulative, acc

    cumulative, total = table()
    while active:
        i = bisect.bisect_right(cumulative, rng.random() * total)
        lang = active[min(i, len(active) - 1)]
        try:
            item = next(iterators[lang])
        except StopIteration:
            if on_exhausted == "drop":
                active.remove(lang)
                del iterators[lang]
                cumulative, total = table()
                continue
            iterators[lang] = _open_stream(lang, streams_by_lang[lang])
            try:
                item = next(iterators[lang])
            except StopIteration:
                raise ValueError(f"the stream of language {lang!r} yields no documents (even after a restart)"
                                 ) from None
        yield item, lang


class LanguageMixer:
    """Re-iterable `mix_languages`: every ``iter()`` starts the same seeded mix from the beginning.

    ``counts`` holds the items drawn per language in the current (latest) iteration; ``probabilities`` the
    normalized weights. ``LanguageMixer(streams, temperature_ratios(sizes, 0.3))`` mixes with XLM-R-style
    language balancing.
    """

    def __init__(self, streams_by_lang: Mapping[str, Iterable | Callable[[], Iterable]],
                 ratios: Mapping[str, float] | None = None, seed: int = 0, *, on_exhausted: str = "cycle") -> None:
        if on_exhausted not in ("cycle", "drop"):
            raise ValueError(f"on_exhausted must be 'cycle' or 'drop', got {on_exhausted!r}")
        if not streams_by_lang:
            raise ValueError("LanguageMixer needs at least one language stream")
        self.streams = dict(streams_by_lang)
        self.probabilities = _normalized_ratios(sorted(self.streams), ratios)
        self.ratios = None if ratios is None else dict(ratios)
        self.seed, self.on_exhausted = seed, on_exhausted
        self.counts: dict[str, int] = {}

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        self.counts = {lang: 0 for lang in sorted(self.streams)}
        for item, lang in mix_languages(self.streams, self.ratios, self.seed, on_exhausted=self.on_exhausted):
            self.counts[lang] += 1
            yield item, lang
