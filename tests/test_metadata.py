"""The `parameters` text each PNG carries: what AUTOMATIC1111 writes, read back by A1111's own
parsing rule and by sd-parsers (a reader people use), with no local path in it."""

import hashlib
import json
import re
import shutil

from PIL import Image
from sd_parsers import ParserManager

from ldm import LatentPipeline
from ldm.pipeline import infotext

# AUTOMATIC1111's rule for one "key: value" pair (modules/infotext_utils.py, re_param_code)
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> dict:
    fields = {}
    for key, value in A1111_PARAM.findall(text.splitlines()[-1]):
        fields[key] = json.loads(value) if value.startswith('"') else value
    return fields


def test_values_are_written_as_a1111_writes_them():
    text = infotext(
        "a red circle", "", {"Steps": 25, "CFG scale": 6.0, "Guidance rescale": 0.7, "Model": "shapes, v2: final"}
    )
    assert text.splitlines()[-1] == 'Steps: 25, CFG scale: 6, Guidance rescale: 0.7, Model: "shapes, v2: final"'
    assert a1111_parse(text) == {
        "Steps": "25",
        "CFG scale": "6",
        "Guidance rescale": "0.7",
        "Model": "shapes, v2: final",
    }


def test_the_png_names_the_model_and_its_hash_never_its_path(tiny_pipeline_dir, tmp_path):
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "alice" / "shapes, v2")
    pipe = LatentPipeline.from_pretrained(folder, device="cpu")
    out = pipe("a red circle", negative_prompt="blue", seed=5, num_inference_steps=2, guidance_scale=6, progress=False)
    path = out.save(tmp_path / "png")[0]
    text = Image.open(path).info["parameters"]
    assert str(tmp_path) not in text and "alice" not in text
    weights = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    expected_hash = hashlib.sha256(weights).hexdigest()[:10]
    fields = a1111_parse(text)
    assert fields["Model"] == "shapes, v2" and fields["Model hash"] == expected_hash
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == (
        "2",
        "plms",  # the scheduler the folder names (PNDM), as diffusers would run
        "6",
        "5",
        "64x64",
    )


def test_sd_parsers_reads_what_we_write(tiny_pipe, tmp_path):
    out = tiny_pipe(
        "a red circle", negative_prompt="blue", seed=11, num_inference_steps=3, guidance_scale=7.5, progress=False
    )
    path = out.save(tmp_path)[0]
    info = ParserManager().parse(Image.open(path))
    sampler = info.samplers[0]
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in sampler.prompts] == ["a red circle"] and [p.value for p in sampler.negative_prompts] == [
        "blue"
    ]
    assert sampler.name == "plms" and (sampler.model.name, sampler.model.hash) == (
        tiny_pipe.model_name,
        tiny_pipe.model_hash,
    )
    assert (
        sampler.parameters["seed"] == "11"
        and sampler.parameters["steps"] == "3"
        and sampler.parameters["cfg_scale"] == "7.5"
    )
