"""ShardLoader with brace patterns, globs and lists: manifest counts found beside the shards, every early
end of a tar reported (with or without a manifest), skipped samples counted exactly."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import pytest

from mmoe.data import DataError, ShardLoader, resolve_urls, write_shards

PER_SHARD = 10
CUT = 3  # the damage is at the start of this sample's header: samples 0..CUT-1 of the shard are kept


def _write(out: Path) -> list[Path]:
    """4 shards of 10 samples {"cls": i} (one 512-byte header + one data block per sample), keys s0000..."""
    samples = ({"__key__": f"s{i:04d}", "cls": i} for i in range(4 * PER_SHARD))
    manifest = write_shards(samples, out, samples_per_shard=PER_SHARD, source="ints")
    shards = [out / s.name for s in manifest.splits["shard"].shards]
    with tarfile.open(shards[1]) as tar:  # the layout the corruptions below rely on
        assert [m.offset for m in tar.getmembers()][:CUT + 1] == [1024 * i for i in range(CUT + 1)]
    return shards


def _damage(shard: Path, how: str) -> None:
    data = bytearray(shard.read_bytes())
    at = 1024 * CUT  # a sample boundary: the header of sample CUT
    if how == "garbage":  # a damaged header (bad checksum): tarfile alone stops there without a word
        data[at:at + 512] = b"\xff" * 512
    elif how == "zeros":  # a header overwritten with zeros: tarfile takes it for the end of the archive
        data[at:at + 512] = bytes(512)
    elif how == "cut":  # truncated at the boundary
        del data[at:]
    else:
        raise AssertionError(how)
    shard.write_bytes(bytes(data))


def _urls(out: Path, form: str):
    if form == "brace":
        return str(out / "shard-{000000..000003}.tar")
    if form == "glob":
        return str(out / "shard-*.tar")
    return [str(out / f"shard-{i:06d}.tar") for i in range(4)]


def _decode(sample) -> int:
    return int(sample["cls"])


def _read(urls, **kw) -> tuple[list[int], ShardLoader, list[str]]:
    loader = ShardLoader(urls, batch_size=1, decode=_decode, shuffle_buffer=0, epochs=1, **kw)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        values = [v for batch in loader for v in batch.tolist()]
    return values, loader, [str(w.message) for w in record]


KEPT = list(range(PER_SHARD)) + list(range(PER_SHARD, PER_SHARD + CUT)) + list(range(2 * PER_SHARD, 4 * PER_SHARD))


@pytest.mark.parametrize("how", ["garbage", "zeros"])
@pytest.mark.parametrize("form", ["brace", "glob", "list"])
def test_damaged_shard_fails_naming_it_and_skips_the_exact_loss(tmp_path: Path, form: str, how: str):
    shards = _write(tmp_path / "out")
    _damage(shards[1], how)
    urls = _urls(tmp_path / "out", form)

    with pytest.raises(DataError) as info:
        _read(urls)
    message = str(info.value)
    assert "\n" not in message and "shard-000001.tar" in message
    assert f"{PER_SHARD - CUT} of its {PER_SHARD} samples" in message

    values, loader, messages = _read(urls, on_error="skip")
    assert values == KEPT  # the samples before the damage are kept, the other shards read whole
    assert loader.errors == {"corrupt_shard": PER_SHARD - CUT}
    assert len(messages) == 1 and "shard-000001.tar" in messages[0] and "s0012" in messages[0]


@pytest.mark.parametrize("how", ["garbage", "zeros", "cut"])
@pytest.mark.parametrize("form", ["brace", "glob", "list"])
def test_early_end_is_reported_without_a_manifest(tmp_path: Path, form: str, how: str):
    shards = _write(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()
    _damage(shards[1], how)
    urls = _urls(tmp_path / "out", form)
    assert resolve_urls(urls)[1] is None

    with pytest.raises(DataError, match=r"^[^\n]*shard-000001\.tar[^\n]*(truncated|corrupt|zero block)[^\n]*$"):
        _read(urls)
    values, loader, messages = _read(urls, on_error="skip")
    assert values == KEPT
    assert loader.errors == {"corrupt_shard": 1}  # the loss is unknown without a count: the shard counts 1
    assert len(messages) == 1 and "shard-000001.tar" in messages[0] and "unknown" in messages[0]


@pytest.mark.parametrize("form", ["brace", "glob", "list", "dir"])
def test_short_shard_counts_every_lost_sample(tmp_path: Path, form: str):
    shards = _write(tmp_path / "out")
    with tarfile.open(shards[2]) as tar:  # rewrite it with its first 4 samples: a valid tar, 6 samples short
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:4]
    with tarfile.open(shards[2], "w") as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    urls = tmp_path / "out" if form == "dir" else _urls(tmp_path / "out", form)

    with pytest.raises(DataError, match=r"shard-000002\.tar: 4 samples, its manifest lists 10"):
        _read(urls)
    values, loader, messages = _read(urls, on_error="skip")
    assert values == list(range(24)) + list(range(30, 40))
    assert loader.errors == {"short_shard": PER_SHARD - 4}
    assert len(messages) == 1 and "shard-000002.tar" in messages[0]


def test_skipped_counts_travel_from_workers_and_through_resume(tmp_path: Path):
    shards = _write(tmp_path / "out")
    _damage(shards[1], "garbage")
    urls = _urls(tmp_path / "out", "glob")
    values, loader, _ = _read(urls, on_error="skip", num_workers=2)
    assert sorted(values) == KEPT and loader.errors == {"corrupt_shard": PER_SHARD - CUT}

    first = ShardLoader(urls, batch_size=1, decode=_decode, shuffle_buffer=0, epochs=1, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = iter(first)
        head = [next(it).item() for _ in range(PER_SHARD + CUT + 1)]  # past the damaged shard
        state = first.state_dict()
        again = ShardLoader(urls, batch_size=1, decode=_decode, shuffle_buffer=0, epochs=1, on_error="skip")
        again.load_state_dict(state)
        tail = [b.item() for b in again]
    assert head + tail == KEPT and again.errors == {"corrupt_shard": PER_SHARD - CUT}


def test_glob_and_pattern_counts_come_from_the_manifest_beside_the_shards(tmp_path: Path):
    out = tmp_path / "out"
    _write(out)
    extra = out / "shard-000099.tar"  # not in the manifest: no count, read as it is
    extra.write_bytes((out / "shard-000000.tar").read_bytes())
    urls, counts = resolve_urls(str(out / "shard-*.tar"))
    assert urls == sorted(str(p) for p in out.glob("shard-*.tar")) and len(urls) == 5
    assert counts == {u: PER_SHARD for u in urls if u != str(extra)}
    urls, counts = resolve_urls(str(out / "shard-{000001..000002}.tar"))
    assert counts == {str(out / "shard-000001.tar"): PER_SHARD, str(out / "shard-000002.tar"): PER_SHARD}
    assert resolve_urls([str(out / "shard-000003.tar")])[1] == {str(out / "shard-000003.tar"): PER_SHARD}

    (out / "manifest.json").write_text('{"format": "something-else"}')  # another tool's manifest: ignored
    assert resolve_urls(str(out / "shard-*.tar"))[1] is None


def test_empty_glob_is_a_one_line_error_naming_it(tmp_path: Path):
    _write(tmp_path / "out")
    pattern = str(tmp_path / "out" / "train-*.tar")
    with pytest.raises(ValueError, match=r"^no shard files match the glob '.*train-\*\.tar'$"):
        ShardLoader(pattern, batch_size=1)
