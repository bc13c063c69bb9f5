"""`MoE`: router -> dispatch -> experts -> combine, optionally wrapped by the MH-MoE split/merge, with
a dense-backprop estimator added to the combine and optional always-on shared experts.

Shape legend: N input tokens, D = dim, h = heads, T = N*h routed rows of width D/h, E experts,
K slots per row, S kept slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import losses
from .config import MoEConfig
from .dense_backprop import DefaultVectors, computed_mask, dense_oracle_term, expert_group_term
from .dispatch import DispatchPlan, combine, expert_capacity, make_plan
from .experts import MLP, Experts
from .parallel import all_reduce_, expert_parallel_forward
from .routing import Routing, build_router


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer's latest forward (detached tensors)."""

    tokens_per_expert: Tensor  # [E] slots routed to each expert (before capacity)
    kept_per_expert: Tensor  # [E] slots computed
    dropped_frac: float  # dropped slots / routed slots
    entropy: float  # mean router entropy (nats) over rows
    activation: float  # mean over input tokens of (distinct experts its (sub-)tokens activate) / E
    num_rows: int  # rows routed (sub-tokens when heads > 1)
    task: int = 0
    aux: dict[str, float] = field(default_factory=dict)

    @property
    def load(self) -> Tensor:
        """Fraction of routed slots per expert (sums to 1)."""
        t = self.tokens_per_expert.float()
        return t / t.sum().clamp_min(1.0)

    def as_dict(self) -> dict:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "kept_per_expert": self.kept_per_expert.tolist(),
            "dropped_frac": self.dropped_frac,
            "entropy": self.entropy,
            "activation": self.activation,
            "num_rows": self.num_rows,
            "task": self.task,
            **{f"aux_{k}": v for k, v in self.aux.items()},
        }


