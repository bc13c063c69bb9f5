"""Sparse upcycling of a dense timm ViT into a ViT-MoE (Komatsuzaki et al. 2023; methods.md §7).

Every parameter of the dense model is kept; the MLP of each chosen block becomes an `mmoe.MoE` whose
experts are exact copies of that MLP and whose router is new. With renormalised top-k weights (the
default here, as the paper does for vision) and no dropping, the upcycled model computes exactly the
dense model's function at step 0.

Options that break step-0 equality, each on purpose: ``normalize_topk=False`` scales the MLP branch by the
selected probability mass; ``capacity_factor`` drops slots; ``dense_backprop="default"`` mixes in the
EMA default vectors, which start from the first batch's expert outputs; ``expert_noise_std > 0`` perturbs
the copies to break their symmetry.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mmoe import MoE

from .models import VisionTransformerMoE, moe_block_indices, vit_moe_config

_CLASSIFIER_KEYS = ("head.weight", "head.bias")


def load_vit_state(model: nn.Module, path: str | Path, *, use_ema: bool = True, what: str = "") -> None:
    """Load the local checkpoint ``path`` into the built timm ``model``.

    Accepts what timm's loaders accept: ``.safetensors``, ``.pth``/``.bin``/``.pt`` (a plain state dict or one
    wrapped in ``state_dict`` / ``model`` / ``state_dict_ema``, ``module.`` prefixes stripped) and big_vision /
    AugReg ``.npz`` files. For ViTs, timm's checkpoint filter remaps keys and resizes the position embedding
    (and patch embedding) to the model's ``img_size`` / ``patch_size``. A classifier of another size
    (fine-tuning to new classes) is left freshly initialised, with a warning; any other mismatch is an
    error naming the file and the keys.
    """
    from timm.models import load_state_dict
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    path = Path(path)
    where = f"{what}{path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such checkpoint file")
    if path.suffix.lower() in (".npz", ".npy"):
        model.load_pretrained(str(path))
        return
    try:
        state = load_state_dict(str(path), use_ema=use_ema)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{where}: cannot read a state dict ({type(err).__name__}: {err})") from err
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    for k in _CLASSIFIER_KEYS:
        if k in state and k in own and state[k].shape != own[k].shape:
            warnings.warn(f"{where}: {k} has shape {tuple(state[k].shape)}, the model {tuple(own[k].shape)} "
                          "(num_classes differs): the classifier starts fresh", stacklevel=3)
            del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _CLASSIFIER_KEYS]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"{where}: does not fit {type(model).__name__} ({'; '.join(parts)})")


def load_dense_vit(path: str | Path, model_name: str, *, use_ema: bool = True, **model_kwargs: Any) -> nn.Module:
    """timm's ``model_name`` (built without download) with the weights of the local file ``path``
    (`load_vit_state`)."""
    import timm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    load_vit_state(model, path, use_ema=use_ema)
    return model


def _mlp_weights(mlp: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    act = getattr(mlp, "act", None)
    norm = getattr(mlp, "norm", nn.Identity())
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise ValueError(f"{where}: {type(mlp).__name__} is not a fc1-act-fc2 MLP (timm Mlp); cannot copy it "
                         "into experts")
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        raise ValueError(f"{where}: activation {act!r} is not exact GELU; mmoe's GELU experts would not "
                         "reproduce it")
    if not isinstance(norm, nn.Identity):
        raise ValueError(f"{where}: an MLP with a hidden norm ({type(norm).__name__}) cannot be copied into experts")
    return fc1.weight, fc1.bias, fc2.weight, fc2.bias


def copy_mlp_into_moe(moe: MoE, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None, *, noise_std: float = 0.0, generator: torch.Generator | None = None,
                      where: str = "") -> None:
    """Make every expert of ``moe`` a copy of the dense MLP ``fc2(gelu(fc1(x)))`` (``w1``: fc1's ``[hidden,
    dim]`` weight, ``w2``: fc2's ``[dim, hidden]``), plus Gaussian noise of std ``noise_std`` on the weights
    when > 0. The router is left as it is. Errors name ``where``."""
    ex = moe.experts
    if ex.w3 is not None:
        raise ValueError(f"{where}: gated ({moe.cfg.activation}) experts cannot copy a GELU MLP")
    if tuple(ex.w1.shape[1:]) != tuple(w1.t().shape):
        raise ValueError(f"{where}: the MLP is {tuple(w1.t().shape)} (dim, hidden) but the experts are "
                         f"{tuple(ex.w1.shape[1:])}")
    if (b1 is not None or b2 is not None) and ex.b1 is None:
        raise ValueError(f"{where}: the dense MLP has biases; keep expert_bias=True")
    with torch.no_grad():
        ex.w1.copy_(w1.t().unsqueeze(0).expand_as(ex.w1))
        ex.w2.copy_(w2.t().unsqueeze(0).expand_as(ex.w2))
        for b_moe, b_dense in ((ex.b1, b1), (ex.b2, b2)):
            if b_moe is not None:
                b_moe.copy_(b_dense.unsqueeze(0).expand_as(b_moe) if b_dense is not None else torch.zeros_like(b_moe))
        if noise_std > 0:
            for w in (ex.w1, ex.w2):
                w.add_(torch.randn(w.shape, generator=generator).to(w) * noise_std)


def upcycle_vit(dense: nn.Module | str | Path, *, model_name: str | None = None,
                model_kwargs: dict[str, Any] | None = None, moe_layers: str | Sequence[int] = "every_2",
                expert_noise_std: float = 0.0, seed: int | None = None, **moe_options: Any) -> nn.Module:
    """A ViT-MoE upcycled from ``dense``: a timm `VisionTransformer` module, or a local checkpoint file
    of one (then ``model_name`` names the timm architecture, e.g. ``"vit_small_patch16_224"``, and
    ``model_kwargs`` its options such as ``img_size`` or ``num_classes``; see `load_dense_vit`).

    ``moe_options`` are `mmoe.MoEConfig` fields (``num_experts=8``, ``top_k=2``, ``router``, ...);
    ``normalize_topk`` defaults to True here (function preserving). MH-MoE (``heads > 1``) has experts of
    width ``dim / heads`` and cannot copy a dense MLP. The dense model is not modified.
    """
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(dense, (str, Path)):
        if not model_name:
            raise ValueError("upcycle_vit: model_name is needed with a checkpoint path (the dense timm "
                             "architecture, e.g. 'vit_small_patch16_224')")
        dense = load_dense_vit(dense, model_name, **(model_kwargs or {}))
    elif model_kwargs:
        raise ValueError("upcycle_vit: model_kwargs only apply when loading a checkpoint path")
    if not isinstance(dense, VisionTransformer):
        raise TypeError(f"upcycle_vit: expected a timm VisionTransformer, got {type(dense).__name__}")
    if any(isinstance(m, MoE) for m in dense.modules()):
        raise ValueError("upcycle_vit: the model already has MoE layers")
    opts = {"normalize_topk": True, **moe_options}
    if int(opts.get("heads", 1)) != 1:
        raise ValueError("upcycle_vit: heads must be 1 (MH-MoE experts have width dim/heads and cannot be "
                         "copies of the dense MLP)")
    if opts.get("activation", "gelu") != "gelu":
        raise ValueError("upcycle_vit: activation must be 'gelu' (the timm ViT MLP)")
    indices = moe_block_indices(moe_layers, len(dense.blocks))
    if not indices:
        raise ValueError("upcycle_vit: moe_layers selects no block")
    hidden = dense.blocks[indices[0]].mlp.fc1.out_features
    if opts.get("expert_hidden") not in (None, hidden):
        raise ValueError(f"upcycle_vit: expert_hidden must be the dense MLP width {hidden} "
                         f"(got {opts['expert_hidden']})")
    opts["expert_hidden"] = hidden
    cfg = vit_moe_config(dense.embed_dim, hidden / dense.embed_dim, opts)

    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for i in indices:
        w1, b1, w2, b2 = _mlp_weights(model.blocks[i].mlp, f"blocks.{i}.mlp")
        if w1.shape[0] != hidden:
            raise ValueError(f"blocks.{i}.mlp: hidden width {w1.shape[0]} differs from block {indices[0]}'s {hidden}")
        moe = MoE(cfg).to(device=w1.device, dtype=w1.dtype)
        copy_mlp_into_moe(moe, w1, b1, w2, b2, noise_std=expert_noise_std, generator=gen, where="upcycle_vit")
        model.blocks[i].mlp = moe
    if type(model) is VisionTransformer:
        # same modules and attributes as a VisionTransformerMoE built by timm.create_model
        model.__class__ = VisionTransformerMoE
    model.moe_layers = indices
    model.moe_config = cfg
    return model
