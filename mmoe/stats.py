"""Routing statistics over time and the expert-load heatmap."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .layer import LayerStats, routing_stats


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
