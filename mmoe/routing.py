"""Routers: map token rows ``x_TD`` to a `Routing` (which experts, with which weights).

Shape legend: T tokens (sub-tokens when the layer has heads), D router input width, E experts,
K slots per token.

Every router runs in fp32 with autocast disabled (router math is precision-sensitive).
A token slot with index ``-1`` is empty (expert choice gives tokens a variable number of experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig


@dataclass
class Routing:
    """The routing decision for T rows.

    Attributes:
        indices: ``[T, K]`` int64 expert ids; ``-1`` marks an empty slot.
        weights: ``[T, K]`` combine weights (0 for empty slots), differentiable w.r.t. the router.
        probs: ``[T, E]`` full score distribution (softmax, or sigmoid scores).
        logits: ``[T, E]`` router logits (noisy in training when router noise is on).
        scale: optional ``[T, K]`` forward-only multiplier of a slot's output (SparseMixer-v2): the
            output value is ``scale * weight * expert(x)`` while gradients are those of
            ``weight * expert(x)``.
        balance_probs: probabilities the balance loss uses (X-MoE paper: softmax at the fixed tau0);
            ``None`` means ``probs``.
        clean_logits: logits before additive noise (V-MoE load loss); ``None`` means ``logits``.
    """

    indices: Tensor
    weights: Tensor
    probs: Tensor
    logits: Tensor
    scale: Tensor | None = None
    balance_probs: Tensor | None = None
    clean_logits: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]


def _normalize(weights: Tensor, valid: Tensor) -> Tensor:
    w = weights * valid
    return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


class TopKRouter(nn.Module):
    """Token-choice top-k router with softmax (GShard/Switch/V-MoE) or sigmoid (DeepSeek-V3) scores.

    Scores ``s = softmax(Wx)`` (or ``sigmoid``); a token picks the k experts with the largest
    ``s + bias`` (the aux-loss-free ``bias`` changes selection only); its weights are ``s`` of the
    picked experts, raw or renormalised (``normalize_topk``).
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        nn.init.normal_(self.weight, std=0.02)

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits ``[T, E]`` and (paper X-MoE only) the balance-loss logits."""
        return x @ self.weight.float().t(), None

    def forward(self, x: Tensor, top_k: int, bias: Tensor | None = None) -> Routing:
        cfg = self.cfg
        logits, balance_logits = self.scores(x)
        clean = None
        if self.training and cfg.router_noise_std > 0:
            clean = logits
            logits = logits + torch.randn_like(logits) * cfg.router_noise_std
        _check_finite(logits, cfg)
        if cfg.score_func == "sigmoid":
            probs = torch.sigmoid(logits)
        else:
            probs = logits.softmax(-1)
        select = probs if bias is None else probs + bias
        idx = select.topk(top_k, dim=-1).indices
        w = probs.gather(-1, idx)
        if cfg.normalize_topk:
            w = w / w.sum(-1, keepdim=True)
        bal = None
        if balance_logits is not None:
            bal = torch.sigmoid(balance_logits) if cfg.score_func == "sigmoid" else balance_logits.softmax(-1)
        elif cfg.score_func == "sigmoid":
            bal = probs / probs.sum(-1, keepdim=True)
        return Routing(idx, w, probs, logits, balance_probs=bal, clean_logits=clean)


class XMoERouter(TopKRouter):
    """X-MoE low-dimensional cosine router (Chi et al. 2022).

    ``variant="paper"`` (default): project the token to ``xmoe_dim`` dims, L2-normalise it and the
    expert embeddings, divide the cosine by a learnable temperature (parametrised as log tau, init
    ``xmoe_temperature``); the balance loss uses the fixed initial temperature, as in the paper.
    ``variant="torchscale"``: torchscale's released gate: the projected token is *not* normalised and
    there is no temperature (expert embeddings normalised, orthogonal init with gain 0.32).
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        nn.Module.__init__(self)
        self.cfg = cfg
        self.proj = nn.Linear(dim, cfg.xmoe_dim, bias=False)
        self.expert_emb = nn.Parameter(torch.empty(cfg.num_experts, cfg.xmoe_dim))
        nn.init.orthogonal_(self.expert_emb, gain=0.32)
        if cfg.xmoe_variant == "paper":
            # shape [1], not a 0-dim tensor: DeepSpeed's flattening of parameters cannot view 0-dim tensors
            self.log_tau = nn.Parameter(torch.full((1,), math.log(cfg.xmoe_temperature)))
        else:
            self.register_parameter("log_tau", None)

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = x @ self.proj.weight.float().t()
        e = F.normalize(self.expert_emb.float(), dim=-1)
        if self.cfg.xmoe_variant == "torchscale":
            return h @ e.t(), None
        cos = F.normalize(h, dim=-1) @ e.t()
        return cos / self.log_tau.float().exp(), cos / self.cfg.xmoe_temperature


