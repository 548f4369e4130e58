"""Image and caption decoding: whatever is on disk -> an RGB uint8 picture and a caption string.

Every reader of `ldm.data` funnels through `load_image` and `decode_caption`, so the rules below
hold for every format:

- Images are *fully* decoded (`Image.load()`), not just `verify()`-ed: a PNG whose zlib stream is
  cut short passes `verify()` (it only checks chunk CRCs) and fails only when the pixels are read.
- The pixel count is checked from the header, before decoding, against `max_pixels`: a 100-byte
  file may claim 20000x20000 pixels (a decompression bomb). This is our own limit, independent of
  PIL's global `Image.MAX_IMAGE_PIXELS`, so changing one program's PIL setting cannot disable it.
- EXIF orientation is applied (phones store portraits as rotated landscapes plus a tag).
- Alpha (RGBA, LA, palette with a transparent index) is composited on white, because captions
  describe what a viewer sees and viewers show transparent pixels on a light page.
- 16-bit greyscale is scaled by 255/65535, not clamped: PIL's own `convert("L")` of an "I;16"
  image clips every value above 255 to white.
- Palette, CMYK, greyscale and the other PIL modes are converted with PIL's conversions.

A sample that cannot be used raises `BadSample(reason, key)`; `reason` is one of `BAD_REASONS`,
a short stable name the readers count by and `ldm-data check` prints.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 48-megapixel phone photo is 8000x6000; a pathological file claims far more. Beyond this
# the decode alone can take GBs of memory for a picture we shrink to a few hundred pixels anyway.
DEFAULT_MAX_PIXELS = 50_000_000

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Why a sample was skipped. Stable names: tests, `ldm-data check` and users grep for them.
BAD_REASONS = {
    "missing_image": "the image file named by the metadata does not exist",
    "missing_caption": "no caption (no .txt beside the image, no text field, or no txt/json in the shard)",
    "unreadable_image": "not an image PIL can identify (garbage, wrong extension, empty file)",
    "truncated_image": "the image header is fine but the pixel data is cut short or corrupt",
    "too_many_pixels": "the image claims more pixels than max_pixels (decompression bomb guard)",
    "unsupported_mode": "a PIL image mode we do not convert (e.g. 32-bit float)",
    "bad_metadata_row": "a metadata.jsonl/.csv row that is not valid JSON or lacks file_name",
    "bad_caption": "a caption that is neither text nor a JSON string/list/object with a caption",
    "too_small": "an image smaller than min_size on its shorter side",
    "bad_shard": "a tar shard that cannot be read to its end (samples after the damage are lost)",
}

# Problems that are counted but do not skip the sample.
NOTE_REASONS = {
    "invalid_utf8": "caption bytes were not valid UTF-8; bad bytes were replaced with U+FFFD",
    "empty_caption": "the caption is empty (kept: an empty caption is a valid unconditional sample)",
    "several_captions": "the image has several captions; one is picked at random each time it is read",
}

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class BadSample(ValueError):
    """A sample that must be skipped. `reason` is a key of `BAD_REASONS`."""

    def __init__(self, reason: str, key: str, detail: str = ""):
        assert reason in BAD_REASONS, reason
        self.reason, self.key, self.detail = reason, key, detail
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))


def load_image(source: ImageSource, *, key: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` (a path, the file's bytes, or a PIL image) into a fully loaded RGB image.

    Raises `BadSample` with the reason; see the module docstring for the rules applied.
    """
    key = key or (str(source) if isinstance(source, (str, os.PathLike)) else "<image>")
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise BadSample("missing_image", key)
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            with warnings.catch_warnings():
                # PIL warns (and above 2x its limit raises) about bombs; we apply our own limit below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise BadSample("too_many_pixels", key, str(e).split(".")[0]) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise BadSample("unreadable_image", key, type(e).__name__) from None
    w, h = image.size
    if w * h > max_pixels:
        raise BadSample("too_many_pixels", key, f"{w}x{h} > max_pixels={max_pixels}")
    if w == 0 or h == 0:
        raise BadSample("unreadable_image", key, f"size {w}x{h}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # the full decode: truncated data fails here, not at open()
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise BadSample("truncated_image", key, " ".join(str(e).split())[:80]) from None
    return to_rgb(image, key=key)


def to_rgb(image: Image.Image, *, key: str = "<image>") -> Image.Image:
    """Convert any PIL mode to RGB: alpha on white, 16-bit scaled, palette/CMYK/grey via PIL."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG loads as "I;16" or "I"): scale 0..65535 -> 0..255, never clamp.
        grey = np.asarray(image).astype(np.float64)
        if mode == "I" and grey.max(initial=0) <= 255:
            pass  # an 8-bit image that was stored as 32-bit int: already on the 0..255 scale
        else:
            grey = grey * (255.0 / 65535.0)
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1))
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    raise BadSample("unsupported_mode", key, f"mode {mode}")


def decode_caption(raw: bytes | str) -> tuple[list[str], list[str]]:
    """Caption file contents -> (captions, notes).

    A text with several non-empty lines is a list of captions (one per line, the COCO habit);
    readers pick one at random per read. Invalid UTF-8 is replaced and noted; an empty caption is
    kept (as `[""]`) and noted. `notes` are keys of `NOTE_REASONS`.
    """
    notes = []
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            notes.append("invalid_utf8")
    else:
        text = raw
    text = text.lstrip("\ufeff")  # a BOM left by Windows editors is not part of the caption
    return _caption_list([line.strip() for line in text.splitlines()], notes)


def caption_from_value(value, *, key: str) -> tuple[list[str], list[str]]:
    """A caption field from JSON/CSV/`datasets` (a string, a list of strings, or None) -> (captions, notes)."""
    if value is None:
        raise BadSample("missing_caption", key)
    if isinstance(value, str):
        return _caption_list([value.strip()], [])
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return _caption_list([v.strip() for v in value], [])
    raise BadSample("bad_caption", key, f"caption is {type(value).__name__}")


def _caption_list(lines: list[str], notes: list[str]) -> tuple[list[str], list[str]]:
    captions = [c for c in lines if c]
    if not captions:
        return [""], notes + ["empty_caption"]
    if len(captions) > 1:
        notes = notes + ["several_captions"]
    return captions, notes


def resize_and_crop(image: Image.Image, resolution: int, *, crop: str = "center", rng: np.random.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the shorter side to `resolution` (bicubic, antialiased), then crop a square.

    crop="center" takes the middle; crop="random" draws the offset from `rng`. Returns the
    square image and the crop's (top, left) in the resized image (SDXL-style crop conditioning).
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if crop == "center":
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        rng = rng if rng is not None else np.random.default_rng()
        top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def to_pixel_values(image: Image.Image):
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (x/127.5 - 1, the VAE's input range)."""
    import torch

    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
