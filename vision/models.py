"""ViT-MoE: timm's VisionTransformer with the MLP of chosen blocks replaced by `mmoe.MoE`.

After ``import vision.models`` the models are in timm's registry::

    import timm, vision.models
    m = timm.create_model("vit_moe_small_patch16_224", num_experts=8, top_k=2, heads=2,
                          dense_backprop="default", moe_layers="every_2", num_classes=10)

Every `mmoe.MoEConfig` field (except ``dim``, which is the embedding width) is a keyword of the model,
either flat as above or collected in ``moe={...}``; the remaining keywords go to timm's
`VisionTransformer` (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``drop_path_rate``, ...).
The expert hidden width defaults to ``embed_dim * mlp_ratio // heads`` (the replaced MLP's width, split
over the MH-MoE sub-tokens).

Placement (``moe_layers``), V-MoE's names (methods.md §5), 0-indexed blocks (`mmoe.moe_block_indices`,
re-exported here): ``"every_2"`` blocks 1, 3, 5, ... (V-MoE "Every 2"; ``"every_n"`` in general: blocks
with (i+1) % n == 0), ``"last_n"`` the last n blocks of "every 2" (V-MoE "Last n"), ``"all"``, ``"none"``,
or a list of indices. Parameter counts: `mmoe.count_params` (re-exported here).

V-MoE's own router has Gaussian logit noise of std 1/E and raw (not renormalised) top-k weights; here the
router defaults are mmoe's (no noise); pass ``router_noise_std=1/E`` for V-MoE's recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from torch import nn

from mmoe import MoE, MoEConfig
from mmoe.config import moe_block_indices, moe_config_from_section
from mmoe.stats import ParamCount, count_params

try:  # timm's public registry and model builder
    from timm.layers import trunc_normal_
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
except ImportError as err:  # pragma: no cover - timm is a hard dependency
    raise ImportError("vision needs timm (pip install timm)") from err

__all__ = ["VisionTransformerMoE", "vit_moe_config", "moe_block_indices", "count_params", "ParamCount",
           "dense_mlp_ratio_for", "vit_moe_size", "VIT_MOE_SIZES", "replace_mlps", "init_moe_like_vit"]

MOE_FIELDS = frozenset(f.name for f in dataclasses.fields(MoEConfig)) - {"dim"}

# the sizes of the registered variants (their keywords of `VisionTransformer`), also read by configs that
# validate a ``moe:`` section before the model is built (`vision.tasks.ClassifierConfig`)
VIT_MOE_SIZES: dict[str, dict[str, Any]] = {
    "vit_moe_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_moe_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_moe_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def vit_moe_size(arch: str, kwargs: Mapping[str, Any] | None = None) -> tuple[int, int, float] | None:
    """``(embed_dim, depth, mlp_ratio)`` of a registered ViT-MoE variant with ``kwargs`` overriding them;
    None for an architecture not in `VIT_MOE_SIZES`."""
    if arch not in VIT_MOE_SIZES:
        return None
    size = {"mlp_ratio": 4.0, **VIT_MOE_SIZES[arch], **(kwargs or {})}
    return size["embed_dim"], size["depth"], size["mlp_ratio"]


def vit_moe_config(embed_dim: int, mlp_ratio: float = 4.0, moe: Mapping[str, Any] | None = None) -> MoEConfig:
    """The `MoEConfig` of a ViT-MoE block: ``dim = embed_dim``, expert hidden = the MLP width / heads
    (`mmoe.moe_config_from_section`; errors are `mmoe.errors.ConfigError` at ``moe.<field>``)."""
    return moe_config_from_section(moe, dim=embed_dim, mlp_hidden=int(embed_dim * mlp_ratio))


def init_moe_like_vit(moe: MoE) -> None:
    """timm's ViT init for the expert weights (truncated normal std 0.02, zero biases), so a ViT-MoE
    starts like the dense ViT it replaces; routers keep mmoe's init."""
    ex = moe.experts
    for w in (ex.w1, ex.w2, ex.w3):
        if w is not None:
            trunc_normal_(w, std=0.02)
    for b in (ex.b1, ex.b2, ex.b3):
        if b is not None:
            nn.init.zeros_(b)