class MoE(nn.Module):
    """A Mixture-of-Experts layer, a drop-in for an MLP: ``[..., dim] -> [..., dim]``.

    Args:
        cfg: the layer's `MoEConfig`.
        dp_group: optional data-parallel process group. The balance loss uses the global expert load
            over it, and the Default-MoE EMA sums/counts (and the aux-loss-free load) are all-reduced
            over it. ``None``: everything is local; the layer never needs ``torch.distributed``.

    After each forward, ``self.aux_loss()`` is the weighted sum of this layer's auxiliary losses and
    ``self.last_stats`` its routing statistics (`mmoe.aux_loss` / `mmoe.routing_stats` collect them).
    """

    def __init__(self, cfg: MoEConfig, *, dp_group=None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.dp_group = dp_group
        # expert parallelism: set by `mmoe.parallel.shard_experts` (None / 1 = every expert local)
        self.ep_group = None
        self.ep_size = 1
        D, dh, E = cfg.dim, cfg.expert_dim, cfg.num_experts
        if cfg.heads > 1 and cfg.head_projections:
            self.head_proj = nn.Linear(D, D)
            self.merge_proj = nn.Linear(D, D)
            nn.init.xavier_uniform_(self.head_proj.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(self.merge_proj.weight)
            nn.init.zeros_(self.merge_proj.bias)
        else:
            self.head_proj = self.merge_proj = None
        self.routers = nn.ModuleList([build_router(dh, cfg) for _ in range(cfg.num_tasks)])
        self.experts = Experts(E, dh, cfg.hidden, cfg.activation, cfg.expert_bias, cfg.grouped_mm)
        self.shared = (MLP(D, cfg.shared_experts * cfg.hidden * cfg.heads, cfg.activation, cfg.expert_bias)
                       if cfg.shared_experts > 0 else None)
        self.default = (DefaultVectors(E, dh, cfg.default_beta, cfg.default_weighted)
                        if cfg.dense_backprop == "default" else None)
        # per-task state: current top-k (AdaMV adapts it), aux-loss-free bias and its load accumulator
        self.register_buffer("task_top_k", torch.full((cfg.num_tasks,), cfg.top_k, dtype=torch.long))
        if cfg.balance_bias_rate > 0:
            self.register_buffer("balance_bias", torch.zeros(cfg.num_tasks, E))
            self.register_buffer("balance_load", torch.zeros(cfg.num_tasks, E))
        else:
            self.balance_bias = self.balance_load = None
        self._aux: dict[str, Tensor] = {}
        self.last_stats: LayerStats | None = None
        # set True to keep the latest `Routing` (with its autograd graph) in `last_routing`, e.g. to read
        # router gradients ``last_routing.probs.grad`` after ``retain_grad()`` in analyses and tests
        self.record_routing = False
        self.last_routing: Routing | None = None

    def __getstate__(self):
        # the latest aux losses / routing hold autograd graphs: never copy or pickle them (deepcopy of a
        # model after a forward, e.g. for an EMA teacher, must work)
        state = self.__dict__.copy()
        state["_aux"] = {}
        state["last_routing"] = None
        return state

    # ------------------------------------------------------------------ public helpers
    @property
    def num_experts(self) -> int:
        """Experts of the layer over all expert-parallel ranks (``cfg.num_experts``)."""
        return self.cfg.num_experts

    @property
    def router(self) -> nn.Module:
        """The router of task 0 (the only one when ``num_tasks == 1``)."""
        return self.routers[0]

    def top_k(self, task: int = 0) -> int:
        return int(self.task_top_k[task])

    def set_top_k(self, k: int, task: int | None = None) -> None:
        """Change the number of experts per token (for one task or all); used by the AdaMV controller."""
        if not 1 <= k <= self.cfg.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.cfg.num_experts}], got {k}")
        if task is None:
            self.task_top_k.fill_(k)
        else:
            self.task_top_k[self._task(task)] = k

    def set_check_finite(self, enabled: bool) -> None:
        """Turn the router's non-finite-logits error on or off (the training engine turns it off: it
        detects a non-finite loss on every rank together and skips the batch, which a per-rank error
        inside an expert-parallel forward could not do without leaving the other ranks waiting)."""
        self.cfg = self.cfg.replace(check_finite=enabled)
        for r in self.routers:
            r.cfg = self.cfg

    def to_rows(self, x: Tensor) -> Tensor:
        """``[..., D]`` -> routed rows ``[T, D/h]`` (head projection and token split when heads > 1)."""
        x = x.reshape(-1, self.cfg.dim)
        if self.head_proj is not None:
            x = self.head_proj(x)
        return x.reshape(-1, self.cfg.expert_dim)

    def from_rows(self, y: Tensor, shape: torch.Size) -> Tensor:
        """Routed rows ``[T, D/h]`` -> ``[..., D]`` (merge and merge projection when heads > 1)."""
        y = y.reshape(-1, self.cfg.dim)
        if self.merge_proj is not None:
            y = self.merge_proj(y)
        return y.reshape(shape)

    def route(self, x: Tensor, task: int | None = None) -> Routing:
        """The routing of ``x [..., D]``; over sub-tokens when heads > 1 (rows of `to_rows`)."""
        return self._route_rows(self.to_rows(x), self._task(task))

    def expert_forward(self, i: int, h: Tensor) -> Tensor:
        """Expert ``i`` applied to rows ``h [n, D/h]``."""
        return self.experts.expert_forward(i, h)

    def capacity(self, num_rows: int, task: int = 0) -> int | None:
        """Per-expert capacity for ``num_rows`` routed rows in the current mode (None = dropless)."""
        cfg = self.cfg
        if cfg.router == "expert_choice":
            return None  # the router itself enforces the per-expert capacity
        cf = cfg.capacity_factor
        if not self.training and cfg.eval_capacity_factor is not None:
            cf = cfg.eval_capacity_factor
        if cf is None:
            return None
        return expert_capacity(num_rows, cfg.num_experts, self.top_k(task), cf)

    def aux_loss(self) -> Tensor:
        """Weighted sum of this layer's auxiliary losses from the latest forward."""
        if not self._aux:
            return self.experts.w1.new_zeros(())
        return sum(self._aux.values())

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        cfg = self.cfg
        t = self._task(task)
        shape = x.shape
        if shape[-1] != cfg.dim:
            raise ValueError(f"MoE expects inputs [..., {cfg.dim}], got {tuple(shape)}")
        h = self.to_rows(x)  # [T, dh]
        T = h.shape[0]
        r = self._route_rows(h, t)
        if self.record_routing:
            self.last_routing = r
        priority = r.probs.max(-1).values if cfg.batch_prioritized else None
        plan = make_plan(r.indices, cfg.num_experts, self.capacity(T, t), priority)
        x_slots = h.index_select(0, plan.token)
        if self.ep_group is not None:
            y_slots = expert_parallel_forward(self.experts, x_slots, plan.counts, self.ep_group)
        else:
            y_slots = self.experts(x_slots, plan.counts)  # [S, dh]
        weights = r.weights.detach() if cfg.dense_backprop == "dense_oracle" else r.weights
        y = combine(y_slots, plan, weights, T, r.scale)  # [T, dh]
        # activation checkpointing re-runs this forward inside backward: the state it updates (Default-MoE
        # EMA, aux-loss-free load, statistics, aux losses) was updated by the original forward already, and
        # the recomputation must use it as is to reproduce the original values
        recompute = _in_backward()
        if cfg.dense_backprop != "none":
            with torch.autocast(h.device.type, enabled=False):  # estimator math in fp32
                y = y + self._dense_backprop(h, r, plan, y_slots, update=not recompute).to(y.dtype)
        out = self.from_rows(y, shape)
        if self.shared is not None:
            out = out + self.shared(x.reshape(-1, cfg.dim)).reshape(shape).to(out.dtype)
        self._record(r, plan, t, keep=not recompute)
        return out

    # ------------------------------------------------------------------ internals
    def _task(self, task: int | None) -> int:
        if task is None:
            if self.cfg.num_tasks > 1:
                raise ValueError(f"this MoE has num_tasks={self.cfg.num_tasks} routers: pass task=0..{self.cfg.num_tasks - 1}")
            return 0
        if not 0 <= int(task) < self.cfg.num_tasks:
            raise ValueError(f"task={task} out of range for num_tasks={self.cfg.num_tasks}")
        return int(task)

    def _route_rows(self, h: Tensor, task: int) -> Routing:
        cfg = self.cfg
        with torch.autocast(h.device.type, enabled=False):
            xr = h.float()
            if self.training and cfg.router_jitter > 0:
                xr = xr * torch.empty_like(xr).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
            bias = self.balance_bias[task] if self.balance_bias is not None else None
            return self.routers[task](xr, self.top_k(task), bias)

    def _dense_backprop(self, h: Tensor, r: Routing, plan: DispatchPlan, y_slots: Tensor,
                        update: bool = True) -> Tensor:
        cfg = self.cfg
        mode = cfg.dense_backprop
        T, E = r.probs.shape
        if mode == "dense_oracle":
            return dense_oracle_term(self.experts, h, r.probs)
        computed = computed_mask(plan, T, E)
        if mode == "default":
            if self.training and update:
                self.default.update(y_slots, plan, r.probs, self.dp_group)
            return self.default.term(r.probs, computed)
        # expert_group
        term = expert_group_term(y_slots, plan, r.probs, computed, cfg.group_k, self.dp_group)
        return term if cfg.expert_group_mode == "forward" else term - term.detach()

    def _record(self, r: Routing, plan: DispatchPlan, task: int, keep: bool = True) -> None:
        """Aux losses, the aux-loss-free load and statistics of this forward. ``keep=False`` (an activation-
        checkpointing recomputation) computes the aux losses, so that the recomputation saves the same
        tensors for backward, and keeps nothing."""
        cfg = self.cfg
        aux: dict[str, Tensor] = {}
        if self.training or torch.is_grad_enabled():
            if cfg.aux_loss_weight > 0 and cfg.balance_loss == "switch":
                aux["balance"] = cfg.aux_loss_weight * losses.switch_balance_loss(r, self.dp_group)
            elif cfg.aux_loss_weight > 0 and cfg.balance_loss == "vmoe":
                aux["importance"] = cfg.aux_loss_weight * losses.importance_loss(r)
                aux["load"] = cfg.aux_loss_weight * losses.load_loss(r, self.top_k(task), cfg.router_noise_std)
            if cfg.z_loss_weight > 0:
                aux["z"] = cfg.z_loss_weight * losses.z_loss(r)
        if not keep:
            return
        self._aux = aux
        with torch.no_grad():
            if self.balance_load is not None and self.training:
                self.balance_load[task] += plan.routed.float()
            p = r.probs.float()
            if cfg.score_func == "sigmoid":
                p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
            entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
            tokens = plan.token // cfg.heads
            n_tok = r.probs.shape[0] // cfg.heads
            hit = torch.zeros(n_tok, cfg.num_experts, dtype=torch.bool, device=tokens.device)
            hit[tokens, plan.expert] = True
            activation = float(hit.float().sum(-1).mean() / cfg.num_experts) if n_tok else 0.0
            self.last_stats = LayerStats(
                tokens_per_expert=plan.routed.detach(),
                kept_per_expert=plan.counts.detach(),
                dropped_frac=plan.num_dropped / max(plan.num_valid, 1),
                entropy=entropy,
                activation=activation,
                num_rows=r.probs.shape[0],
                task=task,
                aux={k: float(v.detach()) for k, v in aux.items()},
            )


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing recomputing a forward)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# ---------------------------------------------------------------------- model-level helpers
def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every `MoE` inside ``model`` (itself included), with its qualified name."""
    return [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> Tensor:
    """Weighted sum of every MoE layer's auxiliary losses from the latest forward.

    Add it to the task loss once per forward: ``loss = task_loss + mmoe.aux_loss(model)``.
    """
    total = None
    for _, m in moe_layers(model):
        a = m.aux_loss()
        total = a if total is None else total + a
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def routing_stats(model: nn.Module) -> dict[str, LayerStats]:
    """Per MoE layer (by module name): routing statistics of its latest forward."""
    return {name: m.last_stats for name, m in moe_layers(model) if m.last_stats is not None}


@torch.no_grad()
def update_balance_bias(model: nn.Module) -> None:
    """Aux-loss-free balancing step (DeepSeek-V3): call once after each optimizer step.

    For every layer with ``balance_bias_rate > 0``: ``bias += rate * sign(mean_load - load)`` from the
    loads accumulated since the last call (all-reduced over the layer's dp_group), then reset them.
    """
    for _, m in moe_layers(model):
        if m.balance_bias is None:
            continue
        load = m.balance_load.clone()
        all_reduce_(load, group=m.dp_group)
        used = load.sum(-1, keepdim=True) > 0
        delta = m.cfg.balance_bias_rate * torch.sign(load.mean(-1, keepdim=True) - load)
        m.balance_bias += torch.where(used, delta, torch.zeros_like(delta))
        m.balance_load.zero_()
