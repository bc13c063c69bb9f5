"""Decoder-only (causal) and masked (XLM-R style encoder) transformer language models with MoE FFNs.

`MoETransformerLM` is a pre-norm transformer::

    x = embed(input_ids)
    for each block:  x = x + attn(norm(x))          # multi-head self-attention with RoPE
                     x = x + ffn(norm(x))           # dense SwiGLU / GELU MLP, or an `mmoe.MoE`
    logits = head(norm(x))                          # head tied to the embedding (tie_embeddings)

``kind="causal"`` attends to the past only (GPT / Llama), ``kind="masked"`` bidirectionally (XLM-R; train
it with `mask_tokens`). Attention is ``torch.nn.functional.scaled_dot_product_attention``. Packed rows
(`language.data.pack_documents`) pass per-token ``positions`` (restarting at 0 in every document) and a
boolean ``attn_mask [B, 1, L, L]`` (True = may attend), or simply ``doc_ids`` from which both are built:
a token then never attends across a document boundary and a document inside a packed row gets exactly
the logits it gets alone (tested). In the causal model a given mask is always intersected with the
causal mask, so no mask can open a path from the future.

Sizes (`LMConfig`)
------------------
``ffn_hidden`` (0 = default) is the dense FFN width: ``4 * dim`` for GELU, and for SwiGLU ``8/3 * dim``
rounded *up* to a multiple of 8 (the Llama rule: three matrices of width 8/3 d cost what two of width
4 d cost). MoE layers take their `mmoe.MoEConfig` fields from ``moe`` (`mmoe.moe_config_from_section`):
``dim`` is the model's, ``expert_hidden`` defaults (also when ``null``) to ``ffn_hidden // heads`` (an
expert as wide as the dense FFN; with MH-MoE heads the sub-token experts shrink accordingly),
``activation`` defaults to the dense FFN's (``swiglu`` / ``gelu``) and ``expert_bias`` to ``bias``.

Which layers are MoE: ``moe_layers`` with ``first_dense`` (`mmoe.moe_block_indices`, 0-based):
``"all"`` / ``"every_1"``: every layer (Mixtral); ``"every_2"``: layers 1, 3, 5, ... (GShard / Switch /
MH-MoE "every other layer"); ``"every_n"``: layers ``i >= first_dense`` with
``(i - first_dense + 1) % n == 0``; ``first_dense=1`` keeps layer 0 dense (Default MoE, DeepSeek-MoE);
``"none"``: a dense model; or a list of layer indices. `MoETransformerLM.moe_layer_ids` lists them.

Initialisation (GPT-2 / Megatron scheme)
----------------------------------------
Every linear and embedding weight ~ N(0, init_std), biases 0, norm weights 1; the *output* projections
of each residual branch (attention ``proj``, FFN ``fc2``, experts' ``w2``, shared experts' ``fc2``) get
``init_std / sqrt(2 * depth)`` so the residual stream's variance does not grow with depth (GPT-2 §2.3).
With ``moe_init="lm"`` (default) the stacked expert weights follow the same rule as the dense FFN
(``w1``/``w3`` N(0, init_std), ``w2`` N(0, init_std / sqrt(2 depth)), expert biases 0), so a dense and an
MoE model start alike; the router (N(0, 0.02) in mmoe) and MH-MoE's head / merge projections (Xavier)
keep mmoe's initialisation. ``moe_init="mmoe"`` keeps mmoe's expert init (per-expert nn.Linear default,
kaiming-uniform).

Causality and the Default-MoE EMA (read this before using ``dense_backprop="default"`` in a causal LM)
---------------------------------------------------------------------------------------------------
In **eval mode** the causal model is strictly causal: the logits at position i depend only on tokens
<= i of the same document, with any MoE configuration that routes every token on its own (token-choice
routers, dropless), including ``dense_backprop="default"`` (its EMA buffers are frozen in eval). Tested
by perturbation for ``none`` and ``default``.

In **training mode** ``dense_backprop="default"`` is *not* strictly causal, by design of the method
(methods.md §1.3 / §1.8): mmoe updates each expert's EMA default vector with the mean output of the
current batch's tokens routed to it *before* using it in the same forward. A token's output therefore
contains ``pi_i(x) * (1 - beta) * mean_{tokens of this batch routed to i}(E_i(.))`` for each expert i it
did not select: a (1-beta)/n_i-weighted statistic of other tokens of the batch, future tokens included.
The leak is small (a mean over all n_i tokens of the batch routed to expert i, scaled by (1-beta) and a
router probability: changing one future token moved earlier logits by ~6e-5 in the test model) and only
a batch-level average, and it does not exist at evaluation or generation time (EMA frozen), so
validation perplexities are clean. It is still a path from the future, so training losses can be very
slightly optimistic, and a test demonstrates it (training mode, ``default`` only). Removing it would
need the EMA updated *after* the forward (using the previous step's vector), a change of the mmoe core
(methods.md §1.8 suggests it as an option) that this package does not make.

Other MoE options break causality in **both** modes, because a token's output depends on the other
tokens of the batch: capacity-limited dispatch (``capacity_factor`` / ``eval_capacity_factor``: whether a
token is dropped depends on the tokens competing for the expert), ``router="expert_choice"`` (experts
choose tokens across the batch) and ``dense_backprop="expert_group"`` (its table is built from the
current batch). A causal model built with any of them warns (`CausalityWarning`); use dropless
token-choice routing for language models.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe import MoE, MoEConfig
from mmoe.config import moe_block_indices, moe_config_from_section
from mmoe.data.masking import mask_tokens  # noqa: F401 (re-exported: language.models.mask_tokens)
from mmoe.experts import MLP
from mmoe.stats import ParamCount, RoutingCounter, count_params  # noqa: F401 (count_params: re-export)

IGNORE_INDEX = -100


class CausalityWarning(UserWarning):
    """A causal LM was built with an MoE option that lets a token's output depend on other tokens."""


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass
class LMConfig:
    """Configuration of `MoETransformerLM` (see the module docstring for the rules).

    Attributes:
        vocab_size: embedding / output rows.
        dim, depth, num_heads: width, number of blocks, attention heads (``dim % num_heads == 0``; the head
            width must be even for RoPE).
        ffn: dense FFN type, ``"swiglu"`` or ``"gelu"``.
        ffn_hidden: dense FFN width; 0 = ``4 * dim`` (gelu) or ``8/3 * dim`` rounded up to a multiple of 8
            (swiglu).
        max_seq_len: longest sequence the model is meant for (generation keeps at most this many tokens
            of context). RoPE itself has no table and no hard limit.
        rope_theta: RoPE base.
        norm: ``"rmsnorm"`` or ``"layernorm"`` (pre-norm, plus a final norm).
        moe_layers: which layers are MoE (`mmoe.moe_block_indices`: ``"all"``, ``"every_<n>"``,
            ``"last_<n>"``, ``"none"`` or a list of indices).
        first_dense: leading layers that stay dense whatever ``moe_layers`` says.
        moe: `mmoe.MoEConfig` fields (``dim`` is the model's; ``expert_hidden`` defaults to
            ``ffn_hidden // heads``, ``activation`` to ``ffn``, ``expert_bias`` to ``bias``); validated
            even in a dense model, errors are `mmoe.errors.ConfigError` at ``moe.<field>``.
        moe_init: ``"lm"`` (experts initialised like the dense FFN, GPT-2 scheme) or ``"mmoe"``.
        tie_embeddings: output head = the embedding matrix (one parameter).
        bias: biases in the attention and dense FFN linear layers.
        dropout: dropout on embeddings, attention probabilities and both residual branches.
        init_std: standard deviation of the normal initialisation.
        kind: ``"causal"`` (decoder-only LM) or ``"masked"`` (bidirectional encoder, masked LM).
        norm_eps: epsilon of the norms.
    """

    vocab_size: int
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    ffn_hidden: int = 0
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    moe_layers: str | list[int] = "all"
    first_dense: int = 0
    moe: dict[str, Any] = field(default_factory=lambda: {"num_experts": 8, "top_k": 2})
    moe_init: Literal["lm", "mmoe"] = "lm"
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    kind: Literal["causal", "masked"] = "causal"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"LMConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "dim", "depth", "num_heads", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        if self.dim % self.num_heads:
            raise bad("num_heads", f"must divide dim={self.dim}")
        if (self.dim // self.num_heads) % 2:
            raise bad("num_heads", f"head width dim/num_heads={self.dim // self.num_heads} must be even for RoPE")
        if self.ffn not in ("swiglu", "gelu"):
            raise bad("ffn", "must be 'swiglu' or 'gelu'")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise bad("norm", "must be 'rmsnorm' or 'layernorm'")
        if self.kind not in ("causal", "masked"):
            raise bad("kind", "must be 'causal' or 'masked'")
        if self.moe_init not in ("lm", "mmoe"):
            raise bad("moe_init", "must be 'lm' or 'mmoe'")
        if self.ffn_hidden < 0:
            raise bad("ffn_hidden", "must be >= 0 (0 = default width)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.init_std <= 0:
            raise bad("init_std", "must be > 0")
        if self.rope_theta <= 0:
            raise bad("rope_theta", "must be > 0")
        self.moe_layer_ids()  # ConfigError at moe_layers / first_dense
        if self.moe_config().router == "soft":
            from mmoe.errors import ConfigError

            why = ("it mixes the tokens of a sequence into every slot, so a position would see later tokens"
                   if self.kind == "causal" else
                   "packed documents share a sequence, and its slots would mix tokens across documents")
            raise ConfigError("", "moe.router", f"'soft' (Soft MoE) is not available in language models: {why}; "
                                                "use a token-choice router (softmax, xmoe, sparsemixer)")

    @property
    def hidden(self) -> int:
        """The dense FFN width (``ffn_hidden`` or its default)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.ffn == "gelu":
            return 4 * self.dim
        return 8 * math.ceil(8 * self.dim / 3 / 8)

    def moe_layer_ids(self) -> list[int]:
        """0-based indices of the blocks whose FFN is an MoE layer."""
        return moe_block_indices(self.moe_layers, self.depth, first_dense=self.first_dense)

    def moe_config(self) -> MoEConfig:
        """The `mmoe.MoEConfig` of the MoE layers (defaults filled in as documented)."""
        return moe_config_from_section(self.moe, dim=self.dim, mlp_hidden=self.hidden,
                                       defaults={"activation": self.ffn, "expert_bias": self.bias})


def lm_config_fields() -> list[str]:
    """Names of the `LMConfig` fields (the task's model section repeats them)."""
    return [f.name for f in dataclasses.fields(LMConfig)]


# ------------------------------------------------------------------------------------------------
# masks and positions


def document_mask(doc_ids: Tensor, causal: bool = True) -> Tensor:
    """Boolean attention mask ``[B, 1, L, L]`` from document ids ``[B, L]`` (or ``[L]``): True where query
    i and key j belong to the same document (and ``j <= i`` when ``causal``). ``causal=True`` is
    `language.data.attention_mask_from_doc_ids`."""
    if causal:
        from .data import attention_mask_from_doc_ids

        return attention_mask_from_doc_ids(doc_ids)
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0)
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [L] or [B, L], got shape {tuple(doc_ids.shape)}")
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1)


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Per-token position inside its document: ``[B, L]`` counting from 0 at every change of ``doc_ids``
    (what `pack_documents` returns as ``positions``)."""
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0)
    B, L = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.arange(L, device=doc_ids.device).expand(B, L)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


# ------------------------------------------------------------------------------------------------
# building blocks


def _norm(cfg: LMConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin ``[B, 1, L, head_dim]`` (fp32) for per-token ``positions [B, L]`` (rotate-half layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[..., None] * inv  # [B, L, hd/2]
    ang = torch.cat([ang, ang], dim=-1).unsqueeze(1)  # [B, 1, L, hd]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x [B, H, L, hd]`` (GPT-NeoX / Llama rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding (batch of any size,
    one position counter for all rows)."""

    def __init__(self, depth: int) -> None:
        self.keys: list[Tensor | None] = [None] * depth
        self.values: list[Tensor | None] = [None] * depth

    @property
    def length(self) -> int:
        """Tokens cached (read it before a forward: layers are appended one after the other)."""
        return self.layer_length(0)

    def layer_length(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
        self.theta, self.causal, self.dropout = cfg.rope_theta, cfg.kind == "causal", cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.layer_length(layer)
            k, v = cache.update(layer, k, v)
        p = self.dropout if self.training else 0.0
        if attn_mask is None and self.causal and past == 0 and L > 1:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, moe: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg)
        self.is_moe = moe
        self.ffn = MoE(cfg.moe_config()) if moe else MLP(cfg.dim, cfg.hidden, cfg.ffn, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, attn_mask, cache, layer))
        return x + self.drop(self.ffn(self.norm2(x)))


