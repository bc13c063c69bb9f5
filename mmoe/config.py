"""`MoEConfig`: every option of the one MoE layer, validated at construction.

Field names are public API (see DESIGN.md). Each option is orthogonal to the others: any router x
dispatch x heads x dense-backprop estimator x tasks composes. Contradictions raise `ValueError`
naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

RouterName = Literal["softmax", "xmoe", "sparsemixer", "expert_choice"]
DenseBackprop = Literal["none", "default", "expert_group", "dense_oracle"]
Activation = Literal["gelu", "swiglu"]
ScoreFunc = Literal["softmax", "sigmoid"]
BalanceLoss = Literal["switch", "vmoe", "none"]
XMoEVariant = Literal["paper", "torchscale"]
ExpertGroupMode = Literal["forward", "backward"]
GroupedMM = Literal["auto", "grouped", "padded", "loop"]


@dataclass
class MoEConfig:
    """Configuration of one `mmoe.MoE` layer.

    Sizes
        dim: model width (input and output of the layer).
        num_experts: routed experts E.
        top_k: experts per token (per sub-token when ``heads > 1``). For ``expert_choice`` it is the
            average number of experts per token, i.e. each expert takes ``capacity_factor*T*top_k/E``
            tokens.
        expert_hidden: hidden width of one expert (default ``4 * dim // heads``).
        activation: ``"gelu"`` MLP (fc1-GELU-fc2, the ViT/timm MLP) or ``"swiglu"``.
        expert_bias: biases in the expert MLPs (needed to upcycle timm MLPs).
        shared_experts: number of always-on experts applied to every token (DeepSeek/Qwen style);
            implemented as one dense MLP of width ``shared_experts * expert_hidden * heads``.

    Router
        router: ``"softmax"`` top-k, ``"xmoe"`` (low-dim cosine router), ``"sparsemixer"``
            (SparseMixer-v2 / GRIN sampling with its gradient estimator), ``"expert_choice"``.
        score_func: ``"softmax"`` or ``"sigmoid"`` scores for the top-k routers (softmax / xmoe).
        normalize_topk: renormalise the selected weights of a token to sum to 1. Off by default (V-MoE,
            Default MoE, GRIN use raw probabilities); turn on for upcycling (methods.md §7).
        router_jitter: Switch-style multiplicative input jitter eps (x * U(1-eps, 1+eps)), training only.
        router_noise_std: V-MoE additive Gaussian logit noise std, training only (V-MoE uses 1/E).
        xmoe_dim: X-MoE routing dimension (paper and torchscale: 16).
        xmoe_variant: ``"paper"`` (both sides L2-normalised, learnable temperature, balance loss at the
            fixed initial temperature) or ``"torchscale"`` (token side not normalised, no temperature).
        xmoe_temperature: initial temperature tau0 (paper: 0.3 softmax gate, 0.07 sigmoid gate).
        sparsemixer_eps: SparseMixer mask tolerance eps (keep expert i iff (z*-z_i)/max(|z_i|,z*) <= 2 eps).
        balance_bias_rate: aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores
            for selection only, nudged by ``rate * sign(mean_load - load)`` by
            `mmoe.update_balance_bias` after each optimizer step. 0 disables.
        num_tasks: number of task-specific routers over one shared expert pool (AdaMV-MoE); the
            forward takes ``task=``.

    Dispatch
        capacity_factor: ``None`` = dropless (default); else each expert takes at most
            ``ceil(capacity_factor * T * top_k / E)`` slots, top-1 choices placed before top-2.
        eval_capacity_factor: capacity factor in eval mode (``None`` = same as training).
        batch_prioritized: V-MoE batch-prioritized routing: tokens with a higher max routing weight are
            placed first, so low-confidence tokens are the ones dropped.
        grouped_mm: expert compute: ``"grouped"`` (torch grouped GEMM), ``"padded"`` (rows padded to
            the largest expert count, one batched GEMM), ``"loop"`` (one GEMM per non-empty expert,
            written in place, forward and backward), or ``"auto"``: on CPU padded when the counts are
            equal within 2%, else loop; on CUDA grouped where this torch supports it, else loop.

    Multi-head (MH-MoE)
        heads: split every token into ``heads`` sub-tokens of width ``dim // heads`` after a head
            projection, route and compute sub-tokens, merge them and apply a merge projection.
        head_projections: use the head and merge linear layers (the MH-MoE ablation turns them off).

    Dense backprop
        dense_backprop: ``"none"``; ``"default"`` (Default MoE EMA default outputs); ``"expert_group"``
            (expert-group approximation, pairwise table); ``"dense_oracle"`` (sparse forward value,
            exact dense router gradient; computes every expert, for experiments).
        default_beta: EMA decay of the default vectors.
        default_weighted: probability-weighted EMA update (methods.md §1.3 reading (a)).
        expert_group_k: experts per token used to group tokens (default ``max(top_k, 2)``; with 1 the
            table only relates an expert to itself and the approximation is zero).
        expert_group_mode: ``"forward"`` (y + y') or ``"backward"`` (y + y' - sg(y'), forward unchanged).

    Losses
        balance_loss: ``"switch"`` (GShard/Switch ``E * sum_e f_e P_e``), ``"vmoe"`` (importance + load
            losses, needs ``router_noise_std > 0``) or ``"none"``.
        aux_loss_weight: weight of the balance loss (each V-MoE term gets this weight).
        z_loss_weight: weight of the router z-loss ``mean(logsumexp(logits)^2)``.
        check_finite: raise a clear error when router logits are not finite.
    """

    dim: int
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None
    activation: Activation = "gelu"
    expert_bias: bool = True
    shared_experts: int = 0

    router: RouterName = "softmax"
    score_func: ScoreFunc = "softmax"
    normalize_topk: bool = False
    router_jitter: float = 0.0
    router_noise_std: float = 0.0
    xmoe_dim: int = 16
    xmoe_variant: XMoEVariant = "paper"
    xmoe_temperature: float = 0.3
    sparsemixer_eps: float = 0.1
    balance_bias_rate: float = 0.0
    num_tasks: int = 1

    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    batch_prioritized: bool = False
    grouped_mm: GroupedMM = "auto"

    heads: int = 1
    head_projections: bool = True

    dense_backprop: DenseBackprop = "none"
    default_beta: float = 0.9
    default_weighted: bool = False
    expert_group_k: int | None = None
    expert_group_mode: ExpertGroupMode = "forward"

    balance_loss: BalanceLoss = "switch"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def expert_dim(self) -> int:
        """Width of the rows an expert sees: ``dim // heads``."""
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else 4 * self.expert_dim

    @property
    def group_k(self) -> int:
        # with top-1 routing a group of one expert holds only the token's own expert: use pairs
        return self.expert_group_k if self.expert_group_k is not None else min(max(2, self.top_k), self.num_experts)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"MoEConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for f in dataclasses.fields(self):
            hint = f.type if isinstance(f.type, str) else str(f.type)
            lit = _LITERALS.get(hint)
            if lit is not None and getattr(self, f.name) not in lit:
                raise bad(f.name, f"must be one of {list(lit)}")
        for name in ("dim", "num_experts", "top_k", "heads", "num_tasks", "xmoe_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        if self.expert_hidden is not None and (not isinstance(self.expert_hidden, int) or self.expert_hidden < 1):
            raise bad("expert_hidden", "must be a positive integer or None")
        if self.shared_experts < 0:
            raise bad("shared_experts", "must be >= 0")
        if self.dim % self.heads != 0:
            raise bad("heads", f"dim={self.dim} is not divisible by heads")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"must be <= num_experts={self.num_experts}")
        if self.router == "expert_choice":
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                raise bad("capacity_factor", "must be > 0")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v <= 0):
                raise bad(name, "must be None (dropless) or > 0")
        if self.eval_capacity_factor is not None and self.capacity_factor is None and self.router != "expert_choice":
            raise bad("eval_capacity_factor", "needs capacity_factor (dropless training has no capacity)")
        if self.batch_prioritized and self.capacity_factor is None:
            raise bad("batch_prioritized", "only applies in capacity mode (set capacity_factor)")
        for name in ("router_jitter", "router_noise_std", "aux_loss_weight", "z_loss_weight", "balance_bias_rate"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not 0.0 <= self.router_jitter < 1.0:
            raise bad("router_jitter", "must be in [0, 1)")
        if not 0.0 <= self.default_beta < 1.0:
            raise bad("default_beta", "must be in [0, 1)")
        if self.sparsemixer_eps <= 0:
            raise bad("sparsemixer_eps", "must be > 0")
        if self.xmoe_temperature <= 0:
            raise bad("xmoe_temperature", "must be > 0")
        if self.balance_loss == "vmoe" and self.router_noise_std <= 0:
            raise bad("balance_loss", "'vmoe' load loss needs router_noise_std > 0 (V-MoE uses 1/num_experts)")
        if self.score_func == "sigmoid" and self.router not in ("softmax", "xmoe"):
            raise bad("score_func", f"sigmoid scores apply to the top-k routers, not router={self.router!r}")
        if self.balance_bias_rate > 0 and self.router not in ("softmax", "xmoe"):
            raise bad("balance_bias_rate", f"aux-loss-free bias applies to top-k routers, not router={self.router!r}")
        if self.expert_group_k is not None and not 1 <= self.expert_group_k <= self.num_experts:
            raise bad("expert_group_k", f"must be in [1, num_experts={self.num_experts}]")

    def replace(self, **changes) -> "MoEConfig":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"MoEConfig has no field(s) {sorted(unknown)}; valid: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)


_LITERALS = {
    name: get_args(alias)
    for name, alias in {
        "RouterName": RouterName,
        "DenseBackprop": DenseBackprop,
        "Activation": Activation,
        "ScoreFunc": ScoreFunc,
        "BalanceLoss": BalanceLoss,
        "XMoEVariant": XMoEVariant,
        "ExpertGroupMode": ExpertGroupMode,
        "GroupedMM": GroupedMM,
    }.items()
}
