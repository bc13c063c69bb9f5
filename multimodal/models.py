"""BEiT-3-style multiway transformer with MoE FFNs (methods.md §6, §2).

`MultiwayMoETransformer` encodes images, texts or image-text pairs with one stack of pre-LN blocks::

    x = [vision tokens (CLS + patches) ; text tokens]        # either part may be absent
    for each block:  x = x + attn(norm1(x))                  # joint attention over the whole sequence
                     x = x + ffn(norm2(x))                   # V-FFN / L-FFN, or an `mmoe.MoE`
    out = final_norm(x)  ->  {"vision": x[:, :1+N], "text": x[:, 1+N:]}

Multiway (torchscale's released "decoupled" Multiway Transformer, ``multiway_attention=True``): every
LayerNorm and the attention's q/k/v/out projections exist twice, one copy for the vision tokens (the first
``1+N`` positions, the "split position") and one for the text tokens; only the attention *computation* is
joint. ``multiway_attention=False`` is the paper's layout: LayerNorms and attention shared, only the
FFNs per modality. Dense blocks always have a V-FFN and an L-FFN (GELU MLPs).

VL-FFN (the paper's vision-language expert, methods.md §6.1; not in torchscale's release): the top
``vl_layers`` blocks (the last n; default 0 = none) also have a vision-language FFN branch that is used only
when the forward gets an image-text *pair* (both ``image`` and ``text``): then ALL tokens of those blocks,
vision and text, go through it. Image-only and text-only forwards use the V-/L-branches there as everywhere.
A dense VL block has a third GELU MLP ``ffn.vl`` (the width and init of the V-/L-FFN). An MoE VL block keeps
its one expert pool: with ``moe_routing="modality"`` its MoE gets a third router (``num_tasks = 3``: task 0
vision, 1 text, 2 vl) and a pair's tokens are all routed by router 2; with ``moe_routing="shared"`` the one
router routes them as before (the MoE call does not change: a shared-routing MoE block has no VL branch to
switch to). Non-VL MoE blocks keep ``num_tasks = 2`` / 1.

MoE blocks (methods.md §6.3, reading (i), recorded here as this package's choice): block ``i`` is an MoE
block iff it is in ``moe_layers`` (`mmoe.moe_block_indices`; default ``"every_2"``: blocks 1, 3, ...,
V-MoE / MH-MoE "every other layer"). Its FFN is ONE `mmoe.MoE` expert pool for all modalities:

* ``moe_routing="shared"``: one router; all tokens of the batch are routed in one call, so routing (not the
  modality) decides which experts a token uses.
* ``moe_routing="modality"``: ``MoEConfig.num_tasks = 2`` (vision tokens use router 0, text tokens router 1;
  3 in VL blocks, above) over the same experts; the layer is called once with the modality ids as its
  per-row task ids.

Only non-padding tokens enter an MoE layer (valid rows are gathered, routed and scattered back; padded
positions get a zero FFN output), so padding never changes routing, expert loads, capacity or aux losses.

Either way each token-choice MoE layer runs once per model forward, so `mmoe.aux_loss` / `mmoe.routing_stats`
need nothing from this module. With modality routing the layer's per-task rules apply (`mmoe.MoE`): capacity
per modality, the balance loss per modality (summed), expert-group tables per modality, one Default-MoE EMA
update from both modalities' tokens; ``routing_stats(model)[name].per_task`` holds each modality's statistics.
`routing_by_modality` gives the routed slots per expert of each modality (for shared routing too).

Soft MoE (``moe: {router: soft}``, dense-vision.md §6): the soft router mixes the tokens of one *sequence*
into each expert's ``soft_slots`` slots, with one task id per call, so an MoE block calls the layer once per
modality: the vision tokens of each sample as one sequence (router 0 under modality routing), the text tokens
of each sample as another, padding masked out of the dispatch (router 1); for a pair in a VL block, the
whole joint sequence of each sample (one image-caption pair = one sequence, router 2). Padded positions get a
zero FFN output. Each call overwrites the layer's ``last_stats``; the block replaces it by the merge of the
forward's calls (`_merge_soft_stats`), so ``routing_stats(model)`` covers the whole forward; Soft MoE has no
aux loss (``mmoe.aux_loss`` is 0).

Heads: `mlm_logits` (LayerNorm + linear tied to the token embedding, plus a bias), `mim_pred` (per-patch
pixels), `itc_embeddings` + ``logit_scale`` (image-text contrastive retrieval).

Deviations from BEiT-3 (also listed in the class docstring):
* masked image modelling regresses per-patch normalised pixels (MAE's ``norm_pix_loss``, `mim_targets`)
  instead of predicting BEiT v2 (VQ-KD) visual tokens: that tokenizer's weights are not available here;
* plain pre-LN blocks (no Magneto sub-LN / its init, no layer scale, as in torchscale's release); the VL-FFN
  is optional (``vl_layers``, default 0 as in the release; the paper: the top 3 layers); learned absolute
  positions for both modalities; BEiT's init (truncated normal 0.02, output projections scaled by
  ``1/sqrt(2 * layer_id)``);
* MoE placement and routing as above (the MH-MoE / X-MoE multimodal setup is unspecified, §6.3 [U]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe import MoE, MoEConfig, moe_layers
from mmoe.layer import LayerStats
from mmoe.config import moe_block_indices, moe_config_from_section
from mmoe.stats import group_expert_counts
from mmoe.experts import MLP

MODALITIES = ("vision", "text")


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass
class MultiwayConfig:
    """Configuration of `MultiwayMoETransformer` (see the module docstring for the rules).

    Attributes:
        vocab_size: token embedding rows (and MLM logits).
        img_size, patch_size, in_chans: square input images, split into ``(img_size/patch_size)^2`` patches.
        dim, depth, num_heads: width, number of blocks, attention heads (``dim % num_heads == 0``).
        mlp_ratio: dense FFN width = ``int(dim * mlp_ratio)``.
        max_text_len: longest text (learned text positions).
        moe_layers: which blocks' FFN is an MoE layer (`mmoe.moe_block_indices`: ``"every_2"`` = blocks 1, 3,
            ...; ``"last_<n>"``, ``"all"``, ``"none"`` or a list of block indices).
        moe: `mmoe.MoEConfig` fields (`mmoe.moe_config_from_section`: ``dim`` is filled in; ``expert_hidden``
            defaults to the dense FFN width ``// heads``, ``activation`` to ``"gelu"``; ``num_tasks`` is set by
            ``moe_routing``).
        moe_routing: ``"shared"`` (one router for all tokens) or ``"modality"`` (router 0 for vision tokens,
            router 1 for text tokens, one shared expert pool; router 2 for a pair's tokens in VL MoE blocks).
            With ``moe.router: soft`` the layer is called once per modality (module docstring).
        vl_layers: number of top blocks (the last ``vl_layers``, ``0..depth``; 0 = none) with a VL-FFN branch,
            used by all tokens of an image-text pair (module docstring).
        multiway_attention: per-modality LayerNorms and q/k/v/out projections (torchscale's release);
            False = shared (the paper).
        drop_path: stochastic depth rate of the last block (linearly increasing from 0).
        itc_dim: width of the image-text contrastive embeddings.
        init_std: std of the truncated normal init.
        init_rescale: BEiT's rescaling of every block's output projections by ``1/sqrt(2 * layer_id)``.
        norm_eps: LayerNorm epsilon.
    """

    vocab_size: int
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    max_text_len: int = 32
    moe_layers: str | list[int] = "every_2"
    moe: dict[str, Any] = field(default_factory=lambda: {"num_experts": 8, "top_k": 2})
    moe_routing: Literal["shared", "modality"] = "shared"
    multiway_attention: bool = True
    vl_layers: int = 0
    drop_path: float = 0.0
    itc_dim: int = 64
    init_std: float = 0.02
    init_rescale: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"MultiwayConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "img_size", "patch_size", "in_chans", "dim", "depth", "num_heads",
                     "max_text_len", "itc_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        if self.img_size % self.patch_size:
            raise bad("patch_size", f"must divide img_size={self.img_size}")
        if self.dim % self.num_heads:
            raise bad("num_heads", f"must divide dim={self.dim}")
        if not isinstance(self.mlp_ratio, (int, float)) or int(self.dim * self.mlp_ratio) < 1:
            raise bad("mlp_ratio", "must give a positive FFN width int(dim * mlp_ratio)")
        if self.moe_routing not in ("shared", "modality"):
            raise bad("moe_routing", "must be 'shared' or 'modality'")
        if not isinstance(self.multiway_attention, bool):
            raise bad("multiway_attention", "must be a bool")
        if not isinstance(self.vl_layers, int) or isinstance(self.vl_layers, bool) or \
                not 0 <= self.vl_layers <= self.depth:
            raise bad("vl_layers", f"must be an integer in [0, depth={self.depth}] (the number of top blocks with a "
                                   "VL-FFN)")
        if not 0.0 <= self.drop_path < 1.0:
            raise bad("drop_path", "must be in [0, 1)")
        if self.init_std <= 0:
            raise bad("init_std", "must be > 0")
        if self.norm_eps <= 0:
            raise bad("norm_eps", "must be > 0")
        moe_ids = self.moe_layer_ids()
        if moe_ids:
            self.moe_config()  # validates the MoE fields (errors keep the key: moe.top_k)
            if set(moe_ids) & set(self.vl_layer_ids()):
                self.moe_config(vl=True)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def hidden(self) -> int:
        """Width of the dense V-FFN / L-FFN."""
        return int(self.dim * self.mlp_ratio)

    def moe_layer_ids(self) -> list[int]:
        """0-based indices of the blocks whose FFN is an MoE layer."""
        return moe_block_indices(self.moe_layers, self.depth)

    def vl_layer_ids(self) -> list[int]:
        """0-based indices of the blocks with a VL-FFN branch (the last ``vl_layers``)."""
        return list(range(self.depth - self.vl_layers, self.depth))

    def moe_config(self, vl: bool = False) -> MoEConfig:
        """The `mmoe.MoEConfig` of the MoE layers (defaults filled in as documented); ``vl=True``: of the MoE
        layers in VL blocks (``num_tasks = 3`` under modality routing: vision, text, vl)."""
        tasks = (3 if vl else 2) if self.moe_routing == "modality" else 1
        return moe_config_from_section(self.moe, dim=self.dim, mlp_hidden=self.hidden,
                                       defaults={"activation": "gelu"}, num_tasks=tasks)


# ------------------------------------------------------------------------------------------------
# image helpers


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, p*p*C]``: patches in row-major order (the patch embedding's order), the
    pixels of a patch ordered (row, column, channel) as in MAE."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patchify: image size {H}x{W} is not divisible by patch_size={p}")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
    return x.reshape(B, h * w, p * p * C)


def mim_targets(images: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """Masked-image-modelling targets ``[B, N, p*p*C]``: every patch's pixels normalised by the patch's own
    mean and (unbiased) variance, ``(x - mean) / sqrt(var + eps)`` (MAE's ``norm_pix_loss``)."""
    x = patchify(images.float(), patch_size)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


# ------------------------------------------------------------------------------------------------
# building blocks


class Multiway(nn.Module):
    """Two copies of a token-wise module: ``vision`` for positions ``< split``, ``text`` for the rest."""

    def __init__(self, vision: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.vision, self.text = vision, text

    def forward(self, x: Tensor, split: int) -> Tensor:
        if split >= x.shape[1]:
            return self.vision(x)
        if split <= 0:
            return self.text(x)
        return torch.cat([self.vision(x[:, :split]), self.text(x[:, split:])], dim=1)


class VLMultiway(Multiway):
    """`Multiway` plus a ``vl`` branch (the VL-FFN of BEiT-3's top blocks): ``forward(x, split, vl=True)``
    applies ``vl`` to every token (an image-text pair), ``vl=False`` is `Multiway`."""

    def __init__(self, vision: nn.Module, text: nn.Module, vl: nn.Module) -> None:
        super().__init__(vision, text)
        self.vl = vl

    def forward(self, x: Tensor, split: int, vl: bool = False) -> Tensor:
        return self.vl(x) if vl else super().forward(x, split)


class Shared(nn.Module):
    """One token-wise module for both modalities (same call signature as `Multiway`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, split: int) -> Tensor:
        return self.module(x)


def _maybe_multiway(make, multiway: bool) -> nn.Module:
    return Multiway(make(), make()) if multiway else Shared(make())


class MultiwayAttention(nn.Module):
    """Multi-head self-attention over the joint sequence; q/k/v and output projections per modality when
    multiway (torchscale's decoupled Multiway), shared otherwise."""

    def __init__(self, cfg: MultiwayConfig) -> None:
        super().__init__()
        D = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, D // cfg.num_heads
        self.qkv = _maybe_multiway(lambda: nn.Linear(D, 3 * D), cfg.multiway_attention)
        self.proj = _maybe_multiway(lambda: nn.Linear(D, D), cfg.multiway_attention)

    def forward(self, x: Tensor, split: int, attn_mask: Tensor | None) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x, split).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, S, hd]
        return self.proj(out.transpose(1, 2).reshape(B, S, D), split)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of a whole sample with probability ``p`` (training)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep)
        return x * mask / keep


class MultiwayBlock(nn.Module):
    """Pre-LN block: joint attention, then V-FFN / L-FFN (dense) or an `mmoe.MoE` on the valid tokens; with
    ``is_vl`` (one of the top ``vl_layers`` blocks) a pair forward (``pair=True``) sends every token through
    the VL branch instead (dense ``ffn.vl``; MoE: task 2 under modality routing, see the module docstring).

    MoE blocks keep ``modality_counts`` (``{"vision": [E], "text": [E]}`` routed slots per expert of each
    modality's tokens in the latest forward, see `routing_by_modality`), ``None`` before any forward. Soft MoE
    blocks also keep ``soft_stats``: ``{"vision" | "text" | "vl": LayerStats}`` of each of the latest forward's
    soft calls (the layer's ``last_stats`` is their merge, `_merge_soft_stats`)."""

    def __init__(self, cfg: MultiwayConfig, is_moe: bool, drop_path: float, is_vl: bool = False) -> None:
        super().__init__()
        D = cfg.dim
        norm = lambda: nn.LayerNorm(D, eps=cfg.norm_eps)  # noqa: E731
        self.norm1 = _maybe_multiway(norm, cfg.multiway_attention)
        self.attn = MultiwayAttention(cfg)
        self.norm2 = _maybe_multiway(norm, cfg.multiway_attention)
        self.is_moe = is_moe
        self.is_vl = is_vl
        self.per_modality = cfg.moe_routing == "modality"
        self.modality_counts: dict[str, Tensor] | None = None
        self.soft_stats: dict[str, LayerStats] | None = None
        if is_moe:
            self.ffn: nn.Module = MoE(cfg.moe_config(vl=is_vl))
        elif is_vl:
            self.ffn = VLMultiway(*(MLP(D, cfg.hidden, "gelu") for _ in range(3)))
        else:
            self.ffn = Multiway(MLP(D, cfg.hidden, "gelu"), MLP(D, cfg.hidden, "gelu"))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, split: int, attn_mask: Tensor | None, valid: Tensor, pair: bool = False) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x, split), split, attn_mask))
        h = self.norm2(x, split)
        vl = pair and self.is_vl
        if not self.is_moe:
            y = self.ffn(h, split, vl=True) if vl else self.ffn(h, split)
        elif self.ffn.cfg.router == "soft":
            y = self._soft_moe(h, split, valid, vl)
        else:
            y = self._moe(h, split, valid, vl)
        return x + self.drop_path(y)

    def _moe(self, h: Tensor, split: int, valid: Tensor, vl: bool = False) -> Tensor:
        """The MoE on the valid tokens only (gathered, routed in one call, scattered back; 0 elsewhere). Task
        ids under modality routing: each row's modality (0 vision, 1 text), or 2 for every row when ``vl``."""
        B, S, D = h.shape
        moe: MoE = self.ffn
        flat = h.reshape(B * S, D)
        pos = torch.arange(S, device=h.device)
        modality = (pos >= split).long().expand(B, S)  # 0 = vision, 1 = text
        index = valid.reshape(-1).nonzero().squeeze(1)  # batch-major, then position
        y = flat.new_zeros(B * S, D)
        if index.numel() == 0:
            return y.reshape(B, S, D)
        rows = flat.index_select(0, index)
        row_modality = modality.reshape(-1).index_select(0, index)
        recorded = moe.record_routing
        moe.record_routing = True  # the routing of this call, to count slots per modality
        try:
            # modality routers: one call, each row routed by its modality's router over the shared experts (a
            # pair in a VL block: every row by the VL router); shared routing: the one router
            if not self.per_modality:
                out = moe(rows)
            else:
                out = moe(rows, task=2) if vl else moe(rows, task=row_modality)
            r = moe.last_routing
        finally:
            moe.record_routing = recorded
            if not recorded:
                moe.last_routing = None
        with torch.no_grad():  # counted by token position, also for the VL router's rows
            counts = group_expert_counts(r.indices, row_modality, len(MODALITIES), moe.cfg.num_experts,
                                         moe.cfg.heads)
            self.modality_counts = {m: counts[i] for i, m in enumerate(MODALITIES)}
        return y.index_copy(0, index, out.to(y.dtype)).reshape(B, S, D)

    def _soft_moe(self, h: Tensor, split: int, valid: Tensor, vl: bool = False) -> Tensor:
        """Soft MoE per sequence per modality (module docstring): the vision part ``h[:, :split]`` (task 0), the
        text part ``h[:, split:]`` with its padding masked (task 1), or, when ``vl``, the joint sequence
        ``h`` (task 2); task None under shared routing. Padded positions output 0."""
        moe: MoE = self.ffn
        E, p = moe.cfg.num_experts, moe.cfg.soft_slots
        B, S, _ = h.shape
        calls: list[tuple[str, int, Tensor, Tensor | None]] = []  # (part, task, input, mask)
        if vl:
            calls.append(("vl", 2, h, valid))
        else:
            if split > 0:
                calls.append(("vision", 0, h[:, :split], None))
            if split < S:
                calls.append(("text", 1, h[:, split:], valid[:, split:]))
        outs, stats = [], {}
        for part, task, x, mask in calls:
            before = moe.last_stats
            outs.append(moe(x, task=task if self.per_modality else None, mask=mask))
            if moe.last_stats is not before:  # not recorded in an activation-checkpointing recomputation
                stats[part] = moe.last_stats
        with torch.no_grad():
            counts = {m: torch.zeros(E, dtype=torch.float32, device=h.device) for m in MODALITIES}
            for part, task, x, mask in calls:
                if part != "vl":  # each of the B sequences fills p slots of every expert
                    counts[part] += B * p
                    continue
                # a joint sequence's slots: split between the modalities by their tokens' dispatch weights,
                # from the router the call used (without its training noise: no random draw here)
                router = moe.routers[task if self.per_modality else 0]
                was_training = router.training
                router.train(False)
                try:
                    dispatch, _ = router.weights(router.logits(x), mask)  # [B, S, E*p], sums to 1 over S
                finally:
                    router.train(was_training)
                mass = dispatch.reshape(B, S, E, p).sum((0, 3))  # [S, E]
                counts["vision"] += mass[:split].sum(0)
                counts["text"] += mass[split:].sum(0)
            self.modality_counts = counts
        if stats:
            self.soft_stats = stats
            moe.last_stats = _merge_soft_stats(list(stats.values()))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------------------------
