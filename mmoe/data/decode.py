"""Small decoders for raw WebDataset samples (fields are bytes, named by extension).

Each raises `KeyError` naming the missing field and the fields present, or the library's own error for
bad bytes; inside `ShardLoader` any such exception becomes a `DataError` naming the shard and the key.
`to_rgb` turns a ``PIL.Image`` of any mode into 8-bit RGB (16-bit and float ranges scaled, not clipped).
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # not LAB, whose A is a colour axis
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "gif", "tif", "tiff")


def _fields(sample: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def _field(sample: Mapping[str, Any], names: tuple[str, ...] | str) -> tuple[str, Any]:
    names = (names,) if isinstance(names, str) else names
    for name in names:
        if name in sample:
            return name, sample[name]
    raise KeyError(f"sample {sample.get('__key__')!r} has no field {' / '.join(names)} "
                   f"(its fields: {', '.join(_fields(sample)) or 'none'})")


def _alpha_onto_white(image):
    """``image`` as RGBA (its alpha band or its ``transparency`` key applied) composited onto opaque white."""
    from PIL import Image

    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scaled_to_l(image):
    """A high-bit-depth greyscale image (modes ``I;16*``, ``I``, ``F``) as an 8-bit ``L`` image whose range is
    scaled, not clipped (see `to_rgb`); any other image as it is."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    array = np.asarray(image)
    if mode == "F":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            scaled = array * 255.0
        elif hi > lo:
            scaled = (array - lo) * (255.0 / (hi - lo))
        else:  # a constant image outside [0, 1]
            scaled = np.zeros_like(array)
    else:
        array = np.clip(array.astype(np.float64), 0.0, None)  # a signed mode's negatives are black
        top = 65535.0 if mode.startswith("I;16") or not array.size or array.max() <= 65535 else 2.0 ** 31 - 1
        scaled = array * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # mode L


def to_rgb(image):
    """``image`` (a ``PIL.Image`` of any mode) as a new 8-bit ``RGB`` image, with high-bit-depth ranges scaled
    to 0..255 instead of clipped (PIL's own ``convert("RGB")`` turns a 16-bit PNG all white).

    - ``RGB``: a copy. ``1``, ``L``, ``P`` (no transparency), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and other
      8-bit modes: PIL's conversion (CMYK naively, without its ICC profile).
    - Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, or a ``transparency`` key in ``image.info``, as
      palette and tRNS PNGs have): composited onto opaque **white**, so transparent pixels are white whatever
      colour they hold (PIL's ``convert("RGB")`` drops the alpha and shows that hidden colour, often black).
    - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: 0..65535 scaled to 0..255.
    - ``I`` (32-bit signed): negative values are 0; when no value exceeds 65535 the image is taken as 16-bit
      (0..65535 -> 0..255, as Pillow opens some 16-bit files), otherwise 0..2**31-1 -> 0..255.
    - ``F`` (32-bit float): values all in [0, 1] are scaled by 255; otherwise the image's own finite minimum
      and maximum are stretched to 0..255 (a constant image outside [0, 1] is black). NaN and infinities are 0.
    """
    image = _scaled_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _alpha_onto_white(image)
    return image.copy() if image.mode == "RGB" else image.convert("RGB")


def decode_image(sample: Mapping[str, Any], mode: str = "RGB"):
    """The sample's image as a loaded ``PIL.Image`` in ``mode`` (default RGB); the field is the first of
    `IMAGE_EXTENSIONS` present. Every PIL mode goes through `to_rgb` first (16-bit and float ranges scaled,
    transparency composited onto white), then to ``mode`` when it is not RGB; an image already in ``mode`` is
    kept as it is, and a ``mode`` with alpha (``RGBA``, ``LA``, ...) keeps the image's alpha."""
    from PIL import Image

    _, data = _field(sample, IMAGE_EXTENSIONS)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if mode == "RGB":
            return to_rgb(image)
        if image.mode == mode:
            return image.copy()
        if mode in _ALPHA_MODES:
            return _scaled_to_l(image).convert(mode)
        return to_rgb(image).convert(mode)


def decode_json(sample: Mapping[str, Any], field: str = "json") -> Any:
    """The JSON field parsed (``json`` by default)."""
    _, data = _field(sample, field)
    return json.loads(data)


def decode_text(sample: Mapping[str, Any], field: str | tuple[str, ...] = ("txt", "text")) -> str:
    """The text field decoded as UTF-8 (``txt`` or ``text`` by default)."""
    _, data = _field(sample, field)
    return data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else str(data)


def decode_label(sample: Mapping[str, Any], field: str = "cls") -> int:
    """The integer class label (``cls`` by default)."""
    _, data = _field(sample, field)
    return int(data)
