"""Write WebDataset shards from samples, image folders, COCO, text files and image-text pair lists.

The core is `write_shards`: it takes WebDataset-style sample dicts (``"__key__"`` plus one field per
file extension: ``{"__key__": "cat/0001", "jpg": b"...", "cls": 3, "json": {...}}``), writes
``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ... into a directory and describes them in a
``manifest.json`` (layout in `mmoe.data.manifest`). The source readers (`ImageFolderSource`,
`CocoSource`, `TextSource`, `PairsSource`, `SegmentationFolderSource`, `CocoSemanticSource`) turn common on-disk layouts into such samples and add
source-specific facts to the manifest; `write_imagefolder` and friends combine the two. For semantic
segmentation, `SegmentationFolderSource` pairs images with label-map PNGs and `CocoSemanticSource` paints
label maps from COCO instance masks; both store the map as the ``seg.png`` field.

Shards are reproducible: the same input gives byte-identical tar files (fixed mtime, owner and mode,
sorted members, inputs read in sorted order) and therefore the same SHA-256s in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .errors import DataError, DataWarning
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo

_TAR_BLOCK = 512
_TAR_RECORD = 10240  # tarfile pads a closed archive to a multiple of 20 blocks
_MAX_SKIPPED_LISTED = 100  # the manifest lists at most this many skipped inputs (the count is exact)

# PIL format name -> the field (extension) the image bytes are stored under.
_IMAGE_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "PPM": "ppm", "BMP": "bmp",
              "GIF": "gif", "TIFF": "tiff"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"64MB"`` -> bytes. ``KB/MB/GB/TB`` are powers of 1000; ``K/M/G/T`` and ``KiB/MiB/GiB/TiB`` are
    powers of 1024; a bare number is bytes. Raises `ValueError` with the offending text."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise ValueError(f"expected a size like 64MB, 512MiB or 1000000, got {text!r}")
        number, unit, suffix = match.groups()
        power = " kmgt".index(unit.lower()) if unit else 0
        base = 1000 if suffix.lower() == "b" else 1024
        if not unit and suffix.lower() not in ("", "b"):
            raise ValueError(f"expected a size like 64MB, 512MiB or 1000000, got {text!r}")
        value = int(float(number) * base**power)
    if value < 1:
        raise ValueError(f"a shard size must be positive, got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------
# keys and fields


def make_key(text: str) -> str:
    """A safe WebDataset key from a relative path or name: ASCII letters, digits, ``_``, ``-`` and ``/``.

    Dots become ``_`` (a WebDataset reader takes the first dot of a file name as the start of the
    extension), other characters become ``_``, empty path parts disappear and a leading ``__`` of a part
    is shortened (WebDataset skips ``__name__`` entries as metadata).
    """
    parts = []
    for part in str(text).replace("\\", "/").split("/"):
        part = re.sub(r"[^A-Za-z0-9_\-]", "_", part)
        while part.startswith("__"):
            part = part[1:]
        if part:
            parts.append(part)
    if not parts:
        raise ValueError(f"cannot make a sample key from {text!r}")
    return "/".join(parts)


class KeyMaker:
    """`make_key` plus uniqueness: a key seen before gets ``_1``, ``_2``, ... appended (deterministic)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, text: str) -> str:
        base = key = make_key(text)
        n = 0
        while key in self._seen:
            n += 1
            key = f"{base}_{n}"
        self._seen.add(key)
        return key


def encode_field(value: Any, *, key: str = "?", field: str = "?") -> bytes:
    """One sample field as bytes: bytes as they are, ``str`` as UTF-8, ``int``/``float`` as decimal text,
    ``dict``/``list``/``bool``/``None`` as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list, tuple, bool)) or value is None:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if isinstance(value, (int, float)):
        return str(value).encode("ascii")
    raise DataError(f"sample {key!r}: field {field!r} has type {type(value).__name__}; expected bytes, str, "
                    f"int, float or a JSON-able dict/list", key=key)


def _encode_sample(sample: Mapping[str, Any]) -> tuple[str, dict[str, bytes]]:
    key = sample.get("__key__") if isinstance(sample, Mapping) else None
    if not isinstance(key, str) or not key:
        raise DataError(f"every sample needs a non-empty string '__key__'; got {str(sample)[:200]}")
    base = key.rsplit("/", 1)[-1]
    if "." in base or key.startswith("/") or "//" in key:
        raise DataError(f"sample key {key!r}: keys must not contain '.' in their last part or empty path parts "
                        f"(a WebDataset reader would split the sample); use mmoe.data.make_key", key=key)
    fields = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue  # __key__, and reader metadata such as __url__
        if not name or name.startswith(".") or "/" in name:
            raise DataError(f"sample {key!r}: bad field name {name!r} (use an extension such as 'jpg')", key=key)
        fields[name] = encode_field(value, key=key, field=name)
    if not fields:
        raise DataError(f"sample {key!r} has no fields besides its key", key=key)
    return key, fields


def split_for_key(key: str, val_fraction: float) -> str:
    """``"val"`` for a fraction ``val_fraction`` of keys, chosen by a hash of the key, else ``"train"``.

    Deterministic and independent of order and of the other keys: a sample stays in its split when the
    dataset grows."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "val" if h < val_fraction else "train"


# ------------------------------------------------------------------------------------------------
# the shard writer


