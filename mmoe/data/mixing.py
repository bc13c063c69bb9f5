"""`MixedLoader`: several weighted data sources in one training stream, with exact resume.

How a batch comes about
-----------------------
Each source is its own loader (in training a `mmoe.data.ShardLoader` over one shard set, with its own
shuffling, rank/worker split and epochs). Batch ``i`` of the mixed stream (``i = 0, 1, ...`` counts the
batches the mixed loader has delivered over its life) is the next batch of source `choose_source`
``(seed, i, weights)``: a draw with probability ``weight_s / sum(weights)`` from a uniform number that is
a hash of ``(seed, i)`` alone. Hence:

* **Homogeneous batches.** A batch comes whole from one source, so a task's ``collate`` and loss always
  see one kind of sample (one task's images and targets, one language's documents). That is what
  multi-task training of the AdaMV kind wants (it alternates task batches), and a mixture of datasets of
  one task loses nothing by it: the mixture holds over steps instead of within a batch. With
  ``grad_accum > 1`` the micro-batches of one optimizer step may come from different sources.
* **The same on every rank.** The choice depends on neither the rank nor the data, so every rank draws the
  same source at the same step (under expert parallelism all ranks must run the same forward; a rank
  that trained on another task than its peers would route a different model). Each rank still reads its
  own share of that source's shards.
* **Exact resume.** The state (`MixedLoader.state_dict`) is the batch counter plus every source's own
  state; a new loader with the same sources, weights and seed and that state yields exactly the batches
  the original would have yielded next. A source that was not drawn for a while keeps its position.

Each item is a `SourcedBatch` ``(data, source, task)``: the source's batch, the source's index and its
label (e.g. ``"cls"`` / ``"det"``). The training engine hands the task either the plain ``data`` or the
`SourcedBatch` (see `mmoe.train.config.DataSource`).

A source that runs out (a loader with finite ``epochs`` raising ``StopIteration``) ends the mixed pass: the
iteration stops, without counting the batch that could not be drawn. Iterating again draws that step
again and goes on: a `ShardLoader` then starts a new pass of the finished source, the others continue
where they were. Training loaders are endless (``epochs=None``), so in training no source runs out; an
evaluation mixture would want every source once through instead, which this loader does not do.

Every source in every batch (`AllLoader`)
-----------------------------------------
Multi-task training of the AdaMV-MoE kind takes one batch of *each* task in every step (one ImageNet and
one COCO batch) and sums the weighted losses. `AllLoader` does that: item ``i`` is a `MultiBatch` holding
the next batch of every source, by task label. There is no draw; the state is every source's own state,
so resume is exact as above; a source that runs out ends the pass (training loaders never do).

Sources and the language mixer
------------------------------
`language.tasks` mixes languages *inside* one shard set: it keeps each document with a per-language
probability (``task_options.language_ratios`` / ``language_temperature``), so the batches mix languages
and the shares hold per batch. Sources generalise that to any shard sets (of one task or of several), at
the level of whole batches: with one shard directory per language, ``data.sources`` with weights ``p_l``
(for a temperature T, ``p_l ~ q_l**T`` from the languages' document counts ``q_l``) reaches the same
mixture over steps without discarding documents, but every batch is then monolingual. Both stay: the
per-document keep probabilities for one multilingual shard set and mixed-language batches, the sources
for separate shard sets and per-task batches.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

STATE_VERSION = 1

__all__ = ["MixedLoader", "AllLoader", "SourcedBatch", "MultiBatch", "choose_source"]


@dataclass
class SourcedBatch:
    """One batch of a mixed stream and where it came from."""

    data: Any  # the source loader's batch, as its collate made it
    source: int  # index of the source in the mixture
    task: str | None = None  # the source's label (``DataSource.task``), None when it has none


@dataclass
class MultiBatch:
    """One micro-batch of `AllLoader` (``data.mix: all``): one batch of every source, by task label."""

    batches: dict[str, Any]  # label -> that source's batch, in source order

    def __getitem__(self, task: str) -> Any:
        return self.batches[task]

    def __contains__(self, task: object) -> bool:
        return task in self.batches

    @property
    def tasks(self) -> list[str]:
        return list(self.batches)


def choose_source(seed: int, step: int, weights: Sequence[float]) -> int:
    """The source of batch ``step``: index ``s`` with probability ``weights[s] / sum(weights)``.

    A pure function of its arguments (no RNG state), so every rank, and a resumed run, draws the same.
    """
    digest = hashlib.blake2b(f"mix:{seed}:{step}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    bounds = list(itertools.accumulate(weights))
    return min(bisect.bisect_right(bounds, u * bounds[-1]), len(bounds) - 1)


class _SourcesLoader:
    """What `MixedLoader` and `AllLoader` share: the sources' loaders, the skipped-data count, the batch counter."""

    loaders: list

    @property
    def step(self) -> int:
        """Batches delivered so far."""
        return self._step

    @property
    def errors(self) -> dict[str, int]:
        """Skipped bad data so far, summed over the sources (see `ShardLoader.errors`)."""
        total: Counter = Counter()
        for loader in self.loaders:
            total.update(getattr(loader, "errors", None) or {})
        return dict(total)

    def _load_sources(self, states: list, labels: Sequence[Any]) -> None:
        for i, (loader, sub) in enumerate(zip(self.loaders, states)):
            try:
                loader.load_state_dict(sub)
            except ValueError as err:
                raise ValueError(f"source {i}{f' ({labels[i]})' if labels[i] else ''}: {err}") from None

    @staticmethod
    def _close(iterators: list) -> None:
        # close the sources' iterators now (a ShardLoader stops its DataLoader workers on close)
        for it in iterators:
            close = getattr(it, "close", None)
            if close is not None:
                close()


