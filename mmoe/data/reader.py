"""`ShardLoader`: batches from WebDataset shards with seeded shuffling, rank/worker splitting, bad-data
handling and exact resume.

How a batch comes about
-----------------------
The stream is cut into *epochs* per worker. In epoch ``e``, worker ``w`` of rank ``r``:

1. takes its shards: all shards, shuffled with seed ``(seed, e)`` when ``shuffle_buffer > 0`` (the same
   order on every rank), then ``[r::world_size]``, then ``[w::num_workers]``. With ``resampled=True`` it
   instead draws ``max(1, shards // (world_size * num_workers))`` shards with replacement, seeded by
   ``(seed, e, r, w)``, so an epoch is a nominal one;
2. reads their samples in order (WebDataset's tar iterator and key grouping), passes them through a
   shuffle buffer seeded by ``(seed, e, r, w)`` (none when ``shuffle_buffer == 0``);
3. decodes each sample with ``decode`` and groups ``batch_size`` decoded samples into a batch with
   ``collate``. Batches do not cross epochs: with ``drop_last`` the rest of an epoch that does not
   fill a batch is dropped, otherwise it is a last, smaller batch.

Each batch leaves the worker tagged with ``(worker, epoch, position)``, where the position counts the
samples the worker pulled from its shuffled stream in that epoch (skipped bad samples included). The
main process delivers batches in a fixed round-robin over workers (0, 1, ..., skipping finished ones),
whatever order the DataLoader returns them in, and remembers per worker the tag of the last batch it
delivered. That record is the state: a new loader with the same arguments and that state restarts
each worker at the start of its epoch, replays its deterministic stream up to the recorded position
*without decoding* (reading only), and continues, so it yields exactly the batches the original
would have yielded next. Exact resume needs a deterministic ``decode``: for random augmentations use
the ``__seed__`` that each raw sample carries (derived from seed, epoch, rank, worker and position).
The replay costs reading up to one epoch of the worker's shards (no decoding).

Bad data
--------
A shard that cannot be opened, a tar that is corrupt or truncated (samples before the damage are
kept), a shard with fewer samples than its manifest lists, and any exception raised by ``decode`` are
*data errors*. With ``on_error="fail"`` they raise `DataError` naming the shard, the sample key and the
cause; with ``"skip"`` they are skipped, counted in `ShardLoader.errors` by kind (``missing_shard``,
``corrupt_shard``, ``short_shard``, ``decode``) and reported with a `DataWarning` in the main process
when the next batch is delivered. Skipping is deterministic, so resume stays exact.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data import default_collate as _default_collate

from .errors import DataError, DataWarning
from .manifest import Manifest

STATE_VERSION = 1
ERROR_KINDS = ("missing_shard", "corrupt_shard", "short_shard", "decode")
# With epochs=None, a worker that yields no batch in this many consecutive fresh epochs is an error
# (all data bad, or fewer good samples per worker epoch than batch_size) instead of a silent hang.
_MAX_EMPTY_EPOCHS = 3


def resolve_urls(urls: str | os.PathLike | Sequence[str], split: str | None = None
                 ) -> tuple[list[str], dict[str, int] | None]:
    """Shard URLs and, when they came from a manifest, the expected sample count per shard.

    ``urls``: a brace pattern (``"dir/train-{000000..000009}.tar"``, see WebDataset's ``expand_urls``),
    a list of paths/URLs, a directory holding a ``manifest.json``, or a manifest path. ``split`` picks a
    split of a manifest (needed when it has several).
    """
    from webdataset.shardlists import expand_urls

    counts = None
    if isinstance(urls, (str, os.PathLike)):
        path = Path(urls)
        if path.is_dir() or (path.suffix == ".json" and path.is_file()):
            manifest = Manifest.load(path)
            result = manifest.urls(split)
            counts = manifest.sample_counts()
            if not result:
                raise ValueError(f"{manifest.path}: split {split or next(iter(manifest.splits))!r} has no shards")
            return result, counts
        if split is not None:
            raise ValueError(f"split={split!r} needs a shard directory or manifest, got {str(urls)!r}")
        result = expand_urls(str(urls))
    else:
        result = [str(u) for u in urls]
    if not result:
        raise ValueError("no shard URLs given")
    return result, counts


def _identity(x):
    return x


def _shuffle(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Buffer shuffle: keep ``size`` items, emit a random one for each new item; shuffle the rest at the end."""
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        out, buffer[i] = buffer[i], item
        yield out
    rng.shuffle(buffer)
    yield from buffer


class _Events:
    """Skipped-data events of one worker, waiting to travel with its next batch (or its end marker)."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, str]] = []

    def take(self) -> list[tuple[str, str]]:
        out, self.pending = self.pending, []
        return out


class _Stream:
    """Everything a worker needs to produce its tagged batches; picklable (sent to DataLoader workers)."""

    def __init__(self, *, urls, expected, batch_size, decode, collate, shuffle_buffer, seed, rank, world_size,
                 num_workers, resampled, epochs, drop_last, on_error):
        self.urls, self.expected = urls, expected or {}
        self.batch_size, self.decode, self.collate = batch_size, decode, collate
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.resampled, self.epochs, self.drop_last, self.on_error = resampled, epochs, drop_last, on_error

    def shards(self, epoch: int, worker: int) -> list[str]:
        """The shards worker ``worker`` reads in ``epoch``, in reading order."""
        if self.resampled:
            draws = max(1, len(self.urls) // (self.world_size * self.num_workers))
            rng = random.Random(f"resample:{self.seed}:{epoch}:{self.rank}:{worker}")
            return [rng.choice(self.urls) for _ in range(draws)]
        order = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return order[self.rank::self.world_size][worker::self.num_workers]

    def sample_seed(self, epoch: int, worker: int, position: int) -> int:
        text = f"{self.seed}:{epoch}:{self.rank}:{worker}:{position}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1

    # -- the worker's stream --------------------------------------------------------------------

    def run(self, worker: int, resume: dict) -> Iterator[dict]:
        """Tagged batches of ``worker`` from ``resume`` (``{"epoch", "pos", "done"}``), then an end marker."""
        events = _Events()
        epoch, skip = int(resume["epoch"]), int(resume["pos"])
        empty_epochs = 0
        if not resume.get("done"):
            while self.epochs is None or epoch < self.epochs:
                delivered = 0
                for item in self._epoch(worker, epoch, skip, events):
                    delivered += 1
                    yield item
                if self.epochs is None and skip == 0:
                    empty_epochs = empty_epochs + 1 if delivered == 0 else 0
                    if empty_epochs >= _MAX_EMPTY_EPOCHS:
                        raise DataError(
                            f"worker {worker} of rank {self.rank} produced no batch in {empty_epochs} epochs in a "
                            f"row (shards of the last: {', '.join(self.shards(epoch, worker)[:4])}): fewer "
                            f"readable samples per worker and epoch than batch_size={self.batch_size}; "
                            f"use fewer workers/ranks, a smaller batch, or check the data")
                epoch, skip = epoch + 1, 0
        yield {"worker": worker, "end": True, "epoch": epoch, "pos": 0, "events": events.take(), "batch": None}

    def _epoch(self, worker: int, epoch: int, skip: int, events: _Events) -> Iterator[dict]:
        pulled = 0  # samples taken from the shuffled stream in this epoch

        def report(kind: str, message: str, url: str | None, key: str | None) -> None:
            if self.on_error == "fail":
                raise DataError(message, url=url, key=key)
            if pulled >= skip:  # events before the resume point were already counted by the original run
                events.pending.append((kind, message))

        samples = self._raw_samples(self.shards(epoch, worker), report)
        if self.shuffle_buffer > 0:
            rng = random.Random(f"shuffle:{self.seed}:{epoch}:{self.rank}:{worker}")
            samples = _shuffle(samples, self.shuffle_buffer, rng)
        batch: list = []
        for sample in samples:
            pulled += 1
            if pulled <= skip:
                continue  # replaying up to the resume point: no decoding
            sample["__seed__"] = self.sample_seed(epoch, worker, pulled)
            try:
                decoded = self.decode(sample) if self.decode is not None else sample
            except Exception as err:
                key, url = sample.get("__key__"), sample.get("__url__")
                message = f"sample {key!r} of shard {url}: decode failed: {type(err).__name__}: {err}"
                if self.on_error == "fail":
                    raise DataError(message, url=url, key=key) from err
                events.pending.append(("decode", message))
                continue
            batch.append(decoded)
            if len(batch) == self.batch_size:
                yield self._item(worker, epoch, pulled, batch, events)
                batch = []
        if batch and not self.drop_last:
            yield self._item(worker, epoch, pulled, batch, events)

    def _item(self, worker: int, epoch: int, pos: int, batch: list, events: _Events) -> dict:
        collate = self.collate if self.collate is not None else _default_collate
        return {"worker": worker, "end": False, "epoch": epoch, "pos": pos, "events": events.take(),
                "batch": collate(batch)}

    def _raw_samples(self, shards: list[str], report: Callable) -> Iterator[dict]:
        for url in shards:
            yield from self._read_shard(url, report)

    def _read_shard(self, url: str, report: Callable) -> Iterator[dict]:
        """Samples of one shard (WebDataset grouping); damage is reported once and ends the shard."""
        from webdataset.gopen import gopen
        from webdataset.handlers import reraise_exception
        from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

        try:
            stream = _TailReader(gopen(url, "rb"))
        except Exception as err:
            report("missing_shard", f"shard {url}: cannot open it: {type(err).__name__}: {err}", url, None)
            return
        where: dict[str, str | None] = {"reading": None, "done": None}

        def select(name: str) -> bool:  # called by the tar iterator before it reads a member's data
            where["reading"] = name
            return True

        def files() -> Iterator[dict]:
            for entry in tar_file_iterator(stream, handler=reraise_exception, select_files=select):
                where["done"] = entry["fname"]
                entry["__url__"] = url
                yield entry

        count, last_key = 0, None
        try:
            try:
                for sample in group_by_keys(files(), handler=reraise_exception):
                    count, last_key = count + 1, sample["__key__"]
                    yield sample
                # Plain tars: a header cut short reads as the end of the archive, so check the end.
                complete = not url.endswith(".tar") or stream.complete()
            except Exception as err:
                member = where["reading"] or where["done"]
                key = base_plus_ext(member)[0] if member else None
                position = f"at sample {key!r} (tar member {member!r})" if member else "at its start"
                cause = str(err).split(" @ ")[0]  # the tar iterator appends the file object's repr
                report("corrupt_shard", f"shard {url}: corrupt or truncated tar {position}: "
                       f"{type(err).__name__}: {cause}; the samples from there to the end of the shard are "
                       f"unreadable", url, key)
                return
        finally:
            stream.close()
        if not complete:
            report("corrupt_shard", f"shard {url}: truncated tar: it ends without the end-of-archive blocks, "
                   f"after sample {last_key!r}; the samples after that one are lost", url, last_key)
            return
        expected = self.expected.get(url)
        if expected is not None and count != expected:
            report("short_shard", f"shard {url}: {count} samples, its manifest lists {expected} (truncated? "
                   f"last sample key {last_key!r})", url, last_key)


class _TailReader:
    """Read-through wrapper that remembers the byte count and the last 512 bytes of a stream.

    Python's tar reader takes a header cut short, or a missing header, for the end of the archive, so a
    tar truncated at (or inside) a header would silently lose its remaining samples. A complete plain
    tar ends with zero blocks and has a size that is a multiple of 512; `complete` checks that.
    """

    def __init__(self, raw) -> None:
        self.raw, self.total, self.tail = raw, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-512:] if len(data) < 512 else data[-512:]
        return data

    def complete(self) -> bool:
        while self.read(1 << 16):
            pass
        return self.total % 512 == 0 and self.total >= 1024 and self.tail == bytes(512)

    def close(self) -> None:
        self.raw.close()


class _WorkerDataset(IterableDataset):
    """The DataLoader side: each worker runs `_Stream.run` for its own id and resume record."""

    def __init__(self, stream: _Stream, resume: list[dict]):
        super().__init__()
        self.stream, self.resume = stream, resume

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.stream.run(worker, self.resume[worker])


class ShardLoader:
    """Iterate batches from WebDataset shards, with exact resume (see the module docstring).

    Args:
        urls: brace pattern, list of shard paths/URLs, a shard directory with ``manifest.json``, or a
            manifest path (then short shards are noticed against the manifest's counts).
        batch_size: samples per batch.
        decode: raw sample (bytes fields, ``__key__``, ``__url__``, ``__seed__``) -> decoded sample;
            exceptions inside are data errors. ``None`` keeps the raw sample.
        collate: list of decoded samples -> batch; default ``torch.utils.data.default_collate``.
        shuffle_buffer: sample shuffle buffer size; 0 = no shuffling at all (shard order kept too).
        seed: seed of every shuffle and resampling; each epoch gets a new, reproducible order.
        rank, world_size: this process's share of the shards (rank ``r`` reads ``[r::world_size]``).
        num_workers: DataLoader worker processes (0 = read in this process); shards are split further
            by worker. Without ``resampled`` there must be at least ``world_size * max(1, num_workers)``
            shards (`ValueError` naming the counts).
        resampled: draw shards with replacement, seeded per epoch, rank and worker.
        epochs: number of epochs; ``None`` = endless (training), 1 = one pass (evaluation). A finished
            pass resets the loader, so iterating again starts a new pass.
        drop_last: leave out the incomplete last batch of each worker epoch.
        on_error: ``"fail"`` raises `DataError` at bad data; ``"skip"`` skips, counts and warns.
        split: which split of a manifest with several (``"train"``, ``"val"``).
        pin_memory, prefetch_factor: passed to the DataLoader (workers > 0).

    Iterating again after a ``break`` continues where the consumed batches ended. `state_dict` /
    `load_state_dict` save and restore that position (small and JSON-able).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str],
        batch_size: int = 32,
        decode: Callable[[dict], Any] | None = None,
        collate: Callable[[list], Any] | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        resampled: bool = False,
        epochs: int | None = None,
        drop_last: bool = True,
        on_error: str = "fail",
        *,
        split: str | None = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None (endless) or >= 1, got {epochs}")
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.urls, expected = resolve_urls(urls, split)
        streams = max(1, num_workers)
        if not resampled and len(self.urls) < world_size * streams:
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot be split over {world_size} rank(s) x {streams} worker(s): "
                f"need at least {world_size * streams} shards; write smaller shards, use fewer workers, "
                f"or resampled=True")
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._stream = _Stream(urls=self.urls, expected=expected, batch_size=batch_size, decode=decode,
                               collate=collate, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank,
                               world_size=world_size, num_workers=streams, resampled=resampled, epochs=epochs,
                               drop_last=drop_last, on_error=on_error)
        self._config = {
            "num_shards": len(self.urls),
            "shards": hashlib.sha256("\n".join(Path(u).name for u in self.urls).encode()).hexdigest()[:16],
            "batch_size": batch_size, "shuffle_buffer": shuffle_buffer, "seed": seed, "rank": rank,
            "world_size": world_size, "num_workers": num_workers, "resampled": resampled, "drop_last": drop_last,
        }
        self._errors: Counter = Counter()
        self._batches = 0
        self._generation = 0
        self._reset_position()

    # -- position ---------------------------------------------------------------------------------

    def _reset_position(self) -> None:
        self._workers = [{"epoch": 0, "pos": 0, "done": False} for _ in range(self._stream.num_workers)]
        self._next = 0

    @property
    def errors(self) -> dict[str, int]:
        """Skipped bad data so far, by kind (``missing_shard``, ``corrupt_shard``, ``short_shard``,
        ``decode``); only kinds that occurred appear."""
        return dict(self._errors)

    @property
    def epoch(self) -> int:
        """The lowest epoch any worker is still in (workers move through epochs independently)."""
        return min(w["epoch"] for w in self._workers)

    @property
    def batches(self) -> int:
        """Batches delivered so far (over the loader's life, including before a `load_state_dict`)."""
        return self._batches

    def state_dict(self) -> dict[str, Any]:
        """The position after the last delivered batch, as a small JSON-able dict."""
        return {"version": STATE_VERSION, "config": dict(self._config),
                "workers": [dict(w) for w in self._workers], "next_worker": self._next,
                "batches": self._batches, "errors": dict(self._errors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from `state_dict` of a loader with the same arguments; ``epochs``
        may differ). Raises `ValueError` naming what differs."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a ShardLoader state (version {STATE_VERSION}): {str(state)[:200]}")
        saved = state.get("config", {})
        diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._config.items() if saved.get(k) != v]
        if diffs:
            raise ValueError("the loader state was saved with other settings, exact resume is impossible: "
                             + "; ".join(diffs))
        workers = state["workers"]
        if len(workers) != self._stream.num_workers:
            raise ValueError(f"state has {len(workers)} worker records, this loader has {self._stream.num_workers}")
        self._workers = [{"epoch": int(w["epoch"]), "pos": int(w["pos"]), "done": bool(w["done"])} for w in workers]
        self._next = int(state["next_worker"]) % len(self._workers)
        self._batches = int(state.get("batches", 0))
        self._errors = Counter({k: int(v) for k, v in state.get("errors", {}).items()})
        self._generation += 1  # an iteration started before this no longer delivers

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        self._generation += 1
        return self._iterate(self._generation)

    def _tagged_items(self, resume: list[dict]) -> Iterator[dict]:
        if self.num_workers == 0:
            return self._stream.run(0, resume[0])
        loader = DataLoader(
            _WorkerDataset(self._stream, resume), batch_size=None, collate_fn=_identity,
            num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self._config["seed"]),  # leave the global RNG alone
        )
        return iter(loader)

    def _iterate(self, generation: int) -> Iterator[Any]:
        if all(w["done"] for w in self._workers):
            self._reset_position()
        items = self._tagged_items([dict(w) for w in self._workers])
        waiting: list[deque] = [deque() for _ in self._workers]
        try:
            while not all(w["done"] for w in self._workers):
                w = self._next
                if self._workers[w]["done"]:
                    self._next = (w + 1) % len(self._workers)
                    continue
                while not waiting[w]:
                    try:
                        item = next(items)
                    except StopIteration:
                        raise RuntimeError(f"ShardLoader: worker {w} stopped without its end marker") from None
                    waiting[item["worker"]].append(item)
                item = waiting[w].popleft()
                self._next = (w + 1) % len(self._workers)
                self._record_events(item["events"])
                if item["end"]:
                    self._workers[w]["done"] = True
                    continue
                self._workers[w]["epoch"], self._workers[w]["pos"] = item["epoch"], item["pos"]
                self._batches += 1
                yield item["batch"]
                if generation != self._generation:
                    return  # a newer iteration or load_state_dict took over
        finally:
            # Stop DataLoader workers now, not at garbage collection: a DataLoader iterator that is still
            # alive when the next one forks its workers breaks in those children.
            shutdown = getattr(items, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del items
        self._reset_position()  # a finished pass: the next iteration starts a new one

    def _record_events(self, events: list[tuple[str, str]]) -> None:
        for kind, message in events:
            self._errors[kind] += 1
            warnings.warn(f"skipped bad data ({kind}): {message}", DataWarning, stacklevel=3)
