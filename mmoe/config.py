"""`MoEConfig`: every option of the one MoE layer, validated at construction; and the "MoE in a model"
helpers every model family uses: `moe_config_from_section` (a config section -> `MoEConfig`, errors keep
``file:line``) and `moe_block_indices` (which blocks get an MoE).

Field names are public API (see DESIGN.md). Each option is orthogonal to the others: any router x
dispatch x heads x dense-backprop estimator x tasks composes. Contradictions raise `ValueError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = ["MoEConfig", "moe_config_from_section", "moe_block_indices", "PLACEMENT_FORMS"]

RouterName = Literal["softmax", "xmoe", "sparsemixer", "expert_choice", "soft"]
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
            (SparseMixer-v2 / GRIN sampling with its gradient estimator), ``"expert_choice"``, or
            ``"soft"``: Soft MoE (Puigcerver et al., ICLR 2024; vmoe ``soft_moe``): per sequence, every
            expert takes ``soft_slots`` slots, each a softmax-over-tokens mix of the sequence, and every
            token's output is a softmax-over-slots mix of the slot outputs; nothing is dropped, there is
            no top-k and no aux loss. Needs inputs ``[B, T, dim]`` (one sequence per row), mixes tokens
            within a sequence (not for causal models), takes ``mask=`` for padding.
        soft_slots: slots per expert of the soft router (the paper: 1).
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
    soft_slots: int = 1
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
        if not isinstance(self.soft_slots, int) or isinstance(self.soft_slots, bool) or self.soft_slots < 1:
            raise bad("soft_slots", "must be a positive integer")
        if self.router == "soft":
            # Soft MoE has no top-k choice, no capacity and no balance loss; these options have no meaning
            for name, off, why in (
                    ("heads", 1, "MH-MoE sub-tokens are not supported with the soft router"),
                    ("dense_backprop", "none", "soft routing is dense already (every slot mixes every token)"),
                    ("capacity_factor", None, "the soft router's capacity is soft_slots per expert"),
                    ("batch_prioritized", False, "nothing is dropped by the soft router"),
                    ("router_jitter", 0.0, "not defined for the soft router"),
                    ("shared_experts", 0, "not supported with the soft router"),
                    ("z_loss_weight", 0.0, "the soft router has no aux losses")):
                if getattr(self, name) != off:
                    raise bad(name, f"{why} (router='soft')")
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


# ---------------------------------------------------------------------------------------------- MoE in a model
# What every model family needs to put MoE layers into a model: the `MoEConfig` of its ``moe:`` config
# section and the indices of the blocks that get one. Errors are `mmoe.errors.ConfigError` with an empty
# origin and a key relative to the calling section: raised inside a section's ``__post_init__``, the
# config loader (`mmoe.train.configfile`) prefixes the section's key path and the ``file:line``.

PLACEMENT_FORMS = "'every_<n>', 'last_<n>', 'last_half', 'all', 'none' or a list of block indices"


def _config_error(key: str, problem: str) -> Exception:
    from .errors import ConfigError  # light module; imported here so config.py stays importable alone

    return ConfigError("", key, problem)


def _fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` (from YAML) fits the `MoEConfig` field type ``tp`` (int/float/bool/str/None/Literal
    and unions of them); an int fits a float, a bool is never a number."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_fits(a, value) for a in get_args(tp))
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(tp, type) and isinstance(value, tp)


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    names = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}
    return names.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _is_float(tp: Any) -> bool:
    return tp is float or (get_origin(tp) in (Union, types.UnionType) and float in get_args(tp))


def moe_config_from_section(section: Mapping[str, Any] | None, *, dim: int, key: str = "moe",
                            mlp_hidden: int | None = None, defaults: Mapping[str, Any] | None = None,
                            **fixed: Any) -> MoEConfig:
    """The `MoEConfig` of a model's ``moe:`` config section (a plain mapping, e.g. from YAML).

    Args:
        section: `MoEConfig` fields; ``None`` = all defaults. A ``dim`` in it must equal ``dim``.
        dim: the model width: the model sets it.
        key: key of the section relative to the calling config section, used in errors (``"moe"``).
        mlp_hidden: the width of the dense MLP an MoE layer replaces: ``expert_hidden`` defaults (also
            when given as ``null``) to ``mlp_hidden // heads``, an expert as wide as that MLP split over
            the MH-MoE sub-tokens. ``None``: `MoEConfig`'s own default (``4 * dim // heads``).
        defaults: the model's defaults for fields the section leaves out (e.g. ``activation``).
        **fixed: more fields the model sets, like ``dim``: a different value in the section is an error.

    Raises:
        mmoe.errors.ConfigError: with an empty origin and the key ``f"{key}.{field}"`` (``key`` for a
            section that is not a mapping): an unknown field (with a "did you mean" suggestion), a value
            of the wrong type, a field that the model sets, or `MoEConfig`'s own validation error.
    """
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise _config_error(key, f"expected a mapping of MoEConfig fields, got {section!r} ({type(section).__name__})")
    hints = _field_types()
    for name in section:
        if name not in hints:
            close = difflib.get_close_matches(str(name), list(hints), n=3, cutoff=0.6)
            hint = ("did you mean " + " or ".join(repr(c) for c in close) + "?") if close else \
                "valid keys: " + ", ".join(hints)
            raise _config_error(f"{key}.{name}", f"unknown MoEConfig field ({hint})")
    values: dict[str, Any] = {}
    for name, value in section.items():
        tp = hints[name]
        if not _fits(tp, value):
            raise _config_error(f"{key}.{name}", f"expected {_describe(tp)}, got {value!r} ({type(value).__name__})")
        if _is_float(tp) and isinstance(value, int):
            value = float(value)
        values[name] = value
    for name, value in {"dim": dim, **fixed}.items():
        if name not in hints:
            raise TypeError(f"moe_config_from_section: {name!r} is not a MoEConfig field")
        if name in values and values[name] != value:
            raise _config_error(f"{key}.{name}", f"set by the model to {value!r}; leave it out (got {values[name]!r})")
        values[name] = value
    for name, value in (defaults or {}).items():
        values.setdefault(name, value)
    if mlp_hidden is not None and values.get("expert_hidden") is None:
        heads = values.get("heads", 1)
        values["expert_hidden"] = max(1, int(mlp_hidden) // heads) if isinstance(heads, int) and heads >= 1 else None
    try:
        return MoEConfig(**values)
    except ValueError as err:
        m = re.match(r"^MoEConfig\.(\w+): (.*)$", str(err), re.S)
        if m is None:
            raise _config_error(key, str(err)) from None
        raise _config_error(f"{key}.{m.group(1)}", m.group(2)) from None


def moe_block_indices(spec: str | Sequence[int], depth: int, *, first_dense: int = 0,
                      key: str = "moe_layers") -> list[int]:
    """0-based indices of the blocks (of ``depth``) whose MLP / FFN is an MoE layer.

    ``spec`` (V-MoE's names, methods.md §5):

    * ``"every_<n>"``: blocks ``i >= first_dense`` with ``(i - first_dense + 1) % n == 0``; ``"every_2"``
      is 1, 3, 5, ... (V-MoE "Every 2", GShard / Switch "every other layer"), ``"every_1"`` every block;
    * ``"last_<n>"``: the last ``n`` blocks of the ``"every_2"`` placement (V-MoE "Last n");
    * ``"last_half"``: the contiguous second half of the blocks, ``depth // 2 .. depth - 1`` (Soft MoE's
      placement: "MoE layers in the last half of the network");
    * ``"all"`` (blocks ``>= first_dense``), ``"none"``;
    * a list of block indices: each in ``[first_dense, depth)``, no duplicates (returned sorted).

    ``first_dense`` leading blocks stay dense (Default MoE, DeepSeek-MoE keep block 0 dense).

    Raises:
        mmoe.errors.ConfigError: (a ``ValueError``; empty origin, key ``key``) naming the spec and the
            valid forms.
    """
    def bad(problem: str) -> Exception:
        return _config_error(key, f"{problem} (got {spec!r}, depth={depth}, first_dense={first_dense}); "
                                  f"use {PLACEMENT_FORMS}")

    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise TypeError(f"moe_block_indices: depth must be an int >= 0, got {depth!r}")
    if not isinstance(first_dense, int) or isinstance(first_dense, bool) or not 0 <= first_dense <= depth:
        raise _config_error("first_dense", f"must be an int in [0, depth={depth}] (got {first_dense!r})")
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "none":
            return []
        if s == "all":
            return list(range(first_dense, depth))
        if s == "last_half":
            return list(range(max(first_dense, depth // 2), depth))
        m = re.fullmatch(r"(every|last)_(\d+)", s)
        if m is None:
            raise bad("unknown placement")
        n = int(m.group(2))
        if n < 1:
            raise bad(f"{m.group(1)}_<n> needs n >= 1")
        if m.group(1) == "every":
            return [i for i in range(first_dense, depth) if (i - first_dense + 1) % n == 0]
        every_2 = moe_block_indices("every_2", depth, first_dense=first_dense, key=key)
        if n > len(every_2):
            raise bad(f"last_<n> needs n <= {len(every_2)}, the blocks of 'every_2'")
        return every_2[-n:]
    if not isinstance(spec, Sequence) or any(not isinstance(i, int) or isinstance(i, bool) for i in spec):
        raise bad("expected a placement string or a list of int block indices")
    if len(set(spec)) != len(spec):
        raise bad("duplicate block indices")
    if any(not first_dense <= i < depth for i in spec):
        raise bad(f"block indices must be in [{first_dense}, {depth})")
    return sorted(spec)


_FIELD_TYPES: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    """`MoEConfig`'s init fields and their resolved types (cached)."""
    if not _FIELD_TYPES:
        hints = get_type_hints(MoEConfig)
        _FIELD_TYPES.update({f.name: hints[f.name] for f in dataclasses.fields(MoEConfig) if f.init})
    return _FIELD_TYPES
