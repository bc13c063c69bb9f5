"""`MoE`: router -> dispatch -> experts -> combine, optionally wrapped by the MH-MoE split/merge, with
a dense-backprop estimator added to the combine and optional always-on shared experts.

Shape legend: N input tokens, D = dim, h = heads, T = N*h routed rows of width D/h, E experts,
K slots per row, S kept slots.

Multi-task (``num_tasks > 1``): ``moe(x, task=...)`` takes one task id or a tensor of ids per token. A
mixed batch is one call: each task's rows are routed by that task's router (its top-k, its aux-loss-free
bias), then all rows share ONE dispatch plan and ONE expert computation (see `MoE.forward` for how
capacity, the estimators and the statistics treat the tasks).

Aux losses accumulate over every training forward until they are collected: ``mmoe.aux_loss(model)``
returns their sum and clears them, so a loss that runs the model several times (streams, modalities)
gets every run's aux terms from one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses
from .config import MoEConfig
from .dense_backprop import DefaultUpdate, DefaultVectors, computed_mask, dense_oracle_term, expert_group_term
from .dispatch import DispatchPlan, combine_slots, expert_capacity, make_plan, slot_combine
from .experts import MLP, SHARED_WORKSPACES, Experts
from .parallel import _all_reduce, all_reduce_, expert_parallel_forward
from .routing import Routing, build_router

# a forward without gradient of at most this many slots (rows x K) takes `MoE._few_rows_forward`
FEW_SLOTS = 16


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer's latest forward (detached tensors).

    ``task`` is the forward's task id, or -1 when its rows belonged to several tasks. ``per_task`` maps each
    task present in the forward to the same statistics over that task's rows only (its ``per_task`` is
    empty); for a single-task forward it has one entry equal to the layer-wide numbers. ``aux`` holds the
    forward's weighted aux terms (summed over tasks; per task in ``per_task``).
    """

    tokens_per_expert: Tensor  # [E] slots routed to each expert (before capacity)
    kept_per_expert: Tensor  # [E] slots computed
    dropped_frac: float  # dropped slots / routed slots
    entropy: float  # mean router entropy (nats) over rows
    activation: float  # mean over input tokens of (distinct experts its (sub-)tokens activate) / E
    num_rows: int  # rows routed (sub-tokens when heads > 1)
    task: int = 0
    aux: dict[str, float] = field(default_factory=dict)
    per_task: dict[int, LayerStats] = field(default_factory=dict)
    # further statistics: top-k routers ``weight_sum``, the mean over rows of the sum of a row's combine
    # weights (before capacity; 1 with ``normalize_topk``, a little above k/E at initialisation without); the soft
    # router: mean max / entropy of its dispatch and combine weights
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def load(self) -> Tensor:
        """Fraction of routed slots per expert (sums to 1)."""
        t = self.tokens_per_expert.float()
        return t / t.sum().clamp_min(1.0)

    def as_dict(self) -> dict:
        out = {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "kept_per_expert": self.kept_per_expert.tolist(),
            "dropped_frac": self.dropped_frac,
            "entropy": self.entropy,
            "activation": self.activation,
            "num_rows": self.num_rows,
            "task": self.task,
            **{f"aux_{k}": v for k, v in self.aux.items()},
            **self.extra,
        }
        if len(self.per_task) > 1:  # a single-task forward's entry repeats the numbers above
            out["per_task"] = {str(t): s.as_dict() for t, s in self.per_task.items()}
        return out


