"""save_pretrained keeps each network's dtype from the folder it was loaded from (a float16 folder
stays float16 even when computed in float32), with diffusers' torch_dtype and variant conventions."""

import json
import struct

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from ldm import LatentPipeline

FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def dtypes(folder, variant=None):
    """{network: the set of dtypes in its weights file's header}"""
    found = {}
    for network, stem in FILES.items():
        data = (folder / network / f"{stem}{'.' + variant if variant else ''}.safetensors").read_bytes()
        header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
        found[network] = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def test_a_float16_folder_saves_as_float16_and_loads_back_the_same(tiny_pipe, tmp_path):
    half = tiny_pipe.save_pretrained(tmp_path / "half", torch_dtype="fp16")
    assert dtypes(half) == {n: {"F16"} for n in FILES}
    pipe = LatentPipeline.from_pretrained(half, device="cpu")
    assert pipe.dtype == torch.float32  # computed in float32 on the CPU
    again = pipe.save_pretrained(tmp_path / "again")
    assert dtypes(again) == {n: {"F16"} for n in FILES}
    for network, stem in FILES.items():  # the same bytes: nothing was lost or doubled
        name = f"{network}/{stem}.safetensors"
        assert (half / name).stat().st_size == (again / name).stat().st_size
    a = pipe("a red circle", seed=1, num_inference_steps=2, output_type="np", progress=False).images
    b = LatentPipeline.from_pretrained(again, device="cpu")(
        "a red circle", seed=1, num_inference_steps=2, output_type="np", progress=False
    ).images
    assert np.array_equal(a, b)

    wide = pipe.save_pretrained(tmp_path / "wide", torch_dtype=torch.float32)
    assert dtypes(wide) == {n: {"F32"} for n in FILES}
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32  # saving never changes the pipeline


def test_a_variant_is_named_as_diffusers_names_it_and_loads_in_both(tiny_pipe, tmp_path):
    folder = tiny_pipe.save_pretrained(tmp_path / "v", torch_dtype="fp16", variant="fp16")
    assert dtypes(folder, "fp16") == {n: {"F16"} for n in FILES}
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    theirs = UNet2DConditionModel.from_pretrained(folder / "unet", variant="fp16")
    ours = LatentPipeline.from_pretrained(folder, device="cpu", variant="fp16")
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.unet.state_dict()[name], tensor.float())
