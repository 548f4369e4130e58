"""S1: pickle weights are refused by default; with the opt-in they are read by torch's weights-only
unpickler only, so a malicious pickle never runs, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from ldm import LatentPipeline
from ldm.cli.txt2img import main as txt2img


class CreatesAFile:
    """Unpickling this calls open(path, "w"): the file appearing means the pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_copy(src, dst):
    """The tiny pipeline with its U-Net weights as a pickle (.bin) instead of safetensors."""
    shutil.copytree(src, dst)
    unet = dst / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    return dst, state


def test_pickle_weights_load_only_with_the_opt_in_and_equal_the_originals(tiny_pipeline_dir, tmp_path, monkeypatch):
    folder, state = pickled_copy(tiny_pipeline_dir, tmp_path / "p")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin: pickle-format weights are refused .*convert them to safetensors.*allow_pickle=True"):
        LatentPipeline.from_pretrained(folder, device="cpu")
    monkeypatch.setattr(torch, "load", _only_weights_only(torch.load))
    pipe = LatentPipeline.from_pretrained(folder, device="cpu", allow_pickle=True)
    params = dict(pipe.unet.state_dict())
    assert all(torch.equal(params[k], v) for k, v in state.items())


def _only_weights_only(original):
    def load(*a, **k):
        assert k.get("weights_only") is True, "torch.load called without weights_only=True"
        return original(*a, **k)
    return load


@pytest.mark.parametrize("force_env", [False, True])
def test_a_malicious_pickle_never_runs(tiny_pipeline_dir, tmp_path, monkeypatch, capsys, force_env):
    folder, _ = pickled_copy(tiny_pipeline_dir, tmp_path / "evil")
    marker = tmp_path / "pwned"
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "x": CreatesAFile(marker)}, weights)
    # the file is live: an unsafe load creates the marker
    torch.load(weights, weights_only=False)
    assert marker.exists()
    marker.unlink()

    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="pickle-format weights are refused"):
        LatentPipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match="refused by torch's weights-only unpickler"):
        LatentPipeline.from_pretrained(folder, device="cpu", allow_pickle=True)
    for extra in ([], ["--allow-pickle"]):
        with pytest.raises(SystemExit) as e:
            txt2img(["a red circle", "--model", str(folder), "--steps", "1", "--outdir", str(tmp_path / "png"), *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and err.startswith("ldm-txt2img: error:")
    assert not marker.exists()
