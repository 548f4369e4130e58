"""Inpainting U-Nets (9 input channels: latents, latent mask, masked image's latents, as SD's
inpainting checkpoints): detected from the config and run as diffusers runs them, with the same
images as diffusers' StableDiffusionInpaintPipeline on the same tiny random weights."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInpaintPipeline
from helpers import make_tiny_pipeline, right_half, stroke_picture as picture
from PIL import Image

from ldm import LatentPipeline

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [5, 6]


@pytest.fixture(scope="module")
def inpainting_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny9") / "pipeline", seed=3, unet_in_channels=9)


@pytest.fixture(scope="module")
def pipe(inpainting_dir):
    return LatentPipeline.from_pretrained(inpainting_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(inpainting_dir):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpainting_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler, scheduler", [("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_same_images_as_diffusers(pipe, reference, sampler, scheduler, strength):
    reference.scheduler = scheduler.from_config(pipe.scheduler.config)
    kw = dict(num_inference_steps=6, guidance_scale=7.5, strength=strength, output_type="np")
    ours = pipe(PROMPTS, image=picture(), mask_image=right_half(), sampler=sampler, seed=SEEDS, composite=False,
                progress=False, **kw)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    theirs = reference(PROMPTS, image=[picture()] * 2, mask_image=[right_half()] * 2, generator=generators, **kw).images
    assert ours.images.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours.images - theirs).max() <= 1e-3
    assert "Inpaint method: unet" in ours.parameters[0]


def test_the_mask_reaches_the_unet(pipe):
    kw = dict(image=picture(), seed=1, num_inference_steps=3, output_type="np", progress=False, composite=False)
    half = pipe("a red circle", mask_image=right_half(), **kw).images
    other = pipe("a red circle", mask_image=right_half().transpose(Image.Transpose.FLIP_LEFT_RIGHT), **kw).images
    assert np.abs(half - other).max() > 1e-3


def test_txt2img_and_img2img_run_under_an_all_white_mask(pipe):
    out = pipe("a red circle", seed=1, num_inference_steps=2, output_type="np", progress=False).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    edited = pipe("a red circle", image=picture(), strength=0.5, seed=1, num_inference_steps=4, progress=False)
    assert edited.images[0].size == (64, 64)


def test_a_method_for_ordinary_unets_is_refused(pipe):
    with pytest.raises(ValueError, match="applies to ordinary U-Nets; this is an inpainting U-Net"):
        pipe("a red circle", image=picture(), mask_image=right_half(), inpaint_method="repaint", sampler="ddim",
             num_inference_steps=4, progress=False)


def test_a_unet_of_another_width_is_refused(pipe):
    config = dict(pipe.unet.config)
    pipe.unet.register_to_config(in_channels=5)
    try:
        message = r"takes 5 input channels; ldm runs ordinary U-Nets \(4.*inpainting U-Nets \(9\)"
        with pytest.raises(ValueError, match=message):
            pipe("a red circle", num_inference_steps=2, progress=False)
    finally:
        pipe.unet.register_to_config(in_channels=config["in_channels"])
