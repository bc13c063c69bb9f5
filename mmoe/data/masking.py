"""Masking for masked-modelling tasks, shared by the families (torch only):

* `mask_tokens` — BERT / XLM-R token masking (80% ``[MASK]``, 10% random, 10% kept), used by the masked
  language model (`language`) and by caption masking (`multimodal`);
* `block_mask` — BEiT's block-wise patch mask with an exact masked count (`multimodal`'s image streams).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "mask_tokens", "block_mask"]

IGNORE_INDEX = -100  # label of positions that take no part in the loss (torch's cross_entropy default)


def mask_tokens(input_ids: Tensor, mask_id: int, vocab_size: int, special_ids: Iterable[int] = (),
                prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT / XLM-R masking: returns ``(inputs, labels)``.

    Every token whose id is not in ``special_ids`` (padding, bos, eos, ...) is selected with probability
    ``prob``. Of the selected tokens 80% are replaced by ``mask_id``, 10% by a random token drawn
    uniformly from ``[0, vocab_size)`` minus ``special_ids``, and 10% are kept. ``labels`` holds the
    original id at selected positions and -100 (ignored by ``cross_entropy``) everywhere else. The input
    tensor is not modified; ``generator`` (CPU) makes the draw reproducible.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    ids = input_ids.detach().cpu()
    special = torch.tensor(sorted({int(s) for s in special_ids}), dtype=torch.long)
    can = ~torch.isin(ids, special) if special.numel() else torch.ones_like(ids, dtype=torch.bool)
    u = torch.rand(ids.shape, generator=generator)
    selected = can & (u < prob)
    kind = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (kind < 0.8)
    to_random = selected & (kind >= 0.8) & (kind < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    keep = special[(special >= 0) & (special < vocab_size)]
    allowed[keep] = False
    if 0 <= mask_id < vocab_size:
        allowed[mask_id] = False
    pool = allowed.nonzero().squeeze(1)
    if pool.numel() == 0:
        raise ValueError("mask_tokens: no ordinary token id left to draw random replacements from")
    random_ids = pool[torch.randint(pool.numel(), ids.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs.to(input_ids.device), labels.to(input_ids.device)


def block_mask(grid_h: int, grid_w: int, num_masked: int, generator: torch.Generator, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), max_tries: int = 10) -> Tensor:
    """BEiT's block-wise mask: exactly ``num_masked`` True cells of a ``[grid_h, grid_w]`` patch grid.

    Rectangles are drawn one after another: an area between ``min_block`` and what is still to be masked,
    an aspect ratio log-uniform in ``aspect``, a random position; the rectangle's cells that are not masked
    yet are masked (a rectangle that would overshoot the count is retried, up to ``max_tries`` times per
    round). When no rectangle fits the rest, single random cells complete the count, so the ratio is exact.
    """
    total = grid_h * grid_w
    if not 0 <= num_masked <= total:
        raise ValueError(f"num_masked must be in [0, {total}], got {num_masked}")
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    count = 0
    while count < num_masked:
        left = num_masked - count
        if left < min_block:
            break
        added = 0
        for _ in range(max_tries):
            area = uniform(min_block, left)
            ratio = math.exp(uniform(math.log(aspect[0]), math.log(aspect[1])))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (1 <= h < grid_h and 1 <= w < grid_w):
                continue
            top = int(torch.randint(0, grid_h - h + 1, (), generator=generator))
            lft = int(torch.randint(0, grid_w - w + 1, (), generator=generator))
            new = int((~mask[top:top + h, lft:lft + w]).sum())
            if 0 < new <= left:
                mask[top:top + h, lft:lft + w] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < num_masked:
        free = (~mask).reshape(-1).nonzero().squeeze(1)
        pick = free[torch.randperm(free.numel(), generator=generator)[:num_masked - count]]
        mask.view(-1)[pick] = True
    return mask
