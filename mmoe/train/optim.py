"""Optimizer parameter groups and the learning-rate schedule of the engine."""

from __future__ import annotations

import math

from torch import nn

__all__ = ["param_groups", "lr_lambda"]


def param_groups(model: nn.Module, cfg, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: decay / no decay (norms, biases, routers as configured) x lr scale x expert (moe).

    ``lr_scales``: optional per-parameter lr multipliers by name (a task's layer-wise lr decay), applied on
    top of ``router_lr_scale``."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_router = ".routers." in f".{name}" or name.startswith("routers.")
        is_norm_or_bias = p.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower()
        if getattr(p, "expert", False) and name.split(".")[-1].startswith("b"):
            is_norm_or_bias = True  # stacked expert biases b1/b2/b3 are [E, H]
        decay = not ((is_norm_or_bias and not cfg.decay_norm_and_bias) or (is_router and not cfg.decay_router))
        lr_scale = cfg.router_lr_scale if is_router else 1.0
        if lr_scales:
            lr_scale = round(lr_scale * float(lr_scales.get(name, 1.0)), 12)
        moe_name = getattr(p, "group_name", None) if getattr(p, "allreduce", True) is False else None
        key = (decay, lr_scale, moe_name)
        if key not in groups:
            g = {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": lr_scale,
                 "name": f"{'decay' if decay else 'no_decay'}_lr{lr_scale:g}" + (f"_{moe_name}" if moe_name else "")}
            if moe_name:
                g["moe"] = True
                g["name"] = moe_name
            groups[key] = g
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_lambda(cfg, max_steps: int):
    warm = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, max_steps - warm))
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
