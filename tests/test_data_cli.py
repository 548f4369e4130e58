"""ldm-data check: counts per problem, exit statuses, one-line errors."""

import io
import json
import tarfile

import pytest
from PIL import Image

from ldm.cli.data import main


def png_bytes(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), color).save(buf, "PNG")
    return buf.getvalue()


def make_messy_folder(root):
    (root / "ok.png").write_bytes(png_bytes())
    (root / "ok.txt").write_text("fine")
    (root / "latin.png").write_bytes(png_bytes())
    (root / "latin.txt").write_bytes(b"na\xefve")
    (root / "empty.png").write_bytes(png_bytes())
    (root / "empty.txt").write_text("")
    (root / "junk.png").write_bytes(b"\x00" * 50)
    (root / "junk.txt").write_text("x")
    (root / "nocap.png").write_bytes(png_bytes())
    return root


def test_check_counts_by_problem(tmp_path, capsys):
    make_messy_folder(tmp_path)
    assert main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "5 samples: 3 valid, 2 would be skipped" in out
    for reason in ("unreadable_image", "missing_caption", "invalid_utf8", "empty_caption"):
        assert reason in out
    assert "junk.png" in out and "20x10" in out
    assert main(["check", str(tmp_path), "--strict"]) == 1
    capsys.readouterr()
    assert main(["check", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] == 3 and data["skipped"] == {"unreadable_image": 1, "missing_caption": 1}
    assert data["notes"] == {"invalid_utf8": 1, "empty_caption": 1} and data["format"] == "folder"


def test_check_shards_and_pixel_limit(tmp_path, capsys):
    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in [("a.png", png_bytes()), ("a.txt", b"x"), ("b.png", png_bytes()), ("b.json", b'"y"')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert main(["check", str(tmp_path / "s-{000..000}.tar"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 2
    # 20x10 = 200 pixels each: over a limit of 100, nothing is usable
    with pytest.raises(SystemExit) as e:
        main(["check", str(shard), "--max-pixels", "100", "--json"])
    assert e.value.code == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] == 0 and data["skipped"] == {"too_many_pixels": 2}


def test_nothing_valid_and_bad_paths_exit_2(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "a.txt").write_text("x")
    for argv, message in [([str(tmp_path)], "no valid sample"), ([str(tmp_path / "missing")], "no such dataset"),
                          ([str(tmp_path), "--format", "parquet"], "invalid choice")]:
        with pytest.raises(SystemExit) as e:
            main(["check", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("ldm-data") and ": error: " in err and err.count("\n") == 1 and message in err
