"""The vision rows of ``mmoe bench model`` (entry point ``mmoe.benchmarks: vision``).

Per size, one group of four ViTs trained side by side (`mmoe.tools.model_bench`), random images and labels:

- ``dense``: the dense ViT of equal active compute (`vision.models.dense_mlp_ratio_for` of the next one);
- ``vit_moe mh+default``: the demo's ViT-MoE: MoE in every second block, 8 experts, top-2, MH-MoE with 2
  heads, Default MoE;
- ``vit_moe top-2``: plain top-2 ViT-MoE (8 experts) whose experts are as wide as the same active compute
  allows, so it matches the dense model too;
- ``deepspeed top-2``: the previous model with DeepSpeed's MoE layer (capacity factor 1.25) in place of
  `mmoe.MoE`, the same expert shapes.

Sizes: ``demo`` (16x16 one-channel images, patch 4: 17 tokens of width 64, depth 4, batch 64) and
``vit_s`` (ViT-S/16 at 224: 197 tokens of width 384, depth 12, 6 heads, batch 32, 1000 classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmoe
from mmoe.tools.model_bench import Group, ModelBenchContext, Variant, deepspeed_aux_loss, param_counts, train_step

SIZES = {
    "demo": dict(img_size=16, in_chans=1, num_classes=10, batch=64,
                 kwargs=dict(patch_size=4, embed_dim=64, depth=4, num_heads=4)),
    "vit_s": dict(img_size=224, in_chans=3, num_classes=1000, batch=32,
                  kwargs=dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
}
MOE = dict(num_experts=8, top_k=2)


def vit_models(size: str, ctx: ModelBenchContext | None = None) -> dict[str, torch.nn.Module]:
    """The four models of a size (module docstring), by variant name; DeepSpeed's only with a ``ctx`` that
    asks for it (RuntimeError with the reason where DeepSpeed is not usable)."""
    from .models import dense_mlp_ratio_for
    from .tasks import ClassifierConfig, build_classifier

    s = SIZES[size]
    common = dict(num_classes=s["num_classes"], img_size=s["img_size"], in_chans=s["in_chans"], drop_path_rate=0.0)
    kwargs = s["kwargs"]
    D = kwargs["embed_dim"]
    mh = build_classifier(ClassifierConfig(arch="vit_moe_tiny_patch16_224", moe_layers="every_2", kwargs=kwargs,
                                           moe=dict(MOE, heads=2, dense_backprop="default"), **common))
    ratio = dense_mlp_ratio_for(mh)
    dense = build_classifier(ClassifierConfig(arch="vit_tiny_patch16_224", kwargs=dict(kwargs, mlp_ratio=ratio),
                                              **common))
    # top-2 experts with the MH-MoE block's multiply-adds per token: 2 experts x 2 matrices x D x hidden
    block_macs = mmoe.moe_cost(mh.moe_config)["macs_per_token"]
    hidden = max(1, round(block_macs / (2 * MOE["top_k"] * D)))
    topk = build_classifier(ClassifierConfig(arch="vit_moe_tiny_patch16_224", moe_layers="every_2", kwargs=kwargs,
                                             moe=dict(MOE, expert_hidden=hidden), **common))
    models = {"dense": dense, "vit_moe mh+default": mh, "vit_moe top-2": topk}
    if ctx is not None and ctx.deepspeed:
        # raises RuntimeError (the reason) where DeepSpeed is not usable
        layers = {i: ctx.deepspeed_mlp(D, hidden, MOE["num_experts"], MOE["top_k"]) for i in topk.moe_layers}
        ds = build_classifier(ClassifierConfig(arch="vit_tiny_patch16_224", kwargs=kwargs, **common))
        for i, layer in layers.items():
            ds.blocks[i].mlp = layer
        models["deepspeed top-2"] = ds
    return models


def model_groups(ctx: ModelBenchContext) -> list[Group]:
    groups = []
    for size in ctx.sizes:
        s = SIZES[size]
        batch = 16 if ctx.quick else s["batch"]
        torch.manual_seed(ctx.seed)
        images = torch.randn(batch, s["in_chans"], s["img_size"], s["img_size"])
        labels = torch.randint(0, s["num_classes"], (batch,))
        variants = []
        ds_error = None
        try:
            models = vit_models(size, ctx)
        except RuntimeError as err:  # DeepSpeed not usable: its row is n/a, the others run
            models, ds_error = vit_models(size), str(err)
        active_topk = None
        for name, model in models.items():
            def loss(model=model, images=images, labels=labels) -> torch.Tensor:
                out = F.cross_entropy(model(images), labels)
                return out + mmoe.aux_loss(model) + deepspeed_aux_loss(model)

            total, active = param_counts(model)
            if name == "vit_moe top-2":
                active_topk = active
            if name == "deepspeed top-2":
                active = active_topk  # the same shapes as the top-2 ViT-MoE
            variants.append(Variant(name, train_step(model, loss, batch), params=total, active_params=active))
        if ds_error:
            variants.append(Variant("deepspeed top-2", error=ds_error))
        tokens = (s["img_size"] // s["kwargs"]["patch_size"]) ** 2 + 1
        groups.append(Group(f"ViT training, {size}: {tokens} tokens of width {s['kwargs']['embed_dim']}, depth "
                            f"{s['kwargs']['depth']}, batch {batch}; MoE in every 2nd block, 8 experts, top-2",
                            "images/s", variants, key=f"vit_{size}"))
    return groups
