"""The training data order of a run that resumes on another number of ranks.

Each rank reads its own stream of training batches (`mmoe.data.ShardLoader` gives rank ``r`` of ``W`` the
shards ``[r::W]``; `mmoe.train.engine.SyntheticLoader` the samples of global step positions). A run's data
order is therefore defined by its *layout*: the world size it started with, its micro-batch and its
gradient accumulation (`DataLayout`, saved in every checkpoint's ``meta.json``). A resume keeps that order
whenever the global batch (world x micro-batch x accumulation) is unchanged, by reading the original
ranks' streams as *virtual streams* (`plan`):

* **same world** (e.g. another EP size or ZeRO stage): each rank continues its own stream;
* **fewer ranks** (2 -> 1): each rank reads ``k`` streams and concatenates their batches, ``g`` streams per
  micro-batch (``micro-batch = g x saved``, ``grad_accum = saved x k / g``);
* **more ranks** (1 -> 2): the ``k`` ranks that share a stream each read it whole and take their contiguous
  ``1/k`` of every batch (``saved micro-batch = k x micro-batch``, same accumulation; each of them decodes
  the whole stream).

The virtual streams deliver uncollated samples (``collate=list``); `LayoutLoader` joins or cuts them and
collates once with the task's collate, so a micro-batch holds exactly the samples the original ranks would
have consumed in that step. The layout stays the original one for the rest of the run, through further
resumes. Any other change (another global batch, sizes that do not divide) starts a fresh data position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..data.mixing import MultiBatch, SourcedBatch
from ..errors import TrainingError

__all__ = ["DataLayout", "Plan", "plan", "LayoutLoader", "stream_states"]


@dataclass(frozen=True)
class DataLayout:
    """How a run's training data is laid out: ``world`` streams of ``batch_size`` samples per micro-batch,
    ``grad_accum`` micro-batches per step."""

    world: int
    batch_size: int
    grad_accum: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataLayout | None":
        if not isinstance(d, dict):
            return None
        try:
            return cls(int(d["world"]), int(d["batch_size"]), int(d["grad_accum"]))
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def global_batch(self) -> int:
        return self.world * self.batch_size * self.grad_accum


@dataclass(frozen=True)
class Plan:
    """What rank ``rank`` reads under a saved layout: the virtual ``streams`` (ranks of the saved layout),
    ``per_micro`` of them joined per micro-batch, or its ``part`` of ``parts`` of one stream's batches."""

    streams: tuple[int, ...]
    per_micro: int = 1
    part: int = 0
    parts: int = 1

    @property
    def natural(self) -> bool:
        """The rank's own stream, whole: a plain loader does it."""
        return len(self.streams) == 1 and self.parts == 1


def plan(saved: DataLayout, now: DataLayout, rank: int) -> Plan | str:
    """Rank ``rank``'s share of the saved data order under the current layout, or why it cannot be kept."""
    if now.global_batch != saved.global_batch:
        return (f"the global batch changed ({saved.world} rank(s) x {saved.batch_size} x {saved.grad_accum} "
                f"accumulation = {saved.global_batch} samples, now {now.world} x {now.batch_size} x "
                f"{now.grad_accum} = {now.global_batch})")
    W, D = now.world, saved.world
    if W == D:
        if (now.batch_size, now.grad_accum) != (saved.batch_size, saved.grad_accum):
            return (f"on the same {W} rank(s) the micro-batch and accumulation must stay {saved.batch_size} x "
                    f"{saved.grad_accum} (now {now.batch_size} x {now.grad_accum})")
        return Plan((rank,))
    if D % W == 0:
        k = D // W
        if now.batch_size % saved.batch_size or k % (now.batch_size // saved.batch_size):
            return (f"{k} saved streams per rank need a micro-batch of g x {saved.batch_size} with g dividing {k} "
                    f"(now {now.batch_size})")
        g = now.batch_size // saved.batch_size
        return Plan(tuple(range(rank * k, (rank + 1) * k)), per_micro=g)
    if W % D == 0:
        k = W // D
        if saved.batch_size != k * now.batch_size or now.grad_accum != saved.grad_accum:
            return (f"{k} ranks per saved stream need a micro-batch of {saved.batch_size} / {k} and accumulation "
                    f"{saved.grad_accum} (now {now.batch_size} x {now.grad_accum})")
        return Plan((rank // k,), part=rank % k, parts=k)
    return f"{W} rank(s) cannot share the {D} saved data stream(s) evenly"


class LayoutLoader:
    """Training batches of one rank under `plan`: the saved layout's virtual streams, joined or cut.

    Args:
        loaders: ``{saved rank: loader}`` for ``plan.streams``, each yielding lists of samples (a
            `ShardLoader` or `SyntheticLoader` with ``collate=list``, or a `MixedLoader` / `AllLoader` of
            them, whose `SourcedBatch` / `MultiBatch` items hold such lists).
        collate: the task's collate, applied once to each joined or cut list.
        plan: from `plan`.

    `state_dict` / `load_state_dict` hold every stream's position, so the layout survives further resumes.
    """

    def __init__(self, loaders: dict[int, Any], collate: Callable[[list], Any], plan: Plan) -> None:
        self.loaders, self.collate, self.plan = loaders, collate, plan
        self._group = 0

    @property
    def errors(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for loader in self.loaders.values():
            for k, v in (getattr(loader, "errors", None) or {}).items():
                total[k] = total.get(k, 0) + v
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "layout", "group": self._group,
                "streams": {str(v): loader.state_dict() for v, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for v, loader in self.loaders.items():
            loader.load_state_dict(state["streams"][str(v)])
        self._group = int(state.get("group", 0))

    def __iter__(self):
        p = self.plan
        its = {v: iter(loader) for v, loader in self.loaders.items()}
        groups = len(p.streams) // p.per_micro
        while True:
            if p.parts > 1:
                yield self._combine([next(its[p.streams[0]])], self._cut)
                continue
            chosen = p.streams[self._group * p.per_micro:(self._group + 1) * p.per_micro]
            items = [next(its[v]) for v in chosen]
            self._group = (self._group + 1) % groups
            yield self._combine(items, self._join)

    def _join(self, lists: list[list]) -> Any:
        return self.collate([s for one in lists for s in one])

    def _cut(self, lists: list[list]) -> Any:
        (one,) = lists
        n, p = len(one), self.plan
        return self.collate(one[p.part * n // p.parts:(p.part + 1) * n // p.parts])

    @staticmethod
    def _combine(items: list, fn: Callable[[list[list]], Any]) -> Any:
        first = items[0]
        if isinstance(first, SourcedBatch):
            if any(i.source != first.source for i in items):
                raise TrainingError("the saved data streams drew different sources for one step "
                                    "(data.sources changed since the checkpoint?)")
            return SourcedBatch(fn([i.data for i in items]), first.source, first.task)
        if isinstance(first, MultiBatch):
            return MultiBatch({t: fn([i.batches[t] for i in items]) for t in first.batches})
        return fn(items)


def stream_states(rank_states: list[dict]) -> dict[int, Any]:
    """``{saved rank: loader state}`` from every rank file of a checkpoint: a plain loader's state belongs to
    its own rank (the natural layout), a `LayoutLoader`'s lists its streams."""
    out: dict[int, Any] = {}
    for r, rs in enumerate(rank_states):
        state = rs.get("loader")
        if state is None:
            continue
        if isinstance(state, dict) and state.get("kind") == "layout":
            out.update({int(v): s for v, s in state["streams"].items()})
        else:
            out[r] = state
    return out