class _HashingFile:
    """A write-only file wrapper that also computes the SHA-256 and size of what passes through."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.discard = False  # set after an aborted write: the tar stream's late flush goes nowhere

    def write(self, data) -> int:
        if self.discard:
            return len(data)
        self.raw.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def _member_bytes(key: str, fields: Mapping[str, bytes]) -> int:
    """Bytes the sample occupies in a tar file (headers, padded data, PAX header for long names)."""
    total = 0
    for name, data in fields.items():
        total += _TAR_BLOCK + math.ceil(len(data) / _TAR_BLOCK) * _TAR_BLOCK
        if len(f"{key}.{name}".encode()) > 100:
            total += 2 * _TAR_BLOCK
    return total


def _archive_bytes(payload: int) -> int:
    """Size of a closed tar file whose members take ``payload`` bytes (end blocks + record padding)."""
    return math.ceil((payload + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


class _SplitWriter:
    """Writes the shards of one prefix, starting a new shard when the count or size limit is reached."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int, max_shard_bytes: int | None):
        self.out_dir, self.prefix = out_dir, prefix
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.shards: list[ShardInfo] = []
        self._tar = self._file = self._hash = self._path = None
        self._count = self._payload = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        size = _member_bytes(key, fields)
        if self._tar is not None and (
            self._count >= self.samples_per_shard
            or (self.max_shard_bytes is not None and _archive_bytes(self._payload + size) > self.max_shard_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **fields})
        self._count += 1
        self._payload += size

    def _open(self) -> None:
        from webdataset import TarWriter

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = self.out_dir / name
        self._file = open(self._path.with_name(name + ".partial"), "wb")
        self._hash = _HashingFile(self._file)
        # Fixed owner, mode and mtime: the same samples give the same bytes.
        self._tar = TarWriter(self._hash, user="", group="", mode=0o444, encoder=False, mtime=0,
                              format="PAX_FORMAT")
        self._count = self._payload = 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._file.name, self._path)
        self.shards.append(ShardInfo(self._path.name, self._count, self._hash.size, self._hash.sha256.hexdigest()))
        self._tar = self._file = self._hash = None

    def close(self) -> SplitInfo:
        if self._tar is not None:
            self._finish()
        return SplitInfo(self.prefix, self.shards)

    def abort(self) -> None:
        """Drop the shard being written (after an error); finished shards stay."""
        if self._file is not None:
            self._hash.discard = True
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
            self._tar = self._file = self._hash = None


def _split_prefixes(prefix: str | None, val_fraction: float) -> dict[str, str]:
    """``{split name: file prefix}``: one split named after the prefix, or ``train``/``val``."""
    if val_fraction > 0:
        if prefix in (None, ""):
            return {"train": "train", "val": "val"}
        return {"train": f"{prefix}-train", "val": f"{prefix}-val"}
    prefix = prefix or "shard"
    return {prefix: prefix}


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    prefix: str | None = None,
    samples_per_shard: int = 1000,
    max_shard_bytes: int | str | None = None,
    val_fraction: float = 0.0,
    source: str | Mapping[str, Any] | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Manifest:
    """Write ``samples`` as tar shards into ``out_dir`` and save ``out_dir/manifest.json``.

    Args:
        samples: WebDataset-style dicts: ``"__key__"`` (unique; no ``.`` in its last path part, see
            `make_key`) and fields named by extension; values may be bytes, str (UTF-8), int/float
            (decimal text) or dict/list (JSON). Fields starting with ``__`` other than the key are
            ignored. A `ShardSource` also fills the manifest's ``source``, ``info`` and ``skipped``.
        out_dir: output directory (created). It may hold one write's shards: rewriting with the same
            split names replaces them (stale shards of the old manifest are removed); a manifest with
            other split names is an error, to avoid mixing unrelated shards.
        prefix: shard file prefix; default ``"shard"``, or ``"train"``/``"val"`` with a validation
            split (an explicit prefix then gives ``{prefix}-train``/``{prefix}-val``).
        samples_per_shard: at most this many samples per shard.
        max_shard_bytes: at most this many bytes per shard file (int or a string such as ``"64MB"``);
            a single larger sample gets a shard of its own.
        val_fraction: put this fraction of samples, chosen by a hash of their key (`split_for_key`),
            into the ``val`` split and the rest into ``train``. A sample with a ``"__group__"`` string is
            placed by the hash of its group instead, so a group never straddles the two splits.
        source: for plain iterables, the source type (str) or ``{"type": ..., "options": {...}}``
            recorded in the manifest; default ``"custom"``.
        extra_manifest: merged into the manifest's ``info`` after all samples were read (so a dict that
            the sample generator fills while running is recorded complete).
        progress: show a tqdm progress bar.

    Returns:
        The saved `Manifest`. Raises `DataError` for bad samples or input files (the message names them).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes is not None:
        max_shard_bytes = parse_size(max_shard_bytes)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefixes = _split_prefixes(prefix, val_fraction)

    old = None
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists():
        old = Manifest.load(manifest_path)
        if set(old.splits) != set(prefixes) or any(old.splits[n].prefix != p for n, p in prefixes.items()):
            raise DataError(f"{out_dir} already holds shards of other splits ({sorted(old.splits)}, this write "
                            f"makes {sorted(prefixes)}); use another directory or delete {manifest_path}")
        manifest_path.unlink()  # a write that fails half-way leaves no manifest that lies

    if isinstance(samples, ShardSource):
        source_entry = {"type": samples.type, "options": samples.options()}
    elif isinstance(source, Mapping):
        source_entry = {"type": str(source.get("type", "custom")), "options": dict(source.get("options", {}))}
    else:
        source_entry = {"type": source or "custom", "options": {}}

    writers = {name: _SplitWriter(out_dir, p, samples_per_shard, max_shard_bytes) for name, p in prefixes.items()}
    seen: set[bytes] = set()
    from tqdm import tqdm

    total = samples.size_hint() if isinstance(samples, ShardSource) else None
    bar = tqdm(samples, total=total, unit=" samples", desc=f"writing {out_dir}", disable=not progress,
               dynamic_ncols=True)
    try:
        for sample in bar:
            key, fields = _encode_sample(sample)
            digest = hashlib.blake2b(key.encode("utf-8"), digest_size=12).digest()
            if digest in seen:
                raise DataError(f"duplicate sample key {key!r}", key=key)
            seen.add(digest)
            group = sample.get("__group__") if isinstance(sample, Mapping) else None  # e.g. a chapter
            name = split_for_key(group or key, val_fraction) if val_fraction > 0 else next(iter(writers))
            writers[name].write(key, fields)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    splits = {name: writer.close() for name, writer in writers.items()}

    info = dict(samples.info()) if isinstance(samples, ShardSource) else {}
    info.update(extra_manifest or {})
    skipped = samples.skipped_summary() if isinstance(samples, ShardSource) else {"count": 0, "items": []}
    manifest = Manifest(
        source=source_entry,
        splits=splits,
        writer={"samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                "val_fraction": val_fraction},
        skipped=skipped,
        info=info,
    )
    manifest.save(manifest_path)
    if old is not None:  # shards of the previous write that this one did not overwrite
        current = {s.name for split in splits.values() for s in split.shards}
        for split in old.splits.values():
            for shard in split.shards:
                if shard.name not in current:
                    (out_dir / shard.name).unlink(missing_ok=True)
    return manifest


# ------------------------------------------------------------------------------------------------
# sources


class ShardSource:
    """Base of the source readers: an iterable of samples that also describes itself for the manifest.

    Subclasses set ``type`` and implement ``__iter__``, ``options`` and ``info`` (called after
    iteration). Bad inputs go through `_problem`: a `DataError` with ``on_error="fail"``, or a
    `DataWarning` plus an entry in the manifest's ``skipped`` with ``on_error="skip"``.
    """

    type = "custom"

    def __init__(self, on_error: str = "fail") -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self._skipped: list[dict[str, str]] = []
        self._skipped_count = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {"on_error": self.on_error}

    def info(self) -> dict[str, Any]:
        return {}

    def size_hint(self) -> int | None:
        """Number of samples if known in advance (for the progress bar)."""
        return None

    def skipped_summary(self) -> dict[str, Any]:
        return {"count": self._skipped_count, "items": list(self._skipped)}

    def _problem(self, where: str, reason: str) -> None:
        """Report a bad input ``where`` (a file, or ``file:line``): raise, or warn and record it."""
        if self.on_error == "fail":
            raise DataError(f"{where}: {reason}", url=where)
        warnings.warn(f"skipped {where}: {reason}", DataWarning, stacklevel=3)
        self._skipped_count += 1
        if len(self._skipped) < _MAX_SKIPPED_LISTED:
            self._skipped.append({"path": where, "reason": reason})


def read_image_file(path: str | os.PathLike) -> tuple[bytes, str]:
    """The file's bytes and the field to store them under (``jpg``, ``png``, ...), from the actual image
    format (not the file name). Raises `OSError` or PIL's errors for unreadable or non-image files."""
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format or ""
        image.verify()
    return data, _IMAGE_EXT.get(fmt, fmt.lower() or "img")


