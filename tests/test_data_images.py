"""Image and caption decoding: every bad-image case is made here, in the test, and checked by value."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm.data.images import BadSample, decode_caption, load_image, resize_and_crop, to_pixel_values


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def handmade_png(width: int, height: int, idat: bytes) -> bytes:
    """An RGB 8-bit PNG with the given IDAT payload and valid CRCs everywhere."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_truncated_png_passes_verify_but_is_rejected():
    rows = b"".join(b"\x00" + bytes(range(96)) for _ in range(32))
    compressed = zlib.compress(rows)
    data = handmade_png(32, 32, compressed[: len(compressed) // 2])  # zlib stream cut short, CRCs valid
    Image.open(io.BytesIO(data)).verify()  # the trap: PIL's verify() is happy
    with pytest.raises(BadSample) as e:
        load_image(data, key="cut.png")
    assert e.value.reason == "truncated_image"
    # the same construction with the whole stream decodes: the failure is the truncation only
    assert load_image(handmade_png(32, 32, compressed)).size == (32, 32)


def test_truncated_jpeg_is_rejected():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)  # noise: the scan data is most of the file
    with pytest.raises(BadSample) as e:
        load_image(data[: len(data) * 2 // 3])
    assert e.value.reason == "truncated_image"


def test_decompression_bomb_rejected_before_decoding():
    # The header claims 10000x10000 = 1e8 pixels with a few bytes of data: our limit must fire
    # from the header (else the decode would report a truncated image instead).
    data = handmade_png(10_000, 10_000, zlib.compress(b"\x00" * 100))
    with pytest.raises(BadSample) as e:
        load_image(data, max_pixels=50_000_000)
    assert e.value.reason == "too_many_pixels" and "10000x10000" in str(e.value)
    # PIL's own DecompressionBombError (above 2x its global limit) is reported the same way
    with pytest.raises(BadSample) as e:
        load_image(handmade_png(20_000, 20_000, b""), max_pixels=10**12)
    assert e.value.reason == "too_many_pixels"


@pytest.mark.parametrize("data", [b"", b"not an image at all", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_garbage_is_unreadable(data):
    with pytest.raises(BadSample) as e:
        load_image(data)
    assert e.value.reason in ("unreadable_image", "truncated_image")


def test_missing_file(tmp_path):
    with pytest.raises(BadSample) as e:
        load_image(tmp_path / "nope.png")
    assert e.value.reason == "missing_image"


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    out = np.asarray(load_image(encode(rgba)))
    # alpha 128/255 of red over white: R = 255, G = B = 255 * (1 - 128/255) = 127
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (255, 127, 127)


def test_palette_with_transparent_index_on_white():
    p = Image.new("P", (4, 2))
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 1)  # green
    data = encode(p, transparency=0)  # index 0 (blue) is transparent -> white
    out = np.asarray(load_image(data))
    assert tuple(out[0, 0]) == (0, 255, 0)
    assert tuple(out[1, 3]) == (255, 255, 255)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    out = np.asarray(load_image(encode(cmyk, "JPEG", quality=100))).astype(int)
    assert np.abs(out[8, 8] - np.array([0, 255, 255])).max() <= 6


def test_16bit_greyscale_is_scaled_not_clamped():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    out = np.asarray(load_image(data)).astype(int)
    expected = np.rint(ramp / 257.0).astype(int)
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert out[..., 0].std() > 60  # a clamp would leave all but the first pixel white
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_8bit_greyscale_and_bilevel():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = np.asarray(load_image(encode(Image.fromarray(grey))))
    assert (out[..., 0] == grey).all()
    assert tuple(np.asarray(load_image(encode(Image.new("1", (3, 3), 1))))[1, 1]) == (255, 255, 255)


def test_exif_orientation_applied():
    # A 40 wide x 20 high picture, red left half, stored with orientation 6 ("rotate 90 CW to view").
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = np.asarray(load_image(data)).astype(int)
    assert out.shape == (40, 20, 3)  # portrait after rotation
    # rotating 90 degrees clockwise puts the left (red) half on top
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_captions():
    assert decode_caption(b"a red circle\n") == (["a red circle"], [])
    assert decode_caption(b"\xef\xbb\xbfhello") == (["hello"], [])  # BOM dropped
    text, notes = decode_caption(b"caf\xe9 au lait")  # latin-1 byte, invalid UTF-8
    assert text == ["caf\ufffd au lait"] and notes == ["invalid_utf8"]
    assert decode_caption(b"  \n ") == ([""], ["empty_caption"])
    assert decode_caption(b"one\n\ntwo\n") == (["one", "two"], ["several_captions"])


def test_resize_and_crop_geometry():
    # A 100x50 image with a distinct left, middle and right third.
    pixels = np.zeros((50, 102, 3), np.uint8)
    pixels[:, :34] = (255, 0, 0)
    pixels[:, 34:68] = (0, 255, 0)
    pixels[:, 68:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    square, (top, left) = resize_and_crop(image, 20, crop="center")
    assert square.size == (20, 20) and top == 0 and left == (41 - 20) // 2
    assert tuple(np.asarray(square)[10, 10]) == (0, 255, 0)
    rng = np.random.default_rng(0)
    lefts = {resize_and_crop(image, 20, crop="random", rng=rng)[1][1] for _ in range(50)}
    assert min(lefts) >= 0 and max(lefts) <= 41 - 20 and len(lefts) > 5
    with pytest.raises(ValueError, match="crop"):
        resize_and_crop(image, 20, crop="middle")


def test_pixel_values_range():
    image = Image.fromarray(np.array([[[0, 255, 128]]], np.uint8))
    values = to_pixel_values(image)
    assert values.shape == (3, 1, 1)
    assert values[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
