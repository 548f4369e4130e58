"""The map-style formats (folder + .txt, metadata.jsonl/.csv, `datasets`-like rows) and open_dataset."""

import csv
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import CaptionDataset, check_dataset, detect_format, open_dataset

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def png_bytes(color, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def make_folder(root, n=5):
    for i in range(n):
        (root / f"img{i}.png").write_bytes(png_bytes(COLORS[i % len(COLORS)]))
        (root / f"img{i}.txt").write_text(f"caption {i}\n")
    return root


def pixel(sample):
    """The sample's centre colour back on the 0..255 scale."""
    return tuple(int(round(v)) for v in ((sample["pixel_values"][:, 4, 4] + 1) * 127.5).tolist())


def test_folder_format_values(tmp_path):
    make_folder(tmp_path)
    ds = open_dataset(tmp_path, resolution=8)
    assert isinstance(ds, CaptionDataset) and len(ds) == 5 and detect_format(tmp_path) == "folder"
    for i in range(5):
        s = ds[i]
        assert s["caption"] == f"caption {i}" and s["key"] == f"img{i}.png"
        assert s["pixel_values"].shape == (3, 8, 8) and s["pixel_values"].dtype == torch.float32
        assert pixel(s) == COLORS[i]
        assert s["original_size"].tolist() == [16, 24] and s["skipped"] == 0


def test_folder_bad_samples_are_replaced_and_counted(tmp_path, caplog):
    make_folder(tmp_path, n=4)
    (tmp_path / "img1.png").write_bytes(b"garbage")  # unreadable
    (tmp_path / "img2.txt").unlink()  # no caption
    (tmp_path / "orphan.txt").write_text("no image")
    (tmp_path / "img3.txt").write_bytes(b"caf\xe9")  # invalid UTF-8: kept, noted
    (tmp_path / "img0.txt").write_text("   ")  # empty caption: kept, noted
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        ds = open_dataset(tmp_path, resolution=8)
        samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == 4  # the length never changes: bad entries are replaced
    assert [s["key"] for s in samples] == ["img0.png", "img3.png", "img3.png", "img3.png"]
    assert [s["skipped"] for s in samples] == [0, 1, 1, 0]
    assert samples[0]["caption"] == "" and samples[3]["caption"] == "caf\ufffd"
    assert ds.report.bad == {"unreadable_image": 1, "missing_caption": 1}
    assert ds.report.examples["unreadable_image"] == ["img1.png"]
    assert "skipping img1.png: unreadable_image" in caplog.text
    summary = ds.report.summary()
    assert "unreadable_image" in summary and "img2.png" in summary

    checked = check_dataset(tmp_path)
    report = checked["report"]
    assert report.ok == 2 and report.bad == {"unreadable_image": 1, "missing_caption": 1}
    assert report.notes == {"invalid_utf8": 1, "empty_caption": 1}
    assert checked["orphan_captions"] == ["orphan.txt"]


def test_no_valid_sample_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.png").write_bytes(png_bytes((1, 2, 3)))  # no caption
    with pytest.raises(ValueError, match="no valid sample") as e:
        open_dataset(tmp_path, resolution=8)
    assert "unreadable_image" in str(e.value) and "missing_caption" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no samples"):
        open_dataset(empty, resolution=8)
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "missing", resolution=8)


def test_metadata_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(3):
        (tmp_path / "sub" / f"{i}.png").write_bytes(png_bytes(COLORS[i]))
    rows = [
        json.dumps({"file_name": "sub/0.png", "text": "zero", "extra": 1}).encode(),
        json.dumps({"file_name": "sub/1.png", "text": ["one a", "one b"]}).encode(),
        b'{"file_name": "sub/2.png", "text": "tw\xff"}',  # invalid UTF-8 inside the row
        b"{not json",
        json.dumps({"file_name": "sub/missing.png", "text": "gone"}).encode(),
        json.dumps({"text": "no file name"}).encode(),
        json.dumps({"file_name": "sub/0.png"}).encode(),  # no caption
    ]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    assert detect_format(tmp_path) == "metadata"
    ds = open_dataset(tmp_path, resolution=8, seed=3)
    assert len(ds) == 7
    assert ds[0]["caption"] == "zero" and pixel(ds[0]) == COLORS[0]
    assert ds[2]["caption"] == "tw\ufffd" and pixel(ds[2]) == COLORS[2]
    # several captions: picked at random, reproducibly for a seed, and both appear over epochs
    picks = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        picks.append(ds[1]["caption"])
    assert set(picks) == {"one a", "one b"}
    again = open_dataset(tmp_path, resolution=8, seed=3)
    again.set_epoch(5)
    ds.set_epoch(5)
    assert again[1]["caption"] == ds[1]["caption"]

    report = check_dataset(tmp_path)["report"]
    assert report.ok == 3
    assert report.bad == {"bad_metadata_row": 2, "missing_image": 1, "missing_caption": 1}
    assert report.notes == {"invalid_utf8": 1, "several_captions": 1}


