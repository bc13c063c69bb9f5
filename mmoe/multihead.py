"""MH-MoE sizing helpers (methods.md §2.3): build an MH-MoE config matched to a baseline config.

The MH-MoE layer adds a head and a merge projection (``2 D^2`` parameters and multiply-adds per token)
and routes ``h`` sub-tokens of width ``D/h``. Its gains depend on what is held equal:

- ``match="flops"`` (MH-MoE v2 regime, arXiv 2411.16205): each sub-token takes ``k_mh = h * k``
  experts; the expert width solves FLOP parity
  ``n_mat * k_mh * D * d_mh + 2 D^2 = n_mat * k * D * d_moe``, and the expert count solves parameter
  parity ``n_mat * E_mh * (D/h) * d_mh + 2 D^2 = n_mat * E * D * d_moe``, rounded to the nearest
  multiple of ``experts_multiple_of``. Reproduces the paper's configs (D=768, SwiGLU d_moe=2048, E=8,
  k=1: h=2 -> d_mh=768, k=2, E=40; h=3 -> d_mh=512, k=3, E=96).
- ``match="params"`` (v1 / NeurIPS regime): same E and k; the expert width solves parameter parity, so
  every sub-token pays a (nearly) full-size expert and FLOPs grow about h-fold.

``n_mat`` is 3 for SwiGLU experts and 2 for GELU MLPs.
"""

from __future__ import annotations

from typing import Literal

from .config import MoEConfig


def _n_mat(cfg: MoEConfig) -> int:
    return 3 if cfg.activation == "swiglu" else 2


def mh_moe_config(base: MoEConfig, heads: int, match: Literal["flops", "params"] = "flops",
                  experts_multiple_of: int = 8, **overrides) -> MoEConfig:
    """An MH-MoE config with ``heads`` sub-tokens matched to ``base`` (a heads=1 config)."""
    if base.heads != 1:
        raise ValueError(f"mh_moe_config: base.heads must be 1, got {base.heads}")
    if heads < 1 or base.dim % heads:
        raise ValueError(f"mh_moe_config: heads={heads} must divide dim={base.dim}")
    D, n, k, E, d_moe = base.dim, _n_mat(base), base.top_k, base.num_experts, base.hidden
    extra = 2 * D * D if heads > 1 else 0
    if match == "flops":
        k_mh = heads * k
        d_mh = round((n * k * D * d_moe - extra) / (n * k_mh * D))
        if d_mh < 1:
            raise ValueError(f"mh_moe_config: no positive expert width matches the FLOPs (heads={heads}: the head "
                             f"and merge projections ({extra} multiply-adds per token) cost as much as the experts)")
        e_exact = (n * E * D * d_moe - extra) / (n * (D // heads) * d_mh)
        m = max(1, experts_multiple_of)
        E_mh = max(m, int(round(e_exact / m)) * m)
        E_mh = max(E_mh, k_mh)
    elif match == "params":
        k_mh, E_mh = k, E
        d_mh = round((n * E * D * d_moe - extra) / (n * E * (D // heads)))
    else:
        raise ValueError(f"mh_moe_config: match must be 'flops' or 'params', got {match!r}")
    if d_mh < 1:
        raise ValueError(f"mh_moe_config: no positive expert width matches (heads={heads} too large for dim={D})")
    return base.replace(heads=heads, top_k=k_mh, num_experts=E_mh, expert_hidden=d_mh, **overrides)


def moe_cost(cfg: MoEConfig) -> dict[str, int]:
    """Leading-term parameters and multiply-adds per token of one layer (router excluded)."""
    n, D, dh = _n_mat(cfg), cfg.dim, cfg.expert_dim
    extra = 2 * D * D if cfg.heads > 1 and cfg.head_projections else 0
    params = n * cfg.num_experts * dh * cfg.hidden + extra
    macs = n * cfg.top_k * cfg.heads * dh * cfg.hidden + extra
    if cfg.shared_experts:
        params += n * D * cfg.shared_experts * cfg.hidden * cfg.heads
        macs += n * D * cfg.shared_experts * cfg.hidden * cfg.heads
    return {"params": params, "macs_per_token": macs}