def replace_mlps(vit: nn.Module, indices: Sequence[int], cfg: MoEConfig) -> None:
    """Put a fresh `mmoe.MoE(cfg)` in place of ``vit.blocks[i].mlp`` for each ``i``."""
    for i in indices:
        moe = MoE(cfg)
        init_moe_like_vit(moe)
        vit.blocks[i].mlp = moe
    vit.moe_layers = list(indices)
    vit.moe_config = cfg


class VisionTransformerMoE(VisionTransformer):
    """timm `VisionTransformer` whose blocks ``moe_layers`` have an `mmoe.MoE` as their MLP.

    Args:
        moe_layers: placement (module docstring).
        moe: `MoEConfig` fields as a dict; any field may also be given as a flat keyword.
        **kwargs: the rest go to `VisionTransformer`.
    """

    def __init__(self, *, moe_layers: str | Sequence[int] = "every_2", moe: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in MOE_FIELDS}
        opts = {**(moe or {}), **flat}
        super().__init__(**kwargs)
        cfg = vit_moe_config(self.embed_dim, kwargs.get("mlp_ratio", 4.0), opts)
        replace_mlps(self, moe_block_indices(moe_layers, len(self.blocks)), cfg)

    def moe_modules(self) -> list[MoE]:
        return [self.blocks[i].mlp for i in self.moe_layers]


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformerMoE:
    return build_model_with_cfg(
        VisionTransformerMoE, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,  # key remapping + position-embedding resizing
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"),
        **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # no hosted weights: pretrained=True loads a local file given as pretrained_cfg_overlay=dict(file=...)
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    "vit_moe_tiny_patch16_224": _cfg(),
    "vit_moe_small_patch16_224": _cfg(),
    "vit_moe_base_patch16_224": _cfg(),
})


@register_model
def vit_moe_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformerMoE:
    """ViT-MoE Ti/16: ViT-Tiny (192 wide, 12 blocks, 3 heads), MoE in every other block (8 experts, top-2)."""
    args = VIT_MOE_SIZES["vit_moe_tiny_patch16_224"]
    return _create("vit_moe_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vit_moe_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformerMoE:
    """ViT-MoE S/16: ViT-Small (384 wide, 12 blocks, 6 heads), MoE in every other block (8 experts, top-2)."""
    args = VIT_MOE_SIZES["vit_moe_small_patch16_224"]
    return _create("vit_moe_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vit_moe_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformerMoE:
    """ViT-MoE B/16: ViT-Base (768 wide, 12 blocks, 12 heads), MoE in every other block (8 experts, top-2)."""
    args = VIT_MOE_SIZES["vit_moe_base_patch16_224"]
    return _create("vit_moe_base_patch16_224", pretrained, **dict(args, **kwargs))


def dense_mlp_ratio_for(model: nn.Module) -> float:
    """MLP ratio of a dense ViT (same width and depth) with the active compute of ``model``: every block's
    MLP multiply-adds per token, MoE blocks counted by their active experts plus the MH-MoE head and merge
    projections (`mmoe.moe_cost`), averaged over blocks. The demo builds its dense baseline with it."""
    from mmoe import moe_cost

    D = model.embed_dim
    ratios = []
    for blk in model.blocks:
        if isinstance(blk.mlp, MoE):
            ratios.append(moe_cost(blk.mlp.cfg)["macs_per_token"] / (2 * D * D))
        else:  # a dense MLP of hidden r*D costs 2*D*(r*D) multiply-adds
            ratios.append(blk.mlp.fc1.out_features / D)
    return sum(ratios) / len(ratios)
