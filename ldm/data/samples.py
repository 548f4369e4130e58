"""What every dataset shares: decoding one `RawSample` into a training dict, and counting problems."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image

from .images import BAD_REASONS, DEFAULT_MAX_PIXELS, NOTE_REASONS, BadSample, load_image, resize_and_crop, to_pixel_values
from .readers import RawSample

log = logging.getLogger("ldm.data")

# How many example keys a report keeps per reason, and how many skips a process logs one by one.
EXAMPLES_PER_REASON = 3
LOGGED_SKIPS = 5


class SampleReport:
    """Counts of good samples, skipped samples by reason and noted problems, with example keys."""

    def __init__(self):
        self.ok = 0
        self.bad: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add_bad(self, error: BadSample, *, log_it: bool = True) -> None:
        self.bad[error.reason] += 1
        self._example(error.reason, error.key)
        if log_it and sum(self.bad.values()) <= LOGGED_SKIPS:
            log.warning("skipping %s", error)

    def add_notes(self, notes: list[str], key: str) -> None:
        for note in set(notes):
            self.notes[note] += 1
            self._example(note, key)

    def _example(self, reason: str, key: str) -> None:
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(key)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "skipped": dict(self.bad), "notes": dict(self.notes), "examples": dict(self.examples)}

    def summary(self) -> str:
        """A few lines: totals, then one line per reason with its meaning and first paths."""
        lines = [f"{self.ok} good, {self.num_bad} skipped"]
        for title, counts, meanings in (("skipped", self.bad, BAD_REASONS), ("noted", self.notes, NOTE_REASONS)):
            for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                shown = ", ".join(self.examples[reason])
                lines.append(f"  {title} {n:>7} {reason}: {meanings[reason]}; e.g. {shown}")
        return "\n".join(lines)


def decode_sample(raw: RawSample, *, resolution: int, crop: str, random_flip: bool, rng: np.random.Generator,
                  max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0, report: SampleReport | None = None) -> dict:
    """RawSample -> {"pixel_values": (3, R, R) float in [-1, 1], "caption": str, "key": str,
    "original_size": (h, w), "crop_top_left": (top, left)}; raises BadSample.

    The caption is read before the pixels so that a sample without one costs no image decode.
    Crop offset, flip and the choice among several captions all come from `rng`, so a sample's
    augmentation is a function of the dataset seed, never of process timing.
    """
    captions, notes = raw.captions()
    image = load_image(raw.image, key=raw.key, max_pixels=max_pixels)
    if min(image.size) < min_size:
        raise BadSample("too_small", raw.key, f"{image.size[0]}x{image.size[1]} < min_size={min_size}")
    caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    original_size = (image.size[1], image.size[0])
    square, top_left = resize_and_crop(image, resolution, crop=crop, rng=rng)
    if random_flip and rng.random() < 0.5:
        square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if report is not None:
        report.add_notes(notes, raw.key)
    return {
        "pixel_values": to_pixel_values(square),  # (3, R, R)
        "caption": caption,
        "key": raw.key,
        "original_size": torch.tensor(original_size),
        "crop_top_left": torch.tensor(top_left),
    }


def check_sample(raw: RawSample, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0) -> tuple[tuple[int, int], list[str]]:
    """Fully decode one sample without resizing (the preflight); returns ((w, h), notes) or raises BadSample."""
    _, notes = raw.captions()
    image = load_image(raw.image, key=raw.key, max_pixels=max_pixels)
    if min(image.size) < min_size:
        raise BadSample("too_small", raw.key, f"{image.size[0]}x{image.size[1]} < min_size={min_size}")
    return image.size, notes
