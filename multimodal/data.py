"""Data for masked multimodal pre-training: a generated image-caption set, BEiT block masking, captions.

* `write_shapes`: a deterministic synthetic image-text pair set (no download): each image is a plain
  background with one or two coloured shapes, each caption names them and their relation ("a small red
  circle", "a blue square left of a yellow triangle"), written as WebDataset shards with
  `mmoe.data.write_pairs` (PNG + ``txt``; the shapes' parameters are kept in the sample's ``json``).
  ``hard=True`` (`hard_shapes_sample`, ``mmoe shards shapes --hard``) is the retrieval variant: 2-3 shapes
  with type, size, fill and colour, three captions per image and two distractor captions.
* `block_mask`: BEiT's block-wise masking of an image's patch grid (`mmoe.data.masking`, re-exported).
* `CaptionTokenizer`: open_clip's byte-level BPE (its vocabulary ships inside the package) with one
  extra ``[MASK]`` id; `mask_caption` masks captions with `language.models.mask_tokens` (80/10/10).
* `load_image`: PNG/JPEG bytes -> ``[3, H, W]`` in [0, 1].

BEiT-3's ratios: 40% of image patches (block-wise), 15% of the tokens of text alone, 50% of the text
tokens of image-text pairs.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmoe.data.masking import block_mask  # noqa: F401 (re-exported: multimodal.data.block_mask)

IMAGE_MASK_RATIO = 0.4
TEXT_MASK_RATIO = 0.15
PAIR_TEXT_MASK_RATIO = 0.5

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40),
          "white": (245, 245, 245), "purple": (150, 60, 190)}
BACKGROUND = (25, 25, 25)
SIZES = {"small": 0.22, "large": 0.36}  # half-width of a shape as a fraction of the image side


# ------------------------------------------------------------------------------------------------ shapes
def _draw(draw, shape: str, cx: float, cy: float, r: float, color: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)


def shapes_sample(rng: random.Random, img_size: int = 32) -> tuple[bytes, str, dict[str, Any]]:
    """One image (PNG bytes), its caption and the drawn shapes' parameters.

    One shape: ``"a <size> <color> <shape>"`` anywhere. Two shapes: side by side or one above the other,
    ``"a <color> <shape> <left of|right of|above|below> a <color> <shape>"`` (distinct colours), the
    relation read from the first shape to the second.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (img_size, img_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    colors = list(COLORS)
    shapes = []
    if rng.random() < 0.5:
        size = rng.choice(list(SIZES))
        r = SIZES[size] * img_size
        cx, cy = rng.uniform(r, img_size - 1 - r), rng.uniform(r, img_size - 1 - r)
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        shapes.append({"shape": shape, "color": color, "size": size, "cx": cx, "cy": cy, "r": r})
        caption = f"a {size} {color} {shape}"
    else:
        r = 0.2 * img_size
        c1, c2 = rng.sample(colors, 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        a, b = img_size * 0.27, img_size * 0.73  # two slots along one axis
        other = rng.uniform(r, img_size - 1 - r)
        relation = rng.choice(["left of", "right of", "above", "below"])
        first, second = (a, b) if relation in ("left of", "above") else (b, a)
        if relation in ("left of", "right of"):
            p1, p2 = (first, other), (second, other)
        else:
            p1, p2 = (other, first), (other, second)
        shapes.append({"shape": s1, "color": c1, "size": "medium", "cx": p1[0], "cy": p1[1], "r": r})
        shapes.append({"shape": s2, "color": c2, "size": "medium", "cx": p2[0], "cy": p2[1], "r": r})
        caption = f"a {c1} {s1} {relation} a {c2} {s2}"
    for s in shapes:
        _draw(draw, s["shape"], s["cx"], s["cy"], s["r"], COLORS[s["color"]])
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), caption, {"shapes": [{k: (round(v, 3) if isinstance(v, float) else v)
                                                   for k, v in s.items()} for s in shapes]}


# the hard variant (`hard_shapes_sample`): four shape types, two sizes, solid or outlined, 2-3 shapes
HARD_SHAPES = ("circle", "square", "triangle", "diamond")
HARD_SIZES = {"small": 0.12, "large": 0.18}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _draw_hard(draw, s: dict) -> None:
    cx, cy, r = s["cx"], s["cy"], s["r"]
    color = COLORS[s["color"]]
    fill, outline = (None, color) if s["fill"] == "outlined" else (color, None)
    box = (cx - r, cy - r, cx + r, cy + r)
    if s["shape"] == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=1)
    elif s["shape"] == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=1)
    else:
        pts = ([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)] if s["shape"] == "triangle"
               else [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)])
        draw.polygon(pts, fill=fill, outline=outline, width=1)