def _describe(err: BaseException) -> str:
    """``Type: message`` without memory addresses (PIL names the BytesIO), so manifests stay reproducible."""
    if type(err).__name__ == "UnidentifiedImageError":
        return "UnidentifiedImageError: not an image format PIL can identify"
    return f"{type(err).__name__}: " + re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", str(err))


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_under(root: Path, pattern: str = "*") -> list[Path]:
    return sorted((p for p in root.rglob(pattern) if p.is_file() and not _is_hidden(p, root)),
                  key=lambda p: p.relative_to(root).as_posix())


class ImageFolderSource(ShardSource):
    """``root/<class_name>/<image files>`` (sub-folders inside a class folder are allowed).

    Class index = position of the class name in the sorted folder names. Sample: the image bytes under
    their format's extension, ``cls`` (int) and ``json`` = ``{"label": class name, "path": path
    relative to root}``. Hidden files and folders are ignored; files directly under ``root`` are
    skipped with a warning; files that are not readable images are errors (or skipped). Manifest
    ``info``: ``classes`` and ``class_counts``.
    """

    type = "imagefolder"

    def __init__(self, root: str | os.PathLike, *, on_error: str = "fail") -> None:
        super().__init__(on_error)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory (expected root/<class_name>/<images>)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root}: no class folders (expected root/<class_name>/<images>)")
        self._files = [(c, f) for c in self.classes for f in _files_under(self.root / c)]
        self._loose = sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))
        self.class_counts = {c: 0 for c in self.classes}

    def options(self) -> dict[str, Any]:
        return {"root": str(self.root), **super().options()}

    def size_hint(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._loose:
            warnings.warn(f"ignored {len(self._loose)} file(s) directly under {self.root} (images must be in "
                          f"class folders): {', '.join(self._loose[:5])}", DataWarning, stacklevel=2)
        keys = KeyMaker()
        index_of = {c: i for i, c in enumerate(self.classes)}
        self.class_counts = {c: 0 for c in self.classes}
        for label, file in self._files:
            rel = file.relative_to(self.root).as_posix()
            try:
                data, ext = read_image_file(file)
            except Exception as err:  # PIL raises many types for bad files
                self._problem(str(file), f"not a readable image ({_describe(err)})")
                continue
            self.class_counts[label] += 1
            yield {"__key__": keys(str(Path(rel).with_suffix(""))), ext: data,
                   "cls": index_of[label], "json": {"label": label, "path": rel}}
        if sum(self.class_counts.values()) == 0:
            raise DataError(f"{self.root}: no readable images in the class folders {self.classes}")

    def info(self) -> dict[str, Any]:
        return {"classes": self.classes, "class_counts": dict(self.class_counts)}


class CocoSource(ShardSource):
    """COCO ``instances_*.json`` plus its image directory: one sample per image.

    Sample: the image bytes under their format's extension and ``json`` = ``{"image": <the image entry
    of the annotation file>, "annotations": [{"id", "bbox", "category_id", "segmentation", "area",
    "iscrowd"}, ...]}`` (annotation order as in the file). Images without annotations are kept. Manifest
    ``info``: ``categories`` (as in the file), ``num_images``, ``num_annotations``.
    """

    type = "coco"

    def __init__(self, annotations: str | os.PathLike, image_dir: str | os.PathLike, *, on_error: str = "fail"):
        super().__init__(on_error)
        self.annotations, self.image_dir = Path(annotations), Path(image_dir)
        try:
            data = json.loads(self.annotations.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{self.annotations}: cannot read COCO annotations ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{self.annotations}: not a COCO annotation file (no \"images\" list)")
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image directory not found")
        self.images = data["images"]
        self.categories = data.get("categories", [])
        self._by_image: dict[Any, list[dict]] = {}
        ids = set()
        for i, image in enumerate(self.images):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise DataError(f"{self.annotations}: images[{i}] lacks 'id' or 'file_name'")
            ids.add(image["id"])
        self._orphans = []
        for ann in data.get("annotations", []):
            if ann.get("image_id") not in ids:
                self._orphans.append(ann)
                continue
            self._by_image.setdefault(ann["image_id"], []).append(
                {k: ann.get(k) for k in ("id", "bbox", "category_id", "segmentation", "area", "iscrowd")})
        self.num_images = self.num_annotations = 0

    def options(self) -> dict[str, Any]:
        return {"annotations": str(self.annotations), "image_dir": str(self.image_dir), **super().options()}

    def size_hint(self) -> int:
        return len(self.images)

    def _readable_images(self, *, sized: bool = False) -> Iterator[tuple[dict, Path, bytes, str, list, Any]]:
        """``(image record, file, bytes, extension, annotations, (width, height) or None)`` for every image
        that exists and decodes (``sized``: its size read too); annotations of unknown images, missing and
        unreadable files are reported as problems (skipped or raised per ``on_error``)."""
        for ann in self._orphans:
            self._problem(f"{self.annotations} annotation id {ann.get('id')}",
                          f"refers to image_id {ann.get('image_id')!r}, which is not in \"images\"")
        for image in self.images:
            file = self.image_dir / image["file_name"]
            if not file.is_file():
                self._problem(str(file), f"image file not found (image id {image['id']} in {self.annotations})")
                continue
            try:
                data, ext = read_image_file(file)
                size = _image_size(data) if sized else None
            except Exception as err:
                self._problem(str(file), f"not a readable image ({_describe(err)})")
                continue
            yield image, file, data, ext, self._by_image.get(image["id"], []), size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        keys = KeyMaker()
        self.num_images = self.num_annotations = 0
        for image, _, data, ext, anns, _ in self._readable_images():
            self.num_images += 1
            self.num_annotations += len(anns)
            yield {"__key__": keys(str(Path(image["file_name"]).with_suffix(""))), ext: data,
                   "json": {"image": image, "annotations": anns}}

    def info(self) -> dict[str, Any]:
        return {"categories": self.categories, "num_images": self.num_images,
                "num_annotations": self.num_annotations}


def _png_bytes(array) -> bytes:
    """A ``uint8 [H, W]`` array as mode-L PNG bytes (reproducible: no metadata, no optimisation)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", optimize=False)
    return out.getvalue()


def _label_values(array) -> list[int]:
    import numpy as np

    return [int(v) for v in np.flatnonzero(np.bincount(array.ravel(), minlength=256))]


def read_label_map(path: str | os.PathLike) -> tuple[bytes, tuple[int, int], list[int]]:
    """A label map file as PNG bytes whose pixel values are the class indices, its ``(width, height)`` and the
    values it holds. Mode ``L`` (grey levels) and ``P`` (palette images, as VOC's: the palette index is the
    class) are kept; a PNG is stored as it is, another format re-encoded as a mode-L PNG of the same values.
    Raises `OSError`, PIL's errors, or `ValueError` for other modes (RGB colour-coded maps must be converted
    to class indices first)."""
    import numpy as np
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode not in ("L", "P"):
            raise ValueError(f"a label map must be a single-channel 8-bit image of class indices (mode L or P), "
                             f"got mode {image.mode}")
        array = np.asarray(image)
        size, fmt = image.size, image.format
    if fmt != "PNG":
        data = _png_bytes(np.ascontiguousarray(array, dtype=np.uint8))
    return data, size, _label_values(array)


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


class SegmentationFolderSource(ShardSource):
    """Images and their label maps in two folders, paired by relative path: ``images_dir/a/x.jpg`` goes with
    ``labels_dir/a/x<label_suffix>`` (default ``labels_dir/a/x.png``).

    Sample: the image bytes under their format's extension, ``seg.png`` = the label map (PNG bytes; pixel
    value = class index, mode L or P kept, see `read_label_map`) and ``json`` = ``{"image": path relative to
    images_dir}``. An image without a label map, an unreadable image or label map, or a label map of another
    size is a bad input (``on_error``). Label maps without an image are not looked at. Hidden files are
    ignored; when both folders are one, files ending in ``label_suffix`` are the label maps, not images.
    Manifest ``info``: ``num_images``, ``label_values`` (every pixel value seen, e.g. ``[0, 1, 2, 255]``) and,
    when ``classes`` is given (class names by index, background included), ``classes`` and ``num_classes``.
    """

    type = "segfolder"

    def __init__(self, images_dir: str | os.PathLike, labels_dir: str | os.PathLike, *, label_suffix: str = ".png",
                 classes: list[str] | None = None, on_error: str = "fail") -> None:
        super().__init__(on_error)
        self.images_dir, self.labels_dir, self.label_suffix = Path(images_dir), Path(labels_dir), label_suffix
        for folder, what in ((self.images_dir, "image"), (self.labels_dir, "label map")):
            if not folder.is_dir():
                raise DataError(f"{folder}: {what} directory not found")
        if not label_suffix:
            raise ValueError("label_suffix must not be empty")
        self.classes = [str(c) for c in classes] if classes is not None else None
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise ValueError(f"classes must be distinct names, got {self.classes}")
        files = _files_under(self.images_dir)
        if self.images_dir.resolve() == self.labels_dir.resolve():
            files = [f for f in files if not f.name.endswith(label_suffix)]
        if not files:
            raise DataError(f"{self.images_dir}: no image files found")
        self._files = files
        self.num_images = 0
        self._values: set[int] = set()

    def options(self) -> dict[str, Any]:
        return {"images_dir": str(self.images_dir), "labels_dir": str(self.labels_dir),
                "label_suffix": self.label_suffix, **super().options()}

    def size_hint(self) -> int:
        return len(self._files)

    def label_path(self, image: Path) -> Path:
        """The label map file of an image file under ``images_dir``."""
        rel = image.relative_to(self.images_dir)
        return self.labels_dir / rel.parent / (Path(rel.name).stem + self.label_suffix)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        keys = KeyMaker()
        self.num_images, self._values = 0, set()
        for file in self._files:
            rel = file.relative_to(self.images_dir).as_posix()
            label_file = self.label_path(file)
            if not label_file.is_file():
                self._problem(str(file), f"no label map {label_file}")
                continue
            try:
                data, ext = read_image_file(file)
                size = _image_size(data)
            except Exception as err:
                self._problem(str(file), f"not a readable image ({_describe(err)})")
                continue
            try:
                label, label_size, values = read_label_map(label_file)
            except Exception as err:
                self._problem(str(label_file), f"not a usable label map ({_describe(err)})")
                continue
            if label_size != size:
                self._problem(str(label_file), f"label map is {label_size[0]}x{label_size[1]}, its image {file} "
                              f"{size[0]}x{size[1]}")
                continue
            self.num_images += 1
            self._values.update(values)
            yield {"__key__": keys(str(Path(rel).with_suffix(""))), ext: data, "seg.png": label,
                   "json": {"image": rel}}
        if self.num_images == 0:
            raise DataError(f"{self.images_dir}: no usable image / label map pairs")

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"num_images": self.num_images, "label_values": sorted(self._values)}
        if self.classes is not None:
            info.update(classes=list(self.classes), num_classes=len(self.classes))
        return info


class CocoSemanticSource(CocoSource):
    """Semantic label maps painted from the instance masks of a COCO ``instances_*.json``: one sample per image.

    Category ``categories[i]`` (file order) becomes class ``i + 1``, 0 is the background. The annotations of an
    image are painted in file order (a later one over an earlier one where they overlap); a crowd region
    (``iscrowd: 1``) is painted 255 (ignore) with ``ignore_crowd``, else as its class. Polygons, RLE and
    uncompressed RLE are decoded with pycocotools. Sample: the image bytes under their format's extension,
    ``seg.png`` (mode-L PNG of class indices) and ``json`` = ``{"image": file_name, "id": image id}``. A
    missing or unreadable image, one whose size differs from its ``width``/``height``, an annotation without a
    segmentation, of an unknown category or of another size is a bad input (``on_error``; the whole image).
    Manifest ``info``: ``classes`` (``["background", *category names]``), ``num_classes``, ``categories``,
    ``num_images``, ``num_annotations``, ``crowd_annotations``, ``ignore_crowd``.
    """

    type = "coco-semantic"

    def __init__(self, annotations: str | os.PathLike, image_dir: str | os.PathLike, *, ignore_crowd: bool = True,
                 on_error: str = "fail") -> None:
        super().__init__(annotations, image_dir, on_error=on_error)
        self.ignore_crowd = ignore_crowd
        self._index: dict[Any, int] = {}
        for i, cat in enumerate(self.categories):
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise DataError(f"{self.annotations}: categories[{i}] lacks 'id' or 'name'")
            if cat["id"] in self._index:
                raise DataError(f"{self.annotations}: category id {cat['id']} appears twice in \"categories\"")
            self._index[cat["id"]] = i + 1
        if not self._index:
            raise DataError(f"{self.annotations}: no \"categories\"")
        if len(self._index) > 254:
            raise DataError(f"{self.annotations}: {len(self._index)} categories; an 8-bit label map holds at most 254 "
                            "besides the background and 255 (ignore)")
        self.crowd_annotations = 0

    def options(self) -> dict[str, Any]:
        return {**super().options(), "ignore_crowd": self.ignore_crowd}

    @staticmethod
    def _mask(ann: dict, height: int, width: int):
        """The annotation's mask, ``uint8 [height, width]``; `ValueError` if it has none or of another size."""
        import numpy as np
        import pycocotools.mask as mask_util

        seg = ann.get("segmentation")
        if not seg:
            raise ValueError("has no segmentation")
        try:
            if isinstance(seg, list):  # polygons
                if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
                    raise ValueError("polygons must be lists of at least 3 x, y pairs")
                rle = mask_util.merge(mask_util.frPyObjects(seg, height, width))
            elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
                if [int(s) for s in seg["size"]] != [height, width]:
                    raise ValueError(f"RLE of size {list(seg['size'])} in an image of height, width {height}, {width}")
                counts = seg["counts"]
                if isinstance(counts, list):  # uncompressed RLE
                    rle = mask_util.frPyObjects(seg, height, width)
                else:
                    rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str)
                           else counts}
            else:
                raise ValueError(f"unknown segmentation format {type(seg).__name__}")
            return np.asarray(mask_util.decode(rle), dtype=np.uint8)
        except ValueError:
            raise
        except Exception as err:  # pycocotools raises assorted types for malformed input
            raise ValueError(f"cannot decode its segmentation ({_describe(err)})") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import numpy as np

        keys = KeyMaker()
        self.num_images = self.num_annotations = self.crowd_annotations = 0
        for image, file, data, ext, anns, (width, height) in self._readable_images(sized=True):
            declared = (image.get("width"), image.get("height"))
            if None not in declared and (int(declared[0]), int(declared[1])) != (width, height):
                self._problem(str(file), f"image is {width}x{height}, {self.annotations} says "
                              f"{declared[0]}x{declared[1]} (image id {image['id']})")
                continue
            label = np.zeros((height, width), dtype=np.uint8)
            crowd = 0
            try:
                for ann in anns:
                    if ann.get("category_id") not in self._index:
                        raise ValueError(f"category_id {ann.get('category_id')!r} is not in \"categories\"")
                    mask = self._mask(ann, height, width).astype(bool)
                    is_crowd = bool(ann.get("iscrowd"))
                    crowd += is_crowd
                    label[mask] = 255 if is_crowd and self.ignore_crowd else self._index[ann["category_id"]]
            except ValueError as err:
                self._problem(str(file), f"annotation id {ann.get('id')} (image id {image['id']} in "
                              f"{self.annotations}): {err}")
                continue
            self.num_images += 1
            self.num_annotations += len(anns)
            self.crowd_annotations += crowd
            yield {"__key__": keys(str(Path(image["file_name"]).with_suffix(""))), ext: data,
                   "seg.png": _png_bytes(label), "json": {"image": image["file_name"], "id": image["id"]}}

    def info(self) -> dict[str, Any]:
        names = [str(c["name"]) for c in self.categories]
        return {"classes": ["background", *names], "num_classes": len(names) + 1, "categories": self.categories,
                "num_images": self.num_images, "num_annotations": self.num_annotations,
                "crowd_annotations": self.crowd_annotations, "ignore_crowd": self.ignore_crowd}


