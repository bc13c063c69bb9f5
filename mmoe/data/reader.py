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
*data errors*. A tar that ends early is one too, with or without a manifest: cut inside a member, cut
at a member boundary, a member header damaged or overwritten with zeros (Python's tar reader takes the
last three for the end of the archive), anything but zero bytes after the end-of-archive block. With
``on_error="fail"`` they raise `DataError` naming the shard, the sample key and the cause; with
``"skip"`` they are skipped, counted in `ShardLoader.errors` by kind (``missing_shard``,
``corrupt_shard``, ``short_shard``, ``decode``) and reported with a `DataWarning` in the main process
when the next batch is delivered. The counts are samples lost: one per decode error, and for a damaged,
missing or short shard with a known sample count, that count minus the samples read; a damaged or
missing shard without a count adds 1 (its message says the loss is unknown). Skipping is deterministic,
so resume stays exact.

A shard's sample count is known when a manifest lists it: the shards of a directory or manifest path,
and a local shard of a brace pattern, glob or list whose own directory holds a ``manifest.json`` that
lists its file name (see `resolve_urls`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data import default_collate as _default_collate

from .errors import DataError, DataWarning
from .manifest import FORMAT as MANIFEST_FORMAT
from .manifest import MANIFEST_NAME, Manifest

STATE_VERSION = 1
ERROR_KINDS = ("missing_shard", "corrupt_shard", "short_shard", "decode")
# With epochs=None, a worker that yields no batch in this many consecutive fresh epochs is an error
# (all data bad, or fewer good samples per worker epoch than batch_size) instead of a silent hang.
_MAX_EMPTY_EPOCHS = 3


def resolve_urls(urls: str | os.PathLike | Sequence[str], split: str | None = None
                 ) -> tuple[list[str], dict[str, int] | None]:
    """Shard URLs and the expected sample count of each shard that a manifest lists.

    ``urls``: a brace pattern (``"dir/train-{000000..000009}.tar"``, see WebDataset's ``expand_urls``), a
    glob of local files (``"dir/train-*.tar"``, expanded with `glob.glob`, sorted; a glob that matches
    nothing is a `ValueError` naming it), a list of paths/URLs, a directory holding a ``manifest.json``,
    or a manifest path. ``split`` picks a split of a manifest (needed when it has several).

    The counts come from the manifest for a directory or manifest path; for the other forms, from a
    ``manifest.json`` in a local shard's own directory that lists a shard of that file name (shards it
    does not list, remote URLs and directories without a manifest get no count). A shard with a count
    that reads fewer samples is reported as short (see the module docstring, "Bad data").
    """
    from webdataset.shardlists import expand_urls

    if isinstance(urls, (str, os.PathLike)):
        path = Path(urls)
        if path.is_dir() or (path.suffix == ".json" and path.is_file()):
            manifest = Manifest.load(path)
            result = manifest.urls(split)
            if not result:
                raise ValueError(f"{manifest.path}: split {split or next(iter(manifest.splits))!r} has no shards")
            return result, manifest.sample_counts()
        if split is not None:
            raise ValueError(f"split={split!r} needs a shard directory or manifest, got {str(urls)!r}")
        text = str(urls)
        if _is_local(text) and not glob.has_magic(text) and "{" not in text and not os.path.exists(text):
            raise ValueError(f"no such shard file or directory: {text}")
        result = []
        for url in expand_urls(text):
            if _is_local(url) and glob.has_magic(url) and not os.path.exists(url):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ValueError(f"no shard files match the glob {url!r}")
                result.extend(matches)
            else:
                result.append(url)
    else:
        result = [str(u) for u in urls]
    if not result:
        raise ValueError("no shard URLs given")
    return result, _counts_from_manifests(result)


def _is_local(url: str) -> bool:
    """A plain file path (not ``scheme://...``, ``pipe:...`` or ``-``)."""
    return "://" not in url and not url.startswith("pipe:") and url != "-"


def _counts_from_manifests(urls: list[str]) -> dict[str, int] | None:
    """``{url: samples}`` for the local shards listed (by file name) in a ``manifest.json`` of their own
    directory; ``None`` when there are none. A ``manifest.json`` of another format is left alone."""
    counts: dict[str, int] = {}
    listed: dict[Path, dict[str, int]] = {}
    for url in urls:
        if not _is_local(url):
            continue
        shard = Path(url)
        directory = shard.parent
        if directory not in listed:
            listed[directory] = _manifest_counts(directory / MANIFEST_NAME)
        if shard.name in listed[directory]:
            counts[url] = listed[directory][shard.name]
    return counts or None


def _manifest_counts(path: Path) -> dict[str, int]:
    """``{shard file name: samples}`` of the mmoe manifest at ``path``; empty when there is none there."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the shard manifest next to the shards ({err})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return {}  # some other tool's manifest.json
    manifest = Manifest.from_dict(data, path=path)
    return {s.name: s.samples for split in manifest.splits.values() for s in split.shards}


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
    """Skipped-data events ``(kind, message, samples lost or None if unknown)`` of one worker, waiting to
    travel with its next batch (or its end marker)."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, str, int | None]] = []

    def take(self) -> list[tuple[str, str, int | None]]:
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

        def report(kind: str, message: str, url: str | None, key: str | None, lost: int | None = None) -> None:
            if self.on_error == "fail":
                raise DataError(message, url=url, key=key)
            if pulled >= skip:  # events before the resume point were already counted by the original run
                events.pending.append((kind, message, lost))

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
                events.pending.append(("decode", message, 1))
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
        from webdataset.tariterators import base_plus_ext, group_by_keys

        expected = self.expected.get(url)

        def lost(count: int) -> tuple[int | None, str]:
            if expected is None:
                return None, "how many is unknown (no manifest lists this shard)"
            return max(expected - count, 0), f"{max(expected - count, 0)} of its {expected} samples (manifest)"

        try:
            raw = gopen(url, "rb")
        except Exception as err:
            n, what = lost(0)
            report("missing_shard", f"shard {url}: cannot open it: {type(err).__name__}: {err}; lost: {what}",
                   url, None, n)
            return
        where: dict[str, str | None] = {"reading": None, "done": None, "end": None}

        def files() -> Iterator[dict]:
            for entry in _tar_members(raw, where):
                entry["__url__"] = url
                yield entry

        count, last_key = 0, None
        try:
            try:
                for sample in group_by_keys(files(), handler=reraise_exception):
                    count, last_key = count + 1, sample["__key__"]
                    yield sample
            except Exception as err:
                member = where["reading"] or where["done"]
                key = base_plus_ext(member)[0] if member else None
                position = f"at sample {key!r} (tar member {member!r})" if member else "at its start"
                n, what = lost(count)
                report("corrupt_shard", f"shard {url}: corrupt or truncated tar {position}: "
                       f"{type(err).__name__}: {err}; the samples from there to the end of the shard are "
                       f"unreadable: {what}", url, key, n)
                return
        finally:
            raw.close()
        if where["end"] is not None:  # the tar stopped early; the samples read up to there were delivered
            n, what = lost(count)
            report("corrupt_shard", f"shard {url}: {where['end']}, after sample {last_key!r} ({count} samples "
                   f"read); the samples after it are lost: {what}", url, last_key, n)
            return
        if expected is not None and count != expected:
            report("short_shard", f"shard {url}: {count} samples, its manifest lists {expected} (truncated? "
                   f"last sample key {last_key!r}); lost: {max(expected - count, 0)} samples", url, last_key,
                   max(expected - count, 0))


def _tar_members(fileobj, where: dict) -> Iterator[dict]:
    """``{"fname", "data"}`` of the regular members of a tar stream (as WebDataset's ``tar_file_iterator``,
    metadata ``__*__`` members left out), then a check that the stream ended properly.

    Python's tar reader takes a header cut short, a missing header, a damaged header or a zero block in
    the middle of the archive for its end, so a shard truncated or overwritten at a member boundary would
    silently lose its remaining samples. `_StopTarInfo` notes which header ended the members; anything
    but end-of-archive zero blocks up to the end of the stream is put into ``where["end"]`` (a message),
    after the last member (so that the sample grouping still delivers the last sample read). ``where
    ["reading"]`` / ``where["done"]``: the member being read / the last one read (for error messages).
    """
    tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_StopTarInfo)
    for info in tar:
        name = info.name
        if not info.isreg() or name is None or _META.match(name) or (
                "/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        where["reading"] = name
        data = tar.extractfile(info).read()
        where["done"], where["reading"] = name, None
        yield {"fname": name, "data": data}
        tar.members = []
    stop, offset = getattr(tar, "_mmoe_stop", None), tar.offset
    if stop == "eof":  # a zero block: the end-of-archive marker, if only zero bytes follow
        while chunk := tar.fileobj.read(1 << 16):
            if chunk.strip(b"\0"):
                where["end"] = (f"tar has a zero block (end-of-archive marker) at byte {offset} followed by "
                                f"more data (a member header overwritten with zeros?)")
                break
    elif stop == "empty":
        where["end"] = f"truncated tar: it ends at byte {offset} without the end-of-archive blocks"
    elif stop == "truncated":
        where["end"] = f"truncated tar: it ends at byte {offset} inside a member header"
    elif stop is not None:
        where["end"] = f"corrupt tar: invalid member header at byte {offset} ({stop})"


_META = re.compile(r"__[^/]*__($|/)")


class _StopTarInfo(tarfile.TarInfo):
    """`tarfile.TarInfo` that notes on the tar file (``_mmoe_stop``) why a header could not be read:
    ``"eof"`` (a zero block), ``"empty"`` (end of the stream), ``"truncated"`` or the invalid header's
    reason. The tar reader itself treats all of these after the first member as the end of the archive."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar._mmoe_stop = "eof"
            raise
        except tarfile.EmptyHeaderError:
            tar._mmoe_stop = "empty"
            raise
        except tarfile.TruncatedHeaderError:
            tar._mmoe_stop = "truncated"
            raise
        except tarfile.HeaderError as err:
            tar._mmoe_stop = f"{type(err).__name__}: {err}"
            raise


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
        urls: brace pattern, glob of local files, list of shard paths/URLs, a shard directory with
            ``manifest.json``, or a manifest path (see `resolve_urls`). Short shards are noticed against
            the counts of the manifest, or of a ``manifest.json`` beside the shards that lists them.
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
        on_error: ``"fail"`` raises `DataError` at bad data; ``"skip"`` skips, counts (`errors`) and warns.
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
        ``decode``), counted in samples lost: a decode error is one sample, a damaged, missing or short
        shard with a manifest count is its count minus the samples read from it; a damaged or missing shard
        without a count adds 1. Only kinds that occurred appear."""
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

    def _record_events(self, events: list[tuple[str, str, int | None]]) -> None:
        for kind, message, lost in events:
            self._errors[kind] += lost or 1  # samples lost where known; a loss of unknown size counts 1
            warnings.warn(f"skipped bad data ({kind}): {message}", DataWarning, stacklevel=3)