def test_metadata_csv_and_caption_column(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(COLORS[i]))
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "prompt"])
        writer.writerow(["0.png", "a, quoted \"caption\""])
        writer.writerow(["1.png", ""])
    ds = open_dataset(tmp_path / "metadata.csv", resolution=8, caption_column="prompt")
    assert [ds[i]["caption"] for i in range(2)] == ['a, quoted "caption"', ""]
    (tmp_path / "metadata.csv").write_text("name,text\n0.png,x\n")
    with pytest.raises(ValueError, match="file_name"):
        open_dataset(tmp_path, resolution=8)


def test_hf_style_rows(tmp_path):
    rows = [
        {"image": Image.new("RGBA", (10, 10), (0, 0, 255, 0)), "text": "transparent"},  # -> white
        {"image": {"bytes": png_bytes(COLORS[1]), "path": "one.png"}, "text": ["x", "y"]},
        {"image": None, "text": "nothing"},
        {"image": {"bytes": b"junk", "path": "junk.png"}, "text": "bad"},
    ]
    assert detect_format(rows) == "hf"
    ds = open_dataset(rows, resolution=8)
    assert pixel(ds[0]) == (255, 255, 255) and ds[0]["caption"] == "transparent"
    assert pixel(ds[1]) == COLORS[1] and ds[1]["key"] == "one.png"
    assert ds[2]["skipped"] == 1 and ds[3]["skipped"] == 1
    assert ds.report.bad == {"missing_image": 1, "unreadable_image": 1}


def test_random_crop_and_flip_are_seeded(tmp_path):
    image = np.zeros((16, 48, 3), np.uint8)
    image[:, :24] = 255  # left half white
    Image.fromarray(image).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    a = open_dataset(tmp_path, resolution=16, crop="random", random_flip=True, seed=1)
    b = open_dataset(tmp_path, resolution=16, crop="random", random_flip=True, seed=1)
    c = open_dataset(tmp_path, resolution=16, crop="random", random_flip=True, seed=2)
    lefts_a, lefts_c = [], []
    for epoch in range(20):
        for ds in (a, b, c):
            ds.set_epoch(epoch)
        sa, sb, sc = a[0], b[0], c[0]
        assert torch.equal(sa["pixel_values"], sb["pixel_values"])  # same seed, same epoch: same sample
        lefts_a.append(sa["crop_top_left"][1].item())
        lefts_c.append(sc["crop_top_left"][1].item())
    assert len(set(lefts_a)) > 5 and lefts_a != lefts_c and all(0 <= x <= 32 for x in lefts_a)

    # flip: a square image so that the crop is the whole picture and a flip is always visible
    square = np.zeros((16, 16, 3), np.uint8)
    square[:, :8] = 255
    Image.fromarray(square).save(tmp_path / "a.png")
    flipping = open_dataset(tmp_path, resolution=16, random_flip=True, seed=1)
    flips = 0
    for epoch in range(40):
        flipping.set_epoch(epoch)
        flips += bool(flipping[0]["pixel_values"][0, 8, -1] > 0)  # white on the right: mirrored
    assert 10 <= flips <= 30
    # flip is off by default: the white half stays on the left
    plain = open_dataset(tmp_path, resolution=16, seed=1)
    for epoch in range(10):
        plain.set_epoch(epoch)
        assert (plain[0]["pixel_values"][0, 8, :8] > 0).all() and (plain[0]["pixel_values"][0, 8, 8:] < 0).all()


def test_dataloader_with_workers(tmp_path):
    make_folder(tmp_path, n=5)
    ds = open_dataset(tmp_path, resolution=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [len(b["caption"]) for b in batches] == [2, 2, 1]
    assert batches[0]["pixel_values"].shape == (2, 3, 8, 8)
    assert [c for b in batches for c in b["caption"]] == [f"caption {i}" for i in range(5)]


def test_bad_arguments(tmp_path):
    make_folder(tmp_path, n=1)
    with pytest.raises(ValueError, match="crop"):
        open_dataset(tmp_path, resolution=8, crop="sides")
    with pytest.raises(ValueError, match="format"):
        open_dataset(tmp_path, resolution=8, format="parquet")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="not a dataset"):
        open_dataset(tmp_path / "notes.md", resolution=8)


def test_hugging_face_datasets_object_and_saved_folder(tmp_path):
    datasets = pytest.importorskip("datasets")  # the optional extra: pip install 'ldm[datasets]'
    image_paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png_bytes(COLORS[i]))
        image_paths.append(str(path))
    (tmp_path / "2.png").write_bytes(b"junk")
    ds = datasets.Dataset.from_dict({"image": image_paths, "caption": ["zero", "one", "two"]})
    ds = ds.cast_column("image", datasets.Image())
    opened = open_dataset(ds, resolution=8, caption_column="caption")
    # the Image feature is read with decode=False so that our decoder sees the bytes
    assert pixel(opened[1]) == COLORS[1] and opened[1]["caption"] == "one"
    assert opened[2]["skipped"] == 1 and opened.report.bad == {"unreadable_image": 1}
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    assert detect_format(saved) == "hf"
    again = open_dataset(saved, resolution=8, caption_column="caption")
    assert pixel(again[0]) == COLORS[0] and again[0]["caption"] == "zero"
    with pytest.raises(ValueError, match="no column 'text'"):
        open_dataset(saved, resolution=8)
