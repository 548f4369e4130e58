"""Image-caption datasets for training, and the shapes world (`ldm.data.shapes`).

The interface the training stages use
-------------------------------------
    from ldm.data import open_dataset
    ds = open_dataset(path, resolution=256, crop="random", random_flip=False, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=4,
                                         shuffle=not isinstance(ds, IterableDataset))
    for batch in loader:
        batch["pixel_values"]  # (B, 3, R, R) float32 in [-1, 1]
        batch["caption"]       # list of B str (may be "", the unconditional caption)
        batch["key"]           # list of B str: relative path or shard/key, for messages
        batch["original_size"], batch["crop_top_left"]  # (B, 2) int: (h, w) before and (top, left) of the crop
        batch["skipped"]       # (B,) int: bad samples this one stands in for; sum = bad samples met

`path` is detected as one of (see `detect_format`; `format=` overrides):
  folder    a folder of images, each with a caption file beside it (cat.png + cat.txt)
  metadata  a folder with metadata.jsonl or metadata.csv rows {"file_name", "text"} (the Hugging
            Face imagefolder convention; `caption_column=` renames "text"), or that file itself
  shards    webdataset tar shards: a .tar, a folder of them, a glob, a brace range
            "data-{000..099}.tar" or a list (see `ldm.data.shards`; never unpickles anything)
  hf        a `datasets.Dataset` object, any sequence of dict rows, or a folder saved with
            `save_to_disk` (needs `pip install 'ldm[datasets]'`); `image_column=`, `caption_column=`

Folder, metadata and hf give a map-style `CaptionDataset`: its length is the number of entries,
a bad entry is replaced by the next valid one, so DistributedSampler / `accelerator.prepare`
split it evenly as usual. Shards give a `ShardDataset` (IterableDataset) that splits itself across
ranks (RANK/WORLD_SIZE as torchrun and accelerate set them) and data-loader workers and yields
exactly `len(ds)` samples per process per epoch, cycling its shards if skips leave it short; do not
shuffle it in the DataLoader nor pass its loader to `accelerator.prepare`. Both take `set_epoch(e)`
and draw every random choice (crop offset, flip, which of several captions) from `seed`.

Bad samples (see `images.BAD_REASONS`) are skipped and counted in `ds.report` (a `SampleReport`
with `summary()`: counts by reason with the first paths; the first few skips are also logged to
the "ldm.data" logger), never stop a run. A dataset with no valid sample raises ValueError when
opened. Horizontal flip is off by default: it turns "left of" into "right of".

`check_dataset(path)` / `ldm-data check PATH` fully decodes every sample and counts problems.

Image rules (EXIF, alpha on white, 16-bit scaling, pixel limit, full decode): `ldm.data.images`.
"""

from .datasets import FORMATS, CaptionDataset, check_dataset, detect_format, open_dataset
from .images import BAD_REASONS, DEFAULT_MAX_PIXELS, NOTE_REASONS, BadSample, decode_caption, load_image, resize_and_crop
from .samples import SampleReport
from .shards import ShardDataset, expand_shards

__all__ = [
    "open_dataset", "check_dataset", "detect_format", "FORMATS", "CaptionDataset", "ShardDataset", "expand_shards",
    "SampleReport", "BadSample", "BAD_REASONS", "NOTE_REASONS", "DEFAULT_MAX_PIXELS", "load_image", "decode_caption",
    "resize_and_crop",
]
