"""Statistics of the MoE layers of a model: expert-load heatmaps, per-group routing counts
(`RoutingCounter`: languages, modalities, tasks) and parameter counts (`count_params`, expert-parallel
aware)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layer import LayerStats, MoE, moe_layers, routing_stats
from .losses import group_expert_counts
from .routing import Routing

__all__ = ["expert_load_matrix", "plot_expert_load", "plot_routing_shares", "ParamCount", "count_params",
           "RoutingCounter", "group_expert_counts"]


def expert_load_matrix(stats: dict[str, LayerStats] | nn.Module) -> tuple[list[str], torch.Tensor]:
    """Layer names and a ``[layers, E]`` matrix of load fractions (rows sum to 1)."""
    if isinstance(stats, nn.Module):
        stats = routing_stats(stats)
    if not stats:
        raise ValueError("no routing statistics: run a forward pass through the model first")
    names = list(stats)
    E = max(s.tokens_per_expert.numel() for s in stats.values())
    mat = torch.zeros(len(names), E)
    for i, n in enumerate(names):
        load = stats[n].load.float().cpu()
        mat[i, : load.numel()] = load
    return names, mat


def plot_expert_load(stats: dict[str, LayerStats] | nn.Module, path: str | Path, title: str | None = None) -> Path:
    """Write a heatmap PNG of expert load per layer (rows: layers, columns: experts).

    Colour = fraction of the layer's routed slots that went to the expert; a perfectly balanced
    layer is uniformly ``1/E``. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, mat = expert_load_matrix(stats)
    L, E = mat.shape
    fig, ax = plt.subplots(figsize=(max(5.0, min(0.25 * E + 3.0, 24.0)), max(2.6, 0.35 * L + 1.6)))
    im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_yticks(range(L))
    ax.set_yticklabels(names, fontsize=7)
    step = max(1, E // 16)
    ax.set_xticks(range(0, E, step))
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"load fraction\n(balanced: 1/{E} = {1 / E:.3f})", fontsize=8)
    ax.set_title(title or "expert load per layer")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_routing_shares(counts: dict[str, torch.Tensor], groups, path: str | Path, title: str) -> Path:
    """Heatmaps, one per MoE layer, of the share of each group's routed slots per expert (rows sum to 1):
    ``counts[layer]`` is ``[groups, E]`` (e.g. per language, per modality). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(counts)
    if not names:
        raise ValueError(f"{title}: no MoE layer counts")
    n = len(names)
    E = counts[names[0]].shape[1]
    fig, axes = plt.subplots(1, n, figsize=(max(3.0, 0.3 * E + 1.5) * n, 0.3 * len(groups) + 1.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        c = counts[name].float()
        share = c / c.sum(1, keepdim=True).clamp_min(1.0)
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert")
        ax.set_yticks(range(c.shape[0]))
        ax.set_yticklabels(list(groups)[: c.shape[0]], fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- parameters
class ParamCount(NamedTuple):
    """Parameters of a model with `mmoe.MoE` layers, over all expert-parallel ranks."""

    total: int  # every parameter once (tied weights once), every routed expert of every rank
    active: int  # parameters one token uses: all but the routed experts, plus the experts it is routed to
    expert: int  # routed-expert parameters (all experts of all layers and ranks)


def count_params(model: nn.Module, *, task: int = 0) -> ParamCount:
    """Total, active-per-token and routed-expert parameters of ``model``.

    A token uses, in each MoE layer, ``min(heads * top_k, E)`` routed experts' worth of parameters: each
    of its ``heads`` MH-MoE sub-tokens goes to ``top_k`` experts of width ``dim / heads`` (the count of
    expert applications `mmoe.moe_cost` charges; with expert choice ``top_k`` is the average), with the
    layer's current ``top_k`` of ``task`` (AdaMV adapts it per task). Everything that is not a routed
    expert is active: attention, embeddings, norms, routers, shared experts, MH-MoE projections.

    Under expert parallelism (`mmoe.train.sharding.shard_experts`) a layer with ``ep_size = P`` holds
    ``E / P`` of its experts; the counts are of the whole model (local expert parameters x ``P``), so
    they are the same on every rank and for every ``ep_size``.
    """
    total = sum(p.numel() for p in model.parameters())
    active = total
    expert = 0
    for name, m in moe_layers(model):
        ex, E = m.experts, m.cfg.num_experts
        P = max(int(getattr(m, "ep_size", 1) or 1), 1)
        if ex.num_experts * P != E:
            raise ValueError(f"{name}: {ex.num_experts} local experts x ep_size={P} != num_experts={E}")
        local = sum(p.numel() for p in ex.parameters())
        per_expert = local // ex.num_experts
        t = task if m.cfg.num_tasks > 1 else 0
        if not 0 <= t < m.cfg.num_tasks:
            raise ValueError(f"{name}: task={task} out of range for num_tasks={m.cfg.num_tasks}")
        # soft routing: every token's output mixes every expert's slots
        used = E if m.cfg.router == "soft" else min(m.cfg.heads * m.top_k(t), E)
        total += per_expert * E - local
        active += per_expert * used - local
        expert += per_expert * E
    return ParamCount(int(total), int(active), int(expert))


# ---------------------------------------------------------------------------------------------- routing per group
class RoutingCounter:
    """Routed slots per (group, expert) of every MoE layer of a model, summed over many batches.

    Groups are languages, modalities, tasks, ...: the caller says which group every input token of a
    layer belongs to. A routed slot is one (row, k) choice of the layer's `mmoe.Routing`; with MH-MoE
    (``heads > 1``) a token is ``heads`` sub-tokens (rows ``t*heads .. t*heads + heads - 1``, the order
    of `MoE.to_rows`) that inherit its group, so a token counts ``heads * top_k`` slots. Empty slots
    (-1, expert choice) and tokens whose group id is outside ``[0, G)`` (e.g. -1 for padding) are not
    counted; slots later dropped by a capacity limit are (routing decision, not compute)::

        counter = RoutingCounter(model, groups=["en", "de"])
        with counter:                         # layers record their routing (restored on exit)
            for batch in batches:
                model(batch["input_ids"])
                counter.add(batch["lang_ids"])   # group id per input token of every MoE layer
        counts = counter.counts()             # {layer name: [G, E] int64}
        counter.plot("routing.png", "share of each language's routed slots per expert")

    ``add`` takes one id tensor for all layers (its elements are a layer's input tokens, i.e. the
    ``x.shape[:-1]`` of its input, in order), a mapping ``{layer name: ids}`` for models whose layers
    see different tokens (padding removed, one modality per layer), or an int: every token of the latest
    forward is in that group (one call per modality or task). `add_routing` counts one `mmoe.Routing`
    directly (for layers called several times per forward).

    Args:
        model: the model; its MoE layers are found once (`mmoe.moe_layers`).
        groups: group names, or their number ``G`` (names ``"0"`` ... ``"G-1"``).
        dp_group: optional process group: `counts` sums every rank's counts over it (a collective:
            call it on every rank of the group).
    """

    def __init__(self, model: nn.Module, groups: Sequence[str] | int, *, dp_group=None) -> None:
        self.groups = [str(i) for i in range(groups)] if isinstance(groups, int) else [str(g) for g in groups]
        if not self.groups:
            raise ValueError("RoutingCounter: needs at least one group")
        self.layers: list[tuple[str, MoE]] = moe_layers(model)
        self._by_name = dict(self.layers)
        self.dp_group = dp_group
        p = next(model.parameters(), None)
        self._device = p.device if p is not None else torch.device("cpu")
        self._counts = {name: torch.zeros(len(self.groups), m.cfg.num_experts, dtype=torch.long, device=self._device)
                        for name, m in self.layers}
        self._saved: list[tuple[MoE, bool]] | None = None

    # ------------------------------------------------------------------ recording
    def start(self) -> "RoutingCounter":
        """Make every layer keep its latest routing (``record_routing``), until `stop`."""
        if self._saved is None:
            self._saved = [(m, m.record_routing) for _, m in self.layers]
            for _, m in self.layers:
                m.record_routing, m.last_routing = True, None
        return self

    def stop(self) -> None:
        """Restore the layers' ``record_routing`` flags and drop their recorded routing."""
        for m, flag in self._saved or []:
            m.record_routing, m.last_routing = flag, None
        self._saved = None

    def __enter__(self) -> "RoutingCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ counting
    def add(self, group_ids: Tensor | int | Mapping[str, Tensor | int]) -> None:
        """Count the latest recorded routing of every layer that ran since the last `add` (see the class
        docstring for ``group_ids``), then clear it, so a layer that did not run is not counted twice."""
        for name, m in self.layers:
            r = m.last_routing
            if r is None:
                continue
            if isinstance(group_ids, Mapping):
                if name not in group_ids:
                    continue
                ids = group_ids[name]
            else:
                ids = group_ids
            self.add_routing(name, r, ids)
            m.last_routing = None

    def add_routing(self, name: str, routing: Routing, group_ids: Tensor | int) -> None:
        """Count one routing of layer ``name``: ``group_ids`` per input token of that call (or an int)."""
        if name not in self._counts:
            raise KeyError(f"RoutingCounter: no MoE layer {name!r}; layers: {list(self._counts)}")
        m = self._by_name[name]
        c = group_expert_counts(routing.indices, group_ids, len(self.groups), m.cfg.num_experts, m.cfg.heads,
                                where=f"RoutingCounter: layer {name!r}")
        self._counts[name] += c.to(self._counts[name].device)

    # ------------------------------------------------------------------ results
    def counts(self) -> dict[str, Tensor]:
        """``{layer name: [G, E]}`` int64 counts on the CPU (summed over ``dp_group`` when given)."""
        from .parallel import all_reduce_

        out = {name: c.clone() for name, c in self._counts.items()}
        all_reduce_(*out.values(), group=self.dp_group)
        return {name: c.cpu() for name, c in out.items()}

    def reset(self) -> None:
        for c in self._counts.values():
            c.zero_()

    def state_dict(self) -> dict:
        """This rank's counts (not reduced) and the group names."""
        return {"groups": list(self.groups), "counts": {name: c.cpu().clone() for name, c in self._counts.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["groups"]) != self.groups:
            raise ValueError(f"RoutingCounter: groups {list(state['groups'])} != {self.groups}")
        if set(state["counts"]) != set(self._counts):
            raise ValueError(f"RoutingCounter: layers {sorted(state['counts'])} != {sorted(self._counts)}")
        for name, c in state["counts"].items():
            self._counts[name].copy_(c)

    def plot(self, path: str | Path, title: str) -> Path:
        """`plot_routing_shares` of `counts` (one heatmap per layer, rows = groups)."""
        return plot_routing_shares(self.counts(), self.groups, path, title)
