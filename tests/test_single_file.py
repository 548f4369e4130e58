"""Original-format single-file checkpoints, converted by diffusers offline."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_sd_topology_pipeline, to_original_format
from ldm import LatentPipeline
from ldm.cli import txt2img


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    folder = tiny_sd_topology_pipeline(root / "pipeline")
    pipe = LatentPipeline.from_pretrained(folder, device="cpu")
    save_file(to_original_format(pipe), root / "model.safetensors")
    return pipe, folder, root / "model.safetensors"


def test_single_file_loads_to_the_same_weights_and_images(single_file):
    pipe, folder, checkpoint = single_file
    loaded = LatentPipeline.from_single_file(checkpoint, config=folder, device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[k].numpy(), theirs[k].reshape(ours[k].shape).numpy()) for k in ours)
    kw = dict(seed=1, num_inference_steps=4, output_type="np", progress=False)
    # The weights are bit-identical (above); the images agree to float rounding only. Where a tensor
    # lands in memory (its 64-byte alignment differs between the two loads) picks the CPU kernel's
    # summation order on some CPUs: on a 2-core AMD EPYC (AVX512) the two drew images 1.8e-6 apart,
    # and 0 apart once every weight was copied into fresh memory.
    np.testing.assert_allclose(pipe("a red circle", **kw).images, loaded("a red circle", **kw).images, rtol=0, atol=1e-5)


def test_single_file_through_the_cli(single_file, tmp_path, capsys):
    _, folder, checkpoint = single_file
    assert txt2img.main(["a red circle", "--model", str(checkpoint), "--config", str(folder), "--steps", "2", "--outdir", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith(".png")
    with pytest.raises(SystemExit) as exit_info:
        txt2img.main(["a red circle", "--model", str(checkpoint), "--height", "12", "--config", str(folder), "--outdir", str(tmp_path)])
    assert exit_info.value.code == 2 and "height 12 is not a multiple of 8" in capsys.readouterr().err
    for argv, message in (
        ([str(checkpoint)], "is a single-file checkpoint: pass --config"),
        ([str(folder), "--config", str(folder)], "--config applies only to a single-file"),
        ([str(tmp_path / "model.ckpt"), "--config", str(folder)], "pickle checkpoints are refused"),
    ):
        with pytest.raises(SystemExit):
            txt2img.main(["x", "--outdir", str(tmp_path), "--model", *argv])
        assert message in capsys.readouterr().err


def test_single_file_bad_inputs(single_file, tmp_path):
    _, folder, checkpoint = single_file
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        LatentPipeline.from_single_file(tmp_path / "none.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(ValueError, match="pickle checkpoints are refused"):
        LatentPipeline.from_single_file(tmp_path / "model.ckpt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors: not a valid safetensors file"):
        LatentPipeline.from_single_file(tmp_path / "garbage.safetensors")
    save_file({"something.else": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an original-format Stable Diffusion checkpoint"):
        LatentPipeline.from_single_file(tmp_path / "other.safetensors")