def _phrase(s: dict) -> str:
    return f"a {s['size']} {'outlined ' if s['fill'] == 'outlined' else ''}{s['color']} {s['shape']}"


def _relation(a: dict, b: dict) -> str:
    """Where ``a`` is seen from ``b``: along the axis of the larger offset."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _hard_captions(shapes: list[dict], rel: str) -> list[str]:
    a, b, rest = shapes[0], shapes[1], shapes[2:]
    tail = "".join(f", and {_phrase(c)}" for c in rest)
    listing = ", ".join(_phrase(c) for c in shapes[:-1]) + f" and {_phrase(shapes[-1])}"
    return [f"{_phrase(a)} {rel} {_phrase(b)}{tail}", f"{_phrase(b)} {INVERSE[rel]} {_phrase(a)}{tail}", listing]


def hard_shapes_sample(rng: random.Random, img_size: int = 32) -> tuple[bytes, list[str], list[str], dict[str, Any]]:
    """One image of the hard variant (PNG bytes), its three captions, two distractor captions and the shapes.

    Two or three non-overlapping shapes, each with a type (circle, square, triangle, diamond), a size
    (small, large), a fill (solid, outlined) and a colour (6), anywhere in the image. Captions: the first
    two shapes and their relation (``"a small red circle left of a large outlined blue diamond"``; the
    relation along the axis of the larger offset), the same with the shapes swapped and the relation
    inverted, and a listing of all shapes (``"a ..., a ... and a ..."``); a third shape is appended to the
    first two (``", and a ..."``). Distractors: the first caption with one thing changed (one shape's
    colour, type, size or fill, or the relation inverted), never equal to a true caption; they describe
    no image of the set, and the retrieval evaluation adds them to the texts an image is ranked against.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (img_size, img_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    n = rng.choice((2, 3))
    shapes: list[dict] = []
    while len(shapes) < n:
        size = rng.choice(list(HARD_SIZES))
        r = HARD_SIZES[size] * img_size
        for _ in range(200):  # rejection sampling of a place that overlaps no earlier shape
            cx, cy = rng.uniform(r, img_size - 1 - r), rng.uniform(r, img_size - 1 - r)
            if all(max(abs(cx - o["cx"]), abs(cy - o["cy"])) > r + o["r"] + 1 for o in shapes):
                break
        else:
            shapes = []  # no room left: start the image again
            continue
        shapes.append({"shape": rng.choice(HARD_SHAPES), "color": rng.choice(list(COLORS)), "size": size,
                       "fill": rng.choice(("solid", "outlined")), "cx": cx, "cy": cy, "r": r})
    for s in shapes:
        _draw_hard(draw, s)
    rel = _relation(shapes[0], shapes[1])
    captions = _hard_captions(shapes, rel)
    distractors: list[str] = []
    options = {"color": list(COLORS), "shape": list(HARD_SHAPES), "size": list(HARD_SIZES),
               "fill": ["solid", "outlined"]}
    while len(distractors) < 2:
        what = rng.choice([*options, "relation"])
        changed, new_rel = [dict(s) for s in shapes], rel
        if what == "relation":
            new_rel = INVERSE[rel]
        else:
            i = rng.randrange(n)
            changed[i][what] = rng.choice([v for v in options[what] if v != shapes[i][what]])
        text = _hard_captions(changed, new_rel)[0]
        if text not in captions and text not in distractors:
            distractors.append(text)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    meta = {"shapes": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()} for s in shapes]}
    return buf.getvalue(), captions, distractors, meta


def write_shapes(out_dir: str | os.PathLike, *, num_samples: int = 2000, img_size: int = 32, seed: int = 0,
                 val_fraction: float = 0.2, hard: bool = False, **write_shards_kwargs):
    """Generate ``num_samples`` images with captions and write them as shards with `mmoe.data.write_pairs`
    (hash-based ``val_fraction`` split); the same arguments give byte-identical shards. Returns the
    `Manifest`.

    ``hard=False``: `shapes_sample`, one caption per image. ``hard=True``: `hard_shapes_sample`, three
    captions per image (``txt`` holds them one per line, `mmoe.data.captions_of`) and two distractor
    captions in the sample's ``json["extra"]["distractors"]``."""
    from mmoe.data import write_pairs

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if img_size < (24 if hard else 8):
        raise ValueError(f"img_size must be >= {24 if hard else 8}, got {img_size}")
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="mmoe-shapes-") as tmp:
        lines = []
        for i in range(num_samples):
            name = f"{i:07d}.png"
            if hard:
                png, captions, distractors, meta = hard_shapes_sample(rng, img_size)
                row = {"image": name, "caption": captions, "distractors": distractors, **meta}
            else:
                png, caption, meta = shapes_sample(rng, img_size)
                row = {"image": name, "caption": caption, **meta}
            Path(tmp, name).write_bytes(png)
            lines.append(json.dumps(row, sort_keys=True))
        listing = Path(tmp, "pairs.jsonl")
        listing.write_text("\n".join(lines) + "\n")
        return write_pairs(listing, out_dir, val_fraction=val_fraction, **write_shards_kwargs)


