"""Format (c): webdataset-style tar shards, streamed with the standard library and split across
processes and data-loader workers so that every process yields the same number of samples.

A shard is a plain tar (optionally gzip-compressed) whose consecutive members sharing a key form a
sample: `000123.jpg` + `000123.txt` (webdataset's convention: the key is the member path up to the
first dot of its file name, the rest is the extension). Images are jpg|jpeg|png|webp (and the
other `IMAGE_EXTENSIONS`), captions txt (preferred) or json (a string, a list of strings, or an
object with a "caption"/"text" field). Members with any other extension (.pth, .pyd, .pickle,
.npy, ...) are never read, so no shard member is ever unpickled: we read tars with `tarfile` and
decode only images (PIL), UTF-8 text and JSON, rather than with the `webdataset` package whose
default decoders unpickle .pyd members (and which pulls torchvision).

How the stream is split (and why every process gets the same count)
--------------------------------------------------------------------
Opening the dataset indexes every shard from its tar headers alone (for an uncompressed tar
`tarfile` seeks past member data, so this reads 512 bytes per member). That fixes in advance the
number of samples N (or `samples_per_epoch` if given), known identically to every process. Each
rank then yields exactly N // world_size samples per epoch (the remainder is dropped, like
`drop_last`); within a rank, data-loader worker w of W yields its share of that, so that worker
counts are identical across ranks and so are the batch counts (sum over workers of
ceil(count_w / batch_size)).

The shards are permuted per epoch (seed, epoch) identically in every process and dealt to the
world_size * W "slots" (rank, worker): slot s reads shards s, s + slots, ... When there are fewer
shards than slots, every slot reads every shard's headers and keeps the samples whose running
index is s modulo slots (the data of the others is skipped by seeking, not read). A slot that
reaches the end of its shards before its quota *cycles*: it reads them again, in a fresh shuffle
order. Skipped (bad) samples therefore never shorten a process's epoch; they only make that slot
read further. A slot whose shards contain no valid sample at all raises ValueError after one pass
rather than looping forever. Because quotas are fixed and assignments rotate with the epoch, a
slot with more samples than its quota leaves some unread that epoch; other epochs deal those
shards to other slots (call `set_epoch`).

Rank and world size come from the arguments, else from an initialised `torch.distributed`, else
from the RANK / WORLD_SIZE environment variables that `torchrun` and `accelerate launch` set.
The dataset splits itself, so do not also pass its DataLoader to `accelerator.prepare` (accelerate
would split the stream a second time); move batches with `.to(accelerator.device)` instead.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import posixpath
import re
import tarfile
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadSample
from .readers import RawSample
from .samples import SampleReport, decode_sample

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CAPTION_EXTENSIONS = ("txt", "json")
_KNOWN_EXTENSIONS = set(IMAGE_EXTENSIONS) | set(CAPTION_EXTENSIONS)


def expand_shards(spec: str | os.PathLike | Sequence) -> list[str]:
    """Shard paths from a list, a brace range (`data-{000..099}.tar`), a glob, a folder or one file."""
    if isinstance(spec, (list, tuple)):
        return [p for item in spec for p in expand_shards(item)]
    spec = os.fspath(spec)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        return [p for i in range(int(lo), int(hi) + 1)
                for p in expand_shards(spec[:match.start()] + str(i).zfill(width) + spec[match.end():])]
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise FileNotFoundError(f"no shard matches {spec}")
        return paths
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(SHARD_SUFFIXES))
        if not paths:
            raise FileNotFoundError(f"no .tar shards in {spec}")
        return paths
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"no shard {spec}")
    return [spec]


def _split_member_name(name: str) -> tuple[str | None, str]:
    directory, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem), ext.lower()


def _groups(tf: tarfile.TarFile, file_size: int | None) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) per sample, in tar order; only regular files with a known extension.

    `tarfile` treats a plain tar cut short as if it ended early, silently; with the file's size
    (uncompressed tars only: gzip reports truncation itself) a member running past it is an error.
    """
    key, members = None, []
    for m in tf:
        if file_size is not None and m.offset_data + m.size > file_size:
            raise tarfile.ReadError(f"member {m.name} runs past the end of the file (truncated shard)")
        if not m.isfile():
            continue
        k, ext = _split_member_name(m.name)
        if k is None or ext not in _KNOWN_EXTENSIONS:
            continue
        if k != key:
            if members:
                yield key, members
            key, members = k, []
        members.append(m)
    if file_size is not None and tf.offset + tarfile.BLOCKSIZE > file_size:
        # the loop ended on a header cut short, not on the end-of-archive blocks
        raise tarfile.ReadError("the shard ends inside a member header (truncated shard)")
    if members:
        yield key, members


def _plain_size(path: str) -> int | None:
    return os.path.getsize(path) if path.endswith(".tar") else None


def count_samples(path: str) -> int:
    """Samples in one shard, from its headers only (a damaged tail ends the count there)."""
    n = 0
    try:
        with tarfile.open(path, "r:*") as tf:
            for _ in _groups(tf, _plain_size(path)):
                n += 1
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


