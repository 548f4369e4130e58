"""The console scripts: --help, one-line errors with exit status 2, and what ldm-txt2img writes."""

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from ldm.cli import txt2img

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_has_help(name, capsys):
    module, func = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _error(argv, capsys) -> str:
    """Run ldm-txt2img in-process; it must exit 2 with exactly one line on stderr and nothing on stdout."""
    with pytest.raises(SystemExit) as exit_info:
        txt2img.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ldm-txt2img: error: ")
    return lines[0]


def test_bad_input_is_one_line_and_status_2(tiny_pipeline_dir, tmp_path, capsys):
    model = ["--model", str(tiny_pipeline_dir)]
    out = ["--outdir", str(tmp_path / "out")]
    assert "height 100 is not a multiple of 8 (the model's latent factor); use 96 or 104" in _error(["x", "--height", "100", *model, *out], capsys)
    assert "width must be a whole number of pixels ≥ 8, got 4" in _error(["x", "--width", "4", *model, *out], capsys)
    assert "num_inference_steps must be an integer ≥ 1" in _error(["x", "--steps", "0", *model, *out], capsys)
    assert "guidance scale (cfg) must be a number ≥ 0, got -1.0" in _error(["x", "--cfg", "-1", *model, *out], capsys)
    line = _error(["x", "--sampler", "nope", *model, *out], capsys)
    assert "unknown sampler 'nope'; choose one of:" in line and "dpm++2m_karras" in line
    assert "invalid int value: 'ten'" in _error(["x", "--steps", "ten", *model, *out], capsys)
    assert "model folder not found: " in _error(["x", "--model", str(tmp_path / "missing"), *out], capsys)
    (tmp_path / "not_a_pipeline").mkdir()
    assert "is not a pipeline folder: missing model_index.json" in _error(["x", "--model", str(tmp_path / "not_a_pipeline"), *out], capsys)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_pipeline_dir, partial)
    shutil.rmtree(partial / "vae")
    assert "missing vae/" in _error(["x", "--model", str(partial), *out], capsys)
    (tmp_path / "a_file").write_text("")
    assert "exists and is not a folder" in _error(["x", *model, "--outdir", str(tmp_path / "a_file")], capsys)
    assert "cannot create --outdir" in _error(["x", *model, "--outdir", str(tmp_path / "a_file" / "sub")], capsys)
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no prompt given" in _error(["--prompts-file", str(tmp_path / "blank.txt"), *model, *out], capsys)
    assert "prompts file not found" in _error(["--prompts-file", str(tmp_path / "nope.txt"), *model, *out], capsys)
    assert "no prompt given" in _error([*model, *out], capsys)
    assert "eta applies to the ddim sampler only" in _error(["x", "--eta", "0.3", *model, *out], capsys)
    assert "fp16 is not supported on the CPU" in _error(["x", "--device", "cpu", "--dtype", "fp16", *model, *out], capsys)
    assert "requested but CUDA is not available" in _error(["x", "--device", "cuda", *model, *out], capsys) or os.environ.get("CUDA_VISIBLE_DEVICES")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing was generated


def test_no_default_model_yet_says_how_to_pass_one(monkeypatch, tmp_path, capsys):
    import ldm.pipeline

    monkeypatch.setattr(ldm.pipeline, "DEFAULT_MODEL", tmp_path / "none")
    assert "the default model is missing from this installation" in _error(["a red circle", "--outdir", str(tmp_path)], capsys)


def test_writes_pngs_with_parameters_and_prints_only_their_paths(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n", encoding="utf-8")
    outdir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "ldm.cli.txt2img", "--prompts-file", str(prompts), "a red circle to the left of a blue square",
        "--model", str(tiny_pipeline_dir), "--outdir", str(outdir), "--steps", "3", "--seed", "40", "--num-images", "2",
        "--batch-size", "4", "--negative", "green", "--cfg", "6", "--sampler", "euler",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == [f"{i:05d}-{40 + i}.png" for i in range(6)]
    assert "Traceback" not in result.stderr
    image = Image.open(paths[4])  # positional prompts first, then the file's: this is "a blue square" #1
    assert image.size == (64, 64)
    text = image.info["parameters"]
    assert text.splitlines()[:2] == ["a blue square", "Negative prompt: green"]
    model = f"Model: {tiny_pipeline_dir.name}"
    for part in ("Steps: 3", "Sampler: euler", "CFG scale: 6,", "Seed: 44", "Size: 64x64", model):
        assert part in text
    # The CLI's batches (4 + 2 images) give the images a single Python call gives with the same seeds.
    from ldm import LatentPipeline

    pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    again = pipe(["a blue square"], seed=44, num_inference_steps=3, negative_prompt="green", guidance_scale=6.0, sampler="euler", progress=False)
    import numpy as np

    assert np.abs(np.asarray(again.images[0], dtype=int) - np.asarray(image, dtype=int)).max() <= 1


def test_error_from_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ldm.cli.txt2img", "x", "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ldm-txt2img: error: model folder not found: {tmp_path / 'nope'}"