class SparseMixerRouter(TopKRouter):
    """SparseMixer-v2 (GRIN) router.

    Training: for each of the k slots, mask experts whose logit is far from the max
    (``(z* - z_i) / max(|z_i|, z*) > 2 eps``), sample ``D ~ softmax(masked z)`` (Gumbel-max), then
    remove D and repeat (sampling without replacement). The slot weight is ``p_D`` of the masked
    softmax; its gradient w.r.t. the logits is ``p_D (1_D - p)`` (GRIN's estimator, exact autograd of
    ``p_D``). The forward output of the slot is scaled by 1 if D is the argmax or with probability 1/4,
    else by 1/3, with gradients as if unscaled (`Routing.scale`). Eval: ``D = argmax`` and scale 1.
    """

    def forward(self, x: Tensor, top_k: int, bias: Tensor | None = None) -> Routing:
        cfg = self.cfg
        logits, _ = self.scores(x)
        _check_finite(logits, cfg)
        probs = logits.softmax(-1)
        remaining = logits
        idx, w, scale = [], [], []
        neg_inf = torch.finfo(logits.dtype).min
        for _ in range(top_k):
            zmax = remaining.max(-1, keepdim=True).values
            factor = remaining.abs().clamp(min=zmax).clamp_min(1e-12)
            keep = (zmax - remaining) / factor <= 2 * cfg.sparsemixer_eps
            masked = remaining.masked_fill(~keep, neg_inf)
            p = masked.softmax(-1)
            top = remaining.argmax(-1, keepdim=True)
            if self.training:
                gumbel = -torch.empty_like(masked).exponential_().log()
                d = (masked.detach() + gumbel).masked_fill(~keep, neg_inf).argmax(-1, keepdim=True)
                lucky = torch.rand(d.shape, device=d.device) > 0.75
                c = torch.where((d == top) | lucky, 1.0, 1.0 / 3.0)
            else:
                d = top
                c = torch.ones(d.shape, device=d.device)
            idx.append(d)
            w.append(p.gather(-1, d))
            scale.append(c)
            remaining = remaining.scatter(-1, d, neg_inf)
        idx_t, w_t, c_t = torch.cat(idx, -1), torch.cat(w, -1), torch.cat(scale, -1)
        if cfg.normalize_topk:
            w_t = w_t / w_t.sum(-1, keepdim=True)
        return Routing(idx_t, w_t, probs, logits, scale=c_t if self.training else None)


class ExpertChoiceRouter(TopKRouter):
    """Expert-choice routing (Zhou et al. 2022; V-MoE `NoisyTopItemsPerExpertRouter`).

    Scores ``softmax(Wx)`` over experts; each expert takes its ``C = ceil(cf * T * k / E)`` highest-
    scoring tokens (cf = capacity_factor, 1 when unset), weight = the score. A token can get 0..E
    experts. Not causal: for decoders use token choice.
    """

    def forward(self, x: Tensor, top_k: int, bias: Tensor | None = None) -> Routing:
        cfg = self.cfg
        logits, _ = self.scores(x)
        if self.training and cfg.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * cfg.router_noise_std
        _check_finite(logits, cfg)
        probs = logits.softmax(-1)
        T, E = probs.shape
        cf = self.capacity_factor()
        C = min(T, max(1, math.ceil(cf * T * top_k / E)))
        tok = probs.t().topk(C, dim=-1).indices  # [E, C]
        exp_ids = torch.arange(E, device=x.device).unsqueeze(1).expand(E, C)
        return expert_lists_to_routing(tok.reshape(-1), exp_ids.reshape(-1), probs, logits, cfg.normalize_topk)

    def capacity_factor(self) -> float:
        cfg = self.cfg
        if not self.training and cfg.eval_capacity_factor is not None:
            return cfg.eval_capacity_factor
        return cfg.capacity_factor if cfg.capacity_factor is not None else 1.0


