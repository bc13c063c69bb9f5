"""mmoe.data: shard writers (4 sources), manifest + verify, ShardLoader (exact resume, rank split, bad data), CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmoe.cli import main as mmoe_main
from mmoe.data import (DataError, DataWarning, Manifest, ShardLoader, decode_image, decode_json, decode_label,
                       decode_text, parse_size, split_for_key, verify_shards, write_coco, write_imagefolder,
                       write_pairs, write_shards, write_text)

# ------------------------------------------------------------------------------------------------
# fixtures and helpers


def _image_bytes(value: int, fmt: str = "PNG", size: int = 8) -> bytes:
    array = np.zeros((size, size, 3), np.uint8)
    array[..., 0], array[..., 1] = value % 256, (value * 7) % 256
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def _make_imagefolder(root: Path, counts: dict[str, int]) -> dict[str, tuple[str, bytes]]:
    """root/<class>/<n>.png|jpg; returns {relative path: (class, bytes)}."""
    files = {}
    value = 0
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            data = _image_bytes(value, fmt)
            (root / label / f"img.{i}.{ext}").write_bytes(data)  # a dot in the stem: keys must sanitise it
            files[f"{label}/img.{i}.{ext}"] = (label, data)
            value += 1
    return files


def _raw_first(batch):
    return batch[0]


def _read_all(urls, **kwargs) -> list[dict]:
    """Every raw sample, in shard order, through ShardLoader (one pass, no shuffling)."""
    loader = ShardLoader(urls, batch_size=1, collate=_raw_first, shuffle_buffer=0, epochs=1, **kwargs)
    return list(loader)


def _check_manifest_matches_files(manifest: Manifest) -> None:
    for split in manifest.splits.values():
        assert len(split.shards) >= 2, "the test wants several shards per split"
        for shard in split.shards:
            file = manifest.directory / shard.name
            assert file.stat().st_size == shard.bytes
            assert hashlib.sha256(file.read_bytes()).hexdigest() == shard.sha256
            with tarfile.open(file) as tar:
                members = tar.getmembers()
            assert len({m.name.split(".", 1)[0] for m in members}) == shard.samples
            # reproducible: nothing time- or user-dependent in the headers
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    data = json.loads((manifest.directory / "manifest.json").read_text())
    assert data["totals"] == {"shards": manifest.num_shards, "samples": manifest.num_samples,
                              "bytes": manifest.num_bytes}
    assert data["totals"]["samples"] == sum(s["samples"] for sp in data["splits"].values() for s in sp["shards"])


def _dir_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _write_ints(out: Path, n: int, per_shard: int, payload: int = 0) -> Manifest:
    """n samples {"cls": i} (plus ``payload`` bytes of filler), keys s0000..."""
    samples = ({"__key__": f"s{i:04d}", "cls": i, **({"bin": bytes([i % 256]) * payload} if payload else {})}
               for i in range(n))
    return write_shards(samples, out, samples_per_shard=per_shard, source="ints")


def _decode_int(sample) -> int:
    return int(sample["cls"])


def _decode_int_failing(sample) -> int:
    value = int(sample["cls"])
    if value % 7 == 3:
        raise ValueError(f"bad value {value}")
    return value


def _decode_key_url(sample) -> tuple[str, str]:
    return sample["__key__"], sample["__url__"]


def _list_collate(batch):
    return list(batch)


# ------------------------------------------------------------------------------------------------
# writers: round trips


def test_imagefolder_round_trip_manifest_and_reproducible(tmp_path: Path):
    files = _make_imagefolder(tmp_path / "src", {"dog": 4, "cat": 5, "ant": 3})
    manifest = write_imagefolder(tmp_path / "src", tmp_path / "out", samples_per_shard=5)

    assert [len(s.shards) for s in manifest.splits.values()] == [3]
    assert list(manifest.splits) == ["shard"] and manifest.source["type"] == "imagefolder"
    assert manifest.info == {"classes": ["ant", "cat", "dog"], "class_counts": {"ant": 3, "cat": 5, "dog": 4}}
    _check_manifest_matches_files(manifest)

    samples = _read_all(tmp_path / "out")
    assert len(samples) == len(files) == manifest.num_samples
    seen = set()
    for sample in samples:
        meta = json.loads(sample["json"])
        label, data = files[meta["path"]]
        ext = "jpg" if meta["path"].endswith("jpg") else "png"
        assert sample[ext] == data  # the original bytes
        assert meta["label"] == label
        assert int(sample["cls"]) == ["ant", "cat", "dog"].index(label)
        assert "." not in sample["__key__"]
        seen.add(meta["path"])
    assert seen == set(files)
    # sorted input order: class by class
    assert [json.loads(s["json"])["label"] for s in samples] == ["ant"] * 3 + ["cat"] * 5 + ["dog"] * 4

    # byte-identical when rewritten, to another directory and in place
    write_imagefolder(tmp_path / "src", tmp_path / "again", samples_per_shard=5)
    assert _dir_bytes(tmp_path / "again") == _dir_bytes(tmp_path / "out")
    before = _dir_bytes(tmp_path / "out")
    write_imagefolder(tmp_path / "src", tmp_path / "out", samples_per_shard=5)
    assert _dir_bytes(tmp_path / "out") == before


def test_imagefolder_bad_file_fails_or_is_skipped(tmp_path: Path):
    _make_imagefolder(tmp_path / "src", {"a": 2, "b": 2})
    (tmp_path / "src" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt.*not a readable image"):
        write_imagefolder(tmp_path / "src", tmp_path / "out")

    with pytest.warns(DataWarning, match=r"notes\.txt"):
        manifest = write_imagefolder(tmp_path / "src", tmp_path / "out2", on_error="skip")
    assert manifest.num_samples == 4
    assert manifest.skipped["count"] == 1 and manifest.skipped["items"][0]["path"].endswith("notes.txt")
    assert json.loads((tmp_path / "out2" / "manifest.json").read_text())["skipped"]["count"] == 1


def _make_coco(tmp_path: Path, n_images: int = 5) -> tuple[Path, Path, dict]:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images, annotations = [], []
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        (image_dir / name).write_bytes(_image_bytes(i, "JPEG", size=16))
        images.append({"id": 100 + i, "file_name": name, "width": 16, "height": 16})
        for j in range(i % 3):  # image 0 and 3 have no annotations
            annotations.append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "category_id": 1 + j,
                                "bbox": [j, j, 4.5, 3.0], "area": 13.5, "iscrowd": 0,
                                "segmentation": [[j, j, j + 4, j, j + 4, j + 3]]})
    categories = [{"id": 1, "name": "cat", "supercategory": "animal"},
                  {"id": 2, "name": "dog", "supercategory": "animal"}]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file, image_dir, coco


def test_coco_round_trip(tmp_path: Path):
    ann_file, image_dir, coco = _make_coco(tmp_path)
    manifest = write_coco(ann_file, image_dir, tmp_path / "out", samples_per_shard=2)
    _check_manifest_matches_files(manifest)
    assert manifest.info["categories"] == coco["categories"]
    assert manifest.info["num_images"] == 5 and manifest.info["num_annotations"] == len(coco["annotations"])

    samples = _read_all(tmp_path / "out")
    assert len(samples) == 5
    for i, sample in enumerate(samples):
        meta = decode_json(sample)
        assert meta["image"] == coco["images"][i]
        expected = [{k: a[k] for k in ("id", "bbox", "category_id", "segmentation", "area", "iscrowd")}
                    for a in coco["annotations"] if a["image_id"] == 100 + i]
        assert meta["annotations"] == expected
        assert sample["jpg"] == (image_dir / coco["images"][i]["file_name"]).read_bytes()
        assert decode_image(sample).size == (16, 16)
    assert [len(decode_json(s)["annotations"]) for s in samples] == [0, 1, 2, 0, 1]

    write_coco(ann_file, image_dir, tmp_path / "again", samples_per_shard=2)
    assert _dir_bytes(tmp_path / "again") == _dir_bytes(tmp_path / "out")

    (image_dir / "000000000002.jpg").unlink()
    with pytest.raises(DataError, match=r"000000000002\.jpg.*not found"):
        write_coco(ann_file, image_dir, tmp_path / "out3")


def test_text_round_trip_lines_files_and_languages(tmp_path: Path):
    src = tmp_path / "corpus"
    (src / "de").mkdir(parents=True)
    (src / "en.txt").write_text("hello world\n\nsecond line\n  \nthird\n", encoding="utf-8")
    (src / "de" / "news.txt").write_text("Grüße aus Köln\nzweite Zeile\n", encoding="utf-8")
    (src / "fr.txt").write_text("bonjour\n", encoding="utf-8")

    manifest = write_text(src, tmp_path / "lines", unit="line", samples_per_shard=2)
    _check_manifest_matches_files(manifest)
    assert manifest.info["languages"] == ["de", "en", "fr"]
    assert manifest.info["docs_per_language"] == {"de": 2, "en": 3, "fr": 1}
    docs = [(decode_json(s)["lang"], decode_text(s), decode_json(s)["source"], decode_json(s)["line"])
            for s in _read_all(tmp_path / "lines")]
    assert docs == [("de", "Grüße aus Köln", "de/news.txt", 1), ("de", "zweite Zeile", "de/news.txt", 2),
                    ("en", "hello world", "en.txt", 1), ("en", "second line", "en.txt", 3),
                    ("en", "third", "en.txt", 5), ("fr", "bonjour", "fr.txt", 1)]

    manifest = write_text(src, tmp_path / "files", unit="file", lang="xx", samples_per_shard=1)
    assert manifest.info["docs_per_language"] == {"xx": 3}
    texts = {decode_json(s)["source"]: decode_text(s) for s in _read_all(tmp_path / "files")}
    assert texts == {"de/news.txt": "Grüße aus Köln\nzweite Zeile\n", "en.txt": (src / "en.txt").read_text(),
                     "fr.txt": "bonjour\n"}

    write_text(src, tmp_path / "lines2", unit="line", samples_per_shard=2)
    assert _dir_bytes(tmp_path / "lines2") == _dir_bytes(tmp_path / "lines")

    (src / "misc").mkdir()
    (src / "misc" / "notes.txt").write_text("which language?\n")
    with pytest.raises(DataError, match=r"notes\.txt.*language"):
        write_text(src, tmp_path / "bad")


def test_pairs_jsonl_and_tsv_round_trip(tmp_path: Path):
    (tmp_path / "img").mkdir()
    images = {f"img/{i}.png": _image_bytes(i) for i in range(5)}
    for path, data in images.items():
        (tmp_path / path).write_bytes(data)
    rows = [{"image": f"img/{i}.png", "caption": f"caption number {i}", "id": i} for i in range(5)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "pairs.tsv").write_text("image\tcaption\n" + "".join(f"{r['image']}\t{r['caption']}\n" for r in rows))

    for name in ("pairs.jsonl", "pairs.tsv"):
        out = tmp_path / f"out-{name}"
        manifest = write_pairs(tmp_path / name, out, samples_per_shard=2)
        _check_manifest_matches_files(manifest)
        assert manifest.info["pairs"] == 5 and manifest.info["images"] == 5
        got = [(decode_json(s)["image"], s["png"], decode_text(s)) for s in _read_all(out)]
        assert got == [(r["image"], images[r["image"]], r["caption"]) for r in rows]
    meta = decode_json(_read_all(tmp_path / "out-pairs.jsonl")[0])
    assert meta["extra"] == {"id": 0} and meta["line"] == 1

    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{\"image\": \"img/1.png\"}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*caption"):
        write_pairs(tmp_path / "bad.jsonl", tmp_path / "bad")
    (tmp_path / "bad.tsv").write_text("img/0.png\tok\nimg/missing.png\tgone\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2.*missing\.png.*not found"):
        write_pairs(tmp_path / "bad.tsv", tmp_path / "bad2")
    with pytest.warns(DataWarning, match=r"bad\.tsv:2"):
        manifest = write_pairs(tmp_path / "bad.tsv", tmp_path / "bad3", on_error="skip")
    assert manifest.num_samples == 1 and manifest.skipped["count"] == 1


def test_val_split_by_key_hash_and_shard_size_limit(tmp_path: Path):
    samples = [{"__key__": f"k{i:03d}", "bin": bytes(1500), "cls": i} for i in range(60)]
    manifest = write_shards(iter(samples), tmp_path / "out", samples_per_shard=100, max_shard_bytes="16KB",
                            val_fraction=0.25)
    assert set(manifest.splits) == {"train", "val"}
    names = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert names == sorted(s.name for sp in manifest.splits.values() for s in sp.shards)
    assert all(n.startswith(("train-", "val-")) for n in names)
    assert all(s.bytes <= 16000 for sp in manifest.splits.values() for s in sp.shards)
    _check_manifest_matches_files(manifest)

    train = {s["__key__"] for s in _read_all(tmp_path / "out", split="train")}
    val = {s["__key__"] for s in _read_all(tmp_path / "out", split="val")}
    assert not train & val and train | val == {s["__key__"] for s in samples}
    assert val == {s["__key__"] for s in samples if split_for_key(s["__key__"], 0.25) == "val"}
    assert 5 <= len(val) <= 25
    with pytest.raises(ValueError, match="train.*val"):
        ShardLoader(tmp_path / "out", epochs=1)

    assert parse_size("64MB") == 64_000_000 and parse_size("2MiB") == parse_size("2M") == 2 * 2**20
    with pytest.raises(ValueError, match="lots"):
        parse_size("lots")


def test_verify_catches_modified_and_missing_shards(tmp_path: Path, capsys):
    manifest = _write_ints(tmp_path / "out", 20, per_shard=5)
    assert verify_shards(tmp_path / "out") == []
    assert mmoe_main(["shards", "verify", str(tmp_path / "out")]) == 0
    assert "ok: 4 shards, 20 samples" in capsys.readouterr().out

    shard = tmp_path / "out" / manifest.splits["shard"].shards[1].name
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: size unchanged, checksum not
    shard.write_bytes(bytes(data))
    (tmp_path / "out" / manifest.splits["shard"].shards[3].name).unlink()
    problems = verify_shards(tmp_path / "out")
    assert len(problems) == 2
    assert "shard-000001.tar" in problems[0] and "sha256" in problems[0]
    assert "shard-000003.tar" in problems[1] and "missing" in problems[1]
    assert mmoe_main(["shards", "verify", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "shard-000001.tar" in err and "shard-000003.tar" in err and "2 problem(s)" in err


# ------------------------------------------------------------------------------------------------
# reader


@pytest.mark.parametrize("case", ["workers0", "workers2", "resampled", "skip-errors"])
def test_exact_resume_across_epochs(tmp_path: Path, case: str):
    _write_ints(tmp_path / "out", 40, per_shard=5)  # 8 shards
    kwargs = dict(batch_size=4, shuffle_buffer=7, seed=3, decode=_decode_int, num_workers=0)
    first, then = 7, 9  # an epoch is 10 batches (or fewer with errors): the resumed part crosses a boundary
    if case == "workers2":
        kwargs["num_workers"] = 2
    elif case == "resampled":
        kwargs.update(num_workers=2, resampled=True)
    elif case == "skip-errors":  # decode errors and a truncated shard, skipped
        kwargs.update(num_workers=2, decode=_decode_int_failing, on_error="skip")
        first, then = 7, 8  # ~3 batches per worker epoch: the resumed part crosses several boundaries
        shard = tmp_path / "out" / "shard-000005.tar"
        shard.write_bytes(shard.read_bytes()[:2500])  # inside the third sample's header

    def batches(loader, n):
        out = []
        for batch in loader:
            out.append(batch.tolist())
            if len(out) == n:
                break
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        reference = ShardLoader(tmp_path / "out", **kwargs)
        expected = batches(reference, first + then)
        interrupted = ShardLoader(tmp_path / "out", **kwargs)
        head = batches(interrupted, first)
        state = json.loads(json.dumps(interrupted.state_dict()))  # JSON-able
        resumed = ShardLoader(tmp_path / "out", **kwargs)
        resumed.load_state_dict(state)
        tail = batches(resumed, then)

    assert head == expected[:first]
    assert tail == expected[first:]
    assert len({tuple(b) for b in expected}) == len(expected)  # the stream moves on, it does not repeat batches
    assert resumed.errors == reference.errors
    if case == "skip-errors":
        assert reference.errors["decode"] > 0 and reference.errors["corrupt_shard"] > 0
        assert not any(v % 7 == 3 for b in expected for v in b)
    if case == "resampled":
        assert resumed.epoch >= 1  # passed a (nominal) epoch boundary
    else:
        assert max(s["epoch"] for s in resumed.state_dict()["workers"]) >= 1


def test_epochs_cover_all_samples_with_new_reproducible_orders(tmp_path: Path):
    _write_ints(tmp_path / "out", 24, per_shard=4)
    pattern = str(tmp_path / "out" / "shard-{000000..000005}.tar")  # brace pattern URLs

    def run(seed, epochs=2, **kw):
        loader = ShardLoader(pattern, batch_size=4, decode=_decode_int, shuffle_buffer=5, seed=seed,
                             epochs=epochs, **kw)
        return [v for b in loader for v in b.tolist()]

    order = run(seed=1)
    assert len(order) == 48
    first, second = order[:24], order[24:]
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second and first != list(range(24))
    assert run(seed=1) == order and run(seed=2) != order

    # one shard: a new order per epoch comes from the sample shuffle alone
    one = ShardLoader([str(tmp_path / "out" / "shard-000000.tar")], batch_size=1, decode=_decode_int,
                      shuffle_buffer=3, epochs=4)
    values = [b.item() for b in one]
    epochs = [tuple(values[i:i + 4]) for i in range(0, 16, 4)]
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs) and len(set(epochs)) > 1

    # one pass (evaluation): iterating again gives the same full pass; drop_last=False keeps the remainder
    loader = ShardLoader(pattern, batch_size=5, decode=_decode_int, shuffle_buffer=0, epochs=1, drop_last=False)
    once = [b.tolist() for b in loader]
    assert once == [b.tolist() for b in loader]
    assert [v for b in once for v in b] == list(range(24)) and [len(b) for b in once] == [5] * 4 + [4]


def test_rank_split_disjoint_and_covering(tmp_path: Path):
    _write_ints(tmp_path / "out", 30, per_shard=5)  # 6 shards
    seen = []
    for rank in range(2):
        loader = ShardLoader(tmp_path / "out", batch_size=1, decode=_decode_key_url, collate=_raw_first,
                             shuffle_buffer=10, rank=rank, world_size=2, epochs=1, num_workers=0)
        items = list(loader)
        seen.append(({url for _, url in items}, {key for key, _ in items}))
    (urls0, keys0), (urls1, keys1) = seen
    assert len(urls0) == len(urls1) == 3 and not urls0 & urls1
    assert not keys0 & keys1 and len(keys0 | keys1) == 30

    with pytest.raises(ValueError, match=r"6 shard\(s\).*4 rank\(s\) x 2 worker\(s\).*at least 8"):
        ShardLoader(tmp_path / "out", world_size=4, rank=0, num_workers=2)


def test_corrupt_shard_fails_or_keeps_earlier_samples(tmp_path: Path):
    manifest = _write_ints(tmp_path / "out", 40, per_shard=10, payload=3000)
    shards = [tmp_path / "out" / s.name for s in manifest.splits["shard"].shards]
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated in the middle
    sample_bytes = 2 * 512 + 512 + 3072  # cls + bin members of one sample
    shards[2].write_bytes(shards[2].read_bytes()[: 2 * sample_bytes])  # cut at a member boundary: tarfile
    # alone would take that for a clean end

    with pytest.raises(DataError, match=r"shard-000001\.tar.*(corrupt|truncated).*s00\d\d"):
        list(ShardLoader(tmp_path / "out", batch_size=2, decode=_decode_int, shuffle_buffer=0, epochs=1))

    pattern = str(tmp_path / "out" / "shard-{000000..000003}.tar")  # counts from the manifest beside them
    for workers in (0, 2):
        loader = ShardLoader(pattern, batch_size=1, decode=_decode_int, shuffle_buffer=0, epochs=1,
                             on_error="skip", num_workers=workers)
        with pytest.warns(DataWarning) as record:
            values = sorted(v for b in loader for v in b.tolist())
        messages = " | ".join(str(w.message) for w in record)
        assert "shard-000001.tar" in messages and "shard-000002.tar: truncated tar" in messages
        kept = [v for v in values if 10 <= v < 20]
        assert 0 < len(kept) < 10 and kept == list(range(10, 10 + len(kept)))  # the part before the damage
        assert [v for v in values if not 10 <= v < 20] == list(range(10)) + [20, 21] + list(range(30, 40))
        assert loader.errors == {"corrupt_shard": (10 - len(kept)) + 8}  # samples lost, by the manifest


def test_short_shard_against_manifest(tmp_path: Path):
    manifest = _write_ints(tmp_path / "out", 12, per_shard=4)
    shard = tmp_path / "out" / manifest.splits["shard"].shards[0].name
    with tarfile.open(shard) as tar:  # rewrite it with its first 3 samples: a valid tar, one sample short
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert len(members) == 4  # one member (cls) per sample
    members = members[:3]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    loader = ShardLoader(tmp_path / "out", batch_size=1, decode=_decode_int, shuffle_buffer=0, epochs=1,
                         on_error="skip")
    with pytest.warns(DataWarning, match=r"shard-000000\.tar: 3 samples, its manifest lists 4"):
        assert [b.item() for b in loader] == [0, 1, 2] + list(range(4, 12))
    assert loader.errors == {"short_shard": 1}


def test_undecodable_image_and_missing_field_name_the_key(tmp_path: Path):
    samples = [{"__key__": f"img{i}", "png": _image_bytes(i), "cls": i} for i in range(6)]
    samples[2]["png"] = b"this is not a png"
    del samples[4]["png"]
    samples[4]["txt"] = "no image here"
    write_shards(samples, tmp_path / "out", samples_per_shard=3)

    def decode(sample):
        return torch.from_numpy(np.array(decode_image(sample))).float().mean(), decode_label(sample)

    with pytest.raises(DataError, match=r"'img2'.*shard-000000\.tar.*decode failed"):
        list(ShardLoader(tmp_path / "out", batch_size=1, decode=decode, shuffle_buffer=0, epochs=1))
    loader = ShardLoader(tmp_path / "out", batch_size=1, decode=decode, shuffle_buffer=0, epochs=1, on_error="skip")
    with pytest.warns(DataWarning) as record:
        labels = [b[1].item() for b in loader]
    assert labels == [0, 1, 3, 5]
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert any("'img2'" in m and "shard-000000.tar" in m for m in messages)
    assert any("'img4'" in m and "shard-000001.tar" in m and "KeyError" in m and "png" in m for m in messages)
    assert loader.errors == {"decode": 2}


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_imagefolder_writes_and_bad_path_is_one_line(tmp_path: Path, capsys):
    _make_imagefolder(tmp_path / "src", {"a": 3, "b": 3})
    code = mmoe_main(["shards", "imagefolder", str(tmp_path / "src"), str(tmp_path / "out"),
                      "--samples-per-shard", "2", "--max-shard-size", "1MB", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("wrote 3 shards, 6 samples")
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.writer == {"samples_per_shard": 2, "max_shard_bytes": 1_000_000, "val_fraction": 0.0}
    assert manifest.info["classes"] == ["a", "b"]

    code = mmoe_main(["shards", "imagefolder", str(tmp_path / "nowhere"), str(tmp_path / "out2"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmoe: error:") and "nowhere" in err[0]
    assert not (tmp_path / "out2").exists()

    code = mmoe_main(["shards", "text", str(tmp_path / "src"), str(tmp_path / "out3"), "--quiet"])
    assert code == 2 and "no text files found (.txt, .html" in capsys.readouterr().err
