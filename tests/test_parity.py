"""Ours against diffusers' StableDiffusionPipeline on the same weights, scheduler, seeds, settings."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from ldm import LatentPipeline

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [7, 8]

# The reference schedulers are built by hand from diffusers, not through our sampler table.
REFERENCE = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "plms": lambda c: PNDMScheduler.from_config(c, skip_prk_steps=True),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "euler_a": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    "heun": lambda c: HeunDiscreteScheduler.from_config(c),
    "dpm++2m": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2),
    "dpm++2m_karras": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
    "lms": lambda c: LMSDiscreteScheduler.from_config(c),
    "dpm2": lambda c: KDPM2DiscreteScheduler.from_config(c),
    "dpm2_a_karras": lambda c: KDPM2AncestralDiscreteScheduler.from_config(c, use_karras_sigmas=True),
}


def _reference(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_both(ours, ref, sampler, steps=8, **kw):
    ref.scheduler = REFERENCE[sampler](ours.scheduler.config)
    a = ours(PROMPTS, sampler=sampler, num_inference_steps=steps, seed=SEEDS[0], output_type="np", progress=False, **kw).images
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    if isinstance(kw.get("negative_prompt"), str):  # diffusers wants a list beside a list of prompts
        kw["negative_prompt"] = [kw["negative_prompt"]] * len(PROMPTS)
    b = ref(PROMPTS, num_inference_steps=steps, generator=generators, output_type="np", **kw).images
    return a, b


@pytest.mark.parametrize("sampler", list(REFERENCE))
@pytest.mark.parametrize("negative", [None, "a green square"])
def test_same_images_as_diffusers(tiny_pipe, tiny_pipeline_dir, sampler, negative):
    a, b = _run_both(tiny_pipe, _reference(tiny_pipeline_dir), sampler, negative_prompt=negative, guidance_scale=7.5)
    assert a.shape == b.shape == (2, 64, 64, 3)
    assert np.abs(a - b).max() <= 1e-3
    assert np.abs(a[0] - a[1]).max() > 0.05  # the two images differ: the comparison means something


def test_v_prediction_matches_diffusers(tiny_v_pipeline_dir):
    ours = LatentPipeline.from_pretrained(tiny_v_pipeline_dir, device="cpu")
    assert ours.scheduler.config.prediction_type == "v_prediction"
    a, b = _run_both(ours, _reference(tiny_v_pipeline_dir), "dpm++2m", guidance_scale=5.0)
    assert np.abs(a - b).max() <= 1e-3


def test_guidance_rescale_and_eta_match_diffusers(tiny_pipe, tiny_pipeline_dir):
    ref = _reference(tiny_pipeline_dir)
    a, b = _run_both(tiny_pipe, ref, "ddim", guidance_scale=9.0, guidance_rescale=0.7, eta=0.5)
    assert np.abs(a - b).max() <= 1e-3
    plain, _ = _run_both(tiny_pipe, ref, "ddim", guidance_scale=9.0)
    assert np.abs(a - plain).max() > 1e-3  # the options changed the result


def test_vae_scaling_factor_comes_from_its_config(tiny_pipe):
    """The tiny VAE's scaling factor is 0.5, not SD's 0.18215: decoding must divide by 0.5."""
    assert tiny_pipe.vae.config.scaling_factor == 0.5
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = tiny_pipe.vae.decode(z / 0.5).sample
    assert torch.allclose(tiny_pipe.decode_latents(z), expected, atol=1e-6)