def iter_shard(path: str, select: Callable[[int], bool] | None = None) -> Iterator[RawSample]:
    """The samples of one shard as RawSamples; `select(i)` picks by index (data of the rest is not read)."""
    name = os.path.basename(path)
    try:
        with tarfile.open(path, "r:*") as tf:
            for i, (key, members) in enumerate(_groups(tf, _plain_size(path))):
                if select is not None and not select(i):
                    continue
                by_ext = {}
                for m in members:
                    _, ext = _split_member_name(m.name)
                    image_taken = any(e in IMAGE_EXTENSIONS for e in by_ext)
                    if ext in by_ext or (ext in IMAGE_EXTENSIONS and image_taken):
                        continue  # one image and one caption per sample: the first of each
                    by_ext[ext] = tf.extractfile(m).read()
                yield _raw_sample(f"{name}/{key}", by_ext)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield RawSample(f"{name} ({' '.join(str(e).split())})", None, None, problem="bad_shard")


def _raw_sample(key: str, by_ext: dict[str, bytes]) -> RawSample:
    image = next((data for ext, data in by_ext.items() if ext in IMAGE_EXTENSIONS), None)
    if image is None:
        return RawSample(key, None, None, problem="missing_image")
    if "txt" in by_ext:
        return RawSample(key, image, by_ext["txt"])
    if "json" not in by_ext:
        return RawSample(key, image, None, problem="missing_caption")
    try:
        value = json.loads(by_ext["json"].decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return RawSample(key, image, None, problem="bad_caption")
    if isinstance(value, dict):
        value = next((value[k] for k in ("caption", "text", "txt", "prompt") if k in value), None)
        if value is None:
            return RawSample(key, image, None, problem="bad_caption")
    return RawSample(key, image, value)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) from the arguments, torch.distributed, or RANK/WORLD_SIZE (torchrun, accelerate)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = int(os.environ.get("RANK", 0)) if rank is None else rank
            world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


class ShardDataset(IterableDataset):
    """Tar shards as an IterableDataset yielding exactly `len(self)` samples per epoch in each process.

    See the module docstring for the split. Samples are dicts as in `ldm.data.open_dataset`, plus
    "skipped": how many bad samples this process passed over just before this one (sum it over
    batches and processes for an exact count; `self.report` holds reasons for num_workers=0).
    """

    def __init__(self, shards, *, resolution: int, crop: str = "center", random_flip: bool = False, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 256, rank: int | None = None, world_size: int | None = None,
                 samples_per_epoch: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0):
        self.shards = expand_shards(shards)
        self.counts = [count_samples(p) for p in self.shards]  # the index pass: tar headers only
        self.total = sum(self.counts) if samples_per_epoch is None else int(samples_per_epoch)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if sum(self.counts) == 0:
            raise ValueError(f"no samples in {len(self.shards)} shard(s) starting {self.shards[0]}")
        self.per_rank = self.total // self.world_size
        if self.per_rank == 0:
            raise ValueError(f"{self.total} samples cannot give each of {self.world_size} processes one")
        self.resolution, self.crop, self.random_flip, self.seed = resolution, crop, random_flip, seed
        self.shuffle, self.shuffle_buffer = shuffle, max(1, shuffle_buffer) if shuffle else 1
        self.max_pixels, self.min_size = max_pixels, min_size
        self.epoch = 0
        self.report = SampleReport()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards and samples for `epoch` (takes effect in workers created afterwards)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def _slot(self) -> tuple[int, int, int]:
        """(slot, number of slots, this slot's sample quota) for this process and data-loader worker."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = self.per_rank // workers + (worker < self.per_rank % workers)
        return self.rank * workers + worker, self.world_size * workers, quota

    def _one_pass(self, order: list[int], slot: int, slots: int) -> Iterator[RawSample]:
        if len(order) >= slots:
            for s in order[slot::slots]:
                yield from iter_shard(self.shards[s])
        else:
            offset = 0
            for s in order:
                yield from iter_shard(self.shards[s], select=lambda i, o=offset: (o + i) % slots == slot)
                offset += self.counts[s]

    def __iter__(self) -> Iterator[dict]:
        slot, slots, quota = self._slot()
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        order_rng = np.random.default_rng([self.seed, self.epoch])  # the same in every process
        yielded, skipped = 0, 0
        for _ in itertools.count():  # passes over the shards until the quota is met
            order = list(order_rng.permutation(len(self.shards))) if self.shuffle else list(range(len(self.shards)))
            good = 0
            for raw in _shuffled(self._one_pass(order, slot, slots), self.shuffle_buffer, rng):
                if yielded == quota:
                    return
                try:
                    sample = decode_sample(raw, resolution=self.resolution, crop=self.crop, random_flip=self.random_flip,
                                           rng=rng, max_pixels=self.max_pixels, min_size=self.min_size, report=self.report)
                except BadSample as e:
                    self.report.add_bad(e)
                    skipped += 1
                    continue
                self.report.ok += 1
                sample["skipped"] = skipped
                skipped, good, yielded = 0, good + 1, yielded + 1
                yield sample
            if yielded == quota:
                return
            if good == 0:
                raise ValueError(f"no valid sample in the shards read by rank {self.rank} (slot {slot} of {slots}); "
                                 f"{self.report.summary()}")


def _shuffled(stream: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Approximate shuffle with a buffer (webdataset's method): emit a random buffered item per new one."""
    if buffer_size <= 1:
        yield from stream
        return
    buffer = []
    for item in stream:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(buffer_size))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
