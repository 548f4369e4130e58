"""Tar shards: reading, never unpickling, and equal per-process counts under any split and skips."""

import io
import json
import pickle
import tarfile

import pytest
import torch
from PIL import Image

from ldm.data import ShardDataset, check_dataset, detect_format, expand_shards, open_dataset


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (value, 255 - value, 7)).save(buf, "PNG")
    return buf.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path, keys, bad=(), caption_as="txt"):
    """One shard with samples `keys`; keys in `bad` get a garbage image."""
    with tarfile.open(path, "w") as tf:
        for key in keys:
            add(tf, f"{key}.png", b"garbage" if key in bad else png_bytes(int(key.split("_")[-1]) % 256))
            if caption_as == "txt":
                add(tf, f"{key}.txt", f"caption {key}".encode())
            else:
                add(tf, f"{key}.json", json.dumps({"caption": f"caption {key}"}).encode())
    return str(path)


def make_shards(tmp_path, sizes, bad=()):
    paths, n = [], 0
    for s, size in enumerate(sizes):
        keys = [f"s{s}_{n + i}" for i in range(size)]
        n += size
        paths.append(write_shard(tmp_path / f"shard-{s:03d}.tar", keys, bad=bad))
    return paths


def collect(ds, num_workers=0, batch_size=3):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    skipped = sum(int(b["skipped"].sum()) for b in batches)
    return batches, keys, skipped


def test_reading_values_and_caption_forms(tmp_path):
    path = tmp_path / "one.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "a/x1.png", png_bytes(10))
        add(tf, "a/x1.txt", b"plain caption")
        add(tf, "x2.jpg", png_bytes(20))  # PNG bytes named .jpg: PIL decodes by content
        add(tf, "x2.json", json.dumps({"text": "from json"}).encode())
        add(tf, "x3.png", png_bytes(30))
        add(tf, "x3.json", json.dumps(["first", "second"]).encode())
        add(tf, "x4.png", png_bytes(40))  # no caption
        add(tf, "x5.png", png_bytes(50))
        add(tf, "x5.json", b'{"label": 3}')  # json without a caption field
    ds = open_dataset(path, resolution=8, shuffle=False)
    assert isinstance(ds, ShardDataset) and len(ds) == 5 and detect_format(path) == "shards"
    samples = list(ds)
    assert len(samples) == 5  # quota is 5 per epoch: the 2 bad ones are made up by cycling
    assert [s["key"] for s in samples[:3]] == ["one.tar/a/x1", "one.tar/x2", "one.tar/x3"]
    assert samples[0]["caption"] == "plain caption" and samples[1]["caption"] == "from json"
    assert samples[2]["caption"] in ("first", "second")
    red = (samples[0]["pixel_values"][0, 4, 4].item() + 1) * 127.5
    assert round(red) == 10
    assert ds.report.bad == {"missing_caption": 1, "bad_caption": 1}


def test_no_member_is_ever_unpickled_or_even_read(tmp_path, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "p.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "k.png", png_bytes(1))
        add(tf, "k.txt", b"ok")
        add(tf, "k.pyd", pickle.dumps(Boom()))
        add(tf, "k.pth", pickle.dumps(Boom()))
    read = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real(self, m))
    ds = open_dataset(path, resolution=8)
    assert [s["caption"] for s in ds] == ["ok"]
    assert read and all(name.endswith((".png", ".txt")) for name in read)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_equal_split_covers_every_sample_once(tmp_path, num_workers):
    paths = make_shards(tmp_path, [5, 5, 5, 5])
    world = 2
    all_keys = []
    for rank in range(world):
        ds = open_dataset(paths, resolution=8, rank=rank, world_size=world, seed=0)
        batches, keys, _ = collect(ds, num_workers)
        assert len(keys) == len(ds) == 10
        all_keys += keys
    assert sorted(all_keys) == sorted(f"shard-{s:03d}.tar/s{s}_{s * 5 + i}" for s in range(4) for i in range(5))


