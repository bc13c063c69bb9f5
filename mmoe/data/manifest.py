"""The ``manifest.json`` that describes a directory of shards, and `verify_shards`.

Layout (one manifest per output directory, whatever the number of splits)::

    {
      "format": "mmoe-shards",
      "version": 1,
      "source": {"type": "imagefolder", "options": {"root": "photos", "on_error": "fail"}},
      "writer": {"samples_per_shard": 1000, "max_shard_bytes": null, "val_fraction": 0.1},
      "splits": {
        "train": {"prefix": "train", "samples": 90, "bytes": 204800,
                  "shards": [{"name": "train-000000.tar", "samples": 50, "bytes": 112640,
                              "sha256": "..."}, ...]},
        "val":   {"prefix": "val", ...}
      },
      "totals": {"shards": 3, "samples": 100, "bytes": 225280},
      "skipped": {"count": 1, "items": [{"path": "photos/cat/notes.txt", "reason": "..."}]},
      "info": {"classes": ["cat", "dog"], "class_counts": {"cat": 60, "dog": 40}}
    }

A write without a validation split has one split, named after its prefix (``"shard"`` by default);
``val_fraction > 0`` gives the splits ``"train"`` and ``"val"``. Shard names are relative to the
manifest's directory. ``info`` is source-specific (class names, COCO categories, languages ...).
Nothing time- or machine-dependent is stored, so writing the same input twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "mmoe-shards"
VERSION = 1


@dataclass
class ShardInfo:
    """One shard file: its name (relative to the manifest), sample count, size in bytes and SHA-256."""

    name: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class SplitInfo:
    """The shards of one split (``prefix-000000.tar``, ``prefix-000001.tar``, ...)."""

    prefix: str
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict:
        return {"prefix": self.prefix, "samples": self.samples, "bytes": self.bytes,
                "shards": [s.to_dict() for s in self.shards]}


@dataclass
class Manifest:
    """In-memory form of ``manifest.json`` (see the module docstring for the file layout).

    ``path`` is where the manifest was loaded from or saved to (``None`` before either); shard paths
    resolve relative to its directory.
    """

    source: dict[str, Any]
    splits: dict[str, SplitInfo]
    writer: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, Any] = field(default_factory=lambda: {"count": 0, "items": []})
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # -- totals ---------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return sum(len(s.shards) for s in self.splits.values())

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.splits.values())

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.splits.values())

    @property
    def directory(self) -> Path:
        if self.path is None:
            raise ValueError("this manifest has no path yet (save or load it first)")
        return self.path.parent

    def split(self, name: str | None = None) -> SplitInfo:
        """The split ``name``; with ``None``, the only split (error naming the choices if several)."""
        if name is None:
            if len(self.splits) != 1:
                raise ValueError(f"{self.path} holds the splits {sorted(self.splits)}; choose one (split=...)")
            return next(iter(self.splits.values()))
        if name not in self.splits:
            raise ValueError(f"{self.path} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def urls(self, split: str | None = None) -> list[str]:
        """Paths of the shards of ``split`` (see `split`), in order."""
        return [str(self.directory / s.name) for s in self.split(split).shards]

    def sample_counts(self) -> dict[str, int]:
        """``{shard path: sample count}`` over all splits (the reader uses it to notice short shards)."""
        return {str(self.directory / s.name): s.samples for sp in self.splits.values() for s in sp.shards}

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "writer": self.writer,
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
            "totals": {"shards": self.num_shards, "samples": self.num_samples, "bytes": self.num_bytes},
            "skipped": self.skipped,
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest as indented JSON (deterministic bytes); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def from_dict(cls, data: dict, path: Path | None = None) -> "Manifest":
        where = path or "manifest"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{where}: not an mmoe shard manifest (no \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise DataError(f"{where}: manifest version {data.get('version')!r}, this mmoe reads {VERSION}")
        try:
            splits = {
                name: SplitInfo(split["prefix"], [ShardInfo(s["name"], int(s["samples"]), int(s["bytes"]),
                                                            s["sha256"]) for s in split["shards"]])
                for name, split in data["splits"].items()
            }
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where}: malformed split or shard entry ({type(err).__name__}: {err})") from None
        return cls(source=data.get("source", {}), splits=splits, writer=data.get("writer", {}),
                   skipped=data.get("skipped", {"count": 0, "items": []}), info=data.get("info", {}), path=path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Load ``path``: a ``manifest.json`` or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"no shard manifest at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: cannot read the manifest ({err})") from None
        return cls.from_dict(data, path=path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def count_tar_samples(path: str | os.PathLike) -> int:
    """Number of samples (distinct keys, WebDataset grouping) in a tar shard; `DataError` if unreadable."""
    from webdataset.tariterators import base_plus_ext

    count, last = 0, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, _ = base_plus_ext(member.name)
                if key is not None and key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"shard {path}: unreadable tar ({type(err).__name__}: {err}) after sample key {last!r}",
                        url=str(path), key=last) from None
    return count


def verify_shards(path: str | os.PathLike, *, count_samples: bool = True) -> list[str]:
    """Re-check every shard listed in a manifest (``path``: the manifest or its directory).

    Checks, per shard: the file exists, its size and SHA-256 match, and (``count_samples``) the number
    of samples in it matches. Also reports ``*.tar`` files of a listed prefix that the manifest does not
    list. Returns one human-readable line per problem, each naming the shard; empty means all good.
    """
    manifest = Manifest.load(path)
    root = manifest.directory
    problems: list[str] = []
    listed: set[str] = set()
    for split_name, split in manifest.splits.items():
        for shard in split.shards:
            listed.add(shard.name)
            file = root / shard.name
            if not file.is_file():
                problems.append(f"{file}: missing (split {split_name!r})")
                continue
            size = file.stat().st_size
            if size != shard.bytes:
                problems.append(f"{file}: {size} bytes, the manifest says {shard.bytes}")
            digest = file_sha256(file)
            if digest != shard.sha256:
                problems.append(f"{file}: sha256 {digest[:16]}..., the manifest says {shard.sha256[:16]}...")
            if count_samples:
                try:
                    n = count_tar_samples(file)
                except DataError as err:
                    problems.append(str(err))
                    continue
                if n != shard.samples:
                    problems.append(f"{file}: {n} samples, the manifest says {shard.samples}")
    for split in manifest.splits.values():
        for file in sorted(root.glob(f"{split.prefix}-*.tar")):
            if file.name not in listed and file.name[len(split.prefix) + 1:-4].isdigit():
                problems.append(f"{file}: not listed in {manifest.path}")
    return problems