_UNITS = ("line", "file", "paragraph", "section")


class TextSource(ShardSource):
    """Text files under a folder (recursive, sorted) or one file: ``.txt``, HTML (``.html``, ``.htm``,
    ``.xhtml``) and JSON lines (``.jsonl``), each optionally gzipped (``.gz``); see `mmoe.data.text`.
    ``include``: shell patterns (``"*.txt.gz"``); under a folder only files whose name or relative path
    matches one are read. A folder with plain-text and HTML files of one language gets a `DataWarning`:
    a book shipped in both formats (Debian's manuals are) would be in the corpus twice.

    Documents (``unit``):

    * ``"line"``: one per non-empty line (HTML: one per paragraph);
    * ``"file"``: one per file (whitespace-only files are left out and counted);
    * ``"paragraph"``: paragraphs packed in order into documents of at most ``max_chars`` characters;
    * ``"section"``: the same, with a new document at every heading.

    A ``.jsonl`` line is one record (``text_field``, default ``"text"``; its ``lang`` or ``language`` field
    if present); under ``paragraph`` / ``section`` a long record is cut like a file.

    Language per document: ``lang`` if given, else from the path (`mmoe.data.text.language_of`: a dotted
    part of the name ``book.fr.txt.gz``, the stem ``en.txt``, or the nearest folder ``de/news.txt``);
    otherwise an error naming the file.

    Splits: under ``paragraph`` / ``section`` every document carries a *group* (``__group__``, also in its
    ``json``): the file's path without its language, plus the numbered section (``#2.3``), so one section in
    every translation lands in one split (`write_shards` hashes the group, not the key). ``.jsonl`` records
    are grouped by their ``id`` or ``url`` field when they have one.

    Sample: ``txt`` (UTF-8) and ``json`` = ``{"lang", "source": path relative to the source folder, "line": n}``
    (``line``: per-line units and jsonl), plus ``group``, ``part`` and ``title`` (the first heading) when cut.
    Manifest ``info``: ``unit``, ``languages``, ``docs_per_language``, ``chars_per_language``, ``empty_files``,
    ``short_dropped``.
    """

    type = "text"

    def __init__(self, src: str | os.PathLike, *, unit: str = "line", lang: str | None = None,
                 on_error: str = "fail", max_chars: int = 2000, min_chars: int = 100,
                 text_field: str = "text", include: Iterable[str] | None = None) -> None:
        from .text import text_kind

        super().__init__(on_error)
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {', '.join(_UNITS)}, got {unit!r}")
        if max_chars < 1 or min_chars < 0:
            raise ValueError(f"need max_chars >= 1 and min_chars >= 0, got {max_chars} and {min_chars}")
        self.src, self.unit, self.lang = Path(src), unit, lang
        self.include = tuple(include or ())
        self.max_chars, self.min_chars, self.text_field = max_chars, min_chars, text_field
        if self.src.is_file():
            self._root, self._files = self.src.parent, [self.src]
        elif self.src.is_dir():
            self._root = self.src
            self._files = [f for f in _files_under(self.src) if text_kind(f)]
            if not self._files:
                raise DataError(f"{self.src}: no text files found (.txt, .html, .htm, .xhtml, .jsonl, or gzipped)")
            if self.include:
                self._files = [f for f in self._files if self._included(f)]
                if not self._files:
                    raise DataError(f"{self.src}: no text files match --include {' '.join(self.include)}")
            self._warn_two_formats()
        else:
            raise DataError(f"{self.src}: no such file or directory")
        self.docs_per_language: dict[str, int] = {}
        self.chars_per_language: dict[str, int] = {}
        self.empty_files = 0
        self.short_dropped = 0

    def _included(self, file: Path) -> bool:
        """Whether ``file`` matches one of the ``include`` shell patterns, by its name or by its path
        relative to the source folder."""
        import fnmatch

        rel = file.relative_to(self._root).as_posix()
        return any(fnmatch.fnmatchcase(file.name, p) or fnmatch.fnmatchcase(rel, p) for p in self.include)

    def _warn_two_formats(self) -> None:
        """Warn when one folder holds plain-text and HTML files of one language: a book shipped in both
        formats (Debian's manuals are) would be in the corpus twice, and a single epoch would be two."""
        from .text import language_of, text_kind

        kinds: dict[tuple[str, str], set[str]] = {}
        for f in self._files:
            kind, rel = text_kind(f), f.relative_to(self._root)
            lang = language_of(rel.as_posix(), self.lang)
            if kind in ("txt", "html") and lang is not None:
                kinds.setdefault((rel.parent.as_posix(), lang), set()).add(kind)
        both = sorted(key for key, ks in kinds.items() if len(ks) > 1)
        if both:
            folder, lang = both[0]
            where = self._root if folder == "." else self._root / folder
            warnings.warn(f"{where}: holds both plain-text and HTML files in {len(both)} language(s) ({lang}"
                          f"{', ...' if len(both) > 1 else ''}); if they are one book in two formats its text is in "
                          "the corpus twice: keep one with --include (e.g. --include '*.txt.gz')", DataWarning,
                          stacklevel=3)

    def options(self) -> dict[str, Any]:
        extra = {"max_chars": self.max_chars, "min_chars": self.min_chars} if self.unit in ("paragraph", "section") else {}
        inc = {"include": list(self.include)} if self.include else {}
        return {"src": str(self.src), "unit": self.unit, "lang": self.lang, **inc, **extra, **super().options()}

    def _doc(self, keys: "KeyMaker", key: str, text: str, lang: str, meta: dict, group: str | None = None) -> dict:
        self.docs_per_language[lang] = self.docs_per_language.get(lang, 0) + 1
        self.chars_per_language[lang] = self.chars_per_language.get(lang, 0) + len(text)
        sample = {"__key__": keys(key), "txt": text, "json": {"lang": lang, **meta}}
        if group is not None:
            sample["__group__"] = group
            sample["json"]["group"] = group
        return sample

    def _cut(self, keys, stem_key: str, blocks, lang: str, meta: dict, group) -> Iterator[dict[str, Any]]:
        """``paragraph`` / ``section`` documents of ``blocks``; ``group(chapter)`` names each one's split group."""
        from .text import documents

        docs, dropped = documents(blocks, unit=self.unit, max_chars=self.max_chars, min_chars=self.min_chars)
        self.short_dropped += dropped
        for i, (text, chapter, title) in enumerate(docs):
            extra = {"part": i, **({"title": title} if title else {})}
            yield self._doc(keys, f"{stem_key}/{i:06d}", text, lang, {**meta, **extra}, group(chapter))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from .text import group_of, html_blocks, language_of, read_text_file, text_blocks, text_kind

        keys = KeyMaker()
        self.docs_per_language, self.chars_per_language = {}, {}
        self.empty_files = self.short_dropped = 0
        cut = self.unit in ("paragraph", "section")
        for file in self._files:
            rel = file.relative_to(self._root).as_posix()
            kind = text_kind(file)
            lang = language_of(rel, self.lang)
            if lang is None and kind != "jsonl":
                self._problem(str(file), "cannot tell its language: name the file like en.txt or book.en.txt.gz, "
                              "put it in a folder like de/, or pass --lang")
                continue
            try:
                text = read_text_file(file)
            except UnicodeDecodeError as err:
                self._problem(str(file), f"not valid UTF-8 (byte {err.start}{' after gunzip' if rel.endswith('.gz') else ''})")
                continue
            except (OSError, EOFError) as err:
                self._problem(str(file), f"cannot read ({err})")
                continue
            stem_key = re.sub(r"\.(txt|html?|xhtml|jsonl)(\.gz)?$", "", rel, flags=re.I)
            if kind == "jsonl":
                yield from self._records(keys, file, rel, stem_key, text, lang, cut)
                continue
            if self.unit == "file":
                if not text.strip():
                    self.empty_files += 1
                    continue
                yield self._doc(keys, stem_key, text if kind == "txt" else "\n\n".join(
                    b.text for b in html_blocks(text)), lang, {"source": rel})
                continue
            if kind == "html":
                blocks = html_blocks(text)
                if cut:
                    yield from self._cut(keys, stem_key, blocks, lang, {"source": rel},
                                         lambda ch: group_of(rel, lang, ch))
                else:
                    for i, b in enumerate(blocks):
                        yield self._doc(keys, f"{stem_key}/{i:07d}", b.text, lang, {"source": rel, "line": i + 1})
                continue
            if cut:
                yield from self._cut(keys, stem_key, text_blocks(text), lang, {"source": rel},
                                     lambda ch: group_of(rel, lang, ch))
                continue
            for number, line in enumerate(text.split("\n"), start=1):
                line = line.rstrip("\r")
                if line.strip():
                    yield self._doc(keys, f"{stem_key}/{number:07d}", line, lang, {"source": rel, "line": number})
        if not self.docs_per_language:
            raise DataError(f"{self.src}: no non-empty documents found")

    def _records(self, keys, file: Path, rel: str, stem_key: str, text: str, lang: str | None, cut: bool):
        from .text import text_blocks

        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as err:
                self._problem(f"{file}:{number}", f"not a JSON object ({err})")
                continue
            body = rec.get(self.text_field) if isinstance(rec, dict) else None
            if not isinstance(body, str):
                self._problem(f"{file}:{number}", f"no string field {self.text_field!r}")
                continue
            rec_lang = self.lang or rec.get("lang") or rec.get("language") or lang
            if not isinstance(rec_lang, str) or not rec_lang:
                self._problem(f"{file}:{number}", "cannot tell its language: give the record a 'lang' field, "
                              "name the file like en.jsonl, or pass --lang")
                continue
            if not body.strip():
                continue
            rid = rec.get("id", rec.get("url"))
            group = f"{rel}#{rid}" if rid is not None else None
            meta = {"source": rel, "line": number}
            if cut and len(body) > self.max_chars:
                yield from self._cut(keys, f"{stem_key}/{number:07d}", text_blocks(body), rec_lang, meta,
                                     lambda ch, g=group, n=number: g or f"{rel}:{n}")
            else:
                yield self._doc(keys, f"{stem_key}/{number:07d}", body, rec_lang, meta, group)

    def info(self) -> dict[str, Any]:
        return {"unit": self.unit, "languages": sorted(self.docs_per_language),
                "docs_per_language": dict(sorted(self.docs_per_language.items())),
                "chars_per_language": dict(sorted(self.chars_per_language.items())),
                "empty_files": self.empty_files, "short_dropped": self.short_dropped}


