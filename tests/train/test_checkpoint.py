"""Checkpoint files on their own (one process): atomic writes, damaged checkpoints passed over, expert
shards re-sliced for another expert-parallel size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmoe
from mmoe.train import checkpoint as C


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), mmoe.MoE(mmoe.MoEConfig(dim=8, num_experts=4, top_k=2, dense_backprop="default")))


def _shard_in_place(model, rank, size):
    ex = model[1].experts
    El = 4 // size
    for name, p in list(ex.named_parameters(recurse=False)):
        q = nn.Parameter(p.detach()[rank * El:(rank + 1) * El].clone())
        q.expert = True
        setattr(ex, name, q)
    ex.num_experts, ex.expert_offset = El, rank * El
    return model


def test_round_trip_and_reshard(tmp_path):
    full = _model()
    full[1](torch.randn(5, 8))  # touch the EMA buffer
    # two expert-parallel ranks write their halves into one checkpoint (simulated in one process: rank 1
    # writes its experts file at the first barrier, as it would in parallel)
    parts = []
    for r in (0, 1):
        part = _shard_in_place(_model(), r, 2)
        part.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("1.experts.")},
                             strict=False)
        parts.append(part)
    calls = []

    def barrier():
        calls.append(1)
        if len(calls) == 1:
            _write_rank1(tmp_path, parts[1])

    C.save_checkpoint(tmp_path, 3, model=parts[0], rank=0, world_size=2, ep_rank=0, ep_size=2, barrier=barrier)
    ck = C.find_latest(tmp_path)
    assert ck is not None and ck.name == "step_0000003"
    state = C.full_state_dict(ck)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(state[k], v, msg=k)
    # load into EP size 4, rank 2: experts [2]
    m4 = _shard_in_place(_model(seed=1), 2, 4)
    C.load_model_state(m4, ck, ep_rank=2, ep_size=4)
    torch.testing.assert_close(m4[1].experts.w1, full[1].experts.w1[2:3])
    torch.testing.assert_close(m4[1].default.vectors, full[1].default.vectors)
    with pytest.raises(C.CheckpointError, match="not divisible"):
        C.load_model_state(_model(), ck, ep_rank=0, ep_size=3)


def _write_rank1(root, part):
    # what rank 1 does inside save_checkpoint: its experts file into the shared temporary folder
    from safetensors.torch import save_file

    tmp = root / "step_0000003.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    state = part.state_dict()
    save_file({k: state[k].contiguous() for k in state if k.startswith("1.experts.")},
              str(tmp / "experts-ep1-of2.safetensors"))


def test_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    m = _model()
    C.save_checkpoint(tmp_path, 10, model=m)
    good = C.find_latest(tmp_path)

    import safetensors.torch as st

    calls = {"n": 0}
    real = st.save_file

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the expert file of the second checkpoint
            raise OSError("disk full (simulated crash)")
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "save_file", dying)
    with pytest.raises(OSError):
        C.save_checkpoint(tmp_path, 20, model=m)
    assert (tmp_path / "step_0000020.tmp").is_dir()
    assert C.find_latest(tmp_path) == good
    assert (tmp_path / "latest").read_text() == good.name


def test_damaged_checkpoints_are_passed_over(tmp_path):
    m = _model()
    C.save_checkpoint(tmp_path, 1, model=m)
    C.save_checkpoint(tmp_path, 2, model=m)
    C.save_checkpoint(tmp_path, 3, model=m)
    (tmp_path / "step_0000003" / "meta.json").unlink()  # interrupted before meta.json
    f = tmp_path / "step_0000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # truncated file
    assert [c.name for c in C.list_checkpoints(tmp_path)] == ["step_0000001"]
    # the pointer is followed (loading it then names what is wrong); a resume tries the candidates in order
    assert C.find_latest(tmp_path).name == "step_0000003"
    assert [c.name for c in C.checkpoint_candidates(tmp_path)] == ["step_0000003", "step_0000002", "step_0000001"]
    (tmp_path / "latest").unlink()  # without a pointer: the newest complete one
    assert C.find_latest(tmp_path).name == "step_0000001"
    with pytest.raises(C.CheckpointError, match="model.safetensors: .* bytes, meta.json says"):
        C.read_meta(tmp_path / "step_0000002")
    with pytest.raises(C.CheckpointError, match="no meta.json"):
        C.read_meta(tmp_path / "step_0000003")


def test_keep_last(tmp_path):
    m = _model()
    for s in range(1, 6):
        C.save_checkpoint(tmp_path, s, model=m, keep_last=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]
