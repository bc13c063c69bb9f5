"""Every PIL image mode decodes to RGB with its range scaled, not clipped (`mmoe.data.decode.to_rgb`, used by
`decode_image`); ``mmoe predict`` on such files is tested in tests/vision/test_vision.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmoe.data import decode_image
from mmoe.data.decode import to_rgb

WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def decoded(image: Image.Image, fmt: str, field: str) -> np.ndarray:
    """``image`` written as ``fmt`` bytes and read back through `decode_image` (the mode survives the trip),
    as an ``[H, W, 3]`` uint8 array."""
    data = encoded(image, fmt)
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == image.mode or {back.mode, image.mode} == {"I;16", "I;16L"}  # the same layout
    out = decode_image({"__key__": "k", field: data})
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def array_image(array: np.ndarray, mode: str) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(array))  # the mode follows from the dtype and shape
    assert image.mode == mode, (image.mode, mode)
    return image


def grey(array: np.ndarray) -> np.ndarray:
    """The one channel of an RGB array whose three channels are equal."""
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0]


def ramp8() -> np.ndarray:
    return np.arange(256, dtype=np.int64).reshape(1, 256)  # the 8-bit values a scaled ramp must give


# ------------------------------------------------------------------------------------------------ high bit depth


@pytest.mark.parametrize("mode,fmt,field", [("I;16", "PNG", "png"), ("I;16B", "TIFF", "tiff"),
                                            ("I;16L", "TIFF", "tif")])
def test_16_bit_gradient_scales_to_8_bit_gradient(mode, fmt, field):
    values = ramp8() * 257  # 0, 257, ..., 65535: exactly 0..255 once scaled
    image = array_image(values.astype(np.uint16), "I;16")
    if mode != "I;16":  # the same values, big- or little-endian
        image = Image.frombytes(mode, image.size, values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert np.asarray(image).astype(np.int64).tolist() == values.tolist()
    out = grey(decoded(image, fmt, field))
    # PIL's own convert("RGB") clips: everything above 255 is white, the image is nearly constant
    assert out.astype(np.int64).tolist() == ramp8().tolist()
    assert to_rgb(image).getpixel((128, 0)) == (128, 128, 128)


def test_16_bit_png_of_real_values_is_not_white():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4096, size=(16, 16), dtype=np.uint16)  # a 12-bit sensor in a 16-bit PNG
    out = grey(decoded(array_image(values, "I;16"), "PNG", "png"))
    assert out.max() <= 16 and out.std() > 1  # 4095 / 65535 * 255 = 15.9: dark, not saturated
    np.testing.assert_allclose(out, values.astype(np.float64) * 255 / 65535, atol=0.5)


def test_32_bit_int_within_16_bits_is_taken_as_16_bit():
    values = ramp8() * 257
    out = grey(decoded(array_image(values.astype(np.int32), "I"), "TIFF", "tiff"))
    assert out.astype(np.int64).tolist() == ramp8().tolist()


def test_32_bit_int_beyond_16_bits_uses_the_int32_range_and_negatives_are_black():
    top = 2 ** 31 - 1
    values = np.array([[-5, 0, 65536, top // 2, top]], dtype=np.int64)
    out = grey(decoded(array_image(values.astype(np.int32), "I"), "TIFF", "tiff"))
    assert out.tolist() == [[0, 0, 0, 127, 255]]  # 127.49...


def test_float_in_unit_range_is_scaled_by_255():
    values = (ramp8() / 255.0).astype(np.float32)
    out = grey(decoded(array_image(values, "F"), "TIFF", "tiff"))
    assert out.astype(np.int64).tolist() == ramp8().tolist()


def test_float_outside_unit_range_is_stretched_min_to_max():
    values = np.array([[-10.0, 0.0, 41.0, 90.0, np.nan]], dtype=np.float32)
    out = grey(decoded(array_image(values, "F"), "TIFF", "tiff"))
    # NaN is 0; min -10 -> 0, max 90 -> 255, 0 (and NaN) -> 25.5, 41 -> 130.05
    assert out.tolist() == [[0, 26, 130, 255, 26]]
    const = grey(np.asarray(to_rgb(array_image(np.full((2, 2), 7.0, np.float32), "F"))))
    assert (const == 0).all()


# ------------------------------------------------------------------------------------------------ transparency


def test_rgba_alpha_is_composited_onto_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent, hidden colour black
    rgba[0, 2] = (0, 0, 255, 128)  # half-transparent blue
    out = decoded(array_image(rgba, "RGBA"), "PNG", "png")
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 1]) == WHITE  # PIL's convert("RGB") would show the hidden black
    assert tuple(out[0, 2]) == (127, 127, 255)


def test_la_alpha_is_composited_onto_white():
    la = np.array([[[0, 255], [0, 0], [100, 0]]], np.uint8)  # opaque black, transparent black, transparent grey
    out = grey(decoded(array_image(la, "LA"), "PNG", "png"))
    assert out.tolist() == [[0, 255, 255]]


def palette_image(transparent: int | None = None) -> Image.Image:
    image = Image.frombytes("P", (4, 1), bytes([0, 1, 2, 3]))
    image.putpalette([*RED, *GREEN, *BLUE, 10, 20, 30] + [0] * (3 * 252))
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


def test_palette_decodes_to_its_colours():
    out = decoded(palette_image(), "PNG", "png")
    assert [tuple(p) for p in out[0]] == [RED, GREEN, BLUE, (10, 20, 30)]


def test_palette_transparency_is_white():
    image = palette_image(transparent=1)
    data = encoded(image, "PNG")
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == "P" and back.info.get("transparency") is not None
    out = np.asarray(decode_image({"png": data}))
    assert [tuple(p) for p in out[0]] == [RED, WHITE, BLUE, (10, 20, 30)]  # convert("RGB") keeps green


def test_pa_alpha_is_composited_onto_white():
    pa = palette_image().convert("PA")  # no file format stores PA: converted directly
    pa.putalpha(array_image(np.array([[255, 0, 255, 0]], np.uint8), "L"))
    out = np.asarray(to_rgb(pa))
    assert [tuple(p) for p in out[0]] == [RED, WHITE, BLUE, WHITE]


def test_rgb_transparency_key_is_white():
    rgb = np.array([[RED, GREEN]], np.uint8)
    image = array_image(rgb, "RGB")
    image.info["transparency"] = GREEN
    out = np.asarray(decode_image({"png": encoded(image, "PNG")}))
    assert [tuple(p) for p in out[0]] == [RED, WHITE]


# ------------------------------------------------------------------------------------------------ 8-bit modes


def test_rgb_is_kept_exactly():
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    assert (decoded(array_image(rgb, "RGB"), "PNG", "png") == rgb).all()
    image = array_image(rgb, "RGB")
    copy = to_rgb(image)
    assert copy is not image and (np.asarray(copy) == rgb).all()


def test_one_bit_and_grey():
    bits = array_image(np.array([[0, 255, 0]], np.uint8), "L").convert("1")
    assert grey(decoded(bits, "PNG", "png")).tolist() == [[0, 255, 0]]
    assert grey(decoded(array_image(ramp8().astype(np.uint8), "L"), "PNG", "png")).tolist() == ramp8().tolist()


@pytest.mark.parametrize("fmt,field", [("TIFF", "tiff"), ("JPEG", "jpg")])
def test_cmyk_known_colours(fmt, field):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure magenta + yellow ink: red
    cmyk.paste((0, 0, 0, 255), (4, 0, 8, 8))  # black ink
    out = decoded(cmyk, fmt, field)
    tol = 0 if fmt == "TIFF" else 8
    assert np.abs(out[2, 1].astype(int) - RED).max() <= tol
    assert np.abs(out[2, 6].astype(int) - (0, 0, 0)).max() <= tol


def test_ycbcr_known_colour():
    ycc = Image.new("RGB", (4, 4), BLUE).convert("YCbCr")
    out = decoded(ycc, "TIFF", "tiff")
    assert np.abs(out.astype(int) - BLUE).max() <= 2


def test_lab_known_colours():
    lab = Image.new("LAB", (2, 1), (255, 128, 128))  # L* 100, a* = b* = 0: white
    lab.putpixel((1, 0), (0, 128, 128))  # L* 0: black
    out = decoded(lab, "TIFF", "tiff")
    assert np.abs(out[0, 0].astype(int) - WHITE).max() <= 2 and np.abs(out[0, 1].astype(int)).max() <= 2
    assert to_rgb(lab).mode == "RGB"


def test_hsv_known_colours():
    hsv = Image.new("HSV", (3, 1), (0, 255, 255))  # no file format stores HSV: converted directly
    hsv.putpixel((1, 0), (85, 255, 255))
    hsv.putpixel((2, 0), (0, 0, 128))
    out = np.asarray(to_rgb(hsv)).astype(int)
    assert np.abs(out[0, 0] - RED).max() <= 2 and np.abs(out[0, 1] - GREEN).max() <= 2
    assert np.abs(out[0, 2] - 128).max() <= 1


def test_other_modes_still_decode_as_asked():
    values = ramp8() * 257
    data = encoded(array_image(values.astype(np.uint16), "I;16"), "PNG")
    assert np.asarray(decode_image({"png": data}, mode="L")).astype(np.int64).tolist() == ramp8().tolist()
    rgba = array_image(np.array([[[1, 2, 3, 40]]], np.uint8), "RGBA")
    assert decode_image({"png": encoded(rgba, "PNG")}, mode="RGBA").getpixel((0, 0)) == (1, 2, 3, 40)
    la = array_image(np.array([[[9, 0]]], np.uint8), "LA")
    assert decode_image({"png": encoded(la, "PNG")}, mode="L").getpixel((0, 0)) == 255  # on white