class PairsSource(ShardSource):
    """Image-text pairs from a list file; image paths are relative to the list file's folder.

    ``.jsonl``: one JSON object per line with the fields ``image_field`` and ``caption_field`` (other
    fields are kept under ``json["extra"]``); the caption may be a list of captions of the image (COCO and
    Flickr30k have five): list an image once with all of them, so that a hash split never puts one image
    in both splits. ``.tsv``: ``path<TAB>caption`` per line (a first line ``image<TAB>caption`` is taken as
    a header). Blank lines are ignored. Sample: the image bytes under their format's extension, ``txt`` =
    the caption (several: one per line, `captions_of`), ``json`` = ``{"image": path as listed, "line": n}``;
    the key is the line number. A bad line (a caption with a line break, an empty caption list), missing
    or unreadable image is an error naming the list file and line (or skipped). Manifest ``info``:
    ``list_format``, ``pairs`` (image-caption pairs), ``images``.
    """

    type = "pairs"

    def __init__(self, list_file: str | os.PathLike, *, image_field: str = "image", caption_field: str = "caption",
                 on_error: str = "fail") -> None:
        super().__init__(on_error)
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise DataError(f"{self.list_file}: no such file")
        suffix = self.list_file.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            self.list_format = "jsonl"
        elif suffix in (".tsv", ".txt"):
            self.list_format = "tsv"
        else:
            raise DataError(f"{self.list_file}: unknown list format {suffix!r} (use .jsonl or .tsv)")
        self.image_field, self.caption_field = image_field, caption_field
        self.pairs, self._images = 0, set()

    def options(self) -> dict[str, Any]:
        return {"list": str(self.list_file), "image_field": self.image_field,
                "caption_field": self.caption_field, **super().options()}

    def _parse(self, number: int, line: str) -> tuple[str, str, dict] | None:
        """``(image path, caption, extra fields)``, or ``None`` for a header line; `ValueError` if bad."""
        if self.list_format == "tsv":
            cols = line.split("\t")
            if len(cols) != 2:
                raise ValueError(f"expected 2 tab-separated columns (path, caption), got {len(cols)}")
            if number == 1 and cols[0].strip().lower() in ("image", "path", self.image_field) and \
                    cols[1].strip().lower() in ("caption", "text", self.caption_field):
                return None
            return cols[0].strip(), cols[1].strip(), {}
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get(self.image_field), str):
            raise ValueError(f"missing or non-string field {self.image_field!r}")
        caption = row.get(self.caption_field)
        if isinstance(caption, list):
            if not caption or not all(isinstance(c, str) and c.strip() for c in caption):
                raise ValueError(f"field {self.caption_field!r}: a list of captions must hold non-empty strings")
            if any("\n" in c or "\r" in c for c in caption):
                raise ValueError(f"field {self.caption_field!r}: a caption holds a line break")
            caption = "\n".join(c.strip() for c in caption)
        elif not isinstance(caption, str):
            raise ValueError(f"missing field {self.caption_field!r} (a string or a list of strings)")
        extra = {k: v for k, v in row.items() if k not in (self.image_field, self.caption_field)}
        return row[self.image_field].strip(), caption.strip(), extra

    def __iter__(self) -> Iterator[dict[str, Any]]:
        base = self.list_file.parent
        self.pairs, self._images = 0, set()
        try:
            lines = self.list_file.read_text(encoding="utf-8-sig").split("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{self.list_file}: cannot read ({err})") from None
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            where = f"{self.list_file}:{number}"
            try:
                parsed = self._parse(number, line)
                if parsed is None:
                    continue
                path, caption, extra = parsed
                if not path or not caption:
                    raise ValueError("empty image path or caption")
            except ValueError as err:
                self._problem(where, str(err))
                continue
            file = base / path
            if not file.is_file():
                self._problem(where, f"image {file} not found")
                continue
            try:
                data, ext = read_image_file(file)
            except Exception as err:
                self._problem(where, f"image {file} is not a readable image ({_describe(err)})")
                continue
            self.pairs += len(captions_of(caption))
            self._images.add(path)
            meta: dict[str, Any] = {"image": path, "line": number}
            if extra:
                meta["extra"] = extra
            yield {"__key__": f"{number:09d}", ext: data, "txt": caption, "json": meta}
        if self.pairs == 0:
            raise DataError(f"{self.list_file}: no usable image-text pairs")

    def info(self) -> dict[str, Any]:
        return {"list_format": self.list_format, "pairs": self.pairs, "images": len(self._images)}