class MoE(nn.Module):
    """A Mixture-of-Experts layer, a drop-in for an MLP: ``[..., dim] -> [..., dim]``.

    Args:
        cfg: the layer's `MoEConfig`.
        dp_group: optional data-parallel process group. The balance loss uses the global expert load
            over it, and the Default-MoE EMA sums/counts (and the aux-loss-free load) are all-reduced
            over it. ``None``: everything is local; the layer never needs ``torch.distributed``.

    ``forward(x, task)``: ``task`` is ``None`` (single-task layers), an int, or an integer tensor of task
    ids with shape ``x.shape[:-1]`` (one per token; with ``heads > 1`` every sub-token of a token uses the
    token's task). A mixed batch is routed task by task, in ascending task id (each task's rows by
    ``routers[t]`` with ``top_k(t)`` and ``balance_bias[t]``; random draws — jitter, noise, SparseMixer
    sampling — happen in that order, as in separate calls per task in that order), and then ALL rows go
    through one dispatch plan and one expert computation. Per task, the result equals separate calls:

    * capacity (``capacity_factor``) is per task: ``capacity(rows of task t, t)`` per expert for each
      task's rows, which compete only with each other; expert choice selects per task among its rows;
    * aux losses are computed per task (the balance loss on each task's own routing) and summed;
    * ``expert_group`` tables are per task; ``dense_oracle`` is per row anyway;
    * exception, ``dense_backprop="default"``: the EMA takes ONE update per forward, from the kept slots of
      all tasks (the paper's per-batch mean; the experts and their default vectors are shared), and every
      row uses the updated vectors. Separate calls would update twice, in sequence.

    With ``dp_group`` or expert parallelism, all ranks must call a layer the same way (every rank with an
    int, or every rank with a tensor): the per-task collectives always cover all ``num_tasks`` tasks.

    Aux losses accumulate: every training-mode forward adds its weighted aux terms to the layer's pending
    sum, ``aux_loss()`` returns that sum (without clearing), ``clear_aux()`` drops it, and
    ``mmoe.aux_loss(model)`` returns every layer's sum and clears it. Only forwards whose aux terms can
    get a gradient are added: nothing from eval-mode forwards, from forwards under ``torch.no_grad()``, or
    from an activation-checkpointing recomputation inside backward. So non-reentrant checkpointing
    (``use_reentrant=False``) counts a layer's aux terms once, with their gradient; *reentrant*
    checkpointing runs its first pass under no_grad, and its layers' aux terms (which could get no gradient
    there) are not collected at all. At most ``max_pending_aux`` forwards are kept (each holds its autograd
    graph): beyond that the oldest is dropped with a warning. ``last_stats`` is the routing statistics of
    the latest forward (`LayerStats`, with ``per_task``), kept for every forward.
    """

    # forwards whose aux terms a layer keeps until they are collected (each holds its autograd graph)
    max_pending_aux = 64

    def __init__(self, cfg: MoEConfig, *, dp_group=None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.dp_group = dp_group
        # expert parallelism: set by `mmoe.train.sharding.shard_experts` (None / 1 = every expert local)
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
        self._aux: list[dict[str, Tensor]] = []  # one dict of weighted aux terms per pending forward
        self._warned_pending = False
        self.last_stats: LayerStats | None = None
        # set True to keep the latest `Routing` (with its autograd graph) in `last_routing`, e.g. to read
        # router gradients ``last_routing.probs.grad`` after ``retain_grad()`` in analyses and tests
        self.record_routing = False
        self.last_routing: Routing | None = None
        # False: forwards outside training leave `last_stats` as it is (`no_stats`; decoding does)
        self.record_stats = True

    def __getstate__(self):
        # the pending aux losses / routing hold autograd graphs: never copy or pickle them (deepcopy of a
        # model after a forward, e.g. for an EMA teacher, must work)
        state = self.__dict__.copy()
        state["_aux"] = []
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

    def route(self, x: Tensor, task: int | Tensor | None = None) -> Routing:
        """The routing of ``x [..., D]``; over sub-tokens when heads > 1 (rows of `to_rows`).

        ``task`` as in `forward`; with a tensor of task ids each row is routed by its task's router and the
        result has ``K = max`` over the tasks' slots (shorter rows padded with ``-1`` / weight 0)."""
        row_task, tasks = self._row_tasks(task, x.shape[:-1])
        return self._route_tasks(self.to_rows(x), row_task, tasks)[0]

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
        """Weighted sum of this layer's auxiliary losses over every forward since they were last cleared
        (`clear_aux`, `mmoe.aux_loss`); zero when there are none. Does not clear them."""
        terms = [v for aux in self._aux for v in aux.values()]
        if not terms:
            return self.experts.w1.new_zeros(())
        return sum(terms)

    @property
    def pending_aux_forwards(self) -> int:
        """Forwards whose aux terms are pending (added since they were last collected or cleared)."""
        return len(self._aux)

    def clear_aux(self) -> None:
        """Drop the pending aux losses (and the graphs they hold)."""
        self._aux = []

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task: int | Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        shape = x.shape
        if shape[-1] != cfg.dim:
            raise ValueError(f"MoE expects inputs [..., {cfg.dim}], got {tuple(shape)}")
        if cfg.router == "soft":
            return self._soft_forward(x, task, mask)
        if mask is not None:
            raise ValueError("MoE: mask= (padding) applies to router='soft'; token-choice routers route every row")
        row_task, tasks = self._row_tasks(task, shape[:-1])
        h = self.to_rows(x)  # [T, dh]
        T = h.shape[0]
        r, parts = self._route_tasks(h, row_task, tasks)
        if self.record_routing:
            self.last_routing = r
        if row_task is None and T * r.indices.shape[1] <= FEW_SLOTS and self._few_rows_ok(T, tasks[0]):
            return self._few_rows_forward(x, h, r, parts, shape)
        priority = r.probs.max(-1).values if cfg.batch_prioritized else None
        if row_task is None:
            plan = make_plan(r.indices, cfg.num_experts, self.capacity(T, tasks[0]), priority)
        else:  # capacity per task: each task's rows compete only with each other
            caps = [self.capacity(int(rows.numel()), t) for t, rows, _ in parts]
            cap = None
            if caps[0] is not None:
                cap = torch.zeros(cfg.num_tasks, dtype=torch.long, device=h.device)
                cap[[t for t, _, _ in parts]] = torch.tensor(caps, device=h.device)
            plan = make_plan(r.indices, cfg.num_experts, cap, priority, groups=row_task)
        weights = r.weights.detach() if cfg.dense_backprop == "dense_oracle" else r.weights
        # activation checkpointing re-runs this forward inside backward: the state it updates (Default-MoE
        # EMA, aux-loss-free load, statistics, aux losses) was updated by the original forward already, and
        # the recomputation must use it as is to reproduce the original values
        recompute = _in_backward()
        c = slot_combine(plan, weights, T, r.scale)
        if cfg.dense_backprop == "default" and self.training and not recompute:
            # the EMA update reads the slots' outputs as they are computed (one update over every task's slots)
            c.observe = self.default.accumulator(plan, r.probs)
        y_slots = None
        if self.ep_group is not None:
            y_slots = expert_parallel_forward(self.experts, h.index_select(0, plan.token), plan.counts, self.ep_group)
        elif cfg.dense_backprop == "expert_group":  # its table reads the slots' outputs
            y_slots = self.experts(h, plan.counts, rows=plan.token)  # [S, dh]; the gather h[plan.token] fused
        else:  # the gather and the combine are fused into the experts' loop path: no [S, dh] slot outputs
            y = self.experts(h, plan.counts, rows=plan.token, combine=c)  # [T, dh]
        if y_slots is not None:
            y = combine_slots(y_slots, c, partial(self.experts.workspace, shared=True))  # [T, dh]
        if cfg.dense_backprop != "none":
            groups = row_task
            if groups is None and cfg.num_tasks > 1:
                groups = torch.full((T,), tasks[0], dtype=torch.long, device=h.device)
            with torch.autocast(h.device.type, enabled=False):  # estimator math in fp32
                y = y + self._dense_backprop(h, r, plan, y_slots, groups, c.observe).to(y.dtype)
        out = self.from_rows(y, shape)
        if self.shared is not None:
            out = out + self.shared(x.reshape(-1, cfg.dim)).reshape(shape).to(out.dtype)
        # only forwards that can give the aux loss a gradient are collected (not no_grad, eval or recompute)
        collect = self.training and torch.is_grad_enabled() and not recompute
        if self.record_stats or self.training or torch.is_grad_enabled():
            self._record(r, parts, plan, row_task, keep=not recompute, collect=collect)
        return out

    # ------------------------------------------------------------------ few rows (decoding)
    def _few_rows_ok(self, T: int, task: int) -> bool:
        """Whether a forward of ``T`` rows may take `_few_rows_forward`: on CPU (on CUDA its host read of the
        choices would stall the launch queue; not measured there), no gradient, no training, one task,
        dropless, no expert parallelism, and an estimator whose forward value needs no slot outputs."""
        return (self.experts.w1.device.type == "cpu" and not self.training and not torch.is_grad_enabled()
                and self.ep_group is None
                and self.cfg.dense_backprop in ("none", "default") and self.capacity(T, task) is None)

    def _few_rows_forward(self, x: Tensor, h: Tensor, r: Routing, parts, shape: torch.Size) -> Tensor:
        """The forward of a handful of rows without gradient (one decoding step: ``T * K <= FEW_SLOTS``):
        each chosen expert runs on its rows with `Experts.expert_forward` and its weighted outputs are added
        into theirs in ascending expert order, as the plan's slots are; no dispatch plan, workspaces or
        chunking, whose fixed cost is most of a one-token forward. Equal to the batched path (tested)."""
        cfg = self.cfg
        T, K = r.indices.shape
        w = r.weights if r.scale is None else r.weights * r.scale
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for t, row in enumerate(r.indices.tolist()):
            for j, e in enumerate(row):
                if e >= 0:
                    by_expert.setdefault(e, []).append((t, j))
        y = None
        for e in sorted(by_expert):
            tj = by_expert[e]
            if len(tj) == 1:  # one row: slices, no index tensors
                (t, j), = tj
                out = self.experts.expert_forward(e, h[t:t + 1])
                out = out * w[t:t + 1, j:j + 1].to(out.dtype)
                if T == 1:
                    y = out if y is None else y + out.to(y.dtype)
                    continue
                if y is None:
                    y = torch.zeros(T, out.shape[-1], dtype=out.dtype, device=h.device)
                y[t:t + 1] += out.to(y.dtype)
                continue
            tok = torch.tensor([t for t, _ in tj], device=h.device)
            slot = torch.tensor([j for _, j in tj], device=h.device)
            out = self.experts.expert_forward(e, h.index_select(0, tok))
            out = out * w[tok, slot].unsqueeze(-1).to(out.dtype)
            if y is None:
                y = torch.zeros(T, out.shape[-1], dtype=out.dtype, device=h.device)
            y.index_add_(0, tok, out.to(y.dtype))
        if y is None:  # every slot empty
            y = torch.zeros_like(h)
        if cfg.dense_backprop == "default":
            computed = torch.zeros(T, cfg.num_experts, dtype=torch.bool, device=h.device)
            computed.scatter_(1, r.indices.clamp_min(0), r.indices >= 0)
            with torch.autocast(h.device.type, enabled=False):
                y = y + self.default.term(r.probs, computed).to(y.dtype)
        out = self.from_rows(y, shape)
        if self.shared is not None:
            out = out + self.shared(x.reshape(-1, cfg.dim)).reshape(shape).to(out.dtype)
        if self.record_stats:
            plan = make_plan(r.indices, cfg.num_experts, None)
            self._record(r, parts, plan, None, keep=True, collect=False)
        return out

    # ------------------------------------------------------------------ Soft MoE
    def _soft_forward(self, x: Tensor, task: int | Tensor | None, mask: Tensor | None) -> Tensor:
        """Soft MoE over each sequence of ``x [B, T, dim]`` (`mmoe.routing.SoftRouter`): slots ``D^T x``, expert
        ``e`` on its ``soft_slots`` slots of every sequence, outputs ``C y``. ``mask [B, T]`` (True = token)
        keeps padding out of every slot; padded positions output 0."""
        cfg = self.cfg
        if x.dim() != 3:
            raise ValueError(f"MoE(router='soft') mixes the tokens of each sequence: inputs must be [batch, tokens, "
                             f"{cfg.dim}], got {tuple(x.shape)}")
        if isinstance(task, Tensor):
            ids = task.unique()
            if ids.numel() != 1:
                raise ValueError("MoE(router='soft'): one task per call (a sequence's slots mix all its tokens); "
                                 f"got task ids {ids.tolist()}")
            task = int(ids.item())
        t = self._task(task)
        B, T, D = x.shape
        if mask is not None:
            if tuple(mask.shape) != (B, T):
                raise ValueError(f"MoE(router='soft'): mask must be [batch, tokens] = {(B, T)}, got {tuple(mask.shape)}")
            mask = mask.to(device=x.device, dtype=torch.bool)
        router = self.routers[t]
        E, p = cfg.num_experts, cfg.soft_slots
        dispatch, combine = router.weights(router.logits(x), mask)  # [B, T, E*p] each, fp32
        slots = torch.einsum("bts,btd->bsd", dispatch.to(x.dtype), x)  # [B, E*p, D]
        rows = slots.reshape(B, E, p, D).transpose(0, 1).reshape(E * B * p, D)  # expert-major rows
        counts = torch.full((E,), B * p, dtype=torch.long, device=x.device)
        if self.ep_group is not None:
            y_rows = expert_parallel_forward(self.experts, rows, counts, self.ep_group)
        else:
            y_rows = self.experts(rows, counts)
        y_slots = y_rows.reshape(E, B, p, D).transpose(0, 1).reshape(B, E * p, D)
        out = torch.einsum("bts,bsd->btd", combine.to(y_slots.dtype), y_slots)
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        if not _in_backward():
            self.last_stats = self._soft_stats(dispatch.detach(), combine.detach(), mask, counts, t)
        return out

    @staticmethod
    def _soft_stats(dispatch: Tensor, combine: Tensor, mask: Tensor | None, counts: Tensor, task: int) -> LayerStats:
        tiny = torch.finfo(combine.dtype).tiny
        real = mask.reshape(-1) if mask is not None else torch.ones(combine.shape[0] * combine.shape[1],
                                                                     dtype=torch.bool, device=combine.device)
        c = combine.reshape(-1, combine.shape[-1])[real]  # [tokens, S]
        c_entropy = float(-(c * c.clamp_min(tiny).log()).sum(-1).mean()) if len(c) else 0.0
        d = dispatch.transpose(1, 2)  # [B, S, T]: a slot's weights over its sequence's tokens
        d_entropy = float(-(d * d.clamp_min(tiny).log()).sum(-1).mean())
        extra = {"combine_max": float(c.max(-1).values.mean()) if len(c) else 0.0, "combine_entropy": c_entropy,
                 "dispatch_max": float(d.max(-1).values.mean()), "dispatch_entropy": d_entropy}
        n = int(real.sum())
        s = LayerStats(tokens_per_expert=counts.detach().cpu(), kept_per_expert=counts.detach().cpu(),
                       dropped_frac=0.0, entropy=c_entropy, activation=1.0, num_rows=n, task=task, extra=extra)
        s.per_task = {task: dataclasses.replace(s)}
        return s

    # ------------------------------------------------------------------ internals
    def _task(self, task: int | None) -> int:
        if task is None:
            if self.cfg.num_tasks > 1:
                raise ValueError(f"this MoE has num_tasks={self.cfg.num_tasks} routers: pass task=0..{self.cfg.num_tasks - 1}")
            return 0
        if not 0 <= int(task) < self.cfg.num_tasks:
            raise ValueError(f"task={task} out of range for num_tasks={self.cfg.num_tasks}")
        return int(task)

    def _row_tasks(self, task, lead: torch.Size) -> tuple[Tensor | None, list[int]]:
        """``(row_task [T] or None, sorted task ids present)``; None when every row has the same task."""
        if not isinstance(task, Tensor) or task.dim() == 0:
            return None, [self._task(None if task is None else int(task))]
        if task.dtype == torch.bool or task.is_floating_point() or task.is_complex():
            raise ValueError(f"task ids must be an integer tensor, got {task.dtype}")
        if tuple(task.shape) != tuple(lead):
            raise ValueError(f"task ids must have the input's shape without its last dim {tuple(lead)}, "
                             f"got {tuple(task.shape)}")
        flat = task.reshape(-1).to(dtype=torch.long, device=self.task_top_k.device)
        tasks = torch.unique(flat).tolist()
        for t in tasks:
            self._task(t)  # range check
        if len(tasks) <= 1:  # one task (or no rows): the single-task path
            return None, tasks or [0]
        if self.cfg.heads > 1:
            flat = flat.repeat_interleave(self.cfg.heads)
        return flat, tasks

    def _route_tasks(self, h: Tensor, row_task: Tensor | None,
                     tasks: list[int]) -> tuple[Routing, list[tuple[int, Tensor | None, Routing]]]:
        """The routing of all rows and, per task present, ``(task, its rows or None = all, its routing)``."""
        if row_task is None:
            r = self._route_rows(h, tasks[0])
            return r, [(tasks[0], None, r)]
        parts = []
        for t in tasks:  # ascending task id: random draws in the order of separate calls
            rows = (row_task == t).nonzero().squeeze(1)
            parts.append((t, rows, self._route_rows(h.index_select(0, rows), t)))
        return _merge_routings(parts, h.shape[0]), parts

    def _route_rows(self, h: Tensor, task: int) -> Routing:
        cfg = self.cfg
        with torch.autocast(h.device.type, enabled=False):
            xr = h.float()
            if self.training and cfg.router_jitter > 0:
                xr = xr * torch.empty_like(xr).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
            bias = self.balance_bias[task] if self.balance_bias is not None else None
            return self.routers[task](xr, self.top_k(task), bias)

    def _dense_backprop(self, h: Tensor, r: Routing, plan: DispatchPlan, y_slots: Tensor | None,
                        groups: Tensor | None, update: DefaultUpdate | None = None) -> Tensor:
        cfg = self.cfg
        mode = cfg.dense_backprop
        T, E = r.probs.shape
        if mode == "dense_oracle":
            return dense_oracle_term(self.experts, h, r.probs)
        computed = computed_mask(plan, T, E)
        if mode == "default":
            # one EMA update per forward over every task's kept slots (class docstring)
            if update is not None:  # accumulated while the slots' outputs were computed
                update.apply(self.dp_group)
            return self.default.term(r.probs, computed)
        # expert_group: one table per task
        term = expert_group_term(y_slots, plan, r.probs, computed, cfg.group_k, self.dp_group,
                                 row_group=groups, num_groups=cfg.num_tasks if groups is not None else 1)
        return term if cfg.expert_group_mode == "forward" else term - term.detach()

    def _task_aux(self, r: Routing, task: int, counts: Tensor | None) -> dict[str, Tensor]:
        """The weighted aux terms of one task's routing (``counts``: its global slot counts)."""
        cfg = self.cfg
        aux: dict[str, Tensor] = {}
        if cfg.aux_loss_weight > 0 and cfg.balance_loss == "switch":
            aux["balance"] = cfg.aux_loss_weight * losses.switch_balance_loss(r, counts=counts)
        elif cfg.aux_loss_weight > 0 and cfg.balance_loss == "vmoe":
            aux["importance"] = cfg.aux_loss_weight * losses.importance_loss(r)
            aux["load"] = cfg.aux_loss_weight * losses.load_loss(r, self.top_k(task), cfg.router_noise_std)
        if cfg.z_loss_weight > 0:
            aux["z"] = cfg.z_loss_weight * losses.z_loss(r)
        return aux

    def _record(self, r: Routing, parts: list[tuple[int, Tensor | None, Routing]], plan: DispatchPlan,
                row_task: Tensor | None, keep: bool = True, collect: bool = True) -> None:
        """Aux losses, the aux-loss-free load and statistics of this forward. ``keep=False`` (an activation-
        checkpointing recomputation) computes the aux losses, so that the recomputation saves the same
        tensors for backward, and keeps nothing; ``collect`` adds the aux terms to the pending sum."""
        cfg = self.cfg
        E = cfg.num_experts
        with torch.no_grad():
            # [G, E] routed (before capacity) / kept slots per task (G = 1 for a single-task forward)
            if row_task is None:
                routed_g, kept_g = plan.routed.unsqueeze(0), plan.counts.unsqueeze(0)
            else:
                routed_g = losses.group_expert_counts(r.indices, row_task, cfg.num_tasks, E)
                kept_g = torch.bincount(row_task[plan.token] * E + plan.expert, minlength=cfg.num_tasks * E)
                kept_g = kept_g.view(cfg.num_tasks, E)
        per_task_aux: dict[int, dict[str, Tensor]] = {}
        if self.training or torch.is_grad_enabled():
            counts = None
            if cfg.aux_loss_weight > 0 and cfg.balance_loss == "switch":
                # every task's slot counts in one collective (same shape on every rank)
                if row_task is None:
                    counts = r.probs.new_zeros(cfg.num_tasks, E)
                    counts[parts[0][0]] = routed_g[0]
                else:
                    counts = routed_g.to(r.probs.dtype)
                counts = _all_reduce(counts, self.dp_group)
            per_task_aux = {t: self._task_aux(rt, t, None if counts is None else counts[t]) for t, _, rt in parts}
        if not keep:
            return
        aux: dict[str, Tensor] = {}
        for a in per_task_aux.values():
            for k, v in a.items():
                aux[k] = aux[k] + v if k in aux else v
        if collect and aux:
            self._aux.append(aux)
            if len(self._aux) > self.max_pending_aux:
                self._aux.pop(0)
                if not self._warned_pending:
                    self._warned_pending = True
                    warnings.warn(f"MoE: aux losses of more than max_pending_aux={self.max_pending_aux} training "
                                  "forwards were never collected; dropping the oldest (collect them with "
                                  "mmoe.aux_loss(model) or drop them with mmoe.layer.clear_aux(model))",
                                  stacklevel=3)
        with torch.no_grad():
            heads = cfg.heads
            T = r.probs.shape[0]
            if self.balance_load is not None and self.training:
                for t, _, _ in parts:
                    self.balance_load[t] += routed_g[t if row_task is not None else 0].float()
            p = r.probs.float()
            if cfg.score_func == "sigmoid":
                p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
            ent_rows = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [T]
            # the scale the routed experts' output gets: a little above k/E for raw softmax top-k at initialisation, 1 renormalised
            w_out = r.weights.detach().float()
            wsum_rows = (w_out if r.scale is None else w_out * r.scale.detach().float()).sum(-1)  # [T]
            n_tok = T // heads
            hit = torch.zeros(n_tok, E, dtype=torch.bool, device=plan.token.device)
            hit[plan.token // heads, plan.expert] = True
            act_tok = hit.float().sum(-1) / E  # [n_tok]

            def stats(g: int, rows: Tensor | None, task: int, a: dict[str, Tensor]) -> LayerStats:
                routed, kept = routed_g[g], kept_g[g]
                if rows is None:  # all rows: the plan's counts
                    dropped_frac = plan.num_dropped / max(plan.num_valid, 1)
                else:
                    n_routed = int(routed.sum())
                    dropped_frac = (n_routed - int(kept.sum())) / max(n_routed, 1)
                ent = ent_rows if rows is None else ent_rows[rows]
                wsum = wsum_rows if rows is None else wsum_rows[rows]
                act = act_tok if rows is None else act_tok[rows[::heads] // heads]
                return LayerStats(
                    tokens_per_expert=routed.detach(),
                    kept_per_expert=kept.detach(),
                    dropped_frac=dropped_frac,
                    entropy=float(ent.mean()) if ent.numel() else 0.0,
                    activation=float(act.mean()) if act.numel() else 0.0,
                    num_rows=int(ent.numel()),
                    task=task,
                    aux={k: float(v.detach()) for k, v in a.items()},
                    extra={"weight_sum": float(wsum.mean()) if wsum.numel() else 0.0},
                )

            if row_task is None:
                t = parts[0][0]
                s = stats(0, None, t, aux)
                s.per_task = {t: dataclasses.replace(s)}  # the same numbers (its own per_task stays empty)
            else:
                per = {t: stats(t, rows, t, per_task_aux.get(t, {})) for t, rows, _ in parts}
                s = LayerStats(
                    tokens_per_expert=routed_g.sum(0),
                    kept_per_expert=plan.counts.detach(),
                    dropped_frac=plan.num_dropped / max(plan.num_valid, 1),
                    entropy=float(ent_rows.mean()),
                    activation=float(act_tok.mean()) if n_tok else 0.0,
                    num_rows=T,
                    task=-1,
                    aux={k: float(v.detach()) for k, v in aux.items()},
                    per_task=per,
                    extra={"weight_sum": float(wsum_rows.mean()) if T else 0.0},
                )
            self.last_stats = s


def _merge_routings(parts: list[tuple[int, Tensor | None, Routing]], T: int) -> Routing:
    """One `Routing` over all T rows from each task's routing of its rows (``K`` = the largest; shorter rows
    padded with empty slots). Differentiable: out-of-place ``index_copy``."""
    K = max(r.indices.shape[1] for _, _, r in parts)
    r0 = parts[0][2]
    E = r0.probs.shape[1]
    idx = torch.full((T, K), -1, dtype=torch.long, device=r0.indices.device)
    w = r0.weights.new_zeros(T, K)
    probs, logits = r0.probs.new_zeros(T, E), r0.logits.new_zeros(T, E)
    scale = r0.weights.new_ones(T, K) if any(r.scale is not None for _, _, r in parts) else None
    bal = r0.probs.new_zeros(T, E) if any(r.balance_probs is not None for _, _, r in parts) else None
    clean = r0.logits.new_zeros(T, E) if any(r.clean_logits is not None for _, _, r in parts) else None
    for _, rows, r in parts:
        pad = (0, K - r.indices.shape[1])
        idx = idx.index_copy(0, rows, F.pad(r.indices, pad, value=-1))
        w = w.index_copy(0, rows, F.pad(r.weights, pad))
        probs = probs.index_copy(0, rows, r.probs)
        logits = logits.index_copy(0, rows, r.logits)
        if scale is not None:
            scale = scale.index_copy(0, rows, F.pad(r.scale, pad, value=1.0) if r.scale is not None
                                     else r.weights.new_ones(rows.numel(), K))
        if bal is not None:
            bal = bal.index_copy(0, rows, r.balance_probs if r.balance_probs is not None else r.probs)
        if clean is not None:
            clean = clean.index_copy(0, rows, r.clean_logits if r.clean_logits is not None else r.logits)
    return Routing(idx, w, probs, logits, scale=scale, balance_probs=bal, clean_logits=clean)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing recomputing a forward)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# ---------------------------------------------------------------------- model-level helpers
def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every `MoE` inside ``model`` (itself included), with its qualified name."""
    return [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> Tensor:
    """Weighted sum of every MoE layer's auxiliary losses over all forwards since the last collection, and
    clear them (a second call returns zero until the next training forward).

    Call it once per loss: ``loss = task_loss + mmoe.aux_loss(model)``; a loss that runs the model several
    times gets the aux terms of every run.
    """
    total = None
    for _, m in moe_layers(model):
        a = m.aux_loss()
        m.clear_aux()
        total = a if total is None else total + a
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def clear_aux(model: nn.Module) -> None:
    """Drop every MoE layer's pending aux losses (e.g. before a training step, so forwards that were never
    part of a loss cannot leak into it)."""
    for _, m in moe_layers(model):
        m.clear_aux()


def routing_stats(model: nn.Module) -> dict[str, LayerStats]:
    """Per MoE layer (by module name): routing statistics of its latest forward (per task in
    ``LayerStats.per_task``)."""
    return {name: m.last_stats for name, m in moe_layers(model) if m.last_stats is not None}


@contextlib.contextmanager
def no_stats(model: nn.Module):
    """Within the block, forwards of ``model``'s MoE layers outside training (no gradient, not ``train()``)
    compute no routing statistics and leave `routing_stats` as it was: for decoding, where a one-token
    forward would otherwise spend a third of its time on them. Training forwards are unaffected."""
    layers = [m for _, m in moe_layers(model)]
    before = [m.record_stats for m in layers]
    for m in layers:
        m.record_stats = False
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.record_stats = b


def set_grad_buffers(model: nn.Module, enabled: bool | None) -> int:
    """Persistent expert weight-gradient buffers (`mmoe.experts`) of every MoE layer in ``model``: None = on
    for CPU tensors (the default), True / False force it; the loop path's activation workspaces follow unless
    ``Experts.reuse_act_buffers`` is set. The buffers and workspaces held so far are freed either way (a
    gradient still in ``.grad`` stays valid); returns the number of layers set."""
    layers = moe_layers(model)
    for _, m in layers:
        m.experts.reuse_grad_buffers = enabled
        m.experts._grad_buffers.clear()
    if layers:
        SHARED_WORKSPACES.clear()
    return len(layers)


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
