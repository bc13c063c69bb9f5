"""The ViTDet-style ViT-MoE backbone and its simple feature pyramid (dense-vision.md §1).

`ViTDetMoE` is a plain ViT over a ``[B, C, H, W]`` image of any size: patches of ``patch_size`` (the image
is zero-padded on the right and bottom to a multiple of ``size_divisibility``, never cropped), an absolute
position embedding sized for pre-training (``img_size``, with a class-token entry, as a timm ViT stores it)
and resized bicubically to the actual grid at every forward, window attention in every block but the
``global_blocks`` (ViTDet's layout by default: four global blocks evenly spaced, 2, 5, 8, 11 of 12), the
token grid padded to a multiple of the window inside each windowed block (timm's SAM/ViTDet blocks),
optional decomposed relative positions (MViTv2; zero-initialised, interpolated to other sizes), drop path,
and an `mmoe.MoE` as the FFN of the blocks ``moe_layers`` names (`mmoe.moe_block_indices`; V-MoE's
"every 2" by default). Every `mmoe.MoEConfig` field is reachable through ``moe``; task ids
(``forward(x, task=...)``: an int or one id per image) reach every MoE layer (``moe.num_tasks > 1``: one
router per task; with one router every task id shares it) and choose the patch + position embedding
set (``task_embeddings > 1``: one per task, AdaMV-MoE's task-specific embeddings).

`SimpleFeaturePyramid` builds ViTDet's pyramid from the last map alone: strides ``patch/4 ... patch*2``
(4, 8, 16, 32 for patch 16) by transposed convs / identity / max-pool, each followed by a 1x1 and a 3x3
conv with channel LayerNorm, plus a stride-``patch*4`` level (a max-pool of the coarsest map) for the RPN.
Its output is an ``OrderedDict`` named ``p<log2 stride>`` and it has ``out_channels``, as torchvision's
detection models expect.

`load_backbone_weights` maps a classification checkpoint of this project (a run / checkpoint folder, or a
timm ViT / ViT-MoE file) into the backbone, resizing the position and patch embeddings; dense MLPs can be
sparsely upcycled into the MoE blocks on the way. `lr_decay_scales` is ViTDet's layer-wise lr decay.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe import MoE, MoEConfig
from mmoe.config import moe_block_indices

__all__ = ["BackboneConfig", "ViTDetMoE", "SimpleFeaturePyramid", "build_backbone", "vitdet_global_blocks",
           "load_backbone_weights", "lr_decay_scales"]


def vitdet_global_blocks(depth: int) -> list[int]:
    """ViTDet's global-attention blocks: four, evenly spaced, the last block among them (2, 5, 8, 11 of 12;
    5, 11, 17, 23 of 24); every block when ``depth <= 4``."""
    if depth <= 4:
        return list(range(depth))
    return sorted({max(0, round((k + 1) * depth / 4) - 1) for k in range(4)})


@dataclass
class BackboneConfig:
    """The ``model.backbone`` section: the ViT-MoE and its pyramid. The defaults are ViTDet-B's layout
    (``depth=12, embed_dim=768, num_heads=12``, window 14, global blocks 2, 5, 8, 11) with V-MoE's placement."""

    img_size: int = 224  # pre-training image size: the position embedding's grid is img_size / patch_size
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    window_size: int = 14  # 0: every block global
    global_blocks: list[int] | None = None  # None: vitdet_global_blocks(depth)
    use_rel_pos: bool = False
    moe_layers: str | list[int] = "every_2"  # mmoe.moe_block_indices; "none" = a dense ViTDet
    moe: dict[str, Any] = field(default_factory=dict)  # mmoe.MoEConfig fields (dim = embed_dim)
    # patch + position embedding sets: 1 = shared by all tasks; n = one per task id 0..n-1 (AdaMV-MoE's
    # task-specific embeddings), the set of task t chosen by the forward's task ids
    task_embeddings: int = 1
    # the pyramid
    out_channels: int = 256
    scale_factors: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    top_block: bool = True  # the extra stride patch*4 level for the RPN
    norm: str = "LN"  # "LN" (channel LayerNorm, ViTDet) or "" (none)

    def __post_init__(self) -> None:
        # "field: problem": the config loader reports it at the key's file:line
        if self.patch_size < 1 or self.img_size < self.patch_size:
            raise ValueError(f"img_size: must be >= patch_size ({self.patch_size}), got {self.img_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        if self.window_size < 0:
            raise ValueError(f"window_size: must be >= 0, got {self.window_size}")
        if self.task_embeddings < 1:
            raise ValueError(f"task_embeddings: must be >= 1, got {self.task_embeddings}")
        if self.global_blocks is not None:
            bad = [i for i in self.global_blocks if not 0 <= int(i) < self.depth]
            if bad:
                raise ValueError(f"global_blocks: {bad} outside [0, depth={self.depth})")
        if self.norm not in ("LN", ""):
            raise ValueError(f"norm: must be 'LN' or '' (none), got {self.norm!r}")
        for s in self.scale_factors:
            if s not in (4.0, 2.0, 1.0, 0.5):
                raise ValueError(f"scale_factors: each must be 4, 2, 1 or 0.5 (ViTDet's), got {s}")
        moe_block_indices(self.moe_layers, self.depth)  # ConfigError at moe_layers
        self.moe_config()  # ConfigError at moe.<field>

    def moe_config(self) -> MoEConfig:
        from ..models import vit_moe_config

        return vit_moe_config(self.embed_dim, self.mlp_ratio, self.moe)

    @property
    def windowed_blocks(self) -> list[int]:
        if self.window_size == 0:
            return []
        glob = set(vitdet_global_blocks(self.depth) if self.global_blocks is None else self.global_blocks)
        return [i for i in range(self.depth) if i not in glob]


def _block_class():
    from timm.models.vision_transformer_sam import Block

    class ViTDetBlock(Block):
        """timm's SAM / ViTDet block (window attention with padding, decomposed relative positions) whose
        FFN may be an `mmoe.MoE` that gets the task ids."""

        def forward(self, x: Tensor, task: Tensor | int | None = None) -> Tensor:  # x: [B, H, W, C]
            from timm.models.vision_transformer_sam import window_partition, window_unpartition

            B, H, W, C = x.shape
            shortcut = x
            x = self.norm1(x)
            pad_hw = None
            if self.window_size > 0:
                x, pad_hw = window_partition(x, self.window_size)
            x = self.drop_path1(self.ls1(self.attn(x)))
            if self.window_size > 0:
                x = window_unpartition(x, self.window_size, (H, W), pad_hw)
            x = shortcut + x
            x = x.reshape(B, H * W, C)
            h = self.norm2(x)
            if isinstance(self.mlp, MoE):
                if self.mlp.cfg.num_tasks == 1:  # one router: shared by every task id (their embeddings may differ)
                    task = None
                elif isinstance(task, Tensor) and task.dim() == 1:  # one id per image -> one per token
                    task = task[:, None].expand(B, H * W)
                h = self.mlp(h, task=task)
            else:
                h = self.mlp(h)
            x = x + self.drop_path2(self.ls2(h))
            return x.reshape(B, H, W, C)

    return ViTDetBlock


class ViTDetMoE(nn.Module):
    """ViTDet's plain ViT with `mmoe.MoE` FFNs (module docstring). ``forward(x, task=None)`` returns
    ``{"last_feat": [B, embed_dim, ceil(H / s) * s / patch, ...]}`` with ``s = size_divisibility``."""

    out_feature = "last_feat"

    def __init__(self, cfg: BackboneConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if cfg is not None and kwargs:
            raise TypeError("ViTDetMoE(cfg) or ViTDetMoE(**fields), not both")
        cfg = cfg or BackboneConfig(**kwargs)
        self.cfg = cfg
        from timm.layers import PatchEmbed, trunc_normal_

        D = cfg.embed_dim
        self.embed_dim, self.patch_size = D, cfg.patch_size
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      embed_dim=D, strict_img_size=False, output_fmt="NHWC")
        self.pretrain_grid = cfg.img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid ** 2, D))  # entry 0: class token
        trunc_normal_(self.pos_embed, std=0.02)
        # task_embeddings > 1: the embeddings of task ids 1.. (task 0 uses patch_embed / pos_embed)
        self.task_patch_embeds = nn.ModuleList([
            PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=D,
                       strict_img_size=False, output_fmt="NHWC") for _ in range(cfg.task_embeddings - 1)])
        self.task_pos_embeds = nn.ParameterList([
            nn.Parameter(trunc_normal_(torch.zeros(1, 1 + self.pretrain_grid ** 2, D), std=0.02))
            for _ in range(cfg.task_embeddings - 1)])
        windowed = set(cfg.windowed_blocks)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        Block = _block_class()
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_path=dpr[i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=cfg.use_rel_pos,
                  window_size=cfg.window_size if i in windowed else 0,
                  input_size=(self.pretrain_grid, self.pretrain_grid))
            for i in range(cfg.depth)])
        self.global_blocks = [i for i in range(cfg.depth) if i not in windowed]
        self.apply(self._init_weights)
        from ..models import init_moe_like_vit

        self.moe_config = cfg.moe_config()
        self.moe_layers = moe_block_indices(cfg.moe_layers, cfg.depth)
        for i in self.moe_layers:
            moe = MoE(self.moe_config)
            init_moe_like_vit(moe)
            self.blocks[i].mlp = moe
        # the input must be a multiple of this for the pyramid's 0.5 level not to drop a row (it is padded)
        self.size_divisibility = cfg.patch_size * (2 if 0.5 in cfg.scale_factors else 1)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        from timm.layers import trunc_normal_

        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def moe_modules(self) -> list[MoE]:
        return [self.blocks[i].mlp for i in self.moe_layers]

    def abs_pos(self, h: int, w: int, embedding: int = 0) -> Tensor:
        """The position embedding (without its class-token entry) resized to an ``h x w`` grid: ``[1, h, w, D]``
        (of embedding set ``embedding``, see ``task_embeddings``)."""
        pos = (self.pos_embed if embedding == 0 else self.task_pos_embeds[embedding - 1])[:, 1:]
        if (h, w) != (self.pretrain_grid, self.pretrain_grid):
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, new_size=[h, w], old_size=[self.pretrain_grid] * 2,
                                         num_prefix_tokens=0, interpolation="bicubic", antialias=False)
        return pos.reshape(1, h, w, -1)

    def pad(self, x: Tensor) -> Tensor:
        """``x`` zero-padded on the right and bottom to a multiple of `size_divisibility`."""
        s = self.size_divisibility
        H, W = x.shape[-2:]
        ph, pw = -H % s, -W % s
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def embed(self, x: Tensor, embedding: int = 0) -> Tensor:
        """Patch + position embedding of set ``embedding``: ``[B, C, H, W]`` (padded) -> ``[B, h, w, D]``."""
        pe = self.patch_embed if embedding == 0 else self.task_patch_embeds[embedding - 1]
        x = pe(x)
        return x + self.abs_pos(x.shape[1], x.shape[2], embedding)

    def forward(self, x: Tensor, task: Tensor | int | None = None) -> dict[str, Tensor]:
        x = self.pad(x)
        n = self.cfg.task_embeddings
        if n == 1 or task is None:
            x = self.embed(x)
        elif isinstance(task, Tensor) and task.dim() > 0:
            ids = task.reshape(len(x), -1)[:, 0].long()  # one id per image (per-token ids: the first token's)
            if int(ids.max()) >= n or int(ids.min()) < 0:
                raise ValueError(f"task ids {sorted(set(ids.tolist()))} outside the {n} task_embeddings")
            out = None
            for t in ids.unique().tolist():
                sel = ids == t
                e = self.embed(x[sel], t)
                if out is None:
                    out = e.new_zeros((len(x), *e.shape[1:]))
                out[sel] = e
            x = out
        else:
            t = int(task)
            if not 0 <= t < n:
                raise ValueError(f"task {t} outside the {n} task_embeddings of the backbone")
            x = self.embed(x, t)
        for blk in self.blocks:
            x = blk(x, task)
        return {self.out_feature: x.permute(0, 3, 1, 2).contiguous()}


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple pyramid over a `ViTDetMoE` (module docstring); ``forward(x, task=None)`` returns
    ``OrderedDict(p<k> = [B, out_channels, ...])`` from the finest level to the coarsest."""

    def __init__(self, net: ViTDetMoE, out_channels: int = 256, scale_factors: Sequence[float] = (4, 2, 1, 0.5),
                 top_block: bool = True, norm: str = "LN") -> None:
        super().__init__()
        from timm.layers import LayerNorm2d

        self.net = net
        self.task: int | None = None  # task id used when forward gets none (see forward)
        D = net.embed_dim
        self.out_channels = out_channels

        def ln(c: int) -> nn.Module:
            return LayerNorm2d(c) if norm == "LN" else nn.Identity()

        self.stages = nn.ModuleList()
        self.strides: list[int] = []
        for scale in scale_factors:
            if scale == 4.0:
                layers, dim = [nn.ConvTranspose2d(D, D // 2, 2, 2), ln(D // 2), nn.GELU(),
                               nn.ConvTranspose2d(D // 2, D // 4, 2, 2)], D // 4
            elif scale == 2.0:
                layers, dim = [nn.ConvTranspose2d(D, D // 2, 2, 2)], D // 2
            elif scale == 1.0:
                layers, dim = [], D
            elif scale == 0.5:
                layers, dim = [nn.MaxPool2d(2, 2)], D
            else:
                raise ValueError(f"scale_factors: {scale} is not one of 4, 2, 1, 0.5")
            layers += [nn.Conv2d(dim, out_channels, 1, bias=norm != "LN"), ln(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=norm != "LN"), ln(out_channels)]
            self.stages.append(nn.Sequential(*layers))
            self.strides.append(int(net.patch_size / scale))
        self.top_block = top_block
        if top_block:
            self.strides.append(self.strides[-1] * 2)
        self.names = [f"p{int(math.log2(s))}" for s in self.strides]
        self.size_divisibility = max(net.size_divisibility, self.strides[-1])

    @property
    def moe_layers(self) -> list[int]:
        return self.net.moe_layers

    def forward(self, x: Tensor, task: Tensor | int | None = None) -> "OrderedDict[str, Tensor]":
        # torchvision's detectors call backbone(images) without task ids: `self.task` (set by a multi-task
        # model around such a call) stands in for them
        feat = self.net(x, task if task is not None else self.task)[self.net.out_feature]
        outs = [stage(feat) for stage in self.stages]
        if self.top_block:  # detectron2's LastLevelMaxPool: kernel 1, stride 2
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.names, outs))


def build_backbone(cfg: BackboneConfig) -> SimpleFeaturePyramid:
    """The ViT-MoE of ``cfg`` inside its pyramid."""
    return SimpleFeaturePyramid(ViTDetMoE(cfg), cfg.out_channels, cfg.scale_factors, cfg.top_block, cfg.norm)


# ---------------------------------------------------------------------------------------- weights
_DROPPED = ("cls_token", "reg_token", "norm.", "fc_norm.", "head.", "head_drop.", "attn_pool.")


def _read_state(path: Path) -> dict[str, Tensor]:
    """A state dict from a run / checkpoint folder of this project or a timm-loadable file."""
    if path.is_dir():
        from mmoe.train import checkpoint as ckpt_lib

        return ckpt_lib.full_state_dict(ckpt_lib.resolve_checkpoint(path))
    from timm.models import load_state_dict

    return load_state_dict(str(path), use_ema=True)


def load_backbone_weights(vit: ViTDetMoE, path: str | Path, *, upcycle: bool = False,
                          what: str = "model.init: ") -> dict[str, list[str]]:
    """Load a classification ViT (ViT-MoE or dense) into ``vit``.

    ``path``: a run folder, a ``checkpoints`` folder or a checkpoint folder of this project (its latest
    complete checkpoint; experts of every expert-parallel rank merged), of a classification run or of a
    detection / segmentation run (then its backbone's ViT, ``backbone.net.*``, is taken), or a
    ``.safetensors`` / ``.pth`` file of a timm ViT or of this project's ``vit_moe_*``. Keys are timm's (``patch_embed.proj``, ``pos_embed``,
    ``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp}``); the class token, final norm and head are left
    out; the position embedding is resized to the backbone's pre-training grid and the patch embedding to
    its patch size (with ``task_embeddings > 1`` every task's set starts from them). An MoE of the file with
    fewer task routers than the backbone's (a classification run loaded into a multi-task backbone) gives
    its routers to tasks 0..; the other tasks' routers start fresh. The per-task top-k always comes from
    the backbone's config (the file's ``task_top_k`` is skipped). A block that is an MoE here and a dense MLP in the file is an error unless ``upcycle``:
    then the MLP is copied into every expert (`vision.upcycle.copy_mlp_into_moe`) and the router starts
    fresh. Relative-position tables (absent from classification ViTs) stay zero. Returns ``{"skipped": keys
    of the file not used, "fresh": backbone keys not in the file}``.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    from ..upcycle import copy_mlp_into_moe

    path = Path(path)
    where = f"{what}{path}"
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such checkpoint file or folder")
    try:
        state = _read_state(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{where}: cannot read a state dict ({type(err).__name__}: {err})") from None
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    if "pos_embed" not in state and "backbone.net.pos_embed" in state:
        # a detection or segmentation run of this project: its ViT is ``backbone.net``; the pyramid and the
        # heads stay behind
        state = {k[len("backbone.net."):]: v for k, v in state.items() if k.startswith("backbone.net.")}
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{where}: not a ViT checkpoint (no pos_embed / patch_embed.proj.weight)")
    own = vit.state_dict()
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    # patch and position embeddings, resized
    w = state.pop("patch_embed.proj.weight")
    if w.shape[1] != vit.cfg.in_chans:
        raise ValueError(f"{where}: patch_embed has {w.shape[1]} input channels, the backbone {vit.cfg.in_chans}")
    if w.shape[-2:] != own["patch_embed.proj.weight"].shape[-2:]:
        w = resample_patch_embed(w, list(own["patch_embed.proj.weight"].shape[-2:]))
    out["patch_embed.proj.weight"] = w
    if "patch_embed.proj.bias" in state:
        out["patch_embed.proj.bias"] = state.pop("patch_embed.proj.bias")
    pos = state.pop("pos_embed")
    n_prefix = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2  # class / register token entries
    g = vit.pretrain_grid
    grid = pos[:, n_prefix:]
    side = int(math.isqrt(grid.shape[1]))
    if side * side != grid.shape[1]:
        raise ValueError(f"{where}: pos_embed of {grid.shape[1]} patch entries is not a square grid")
    if side != g:
        grid = resample_abs_pos_embed(grid, new_size=[g, g], old_size=[side, side], num_prefix_tokens=0)
    cls = pos[:, :1] if n_prefix else torch.zeros_like(pos[:, :1])
    out["pos_embed"] = torch.cat([cls, grid], dim=1)
    for t in range(len(vit.task_patch_embeds)):  # task-specific embeddings all start from the file's
        for k in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            if k in out:
                out[f"task_patch_embeds.{t}.{k[len('patch_embed.'):]}"] = out[k]
        out[f"task_pos_embeds.{t}"] = out["pos_embed"]
    # blocks
    moe_blocks = set(vit.moe_layers)
    for i, blk in enumerate(vit.blocks):
        pre = f"blocks.{i}."
        theirs = {k[len(pre):]: state.pop(k) for k in list(state) if k.startswith(pre)}
        if not theirs:
            raise ValueError(f"{where}: has no block {i} (the backbone has depth {len(vit.blocks)})")
        dense_mlp = "mlp.fc1.weight" in theirs
        if i in moe_blocks and dense_mlp:
            if not upcycle:
                raise ValueError(f"{where}: block {i} is a dense MLP in the checkpoint but an MoE in the backbone; "
                                 "set model.upcycle: true to copy it into the experts, or choose moe_layers "
                                 "as in the checkpoint")
            mlp = {k[4:]: theirs.pop(k) for k in list(theirs) if k.startswith("mlp.")}
            copy_mlp_into_moe(blk.mlp, mlp["fc1.weight"], mlp.get("fc1.bias"), mlp["fc2.weight"], mlp.get("fc2.bias"),
                              where=f"{where}: blocks.{i}.mlp")
            for k, v in blk.mlp.state_dict().items():
                out[f"{pre}mlp.{k}"] = v
        elif i not in moe_blocks and not dense_mlp and any(k.startswith("mlp.") for k in theirs):
            raise ValueError(f"{where}: block {i} is an MoE in the checkpoint but dense in the backbone (moe_layers "
                             "must include it)")
        for k, v in theirs.items():
            key = f"{pre}{k}"
            if k == "mlp.task_top_k":  # the k's come from this backbone's config (and an AdaptiveTopK)
                skipped.append(key)
            elif key in own and k in ("mlp.balance_bias", "mlp.balance_load") and v.shape[0] < own[key].shape[0]:
                # fewer tasks in the file: its rows are tasks 0.., the others keep their start values
                out[key] = torch.cat([v, own[key][v.shape[0]:]], dim=0)
            elif key in own:
                out[key] = v
            else:
                skipped.append(key)
    for k in list(state):
        if k.startswith(_DROPPED) or k in ("cls_token", "reg_token"):
            skipped.append(k)
            del state[k]
    if state:
        keys = sorted(state)
        raise ValueError(f"{where}: keys the backbone has no place for: {keys[:5]}{' ...' if len(keys) > 5 else ''}")
    bad = [k for k, v in out.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{where}: {k} has shape {tuple(out[k].shape)}, the backbone {tuple(own[k].shape)} "
                         "(embed_dim, num_experts or the MoE layout differ)")
    fresh = sorted(k for k in own if k not in out)
    not_rel = [k for k in fresh if ".rel_pos_" not in k and ".routers." not in k and not k.endswith(".task_top_k")]
    if not_rel:
        raise ValueError(f"{where}: lacks {not_rel[:5]}{' ...' if len(not_rel) > 5 else ''}")
    vit.load_state_dict(out, strict=False)
    return {"skipped": skipped, "fresh": fresh}


def lr_decay_scales(model: nn.Module, rate: float) -> dict[str, float]:
    """ViTDet's layer-wise lr decay for every parameter of ``model`` that lies in a `ViTDetMoE`: with ``L``
    blocks, the patch and position embeddings get ``rate ** (L + 1)``, block ``i`` ``rate ** (L - i)``;
    everything else (pyramid, heads) 1."""
    scales: dict[str, float] = {}
    for prefix, mod in model.named_modules():
        if not isinstance(mod, ViTDetMoE):
            continue
        L = len(mod.blocks)
        for name, _ in mod.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            if name.startswith(("pos_embed", "patch_embed", "task_pos_embeds", "task_patch_embeds")):
                layer = 0
            elif name.startswith("blocks."):
                layer = int(name.split(".")[1]) + 1
            else:
                layer = L + 1
            scales[full] = rate ** (L + 1 - layer)
    return scales