def expert_lists_to_routing(tok: Tensor, exp: Tensor, probs: Tensor, logits: Tensor, normalize: bool) -> Routing:
    """Turn flat (token, expert) choices into the token-major ``[T, K]`` form, K = max experts per token."""
    T = probs.shape[0]
    order = torch.argsort(tok * probs.shape[1] + exp)  # by token, then expert id
    tok, exp = tok[order], exp[order]
    counts = torch.bincount(tok, minlength=T)
    K = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(tok.numel(), device=tok.device) - starts[tok]
    idx = torch.full((T, K), -1, dtype=torch.long, device=tok.device)
    idx[tok, col] = exp
    valid = idx >= 0
    w = probs.gather(-1, idx.clamp_min(0)) * valid
    if normalize:
        w = _normalize(w, valid)
    return Routing(idx, w, probs, logits)


class SoftRouter(nn.Module):
    """Soft MoE's slot parameters (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", ICLR 2024;
    vmoe ``projects/soft_moe/router.py``; dense-vision.md §6).

    ``phi [D, E * p]`` (``p = soft_slots``) and a learned scalar ``scale`` (init 1). For one sequence
    ``x [T, D]``: ``logits = scale * normalize(x) @ normalize(phi)`` (both L2-normalised over ``D``, eps 1e-6, as
    vmoe's ``normalize_router_params``), ``[T, E * p]``; `weights` turns them into the dispatch weights
    (softmax over the tokens of a sequence, padding excluded) and the combine weights (softmax over all
    slots of a token). Runs in fp32. Optional V-MoE logit noise (``router_noise_std``) in training.
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_slots = cfg.num_experts * cfg.soft_slots
        self.phi = nn.Parameter(torch.randn(dim, self.num_slots) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.ones(1))

    def logits(self, x: Tensor) -> Tensor:
        """``x [B, T, D]`` -> slot logits ``[B, T, E * p]`` (fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            xn = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
            phi = self.phi.float()
            pn = phi * torch.rsqrt(phi.pow(2).sum(0, keepdim=True) + 1e-6)
            logits = self.scale.float() * (xn @ pn)
            if self.training and self.cfg.router_noise_std > 0:
                logits = logits + torch.randn_like(logits) * self.cfg.router_noise_std
        _check_finite(logits.reshape(-1, self.num_slots), self.cfg)
        return logits

    @staticmethod
    def weights(logits: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Dispatch ``[B, T, S]`` (softmax over ``T``; padded tokens get 0) and combine ``[B, T, S]``
        (softmax over ``S``) weights of ``logits [B, T, S]``; ``mask [B, T]`` True = a real token."""
        if mask is not None:
            dispatch_logits = logits.masked_fill(~mask[..., None], float("-inf"))
        else:
            dispatch_logits = logits
        dispatch = torch.softmax(dispatch_logits, dim=1)
        if mask is not None:  # a sequence without real tokens: no slot input at all (not NaN)
            dispatch = torch.nan_to_num(dispatch, nan=0.0)
        combine = torch.softmax(logits, dim=2)
        return dispatch, combine


ROUTERS: dict[str, type[TopKRouter]] = {
    "softmax": TopKRouter,
    "xmoe": XMoERouter,
    "sparsemixer": SparseMixerRouter,
    "expert_choice": ExpertChoiceRouter,
}


def build_router(dim: int, cfg: MoEConfig) -> TopKRouter:
    if cfg.router == "soft":
        return SoftRouter(dim, cfg)
    try:
        cls = ROUTERS[cfg.router]
    except KeyError:
        raise ValueError(f"MoEConfig.router: unknown router {cfg.router!r}; choose from {sorted(ROUTERS)}") from None
    return cls(dim, cfg)


def _check_finite(logits: Tensor, cfg: MoEConfig) -> None:
    if cfg.check_finite and not bool(torch.isfinite(logits).all()):
        bad = (~torch.isfinite(logits)).any(-1).sum().item()
        raise FloatingPointError(
            f"MoE router ({cfg.router}) produced non-finite logits for {bad} of {logits.shape[0]} tokens; "
            "the layer input or router weights contain NaN/inf (check the learning rate, the loss scale "
            "or the data); set MoEConfig.check_finite=False to skip this check"
        )
