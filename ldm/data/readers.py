"""Indexing the map-style formats: a folder of image + .txt, metadata.jsonl/.csv, `datasets`.

Each reader turns its format into a `Source`: a sized, indexable list of `RawSample`s that holds
only what indexing found (paths, metadata fields). Nothing is decoded here; `ldm.data.datasets`
decodes on access so that opening a million-image folder costs one directory walk.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from .images import IMAGE_EXTENSIONS, BadSample, caption_from_value, decode_caption

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass
class RawSample:
    """One sample as stored, before decoding.

    image: a path, the file's bytes, or a PIL image (from `datasets`); None when missing.
    caption: bytes (a .txt file's contents), a str/list value (a metadata field), a path to a
    .txt (read on access), or None when there is none. problem: a `BAD_REASONS` key found while
    indexing (the sample is bad whatever its pixels are). notes: problems found while indexing
    that do not skip the sample (invalid UTF-8 in a metadata row).
    """

    key: str
    image: Any
    caption: Any
    caption_path: str | None = None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    def captions(self) -> tuple[list[str], list[str]]:
        """(captions, notes) or raise BadSample; reads the .txt now if the caption is a path."""
        if self.problem:
            raise BadSample(self.problem, self.key)
        if self.caption_path is not None:
            with open(self.caption_path, "rb") as f:
                captions, notes = decode_caption(f.read())
        elif isinstance(self.caption, (bytes, bytearray)):
            captions, notes = decode_caption(self.caption)
        else:
            captions, notes = caption_from_value(self.caption, key=self.key)
        return captions, self.notes + notes


class FolderSource:
    """Format (a): every image under `root` (recursively) with a caption file `<stem>.txt` beside it.

    Images without a .txt are kept as samples with problem "missing_caption" so that they are
    counted; .txt files without an image are not samples and are only counted by `orphans`.
    """

    def __init__(self, root: str):
        self.root = root
        images, texts = [], set()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()  # a stable order on every machine: sample i is the same file everywhere
            for name in sorted(filenames):
                stem, ext = os.path.splitext(name)
                path = os.path.join(dirpath, name)
                if ext[1:].lower() in IMAGE_EXTENSIONS:
                    images.append(path)
                elif ext.lower() == ".txt":
                    texts.add(path)
        self.samples = []
        for path in images:
            txt = os.path.splitext(path)[0] + ".txt"
            has_txt = txt in texts
            texts.discard(txt)
            self.samples.append(RawSample(
                key=os.path.relpath(path, root), image=path, caption=None,
                caption_path=txt if has_txt else None, problem=None if has_txt else "missing_caption"))
        self.orphans = sorted(os.path.relpath(t, root) for t in texts)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> RawSample:
        return self.samples[i]


class MetadataSource:
    """Format (b): the Hugging Face imagefolder convention, rows {"file_name": ..., "text": ...}.

    `path` is the metadata.jsonl/.csv file (or a folder holding one); file names are relative to
    its folder. `caption_column` names the caption field ("text" by convention); its value is a
    string or a list of strings. Other columns are ignored. A row that is not valid JSON or lacks
    file_name becomes a sample with problem "bad_metadata_row" so that it is counted.
    """

    def __init__(self, path: str, *, caption_column: str = "text"):
        if os.path.isdir(path):
            found = [os.path.join(path, m) for m in METADATA_FILES if os.path.isfile(os.path.join(path, m))]
            if not found:
                raise FileNotFoundError(f"no metadata.jsonl or metadata.csv in {path}")
            path = found[0]
        self.path, self.root = path, os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            data = f.read()
        rows = _jsonl_rows(data) if path.endswith(".jsonl") else _csv_rows(data, path)
        self.samples = []
        for line_no, row, notes in rows:
            key = f"{os.path.basename(path)}:{line_no}"
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                self.samples.append(RawSample(key, None, None, problem="bad_metadata_row"))
                continue
            image = os.path.join(self.root, row["file_name"])
            caption = row.get(caption_column)
            self.samples.append(RawSample(
                key=row["file_name"], image=image, caption=caption, notes=notes,
                problem="missing_caption" if caption is None else None))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> RawSample:
        return self.samples[i]


def _decode_line(raw: bytes) -> tuple[str, list[str]]:
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), ["invalid_utf8"]


def _jsonl_rows(data: bytes):
    for line_no, raw in enumerate(data.splitlines(), start=1):
        text, notes = _decode_line(raw)
        text = text.strip().lstrip("\ufeff")
        if not text:
            continue
        try:
            yield line_no, json.loads(text), notes
        except json.JSONDecodeError:
            yield line_no, None, notes


def _csv_rows(data: bytes, path: str):
    # Decode line by line first so that one row's bad bytes are noted on that row only.
    lines, line_notes = [], []
    for raw in data.splitlines():
        text, notes = _decode_line(raw)
        lines.append(text.lstrip("\ufeff"))
        line_notes.append(notes)
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    if not reader.fieldnames or "file_name" not in reader.fieldnames:
        raise ValueError(f"{path}: the first line must be a header with a file_name column, got {reader.fieldnames}")
    for row in reader:
        line_no = reader.line_num
        yield line_no, row, line_notes[line_no - 1] if line_no - 1 < len(line_notes) else []


class HFSource:
    """Format (d): a Hugging Face `datasets.Dataset` (or any sequence of dict rows).

    `image_column` holds a PIL image, a {"bytes", "path"} dict (an `Image(decode=False)` feature)
    or a path; `caption_column` a string or list of strings. When the column is a `datasets.Image`
    feature it is cast to `decode=False`, so that our decoder (pixel limit, EXIF, modes) sees the
    original bytes rather than an image `datasets` decoded without those guards.
    """

    def __init__(self, rows: Sequence[dict], *, image_column: str = "image", caption_column: str = "text"):
        names = getattr(rows, "column_names", None)
        if names is not None:
            for column in (image_column, caption_column):
                if column not in names:
                    raise ValueError(f"the dataset has no column {column!r}; its columns are {names}")
            features = getattr(rows, "features", {}) or {}
            if type(features.get(image_column)).__name__ == "Image":
                import datasets

                rows = rows.cast_column(image_column, datasets.Image(decode=False))
        self.rows, self.image_column, self.caption_column = rows, image_column, caption_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> RawSample:
        row = self.rows[i]
        image = row.get(self.image_column)
        key = f"row {i}"
        if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            key = image.get("path") or key
            image = image.get("bytes") or image.get("path")
        caption = row.get(self.caption_column)
        return RawSample(key, image, caption, problem="missing_image" if image is None else None)


def load_hf_from_disk(path: str):
    """A dataset saved with `datasets.Dataset.save_to_disk(path)`; needs the `datasets` extra."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path} is a Hugging Face `datasets` folder; install the extra: pip install 'ldm[datasets]'") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path} holds splits {list(ds)}; expected a 'train' split or a single dataset")
        ds = ds["train"]
    return ds


def is_hf_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or (os.path.isfile(os.path.join(path, "dataset_info.json")) and os.path.isfile(os.path.join(path, "state.json"))))
