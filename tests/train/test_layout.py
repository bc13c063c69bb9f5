"""Portable resume pieces that need no process group: the data-layout plan, `LayoutLoader`'s joins and cuts
(every sample of the saved streams exactly once, in the saved order), and the optimizer state by parameter
name written and read back through a plain torch optimizer (ZeRO 0)."""

from __future__ import annotations

import pytest
import torch

from mmoe.data.mixing import MixedLoader, SourcedBatch
from mmoe.errors import TrainingError
from mmoe.train.deepspeed import full_optimizer_state, set_full_optimizer_state
from mmoe.train.layout import DataLayout, LayoutLoader, Plan, plan, stream_states


def test_plan_keeps_the_order_whenever_the_global_batch_is_unchanged():
    two = DataLayout(world=2, batch_size=16, grad_accum=1)
    assert plan(two, DataLayout(2, 16, 1), 1) == Plan((1,))  # another EP size or ZeRO stage
    assert plan(two, DataLayout(1, 32, 1), 0) == Plan((0, 1), per_micro=2)  # both streams in one micro-batch
    assert plan(two, DataLayout(1, 16, 2), 0) == Plan((0, 1), per_micro=1)  # one stream per micro-batch
    assert plan(two, DataLayout(4, 8, 1), 3) == Plan((1,), part=1, parts=2)  # ranks 2, 3 halve stream 1
    four = DataLayout(4, 8, 1)
    assert plan(four, DataLayout(2, 16, 1), 1) == Plan((2, 3), per_micro=2)
    assert plan(two, DataLayout(1, 32, 1), 0).natural is False and Plan((0,)).natural
    assert "cannot share the 2 saved data stream(s) evenly" in plan(DataLayout(2, 12, 1), DataLayout(3, 8, 1), 0)


@pytest.mark.parametrize("now, reason", [
    (DataLayout(1, 16, 1), "the global batch changed (2 rank(s) x 16 x 1 accumulation = 32 samples, now 1 x 16 x 1 = 16)"),
    (DataLayout(2, 8, 2), "on the same 2 rank(s) the micro-batch and accumulation must stay 16 x 1"),
    (DataLayout(4, 4, 2), "2 ranks per saved stream need a micro-batch of 16 / 2 and accumulation 1"),
    (DataLayout(3, 32, 1), None),  # 96 != 32: global batch
])
def test_plan_says_why_it_cannot_keep_the_order(now, reason):
    got = plan(DataLayout(2, 16, 1), now, 0)
    assert isinstance(got, str)
    assert reason is None or got.startswith(reason)


class _Stream:
    """Batches of sample ids ``(stream, i)``, as lists (``collate=list``), with the resume protocol."""

    def __init__(self, v: int, batch: int) -> None:
        self.v, self.batch, self.i, self.errors = v, batch, 0, {"decode": v}

    def __iter__(self):
        while True:
            out = [(self.v, self.i + j) for j in range(self.batch)]
            self.i += self.batch
            yield out

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_layout_loader_joins_and_cuts_the_saved_streams():
    # 2 saved streams of 4 on one rank, both in each micro-batch: stream 0's batch then stream 1's
    both = LayoutLoader({0: _Stream(0, 4), 1: _Stream(1, 4)}, tuple, Plan((0, 1), per_micro=2))
    got = _take(both, 2)
    assert got[0] == tuple([(0, i) for i in range(4)] + [(1, i) for i in range(4)])
    assert got[1] == tuple([(0, i) for i in range(4, 8)] + [(1, i) for i in range(4, 8)])
    assert both.errors == {"decode": 1}
    # one stream per micro-batch (grad_accum doubled): they take turns
    turns = LayoutLoader({0: _Stream(0, 4), 1: _Stream(1, 4)}, tuple, Plan((0, 1), per_micro=1))
    assert [b[0] for b in _take(turns, 4)] == [(0, 0), (1, 0), (0, 4), (1, 4)]
    # two ranks share a saved stream: contiguous halves, together the whole batch
    halves = [_take(LayoutLoader({0: _Stream(0, 6)}, tuple, Plan((0,), part=p, parts=2)), 2) for p in (0, 1)]
    assert halves[0][0] + halves[1][0] == tuple((0, i) for i in range(6))
    assert halves[0][1] + halves[1][1] == tuple((0, i) for i in range(6, 12))
    # the position survives a save and a reload into a fresh loader (the cycling group too)
    state = turns.state_dict()
    assert state["streams"] == {"0": {"i": 8}, "1": {"i": 8}} and state["group"] == 0
    again = LayoutLoader({0: _Stream(0, 4), 1: _Stream(1, 4)}, tuple, Plan((0, 1), per_micro=1))
    again.load_state_dict(state)
    assert _take(again, 1)[0][0] == (0, 8)
    # and the rank files of a checkpoint name every stream: plain loaders their rank, layout loaders theirs
    assert stream_states([{"loader": {"i": 3}}, {"loader": None}]) == {0: {"i": 3}}
    assert stream_states([{"loader": state}]) == {0: {"i": 8}, 1: {"i": 8}}


def test_layout_loader_keeps_sources_whole():
    def mixed(v):
        return MixedLoader([_Stream(10 * v, 2), _Stream(10 * v + 1, 2)], [1.0, 1.0], seed=3, tasks=[None, None])

    got = _take(LayoutLoader({0: mixed(0), 1: mixed(1)}, tuple, Plan((0, 1), per_micro=2)), 6)
    want = [b.source for b in _take(mixed(0), 6)]
    assert [b.source for b in got] == want and len(set(want)) == 2
    for b in got:  # each micro-batch: the same source's batch of both streams
        assert isinstance(b, SourcedBatch) and {s for s, _ in b.data} == {b.source, 10 + b.source}
    with pytest.raises(TrainingError, match="drew different sources"):
        LayoutLoader._combine([SourcedBatch([1], 0, None), SourcedBatch([2], 1, None)], tuple)


def test_optimizer_state_by_name_round_trips_through_a_torch_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert full_optimizer_state(opt, list(model.named_parameters())) == {}  # no step yet: nothing saved
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    whole = full_optimizer_state(opt, list(model.named_parameters()))
    assert sorted(whole) == sorted(f"{n}/{k}" for n, _ in model.named_parameters()
                                   for k in ("exp_avg", "exp_avg_sq", "step"))
    assert all(float(v) == 3.0 for k, v in whole.items() if k.endswith("/step"))

    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    assert set_full_optimizer_state(opt2, list(twin.named_parameters()),
                                    {k: v for k, v in whole.items() if not k.startswith("1.bias")}) == ["1.bias"]
    opt2.state[twin[1].bias] = {k: v.clone() for k, v in opt.state[model[1].bias].items()}
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, opt2)):
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
