"""The embedded default model (assets/default-model): what ships, how it loads, and its quality."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldm import LatentPipeline
from ldm.data.shapes import KINDS, world_words
from ldm.pipeline import DEFAULT_MODEL

# The quality gate on the fixed subset below (48 evaluation prompts, 8 per kind, seed 0, the
# default sampler and steps, CFG 7.5): the shipped model scores SUBSET_MEASURED overall on them
# (assets/default-model/README.md has the full 600-prompt table). A drop of more than 0.15 fails.
SUBSET_PROMPTS = 48
SUBSET_MEASURED = 0.979  # 47 of 48 (v2, 2026-12-06, the shipped float16 folder)
SUBSET_TOLERANCE = 0.15
# The same on the first 36 prompts of the hard mix (ldm-shapes eval --mix hard: pairs of one colour,
# counts of three and four, both sizes named, a third on black).
HARD_PROMPTS = 36
HARD_MEASURED = 0.806  # 29 of 36 (v2, 2026-12-06; v1: 26 of 36)

# Until the model ships (issue 6: it ships once it passes the quality gate) these tests are
# skipped, with the reason in the summary; shipping it without setting SUBSET_MEASURED fails.
pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason="the embedded default model is not shipped yet (assets/default-model)")


@pytest.fixture(scope="module")
def default_pipe():
    return LatentPipeline.from_pretrained(device="cpu")


def test_what_ships_fits_the_budget_in_half_precision():
    files = [f for f in DEFAULT_MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"unet", "vae", "text_encoder"}
    assert not [f for f in files if f.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    for f in weights:
        with safe_open(f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F16"}, f
    assert (DEFAULT_MODEL / "README.md").is_file()  # the model card
    assert (DEFAULT_MODEL / "training_words.txt").read_text().split() == world_words()


def test_loads_with_no_argument_in_float32_on_the_cpu(default_pipe):
    assert default_pipe.name_or_path == str(DEFAULT_MODEL)
    assert default_pipe.unet.dtype == default_pipe.vae.dtype == default_pipe.text_encoder.dtype == torch.float32
    assert default_pipe.default_size == 64 and default_pipe.latent_factor == 8
    assert default_pipe.training_words == set(world_words())


def test_diffusers_loads_it_and_draws_the_same_picture(default_pipe):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = EulerDiscreteScheduler.from_config(default_pipe.scheduler.config)  # the default sampler
    prompt = "a red circle to the left of a blue square"
    ours = default_pipe(prompt, seed=5, output_type="np", progress=False).images
    theirs = ref(prompt, generator=torch.Generator().manual_seed(5), num_inference_steps=25, output_type="np",
                 guidance_rescale=0.7).images  # a zero-terminal-SNR model: ours rescales guidance by default
    assert np.abs(ours - theirs).max() <= 1e-3


def test_quality_on_a_fixed_subset_of_held_out_prompts(default_pipe, tmp_path):
    """Generate and score 48 evaluation prompts (8 per caption kind): fails if the model got
    much worse than measured when it shipped. About 10 s on one CPU thread."""
    from ldm.data.shapes_eval import generate_eval_folder
    from ldm.data.shapes_score import score_folder

    rows = generate_eval_folder(default_pipe, str(tmp_path), num_prompts=SUBSET_PROMPTS, seed=0, cfg=7.5)
    assert sorted(r["kind"] for r in rows) == sorted(KINDS * (SUBSET_PROMPTS // len(KINDS)))
    report = score_folder(str(tmp_path))
    overall = report["kinds"]["overall"]["accuracy"]
    assert overall >= SUBSET_MEASURED - SUBSET_TOLERANCE, json.dumps(report["kinds"], indent=1)


def test_quality_on_the_first_prompts_of_the_hard_mix(default_pipe, tmp_path):
    """The hard mix's first 36 prompts: fails if the model got much worse on its hard cases than measured."""
    from ldm.data.shapes_eval import generate_eval_folder
    from ldm.data.shapes_score import score_folder

    generate_eval_folder(default_pipe, str(tmp_path), num_prompts=HARD_PROMPTS, seed=0, cfg=7.5, mix="hard")
    report = score_folder(str(tmp_path))
    assert report["kinds"]["background"]["n"] == HARD_PROMPTS // 3
    overall = report["kinds"]["overall"]["accuracy"]
    assert overall >= HARD_MEASURED - SUBSET_TOLERANCE, json.dumps(report["kinds"], indent=1)


def test_the_readme_command_makes_a_correct_picture(tmp_path):
    from PIL import Image

    from ldm.data.shapes_score import score_image

    prompt = "a red circle to the left of a blue square"
    result = subprocess.run([sys.executable, "-m", "ldm.cli.txt2img", prompt, "--cfg", "7.5", "--seed", "0", "--quiet"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str((tmp_path / "outputs" / "00000-0.png").relative_to(tmp_path))]
    assert "warning" not in result.stderr
    image = Image.open(tmp_path / "outputs" / "00000-0.png")
    assert image.size == (64, 64)
    assert score_image(image.convert("RGB"), prompt).passed


# A prompt outside the world (one warning naming the unseen words, a picture all the same):
# tests/test_output.py::test_a_run_prints_only_our_warnings_and_bars runs it on the default model.