def test_fewer_shards_than_slots_split_by_sample(tmp_path):
    paths = make_shards(tmp_path, [12])
    all_keys = []
    for rank in range(3):
        ds = open_dataset(paths, resolution=8, rank=rank, world_size=3)
        _, keys, _ = collect(ds, num_workers=2)  # 6 slots over 1 shard: 2 samples each
        assert len(keys) == 4
        all_keys += keys
    assert sorted(all_keys) == sorted(f"shard-000.tar/s0_{i}" for i in range(12))


def test_uneven_shards_and_skips_give_equal_batch_counts(tmp_path):
    # 28 samples in shards of unequal size, 5 of them bad, all in the first shards.
    bad = {"s0_0", "s0_1", "s0_2", "s1_3", "s1_4"}
    paths = make_shards(tmp_path, [3, 5, 4, 6, 2, 5, 3], bad=bad)
    for num_workers in (0, 2):
        counts = []
        for rank in range(2):
            ds = open_dataset(paths, resolution=8, rank=rank, world_size=2, seed=1, shuffle_buffer=4)
            batches, keys, skipped = collect(ds, num_workers, batch_size=3)
            assert len(keys) == 14 and not set(k.split("/")[-1] for k in keys) & bad
            counts.append(len(batches))
        assert counts[0] == counts[1]


def test_skipped_counts_sum_to_bad_samples_met(tmp_path):
    bad = {"s0_1", "s0_3"}
    paths = make_shards(tmp_path, [6], bad=bad)
    ds = open_dataset(paths, resolution=8, shuffle=False)
    batches, keys, skipped = collect(ds)
    # cycling: the 4 good samples, then the first 2 again; s0_1 is met (and skipped) on both passes
    assert [k.split("/")[1] for k in keys] == ["s0_0", "s0_2", "s0_4", "s0_5", "s0_0", "s0_2"]
    assert skipped == 3 and ds.report.bad == {"unreadable_image": 3}


def test_epochs_reshuffle_and_seed_reproduces(tmp_path):
    paths = make_shards(tmp_path, [4, 4, 4])
    a = open_dataset(paths, resolution=8, seed=5)
    b = open_dataset(paths, resolution=8, seed=5)
    keys_a0 = [s["key"] for s in a]
    assert keys_a0 == [s["key"] for s in b]
    a.set_epoch(1)
    keys_a1 = [s["key"] for s in a]
    assert keys_a1 != keys_a0 and sorted(keys_a1) == sorted(keys_a0)


def test_rank_from_environment(tmp_path, monkeypatch):
    paths = make_shards(tmp_path, [4, 4])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = open_dataset(paths, resolution=8)
    assert (ds.rank, ds.world_size, len(ds)) == (1, 2, 4)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="rank"):
        open_dataset(paths, resolution=8)


def test_all_bad_and_empty_shards_are_clear_errors(tmp_path):
    paths = make_shards(tmp_path, [3], bad={"s0_0", "s0_1", "s0_2"})
    with pytest.raises(ValueError, match="(?s)no valid sample.*unreadable_image"):
        open_dataset(paths, resolution=8)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(ValueError, match="no samples"):
        open_dataset(empty, resolution=8)


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated_shard_is_counted_not_fatal(tmp_path, where):
    good = make_shards(tmp_path, [4])[0]
    data = open(good, "rb").read()
    with tarfile.open(good) as tf:
        last = tf.getmembers()[-1]
    # cut inside the last member's header, or inside its data
    end = last.offset + 100 if where == "header" else last.offset_data + 3
    cut = tmp_path / "shard-001.tar"
    cut.write_bytes(data[:end])
    ds = open_dataset([good, str(cut)], resolution=8, shuffle=False)
    assert len(list(ds)) == len(ds)
    report = check_dataset([good, str(cut)])["report"]
    assert report.bad.get("bad_shard") == 1 and report.ok >= 4


def test_expand_shards(tmp_path):
    paths = make_shards(tmp_path, [1, 1, 1])
    assert expand_shards(str(tmp_path / "shard-{000..002}.tar")) == paths
    assert expand_shards(str(tmp_path / "shard-*.tar")) == paths
    assert expand_shards(tmp_path) == paths
    with pytest.raises(FileNotFoundError, match="shard-008"):
        expand_shards(str(tmp_path / "shard-{008..009}.tar"))
