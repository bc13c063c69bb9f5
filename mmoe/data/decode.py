"""Small decoders for raw WebDataset samples (fields are bytes, named by extension).

Each raises `KeyError` naming the missing field and the fields present, or the library's own error for
bad bytes; inside `ShardLoader` any such exception becomes a `DataError` naming the shard and the key.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

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


def decode_image(sample: Mapping[str, Any], mode: str = "RGB"):
    """The sample's image as a loaded ``PIL.Image`` in ``mode`` (default RGB); the field is the first of
    `IMAGE_EXTENSIONS` present."""
    from PIL import Image

    _, data = _field(sample, IMAGE_EXTENSIONS)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert(mode)


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