class MixedLoader(_SourcesLoader):
    """Iterate `SourcedBatch` items drawn from several loaders by weight (see the module docstring).

    Args:
        loaders: one loader per source: iterables of batches with ``state_dict()`` / ``load_state_dict()``
            (a `mmoe.data.ShardLoader`, or anything with the same resume protocol).
        weights: one weight > 0 per source; source ``s`` gives a share ``weights[s] / sum(weights)`` of
            the batches.
        seed: seed of the source choice (the same on every rank).
        tasks: optional label per source, passed on in `SourcedBatch.task`.

    Iterating again after a ``break`` continues where the consumed batches ended. `state_dict` /
    `load_state_dict` save and restore that position (small and JSON-able when the sources' states are).
    """

    def __init__(self, loaders: Sequence[Any], weights: Sequence[float], *, seed: int = 0,
                 tasks: Sequence[str | None] | None = None) -> None:
        if not loaders:
            raise ValueError("MixedLoader needs at least one source")
        if len(weights) != len(loaders):
            raise ValueError(f"{len(loaders)} source(s) but {len(weights)} weight(s)")
        for i, w in enumerate(weights):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ValueError(f"weights[{i}]: must be > 0, got {w!r}")
        if tasks is not None and len(tasks) != len(loaders):
            raise ValueError(f"{len(loaders)} source(s) but {len(tasks)} task label(s)")
        self.loaders = list(loaders)
        self.weights = [float(w) for w in weights]
        self.tasks = list(tasks) if tasks is not None else [None] * len(self.loaders)
        self.seed = int(seed)
        self._step = 0  # batches delivered so far: the index of the next choice
        self._generation = 0

    def state_dict(self) -> dict[str, Any]:
        """The batch counter (the index of the next source choice) and every source's position."""
        return {"version": STATE_VERSION, "kind": "mixed", "seed": self.seed, "weights": list(self.weights),
                "step": self._step, "sources": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from `state_dict` of a loader with the same sources, weights and seed).
        Raises `ValueError` naming what differs."""
        if not isinstance(state, dict) or state.get("kind") != "mixed" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a MixedLoader state (version {STATE_VERSION}); a checkpoint of a run with "
                             f"one training stream cannot resume one with data.sources: {str(state)[:200]}")
        diffs = []
        if len(state["sources"]) != len(self.loaders):
            diffs.append(f"sources: saved {len(state['sources'])}, now {len(self.loaders)}")
        if [float(w) for w in state["weights"]] != self.weights:
            diffs.append(f"weights: saved {state['weights']}, now {self.weights}")
        if int(state["seed"]) != self.seed:
            diffs.append(f"seed: saved {state['seed']}, now {self.seed}")
        if diffs:
            raise ValueError("the mixed loader state was saved with other settings, exact resume is impossible: "
                             + "; ".join(diffs))
        self._load_sources(state["sources"], [None] * len(self.loaders))
        self._step = int(state["step"])
        self._generation += 1  # an iteration started before this no longer delivers

    def __iter__(self) -> Iterator[SourcedBatch]:
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[SourcedBatch]:
        # fresh iterators: a ShardLoader continues from its last delivered batch (its older iterators,
        # e.g. of a previous pass of this loader, stop delivering)
        iterators = [iter(loader) for loader in self.loaders]
        try:
            while True:
                s = choose_source(self.seed, self._step, self.weights)
                try:
                    batch = next(iterators[s])
                except StopIteration:
                    return  # source s ran out: the pass ends, step s is drawn again by the next pass
                self._step += 1
                yield SourcedBatch(batch, s, self.tasks[s])
                if generation != self._generation:
                    return  # a newer iteration or load_state_dict took over
        finally:
            self._close(iterators)


class AllLoader(_SourcesLoader):
    """Iterate `MultiBatch` items: the next batch of every loader, by label (module docstring).

    Args:
        loaders: one loader per source (`mmoe.data.ShardLoader` or anything with its resume protocol).
        tasks: one distinct label per source (the keys of each `MultiBatch`).

    `state_dict` / `load_state_dict` save and restore every source's position.
    """

    def __init__(self, loaders: Sequence[Any], tasks: Sequence[str]) -> None:
        if not loaders:
            raise ValueError("AllLoader needs at least one source")
        if len(tasks) != len(loaders):
            raise ValueError(f"{len(loaders)} source(s) but {len(tasks)} task label(s)")
        if any(not t for t in tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(f"AllLoader: task labels must be distinct non-empty strings, got {list(tasks)}")
        self.loaders = list(loaders)
        self.tasks = list(tasks)
        self._step = 0
        self._generation = 0

    def state_dict(self) -> dict[str, Any]:
        """The batch counter and every source's position."""
        return {"version": STATE_VERSION, "kind": "all", "tasks": list(self.tasks), "step": self._step,
                "sources": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (of a loader with the same sources and labels); `ValueError` naming what
        differs."""
        if not isinstance(state, dict) or state.get("kind") != "all" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not an AllLoader state (data.mix: all, version {STATE_VERSION}): {str(state)[:200]}")
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"sources: saved with task labels {state['tasks']}, now {self.tasks}")
        self._load_sources(state["sources"], self.tasks)
        self._step = int(state["step"])
        self._generation += 1

    def __iter__(self) -> Iterator[MultiBatch]:
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[MultiBatch]:
        iterators = [iter(loader) for loader in self.loaders]
        try:
            while True:
                batches = {}
                for t, it in zip(self.tasks, iterators):
                    try:
                        batches[t] = next(it)
                    except StopIteration:
                        return
                self._step += 1
                yield MultiBatch(batches)
                if generation != self._generation:
                    return
        finally:
            self._close(iterators)