# ------------------------------------------------------------------------------------------------ masking
# ------------------------------------------------------------------------------------------------ text
class CaptionTokenizer:
    """open_clip's BPE tokenizer (vocabulary bundled with open_clip, no download) plus a ``[MASK]`` id.

    ``encode(text)`` = ``[sot] + bpe + [eot]``, truncated to ``context_length`` with ``eot`` kept last.
    Ids: ``pad_id`` 0, ``mask_id`` = open_clip's vocabulary size (the one extra id), ``vocab_size`` =
    open_clip's + 1.
    """

    def __init__(self, context_length: int = 32) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self._tok = SimpleTokenizer()
        self.context_length = context_length
        self.sot_id = self._tok.encoder["<start_of_text>"]
        self.eot_id = self._tok.encoder["<end_of_text>"]
        self.pad_id = 0
        self.mask_id = len(self._tok.encoder)
        self.vocab_size = self.mask_id + 1

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.sot_id, self.eot_id, self.mask_id)

    def encode(self, text: str) -> list[int]:
        if not text or not text.strip():
            raise ValueError("CaptionTokenizer.encode: empty caption")
        ids = self._tok.encode(text)[: self.context_length - 2]
        return [self.sot_id, *ids, self.eot_id]

    def batch(self, texts: list[str], pad_to_max: bool = False) -> tuple[Tensor, Tensor]:
        """``(ids [B, L], padding_mask [B, L])`` (True = padding), L = longest (or ``context_length``)."""
        enc = [self.encode(t) for t in texts]
        return self.pad(enc, self.context_length if pad_to_max else None)

    def pad(self, enc: list[list[int]], length: int | None = None) -> tuple[Tensor, Tensor]:
        L = length or max(len(e) for e in enc)
        ids = torch.full((len(enc), L), self.pad_id, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e[:L], dtype=torch.long)
        pad = torch.ones_like(ids, dtype=torch.bool)
        for i, e in enumerate(enc):
            pad[i, :min(len(e), L)] = False
        return ids, pad

    def decode(self, ids) -> str:
        keep = [int(i) for i in ids if int(i) not in self.special_ids]
        return self._tok.decode(keep).strip()


def mask_caption(ids: Tensor, padding_mask: Tensor, ratio: float, tokenizer: CaptionTokenizer,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT masking (`language.models.mask_tokens`, 80% [MASK] / 10% random / 10% kept) of the caption
    tokens with probability ``ratio``; special ids and padding are never selected. A caption where the
    draw selects nothing gets one random token selected (and replaced by [MASK]), so every caption adds
    to the masked-language loss. Returns ``(input_ids, labels)`` (labels -100 where not selected)."""
    from mmoe.data.masking import mask_tokens

    inputs, labels = mask_tokens(ids, tokenizer.mask_id, tokenizer.vocab_size, tokenizer.special_ids,
                                 prob=ratio, generator=generator)
    if ratio > 0:
        can = ~padding_mask & ~torch.isin(ids, torch.tensor(tokenizer.special_ids))
        for row in ((labels == -100).all(1) & can.any(1)).nonzero().squeeze(1).tolist():
            cols = can[row].nonzero().squeeze(1)
            col = int(cols[torch.randint(0, cols.numel(), (), generator=generator)])
            labels[row, col] = ids[row, col]
            inputs[row, col] = tokenizer.mask_id
    return inputs, labels


# ------------------------------------------------------------------------------------------------ images
def load_image(data: bytes, img_size: int, key: str = "?") -> Tensor:
    """Image bytes -> RGB ``[3, img_size, img_size]`` float in [0, 1] (resized when needed)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor, resize

    from mmoe.data.decode import to_rgb

    try:
        img = to_rgb(Image.open(io.BytesIO(data)))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"sample {key}: the image does not decode ({err})") from None
    t = pil_to_tensor(img)
    if t.shape[-2:] != (img_size, img_size):
        t = resize(t, [img_size, img_size], antialias=True)
    return t.float() / 255.0
