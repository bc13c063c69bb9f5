"""The engine's own small task: classify scikit-learn's handwritten digits with an MLP-MoE.

``digits_mlp`` reads image shards (any image-folder-style shards: an image plus ``cls``), turns each
image into a grey ``image_size x image_size`` vector and classifies it with
``Linear -> depth x (LayerNorm -> MoE, residual) -> LayerNorm -> Linear`` (``model.moe_layers`` may make
some blocks dense). It exists so that the engine
(DeepSpeed, expert parallelism, checkpoints, resume) is tested end to end on real data in seconds;
the ViT-MoE classifiers live in `vision`.

`write_digits_shards` writes the 1,797 8x8 digit images that scikit-learn ships as PNG shards
(``train-*`` / ``val-*``), so nothing is downloaded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.config import MoEConfig, moe_block_indices, moe_config_from_section
from mmoe.experts import MLP
from mmoe.layer import MoE
from mmoe.train.tasks import Task, register_task


@dataclass
class DigitsModelConfig:
    """The ``model:`` section of ``digits_mlp``; ``moe`` (`mmoe.MoEConfig` fields, ``dim`` is the model's)
    and ``moe_layers`` (`mmoe.moe_block_indices`; default: an MoE in every block) are validated here, so
    errors carry the config file's ``file:line`` (``model.moe.top_k: ...``)."""

    image_size: int = 8
    dim: int = 64
    depth: int = 2
    num_classes: int = 10
    dropout: float = 0.0
    moe_layers: str | list[int] = "all"
    moe: dict[str, Any] = field(default_factory=lambda: dict(num_experts=4, top_k=2))

    def __post_init__(self) -> None:
        self.moe_block_ids()
        self.moe_config()

    def moe_config(self) -> MoEConfig:
        return moe_config_from_section(self.moe, dim=self.dim)

    def moe_block_ids(self) -> list[int]:
        return moe_block_indices(self.moe_layers, self.depth)


class MLPMoE(nn.Module):
    """``Linear -> depth x (LayerNorm -> FFN, residual) -> LayerNorm -> Linear``; the FFN of the blocks in
    ``moe_layers`` is an `mmoe.MoE`, of the others a dense MLP as wide as one expert."""

    def __init__(self, cfg: DigitsModelConfig) -> None:
        super().__init__()
        moe_cfg = cfg.moe_config()
        moe_ids = set(cfg.moe_block_ids())
        self.inp = nn.Linear(cfg.image_size * cfg.image_size, cfg.dim)
        self.norms = nn.ModuleList([nn.LayerNorm(cfg.dim) for _ in range(cfg.depth)])
        self.blocks = nn.ModuleList([MoE(moe_cfg) if i in moe_ids else
                                     MLP(cfg.dim, moe_cfg.hidden, moe_cfg.activation, moe_cfg.expert_bias)
                                     for i in range(cfg.depth)])
        self.drop = nn.Dropout(cfg.dropout)
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for norm, ffn in zip(self.norms, self.blocks):
            h = h + self.drop(ffn(norm(h)))
        return self.head(self.out_norm(h))


@dataclass
class DigitsOptions:
    # indices of synthetic examples to corrupt with a NaN pixel, to exercise the engine's non-finite-loss handling
    corrupt_examples: list[int] = field(default_factory=list)


@register_task("digits_mlp")
class DigitsTask(Task):
    ModelConfig = DigitsModelConfig
    Options = DigitsOptions
    unit = "images"

    def __init__(self, model_cfg: DigitsModelConfig, options: DigitsOptions | None = None) -> None:
        super().__init__(model_cfg, options)
        self._corrupt = set(self.options.corrupt_examples)

    def build_model(self) -> nn.Module:
        return MLPMoE(self.model_cfg)

    def decode(self, sample: dict):
        from PIL import Image

        from mmoe.data import decode_image, decode_label

        s = self.model_cfg.image_size
        img = decode_image(sample, mode="L")
        if img.size != (s, s):
            img = img.resize((s, s), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(-1) / 255.0)
        return x, decode_label(sample)

    def synthetic_example(self, index: int):
        """Deterministic example ``index`` (data.train: synthetic): a random image whose class is the
        brightest of ``num_classes`` fixed pixel groups, so it can be learnt."""
        n = self.model_cfg.image_size ** 2
        g = torch.Generator().manual_seed(1_000_003 + int(index))
        x = torch.rand(n, generator=g)
        groups = torch.arange(n) % self.model_cfg.num_classes
        y = int(torch.zeros(self.model_cfg.num_classes).index_add_(0, groups, x).argmax())
        if int(index) in self._corrupt:  # fault injection (task_options.corrupt_examples): a NaN pixel
            x[0] = float("nan")
        return x, y

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"acc": float(acc)}, int(y.numel())

    @torch.no_grad()
    def eval_step(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
                "correct": float((logits.argmax(-1) == y).sum()), "count": float(y.numel())}

    def eval_metrics(self, sums):
        n = max(sums.get("count", 0.0), 1.0)
        return {"loss": sums["loss_sum"] / n, "acc": sums["correct"] / n, "count": sums.get("count", 0.0)}


def digits_samples():
    """The 1,797 scikit-learn digits as shard samples (PNG bytes, ``cls``, ``json``)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in range(len(d.target)):
        img = Image.fromarray((d.images[i] * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append({"__key__": f"digit{i:05d}", "png": buf.getvalue(), "cls": int(d.target[i]),
                    "json": {"label": str(d.target[i]), "index": int(i)}})
    return out


def write_digits_shards(out_dir: str | Path, *, samples_per_shard: int = 200, val_fraction: float = 0.2,
                        progress: bool = False):
    """Write scikit-learn's digits as ``out_dir/train-*.tar`` and ``out_dir/val-*.tar`` (split by key hash)
    with a ``manifest.json``; returns the `mmoe.data.Manifest`."""
    from mmoe.data import write_shards

    return write_shards(digits_samples(), out_dir, samples_per_shard=samples_per_shard, val_fraction=val_fraction,
                        source="sklearn-digits", progress=progress,
                        extra_manifest={"classes": [str(i) for i in range(10)]})
