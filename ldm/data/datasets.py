"""`open_dataset` (format detection -> a torch Dataset) and `check_dataset` (the preflight)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Dataset

from .images import DEFAULT_MAX_PIXELS, BadSample
from .readers import FolderSource, HFSource, MetadataSource, RawSample, is_hf_saved_dataset, load_hf_from_disk
from .samples import SampleReport, check_sample, decode_sample
from .shards import SHARD_SUFFIXES, ShardDataset, expand_shards, iter_shard

FORMATS = ("folder", "metadata", "shards", "hf")


class CaptionDataset(Dataset):
    """A map-style dataset over a `Source` (folder, metadata or `datasets` rows).

    Item i is entry i decoded; if entry i is bad it is counted once and replaced by the next valid
    entry (wrapping around), so `len` is fixed in advance and a DistributedSampler (or
    `accelerator.prepare`) gives every process the same number of batches whatever is skipped.
    The substitute is augmented with item i's own random stream, so it is not an exact duplicate.
    Item dicts carry "skipped": 1 when entry i was bad and replaced, else 0 (its sum over an epoch
    is the number of bad entries). Augmentation for item i draws from the seed sequence
    (seed, epoch, i): reproducible and independent of worker count; call `set_epoch` per epoch.
    """

    def __init__(self, source, *, resolution: int, crop: str = "center", random_flip: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0, name: str = "dataset"):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.source, self.name = source, name
        self.resolution, self.crop, self.random_flip, self.seed = resolution, crop, random_flip, seed
        self.max_pixels, self.min_size = max_pixels, min_size
        self.epoch = 0
        self.report = SampleReport()
        self._bad: set[int] = set()  # entries known bad in this process: not decoded again
        if len(source) == 0:
            raise ValueError(f"no samples in {name}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        n = len(self.source)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        rng = np.random.default_rng([self.seed, self.epoch, i])
        for step in range(n):
            j = (i + step) % n
            if j in self._bad:
                continue
            try:
                sample = decode_sample(self.source[j], resolution=self.resolution, crop=self.crop, random_flip=self.random_flip,
                                       rng=rng, max_pixels=self.max_pixels, min_size=self.min_size, report=self.report)
            except BadSample as e:
                self._bad.add(j)
                self.report.add_bad(e)
                continue
            self.report.ok += 1
            sample["skipped"] = int(i in self._bad)
            return sample
        raise ValueError(f"no valid sample in {self.name}: {self.report.summary()}")


def detect_format(path: Any) -> str:
    """Which of FORMATS `path` is: see `open_dataset`."""
    if not isinstance(path, (str, os.PathLike, list, tuple)):
        if hasattr(path, "__getitem__") and hasattr(path, "__len__"):
            return "hf"  # a datasets.Dataset or any sequence of dict rows
        raise ValueError(f"cannot read a dataset from a {type(path).__name__}")
    if isinstance(path, (list, tuple)):
        # a list of paths is shards; a list of rows is `datasets`-like
        return "shards" if all(isinstance(p, (str, os.PathLike)) for p in path) else "hf"
    path = os.fspath(path)
    if any(c in path for c in "*?[{"):
        return "shards"
    if os.path.isfile(path):
        if path.endswith(SHARD_SUFFIXES):
            return "shards"
        if path.endswith((".jsonl", ".csv")):
            return "metadata"
        raise ValueError(f"{path} is not a dataset: expected a folder, metadata.jsonl/.csv, or .tar shards")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such dataset: {path}")
    names = os.listdir(path)
    if "metadata.jsonl" in names or "metadata.csv" in names:
        return "metadata"
    if is_hf_saved_dataset(path):
        return "hf"
    if any(n.endswith(SHARD_SUFFIXES) for n in names):
        return "shards"
    return "folder"


def _source(path: Any, fmt: str, caption_column: str, image_column: str):
    if fmt == "folder":
        return FolderSource(os.fspath(path))
    if fmt == "metadata":
        return MetadataSource(os.fspath(path), caption_column=caption_column)
    if fmt == "hf":
        rows = load_hf_from_disk(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path
        return HFSource(rows, image_column=image_column, caption_column=caption_column)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def open_dataset(path: Any, *, resolution: int, crop: str = "center", random_flip: bool = False, seed: int = 0,
                 format: str | None = None, caption_column: str = "text", image_column: str = "image",
                 max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0, shuffle: bool = True, shuffle_buffer: int = 256,
                 rank: int | None = None, world_size: int | None = None, samples_per_epoch: int | None = None):
    """Open an image-caption dataset in any supported format; see `ldm.data` for the contract."""
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if isinstance(path, (str, os.PathLike)):
        name = os.fspath(path)
    elif fmt == "shards":
        name = f"{len(path)} shards starting {os.fspath(path[0])}" if path else "an empty list of shards"
    else:
        name = f"a {type(path).__name__} of rows"
    if fmt == "shards":
        dataset = ShardDataset(path, resolution=resolution, crop=crop, random_flip=random_flip, seed=seed, shuffle=shuffle,
                               shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                               samples_per_epoch=samples_per_epoch, max_pixels=max_pixels, min_size=min_size)
        # Fail now, not inside a data-loader worker, when nothing in the shards is usable.
        _require_valid((raw for shard in dataset.shards for raw in iter_shard(shard)), name, max_pixels, min_size)
        return dataset
    dataset = CaptionDataset(_source(path, fmt, caption_column, image_column), resolution=resolution, crop=crop,
                             random_flip=random_flip, seed=seed, max_pixels=max_pixels, min_size=min_size, name=name)
    dataset[0]  # scans forward to the first valid entry; raises a clear ValueError if there is none
    return dataset


def _require_valid(raws: Iterator[RawSample], name: str, max_pixels: int, min_size: int) -> None:
    report = SampleReport()
    for raw in raws:
        try:
            check_sample(raw, max_pixels=max_pixels, min_size=min_size)
            return
        except BadSample as e:
            report.add_bad(e, log_it=False)
    raise ValueError(f"no valid sample in {name}: {report.summary()}")


def iter_raw_samples(path: Any, *, format: str | None = None, caption_column: str = "text", image_column: str = "image") -> tuple[str, Iterator[RawSample], dict]:
    """(format, every RawSample in storage order, extra facts such as orphan caption files)."""
    fmt = format or detect_format(path)
    if fmt == "shards":
        shards = expand_shards(path)
        return fmt, (raw for shard in shards for raw in iter_shard(shard)), {"shards": len(shards)}
    source = _source(path, fmt, caption_column, image_column)
    extra = {"orphan_captions": getattr(source, "orphans", [])} if fmt == "folder" else {}
    return fmt, (source[i] for i in range(len(source))), extra


def check_dataset(path: Any, *, format: str | None = None, caption_column: str = "text", image_column: str = "image",
                  max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0) -> dict:
    """The preflight: fully decode every sample, count problems by reason. Never raises for bad samples.

    Returns {"format", "report": SampleReport, "min_size": (w, h) | None, "max_size": ..., and
    "orphan_captions" (folder format) or "shards" (shard format)}.
    """
    fmt, raws, extra = iter_raw_samples(path, format=format, caption_column=caption_column, image_column=image_column)
    report = SampleReport()
    smallest = largest = None
    for raw in raws:
        try:
            (w, h), notes = check_sample(raw, max_pixels=max_pixels, min_size=min_size)
        except BadSample as e:
            report.add_bad(e, log_it=False)
            continue
        report.ok += 1
        report.add_notes(notes, raw.key)
        smallest = (w, h) if smallest is None or w * h < smallest[0] * smallest[1] else smallest
        largest = (w, h) if largest is None or w * h > largest[0] * largest[1] else largest
    return {"format": fmt, "report": report, "min_size": smallest, "max_size": largest, **extra}
