"""ldm-img2img's inpainting and outpainting flags: each reaches the pipeline (read back from the PNG's
parameters and its size), and each misuse is one line on stderr, exit status 2, nothing written."""

import struct
import zlib

import numpy as np
import pytest
from helpers import right_half, stroke_picture as picture
from PIL import Image

from ldm.cli.img2img import main


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims width × height pixels (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


@pytest.fixture
def files(tmp_path):
    picture().save(tmp_path / "in.png")
    right_half().save(tmp_path / "mask.png")
    (tmp_path / "bomb.png").write_bytes(png_claiming(40000, 40000))
    return tmp_path


def run(files, tiny_pipeline_dir, *extra, image="in.png"):
    return main([str(files / image), "a red circle", "--model", str(tiny_pipeline_dir), "--steps", "4", "--seed", "2",
                 "--quiet", "--outdir", str(files / "out"), *extra])


def test_repaint_from_the_command_line_runs_ddim_unless_told(files, tiny_pipeline_dir, capsys):
    assert run(files, tiny_pipeline_dir, "--mask", str(files / "mask.png"), "--inpaint-method", "repaint",
               "--jump-length", "1", "--jump-samples", "2", "--mask-blur", "2") == 0
    written = Image.open(capsys.readouterr().out.split()[0])
    text = written.info["parameters"]
    for part in ("Sampler: ddim", "Inpaint method: repaint", "Jump length: 1", "Jump samples: 2", "Mask blur: 2"):
        assert part in text
    assert np.array_equal(np.asarray(written)[:, :24], np.asarray(picture())[:, :24])  # beyond the blur: kept


def test_outpainting_and_only_masked_from_the_command_line(files, tiny_pipeline_dir, capsys):
    assert run(files, tiny_pipeline_dir, "--outpaint", "0,8,16,0") == 0
    written = Image.open(capsys.readouterr().out.split()[0])
    assert written.size == (80, 72)
    assert np.array_equal(np.asarray(written)[8:, :64], np.asarray(picture()))
    assert run(files, tiny_pipeline_dir, "--mask", str(files / "mask.png"), "--inpaint-area", "masked",
               "--masked-padding", "8", "--mask-invert", "--masked-content", "fill", "--strength", "0.8") == 0
    written = Image.open(capsys.readouterr().out.split()[0])
    text = written.info["parameters"]
    assert written.size == (64, 64) and "Inpaint area: Only masked" in text and "Mask mode: Inpaint not masked" in text
    assert np.array_equal(np.asarray(written)[:, 32:], np.asarray(picture())[:, 32:])  # inverted: the right kept


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask-blur", "4"], "--mask-blur applies to inpainting: pass --mask (white = repaint) or --outpaint"),
        (["--jump-length", "2"], "--jump-length applies only with --mask or --outpaint"),
        (["--outpaint", "8,8"],
         "--outpaint takes four whole numbers of pixels ≥ 0, left,top,right,bottom; got '8,8'"),
        (["--outpaint", "0,0,0,0"], "outpaint must be four whole numbers"),
        (["--outpaint", "8,0,0,0", "--width", "64"], "--outpaint sets the size"),
        (["--outpaint", "8,0,0,0", "--mask", "MASK"], "pass --mask or --outpaint, not both"),
        (["--mask", "MASK", "--inpaint-method", "repaint", "--sampler", "euler"],
         "steps back in time, which sampler euler cannot"),
        (["--mask", "MASK", "--inpaint-method", "repaint", "--jump-length", "4"],
         "jump_length 4 leaves no room to jump back in the 4 steps that run"),
        (["--mask", "BOMB"], "bomb.png: too_many_pixels"),
        (["IMAGE=bomb.png"], "bomb.png: too_many_pixels"),
    ],
)
def test_bad_editing_flags_are_one_line_and_status_2(files, tiny_pipeline_dir, capsys, extra, message):
    image = "in.png"
    if extra[0].startswith("IMAGE="):
        image, extra = extra[0][6:], extra[1:]
    extra = [str(files / "mask.png") if e == "MASK" else str(files / "bomb.png") if e == "BOMB" else e for e in extra]
    with pytest.raises(SystemExit) as e:
        run(files, tiny_pipeline_dir, *extra, image=image)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and message in err, err
    assert not (files / "out").exists() or not list((files / "out").iterdir())  # nothing written


def test_help_states_repaints_cost_and_the_a1111_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("(samples - 1) U-Net calls: 65 instead of 25 at the defaults", "--mask-blur", "--inpaint-area",
                 "--outpaint L,T,R,B", "--mask-invert", "--masked-content"):
        assert part in text