# ------------------------------------------------------------------------------------------------
# one call per source


def write_imagefolder(root, out_dir, *, on_error: str = "fail", **kwargs) -> Manifest:
    """`write_shards` of an `ImageFolderSource`; ``kwargs`` go to `write_shards`."""
    return write_shards(ImageFolderSource(root, on_error=on_error), out_dir, **kwargs)


def write_coco(annotations, image_dir, out_dir, *, on_error: str = "fail", **kwargs) -> Manifest:
    """`write_shards` of a `CocoSource`; ``kwargs`` go to `write_shards`."""
    return write_shards(CocoSource(annotations, image_dir, on_error=on_error), out_dir, **kwargs)


def write_segfolder(images_dir, labels_dir, out_dir, *, label_suffix: str = ".png", classes: list[str] | None = None,
                    on_error: str = "fail", **kwargs) -> Manifest:
    """`write_shards` of a `SegmentationFolderSource`; ``kwargs`` go to `write_shards`."""
    source = SegmentationFolderSource(images_dir, labels_dir, label_suffix=label_suffix, classes=classes,
                                      on_error=on_error)
    return write_shards(source, out_dir, **kwargs)


def write_coco_semantic(annotations, image_dir, out_dir, *, ignore_crowd: bool = True, on_error: str = "fail",
                        **kwargs) -> Manifest:
    """`write_shards` of a `CocoSemanticSource`; ``kwargs`` go to `write_shards`."""
    source = CocoSemanticSource(annotations, image_dir, ignore_crowd=ignore_crowd, on_error=on_error)
    return write_shards(source, out_dir, **kwargs)