# ------------------------------------------------------------------------------------------------
# the model


class MoETransformerLM(nn.Module):
    """Pre-norm transformer LM with MoE FFNs (``kind="causal"`` or ``"masked"``); see the module docstring.

    ``forward(input_ids [B, L], positions=None, attn_mask=None, doc_ids=None, kv_cache=None)`` ->
    logits ``[B, L, vocab_size]``.

    * ``positions [B, L]``: RoPE positions; default ``0..L-1`` (after the cached tokens with a cache), or
      positions restarting in every document when ``doc_ids`` is given.
    * ``attn_mask``: boolean ``[B, 1, L, L]`` (True = may attend, e.g. `document_mask`); in the causal
      model it is intersected with the causal mask. Default: built from ``doc_ids`` when given, else
      plain causal (causal model) or full attention (masked model).
    * ``doc_ids [B, L]``: document ids of packed rows (`pack_documents`); builds the block-diagonal mask
      and the positions that are not given.
    * ``kv_cache``: a `KVCache` for incremental decoding (causal model, eval); the new tokens are appended.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        moe_ids = set(cfg.moe_layer_ids())
        self.blocks = nn.ModuleList([Block(cfg, i in moe_ids) for i in range(cfg.depth)])
        self.norm = _norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.kind == "causal" and moe_ids:
            _warn_noncausal(cfg.moe_config())

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    @property
    def output_weight(self) -> Tensor:
        """The output projection ``[vocab_size, dim]`` (the embedding matrix when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self) -> None:
        """GPT-2 style initialisation (module docstring)."""
        cfg = self.cfg
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.depth)
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            for lin, s in ((block.attn.qkv, std), (block.attn.proj, out_std)):
                nn.init.normal_(lin.weight, std=s)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            mlps = [block.ffn] if not block.is_moe else ([block.ffn.shared] if block.ffn.shared is not None else [])
            for mlp in mlps:
                for lin, s in ((mlp.fc1, std), (mlp.fc3, std), (mlp.fc2, out_std)):
                    if lin is None:
                        continue
                    nn.init.normal_(lin.weight, std=s)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
            if block.is_moe and cfg.moe_init == "lm":
                ex = block.ffn.experts
                with torch.no_grad():
                    for w, s in ((ex.w1, std), (ex.w3, std), (ex.w2, out_std)):
                        if w is not None:
                            w.normal_(0.0, s)
                    for b in (ex.b1, ex.b2, ex.b3):
                        if b is not None:
                            b.zero_()
            for norm in (block.norm1, block.norm2):
                _reset_norm(norm)
        _reset_norm(self.norm)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None,
                doc_ids: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        h = self.hidden_states(input_ids, positions, attn_mask, doc_ids, kv_cache)
        return self.logits(h)

    def logits(self, h: Tensor) -> Tensor:
        """Output logits of final hidden states (already normed by `hidden_states`)."""
        return F.linear(h, self.output_weight)

    def hidden_states(self, input_ids: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None,
                      doc_ids: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """Final normed hidden states ``[B, L, dim]`` (the input of the output head)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        B, L = input_ids.shape
        causal = self.cfg.kind == "causal"
        past = 0
        if kv_cache is not None:
            if not causal:
                raise ValueError("kv_cache is for incremental decoding with the causal model")
            if doc_ids is not None or attn_mask is not None:
                raise ValueError("kv_cache does not take doc_ids or attn_mask (one sequence per row)")
            past = kv_cache.length
        dev = input_ids.device
        if positions is None:
            if doc_ids is not None:
                positions = positions_from_doc_ids(doc_ids.to(dev))
            else:
                positions = torch.arange(past, past + L, device=dev).expand(B, L)
        elif positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(B, L)
        if attn_mask is None and doc_ids is not None:
            attn_mask = document_mask(doc_ids.to(dev), causal=causal)
        if attn_mask is not None:
            attn_mask = attn_mask.to(device=dev, dtype=torch.bool)
            if attn_mask.dim() == 2:
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(1)
            if causal:  # no mask may open a path from the future
                attn_mask = attn_mask & torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        elif past > 0 and L > 1:
            # new queries i (absolute past + i) see every cached key and the new keys j <= i
            attn_mask = torch.ones(L, past + L, dtype=torch.bool, device=dev).tril(past)[None, None]
        cos, sin = rope_cos_sin(positions, self.cfg.dim // self.cfg.num_heads, self.cfg.rope_theta)
        x = self.drop(self.embed(input_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, kv_cache, i)
        return self.norm(x)


def _reset_norm(norm: nn.Module) -> None:
    if getattr(norm, "weight", None) is not None:
        nn.init.ones_(norm.weight)
    if getattr(norm, "bias", None) is not None:
        nn.init.zeros_(norm.bias)


def _warn_noncausal(mc: MoEConfig) -> None:
    problems = []
    if mc.capacity_factor is not None or mc.eval_capacity_factor is not None:
        problems.append("capacity-limited dispatch (capacity_factor) drops tokens depending on the other tokens")
    if mc.router == "expert_choice":
        problems.append("router='expert_choice' lets experts choose among all tokens of the batch")
    if mc.dense_backprop == "expert_group":
        problems.append("dense_backprop='expert_group' builds its table from the whole batch")
    if problems:
        warnings.warn("causal LM with MoE options that are not causal (also in eval mode): " + "; ".join(problems)
                      + ". Use dropless token-choice routing for language models.", CausalityWarning, stacklevel=3)


def build_lm(cfg: LMConfig | dict) -> MoETransformerLM:
    """`MoETransformerLM` from an `LMConfig` or a dict of its fields."""
    if isinstance(cfg, dict):
        cfg = LMConfig(**cfg)
    return MoETransformerLM(cfg)


# ------------------------------------------------------------------------------------------------
# masked language modelling


# ------------------------------------------------------------------------------------------------
# routing per language (parameter counts: `mmoe.count_params`, re-exported here)


@torch.no_grad()
def routing_by_language(model: nn.Module, batches: Iterable[dict], num_languages: int | None = None,
                        languages: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Tokens per expert and language for every MoE layer: ``{layer name: [num_languages, E]}`` counts.

    ``batches``: dicts as `language.tasks` collates them (``input_ids``, ``doc_ids``, ``positions``,
    ``lang_ids`` with -1 for padding / unknown language, and for the masked LM the masked inputs as
    ``input_ids``). The model runs in eval mode (restored afterwards) and a `mmoe.RoutingCounter` counts
    each routed slot of a token for the token's language (``heads * top_k`` slots per token with MH-MoE;
    empty slots skipped; slots later dropped by a capacity limit counted). ``num_languages`` defaults to
    ``len(languages)``, else the largest language id + 1 (then the batches are read before counting).
    """
    if num_languages is None and languages is not None:
        num_languages = len(languages)
    if num_languages is None:
        batches = list(batches)
        num_languages = max([int(b["lang_ids"].max()) + 1 for b in batches if b["lang_ids"].numel()] + [1])
    counter = RoutingCounter(model, languages if languages is not None else num_languages)
    if len(counter.groups) != num_languages:
        raise ValueError(f"routing_by_language: num_languages={num_languages} but {len(counter.groups)} languages")
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    try:
        with counter:
            for batch in batches:
                model(batch["input_ids"].to(dev), positions=_opt(batch, "positions", dev),
                      doc_ids=_opt(batch, "doc_ids", dev))
                counter.add(batch["lang_ids"])
    finally:
        model.train(was_training)
    return counter.counts()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _opt(batch: dict, key: str, dev: torch.device) -> Tensor | None:
    v = batch.get(key)
    return v.to(dev) if isinstance(v, Tensor) else None


def plot_routing_by_language(counts: dict[str, Tensor], languages: Sequence[str], path, title: str | None = None):
    """Heatmaps (one per MoE layer) of the share of each language's routed slots per expert (rows sum to
    1); returns the path written."""
    from mmoe.stats import plot_routing_shares

    return plot_routing_shares(counts, languages, path, title or "share of each language's routed slots per expert")
