"""mmoe.data.mixing: weighted source choice (seeded, rank-independent), homogeneous batches, exact resume of
a `MixedLoader` over `ShardLoader` sources, finite sources; `AllLoader` (every source in every item, data.mix: all)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmoe.data import AllLoader, MixedLoader, MultiBatch, ShardLoader, SourcedBatch, choose_source, write_shards


def _write(out: Path, name: str, n: int, per_shard: int = 5) -> Path:
    """n samples keyed ``{name}0000...`` with ``cls`` = their number, in shards of ``per_shard``."""
    samples = ({"__key__": f"{name}{i:04d}", "cls": i} for i in range(n))
    write_shards(samples, out / name, samples_per_shard=per_shard, source=name)
    return out / name


def _key(sample) -> str:
    return sample["__key__"]


def _keys(batch: list) -> list:
    return list(batch)


def _sources(tmp_path: Path, weights=(3.0, 1.0), *, rank=0, world=1, workers=0, seed=5, sizes=(60, 40),
             epochs=None) -> MixedLoader:
    loaders = [ShardLoader(_write(tmp_path, f"s{i}", n) if not (tmp_path / f"s{i}").exists() else tmp_path / f"s{i}",
                           batch_size=4, decode=_key, collate=_keys, shuffle_buffer=6, seed=seed + i, rank=rank,
                           world_size=world, num_workers=workers, epochs=epochs)
               for i, n in enumerate(sizes)]
    return MixedLoader(loaders, list(weights), seed=seed, tasks=[f"task{i}" for i in range(len(sizes))])


def _take(loader, n: int) -> list[tuple[int, str | None, list]]:
    out = []
    for item in loader:
        out.append((item.source, item.task, item.data))
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------------ choice
def test_choice_follows_the_weights_and_is_a_pure_function_of_seed_and_step():
    weights = [3.0, 1.0, 0.5, 0.5]
    n = 20_000
    picks = [choose_source(7, step, weights) for step in range(n)]
    counts = Counter(picks)
    for s, w in enumerate(weights):
        # binomial standard deviation of a share is at most 0.0035 here: 0.015 is > 4 sigma
        assert abs(counts[s] / n - w / sum(weights)) < 0.015, (s, counts)
    assert picks == [choose_source(7, step, weights) for step in range(n)]  # seeded, no hidden state
    assert picks[:200] != [choose_source(8, step, weights) for step in range(200)]  # the seed matters
    assert [choose_source(7, step, [2.0]) for step in range(50)] == [0] * 50
    # scaling the weights changes nothing
    assert picks[:500] == [choose_source(7, step, [6.0, 2.0, 1.0, 1.0]) for step in range(500)]


def test_every_rank_draws_the_same_sources_and_reads_its_own_samples(tmp_path: Path):
    ranks = [_take(_sources(tmp_path, rank=r, world=2), 40) for r in range(2)]
    assert [s for s, _, _ in ranks[0]] == [s for s, _, _ in ranks[1]]
    assert {s for s, _, _ in ranks[0]} == {0, 1}
    for source in (0, 1):  # in the first epoch (5 batches per rank for either source) each rank has its share
        seen = [{k for _, _, keys in [x for x in items if x[0] == source][:5] for k in keys} for items in ranks]
        assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


def test_batches_are_homogeneous_and_carry_their_source(tmp_path: Path):
    loader = _sources(tmp_path, weights=(1.0, 1.0))
    items = list(zip(range(50), loader))
    assert all(isinstance(item, SourcedBatch) for _, item in items)
    for _, item in items:
        assert item.task == f"task{item.source}"
        assert len(item.data) == 4 and {k[:2] for k in item.data} == {f"s{item.source}"}
    assert loader.step == 50


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_round_trip_mid_stream_is_exact(tmp_path: Path, workers: int):
    first, then = 13, 30  # source 1 (40 samples, 10 batches per epoch) passes an epoch boundary after the resume
    expected = _take(_sources(tmp_path, workers=workers), first + then)
    interrupted = _sources(tmp_path, workers=workers)
    head = _take(interrupted, first)
    state = json.loads(json.dumps(interrupted.state_dict()))  # JSON-able
    assert state["step"] == first and len(state["sources"]) == 2
    resumed = _sources(tmp_path, workers=workers)
    resumed.load_state_dict(state)
    tail = _take(resumed, then)
    assert head == expected[:first]
    assert tail == expected[first:]
    # and the same loader continues after a break and a state round trip onto itself
    interrupted.load_state_dict(state)
    assert _take(interrupted, 5) == expected[first:first + 5]


def test_state_from_other_settings_is_refused(tmp_path: Path):
    state = _sources(tmp_path).state_dict()
    with pytest.raises(ValueError, match="weights: saved"):
        _sources(tmp_path, weights=(1.0, 1.0)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed: saved"):
        MixedLoader(_sources(tmp_path).loaders, [3.0, 1.0], seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="not a MixedLoader state"):
        _sources(tmp_path).load_state_dict(state["sources"][0])
    with pytest.raises(ValueError, match="weights\\[1\\]: must be > 0"):
        MixedLoader(_sources(tmp_path).loaders, [1.0, 0.0])


def test_a_finished_source_ends_the_pass_and_restarts_on_the_next(tmp_path: Path):
    # one pass each: source 0 has 15 batches, source 1 has 10; source 0 is drawn 3 times as often
    loader = _sources(tmp_path, epochs=1)
    first = [(item.source, item.data) for item in loader]
    counts = Counter(s for s, _ in first)
    assert (counts[0] == 15) != (counts[1] == 10)  # one of them ran out, which ended the pass
    assert counts[0] <= 15 and counts[1] <= 10 and loader.step == len(first)
    finished = 0 if counts[0] == 15 else 1
    assert choose_source(5, len(first), [3.0, 1.0]) == finished  # the step that found it finished ...
    second = [(item.source, item.data) for _, item in zip(range(20), loader)]
    # ... is drawn again and gets the first batch of that source's new pass; the other source continues
    assert second[0] == next(x for x in first if x[0] == finished)
    other = [keys for s, keys in second if s != finished]
    assert other and not set(map(tuple, other)) & {tuple(k) for s, k in first if s != finished}


# ------------------------------------------------------------------------------------------------ AllLoader
def _all(tmp_path: Path, *, seed=5, sizes=(60, 40), batch_sizes=(4, 2), tasks=("cls", "det")) -> AllLoader:
    loaders = [ShardLoader(_write(tmp_path, f"s{i}", n) if not (tmp_path / f"s{i}").exists() else tmp_path / f"s{i}",
                           batch_size=bs, decode=_key, collate=_keys, shuffle_buffer=6, seed=seed + i)
               for i, (n, bs) in enumerate(zip(sizes, batch_sizes))]
    return AllLoader(loaders, list(tasks))


def _take_all(loader, n: int) -> list[dict]:
    out = []
    for item in loader:
        assert isinstance(item, MultiBatch)
        out.append(dict(item.batches))
        if len(out) == n:
            break
    return out


def test_all_loader_gives_one_batch_of_every_source_per_item(tmp_path: Path):
    items = _take_all(_all(tmp_path), 25)
    assert all(list(it) == ["cls", "det"] for it in items)
    assert all(len(it["cls"]) == 4 and len(it["det"]) == 2 for it in items)  # each source's own batch size
    assert all(k.startswith("s0") for it in items for k in it["cls"])
    assert all(k.startswith("s1") for it in items for k in it["det"])
    # every source is read in its own order, whole epochs: 25 batches of 2 from 40 samples = 1.25 epochs
    det = [k for it in items for k in it["det"]]
    assert sorted(det[:40]) == [f"s1{i:04d}" for i in range(40)]


def test_all_loader_resume_is_exact_and_refuses_other_sources(tmp_path: Path):
    expected = _take_all(_all(tmp_path), 30)
    first = _all(tmp_path)
    head = _take_all(first, 11)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["kind"] == "all" and state["step"] == 11
    resumed = _all(tmp_path)
    resumed.load_state_dict(state)
    assert head + _take_all(resumed, 19) == expected
    with pytest.raises(ValueError, match="task labels"):
        _all(tmp_path, tasks=("det", "cls")).load_state_dict(state)
    with pytest.raises(ValueError, match="not an AllLoader state"):
        _all(tmp_path).load_state_dict(_sources(tmp_path).state_dict())
    with pytest.raises(ValueError, match="distinct"):
        AllLoader(_all(tmp_path).loaders, ["cls", "cls"])


def test_mix_all_config_checks(tmp_path: Path):
    from mmoe.errors import ConfigError
    from mmoe.train.config import TrainConfig, check_train_config
    from mmoe.train.configfile import from_dict

    def cfg(data):
        c = from_dict(TrainConfig, {"task": "t", "data": data})
        check_train_config(c, "x.yaml")
        return c

    ok = cfg({"mix": "all", "sources": [{"path": "a", "task": "cls", "batch_size": 8}, {"path": "b", "task": "det"}],
              "val_sources": [{"path": "a", "task": "cls"}]})
    assert ok.data.has_val and ok.data.sources[0].batch_size == 8
    bad = [
        ({"mix": "all", "train": "a"}, "data.mix: 'all' takes one batch of every data.sources entry"),
        ({"mix": "all", "sources": [{"path": "a"}]}, "data.sources[0].task: data.mix: all needs a task label"),
        ({"mix": "all", "sources": [{"path": "a", "task": "x"}, {"path": "b", "task": "x"}]}, "must be distinct"),
        ({"mix": "all", "sources": [{"path": "a", "task": "x", "weight": 2}]}, "data.sources[0].weight: unused"),
        ({"sources": [{"path": "a", "task": "x"}], "val": "v", "val_sources": [{"path": "v", "task": "x"}]},
         "give data.val or data.val_sources"),
        ({"sources": [{"path": "a", "task": "x"}], "val_sources": [{"path": "v"}]}, "data.val_sources[0].task"),
        ({"sources": [{"path": "a", "task": "x"}], "val_sources": [{"path": "v", "task": "x"}, {"path": "w", "task": "x"}]},
         "data.val_sources[1].task: 'x' given twice"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError) as err:
            cfg(data)
        assert message in str(err.value) and str(err.value).startswith("x.yaml"), (data, str(err.value))
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        cfg({"sources": [{"path": "a", "batch_size": 0}]})