# the model


class MultiwayMoETransformer(nn.Module):
    """BEiT-3-style multiway transformer with MoE FFNs (module docstring).

    ``forward(image=None, text=None, text_padding_mask=None, image_mask=None)`` -> ``{"vision": [B, 1+N, D]
    or None, "text": [B, L, D] or None}`` final (normed) hidden states.

    * ``image [B, C, H, W]``; ``image_mask [B, N]`` bool, True = masked patch: its patch embedding is
      replaced by the learned mask token (BEiT), so nothing of its pixels enters the model.
    * ``text [B, L]`` token ids (``L <= max_text_len``); ``text_padding_mask [B, L]`` bool, True = padding:
      padded keys are masked out of the attention and padded tokens skip the MoE layers.
    * both: an image-text pair, sequence ``[vision tokens ; text tokens]`` with joint attention; in the top
      ``vl_layers`` blocks all its tokens use the VL-FFN (module docstring).

    Deviations from BEiT-3: masked image modelling predicts per-patch normalised pixels (`mim_targets`,
    MAE's norm_pix_loss) instead of VQ-KD visual tokens (the tokenizer weights are not available); no
    Magneto sub-LN or layer scale; the VL-FFN only with ``vl_layers > 0`` (default 0, torchscale's release; the
    paper: 3); MoE placement/routing is methods.md §6.3 reading (i).
    """

    def __init__(self, cfg: MultiwayConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, N = cfg.dim, cfg.num_patches
        # vision embedding
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.vision_pos = nn.Parameter(torch.zeros(1, 1 + N, D))
        # text embedding
        self.token_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, D))
        moe_ids, vl_ids = set(cfg.moe_layer_ids()), set(cfg.vl_layer_ids())
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist() if cfg.depth > 1 else [cfg.drop_path]
        self.blocks = nn.ModuleList([MultiwayBlock(cfg, i in moe_ids, rates[i], i in vl_ids)
                                     for i in range(cfg.depth)])
        self.norm = _maybe_multiway(lambda: nn.LayerNorm(D, eps=cfg.norm_eps), cfg.multiway_attention)
        # heads
        self.mlm_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.mim_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mim_head = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_chans)
        self.itc_vision = nn.Linear(D, cfg.itc_dim, bias=False)
        self.itc_text = nn.Linear(D, cfg.itc_dim, bias=False)
        # shape [1], not 0-dim: DeepSpeed cannot view a 0-dim parameter as bytes when it broadcasts the model
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.reset_parameters()

    # ------------------------------------------------------------------ introspection
    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    @property
    def moe_layers(self) -> list[tuple[str, MoE]]:
        """``(name, layer)`` of every MoE layer (`mmoe.moe_layers`)."""
        return moe_layers(self)

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """BEiT init: truncated normal (std ``init_std``, cut at 2 std) for linear / conv / embedding weights
        and the learned tokens and positions, zero biases, LayerNorm 1 / 0; the experts like the dense FFN;
        with ``init_rescale`` every block's attention output and FFN (V, L, VL) / expert output weights are divided by
        ``sqrt(2 * layer_id)`` (layer_id = block index + 1). Routers and MH-MoE projections keep mmoe's
        init; ``logit_scale`` = log(1/0.07)."""
        std = self.cfg.init_std

        def tn(w: Tensor) -> None:
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)

        moe_params = {id(p) for _, m in moe_layers(self) for p in m.parameters()}
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, MoE):
                    ex = mod.experts
                    for w in (ex.w1, ex.w2, ex.w3):
                        if w is not None:
                            tn(w)
                    for b in (ex.b1, ex.b2, ex.b3):
                        if b is not None:
                            b.zero_()
                    if mod.shared is not None:
                        for lin in (mod.shared.fc1, mod.shared.fc2, mod.shared.fc3):
                            if lin is not None:
                                tn(lin.weight)
                                if lin.bias is not None:
                                    lin.bias.zero_()
                    continue
                if id(getattr(mod, "weight", None)) in moe_params:
                    continue  # inside an MoE (MH-MoE head / merge projections): mmoe's init
                if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    tn(mod.weight)
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()
                elif isinstance(mod, nn.LayerNorm):
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()
            for p in (self.cls_token, self.mask_token, self.vision_pos, self.text_pos):
                tn(p)
            self.mlm_bias.zero_()
            self.logit_scale.fill_(math.log(1 / 0.07))
            if self.cfg.init_rescale:
                for i, block in enumerate(self.blocks):
                    s = 1.0 / math.sqrt(2.0 * (i + 1))
                    for lin in _branches(block.attn.proj):
                        lin.weight.mul_(s)
                    if block.is_moe:
                        block.ffn.experts.w2.mul_(s)
                        if block.ffn.shared is not None:
                            block.ffn.shared.fc2.weight.mul_(s)
                    else:
                        for mlp in _branches(block.ffn):
                            mlp.fc2.weight.mul_(s)

    # ------------------------------------------------------------------ embeddings
    def embed_image(self, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """``[B, C, H, W]`` -> vision tokens ``[B, 1+N, D]`` (CLS first; masked patches = mask token)."""
        cfg = self.cfg
        if image.dim() != 4 or image.shape[1] != cfg.in_chans or tuple(image.shape[2:]) != (cfg.img_size,) * 2:
            raise ValueError(f"image must be [B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}], "
                             f"got {tuple(image.shape)}")
        x = self.patch_embed(image).flatten(2).transpose(1, 2)  # [B, N, D]
        B, N, _ = x.shape
        if image_mask is not None:
            if tuple(image_mask.shape) != (B, N):
                raise ValueError(f"image_mask must be [B, N] = [{B}, {N}], got {tuple(image_mask.shape)}")
            w = image_mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1)
            x = torch.where(w, self.mask_token.to(x.dtype).expand(B, N, -1), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        return x + self.vision_pos.to(x.dtype)

    def embed_text(self, text: Tensor) -> Tensor:
        """Token ids ``[B, L]`` -> text tokens ``[B, L, D]``."""
        if text.dim() != 2:
            raise ValueError(f"text must be token ids [B, L], got shape {tuple(text.shape)}")
        L = text.shape[1]
        if L > self.cfg.max_text_len:
            raise ValueError(f"text length {L} > max_text_len={self.cfg.max_text_len}")
        return self.token_embed(text) + self.text_pos[:, :L]

    # ------------------------------------------------------------------ forward
    def forward(self, image: Tensor | None = None, text: Tensor | None = None,
                text_padding_mask: Tensor | None = None, image_mask: Tensor | None = None) -> dict[str, Tensor | None]:
        if image is None and text is None:
            raise ValueError("forward needs an image, a text or both")
        if image is None and image_mask is not None:
            raise ValueError("image_mask given without an image")
        if text is None and text_padding_mask is not None:
            raise ValueError("text_padding_mask given without a text")
        parts = []
        if image is not None:
            parts.append(self.embed_image(image, image_mask))
        if text is not None:
            parts.append(self.embed_text(text))
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"image and text batch sizes differ: {parts[0].shape[0]} vs {parts[1].shape[0]}")
        x = torch.cat(parts, dim=1)
        B, S, _ = x.shape
        split = parts[0].shape[1] if image is not None else 0
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device)
        attn_mask = None
        if text_padding_mask is not None:
            pad = text_padding_mask.to(device=x.device, dtype=torch.bool)
            if tuple(pad.shape) != tuple(text.shape):
                raise ValueError(f"text_padding_mask must have the text's shape {tuple(text.shape)}, "
                                 f"got {tuple(pad.shape)}")
            valid[:, split:] = ~pad
            keys = valid.clone()
            keys[~keys.any(1)] = True  # a row with no valid token at all: attend anywhere (avoids NaN)
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, S], True = may attend
        pair = image is not None and text is not None  # the VL blocks' VL branch
        for block in self.blocks:
            x = block(x, split, attn_mask, valid, pair)
        x = self.norm(x, split)
        return {"vision": x[:, :split] if image is not None else None,
                "text": x[:, split:] if text is not None else None}

    # ------------------------------------------------------------------ heads
    def mlm_logits(self, text_hidden: Tensor) -> Tensor:
        """Masked-language-modelling logits ``[..., vocab_size]``: LayerNorm, then the token embedding
        matrix (tied) plus a bias."""
        return F.linear(self.mlm_norm(text_hidden), self.token_embed.weight, self.mlm_bias)

    def mim_pred(self, vision_hidden: Tensor) -> Tensor:
        """Masked-image-modelling predictions ``[B, N, p*p*C]`` of the patches' normalised pixels
        (`mim_targets`) from the vision hidden states ``[B, 1+N, D]`` (CLS dropped)."""
        return self.mim_head(self.mim_norm(vision_hidden[:, 1:]))

    def itc_embeddings(self, vision_hidden: Tensor | None = None,
                       text_hidden: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """L2-normalised contrastive embeddings ``[B, itc_dim]`` of the vision CLS token and the text's first
        token (each None when its input is None). Similarities: ``logit_scale.exp() * img @ txt.T``."""
        img = F.normalize(self.itc_vision(vision_hidden[:, 0]), dim=-1) if vision_hidden is not None else None
        txt = F.normalize(self.itc_text(text_hidden[:, 0]), dim=-1) if text_hidden is not None else None
        return img, txt


def _branches(m: nn.Module) -> list[nn.Module]:
    if isinstance(m, VLMultiway):
        return [m.vision, m.text, m.vl]
    return [m.vision, m.text] if isinstance(m, Multiway) else [m.module]


def build_multiway(cfg: MultiwayConfig | dict) -> MultiwayMoETransformer:
    """`MultiwayMoETransformer` from a `MultiwayConfig` or a dict of its fields."""
    if isinstance(cfg, dict):
        cfg = MultiwayConfig(**cfg)
    return MultiwayMoETransformer(cfg)


def routing_by_modality(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """Per MoE layer (by module name): ``{"vision": [E], "text": [E]}`` routed slots per expert of each
    modality's (valid) tokens in the latest forward (a token counts ``heads * top_k`` slots; slots later
    dropped by a capacity limit are counted). Counted by token position, so a pair's tokens in a VL block
    (routed by the VL router under modality routing) count for their own modality. Layers without a forward
    yet are left out.

    Soft MoE layers (floats): the slots per expert each modality's sequences occupy: every vision (text)
    sequence of the forward fills ``soft_slots`` slots of every expert, an all-padding text too (as in the
    layer's ``tokens_per_expert``); a joint image-text sequence (a pair in a VL block) fills them as well,
    each slot split between the modalities by the total dispatch weight of their tokens (computed without
    the router's training noise). Per layer, vision + text = ``routing_stats(model)[name].tokens_per_expert``.
    """
    out = {}
    for name, block in model.named_modules():
        if isinstance(block, MultiwayBlock) and block.is_moe and block.modality_counts is not None:
            out[f"{name}.ffn" if name else "ffn"] = {k: v.tolist() for k, v in block.modality_counts.items()}
    return out


def _merge_soft_stats(parts: list[LayerStats]) -> LayerStats:
    """One `LayerStats` from a block's soft calls of one forward (`mmoe.MoE` keeps only its latest call's).

    Slot counts (``tokens_per_expert`` = ``kept_per_expert``) and ``num_rows`` (the real tokens) are summed;
    ``entropy`` and the ``combine_*`` extras are means over the real tokens of all calls, the ``dispatch_*``
    extras means over all slots of all calls (each call's value weighted by its tokens / slots);
    ``dropped_frac`` is 0 and ``activation`` 1 (soft routing drops nothing and uses every expert). ``task``
    is the calls' task id when they share one (shared routing: 0), else -1; ``per_task`` maps each task id to
    the merge of its calls (modality routing: 0 vision, 1 text, 2 vl). No aux terms (Soft MoE has none)."""

    def merge(ps: list[LayerStats]) -> LayerStats:
        rows = [s.num_rows for s in ps]
        slots = [float(s.tokens_per_expert.sum()) for s in ps]

        def mean(vals: list[float], w: list[float]) -> float:
            return sum(v * x for v, x in zip(vals, w)) / max(sum(w), 1)

        extra = {}
        for key in ps[0].extra:
            w = slots if key.startswith("dispatch") else rows
            extra[key] = mean([s.extra.get(key, 0.0) for s in ps], w)
        tasks = {s.task for s in ps}
        counts = sum(s.tokens_per_expert for s in ps)
        return LayerStats(tokens_per_expert=counts, kept_per_expert=sum(s.kept_per_expert for s in ps),
                          dropped_frac=0.0, entropy=mean([s.entropy for s in ps], rows), activation=1.0,
                          num_rows=sum(rows), task=tasks.pop() if len(tasks) == 1 else -1, extra=extra)

    out = merge(parts)
    by_task: dict[int, list[LayerStats]] = {}
    for s in parts:
        by_task.setdefault(s.task, []).append(s)
    for t, ps in sorted(by_task.items()):
        out.per_task[t] = merge(ps)
    return out