def write_text(src, out_dir, *, unit: str = "line", lang: str | None = None, on_error: str = "fail",
               max_chars: int = 2000, min_chars: int = 100, text_field: str = "text",
               include: Iterable[str] | None = None, **kwargs) -> Manifest:
    """`write_shards` of a `TextSource`; ``kwargs`` go to `write_shards`."""
    source = TextSource(src, unit=unit, lang=lang, on_error=on_error, max_chars=max_chars, min_chars=min_chars,
                        text_field=text_field, include=include)
    return write_shards(source, out_dir, **kwargs)


def captions_of(txt: str | bytes) -> list[str]:
    """The captions of a pair sample's ``txt`` field: one per non-empty line (`PairsSource` writes an image's
    several captions one per line)."""
    if isinstance(txt, bytes):
        txt = txt.decode("utf-8")
    return [line.strip() for line in str(txt).splitlines() if line.strip()]


def write_pairs(list_file, out_dir, *, image_field: str = "image", caption_field: str = "caption",
                on_error: str = "fail", **kwargs) -> Manifest:
    """`write_shards` of a `PairsSource`; ``kwargs`` go to `write_shards`."""
    source = PairsSource(list_file, image_field=image_field, caption_field=caption_field, on_error=on_error)
    return write_shards(source, out_dir, **kwargs)
