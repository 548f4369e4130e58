"""Inpainting by replacement (ldm.editing.Replacement): the same images as diffusers'
StableDiffusionInpaintPipeline on an ordinary 4-channel U-Net, and outside the mask, by default,
the input's own pixels, bit for bit."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInpaintPipeline
from helpers import right_half, stroke_picture as picture
from PIL import Image

from ldm.text import LdmWarning

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [5, 6]
REFERENCE = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}  # deterministic: see test_same_images_as_diffusers




@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers notes that this U-Net is not an inpainting one: that is the point
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", sorted(REFERENCE))
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_same_images_as_diffusers(tiny_pipe, reference, sampler, strength):
    # Deterministic samplers: diffusers also draws a posterior sample of the masked image (for
    # 9-channel U-Nets) from each generator after the noise, which shifts an ancestral sampler's draws.
    reference.scheduler = REFERENCE[sampler].from_config(tiny_pipe.scheduler.config)
    kw = dict(num_inference_steps=8, guidance_scale=7.5, strength=strength, output_type="np")
    ours = tiny_pipe(
        PROMPTS,
        image=picture(),
        mask_image=right_half(),
        sampler=sampler,
        seed=SEEDS[0],
        composite=False,
        progress=False,
        **kw,
    ).images
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    theirs = reference(PROMPTS, image=[picture()] * 2, mask_image=[right_half()] * 2, generator=generators, **kw).images
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-3


def test_outside_the_mask_the_pixels_are_the_inputs_bit_for_bit(tiny_pipe):
    image, mask = picture(), right_half()
    out = tiny_pipe("a red circle", image=image, mask_image=mask, seed=1, num_inference_steps=4, progress=False)
    a, b = np.asarray(out.images[0]), np.asarray(image)
    assert np.array_equal(a[:, :32], b[:, :32])  # kept
    assert np.abs(a[:, 32:].astype(int) - b[:, 32:]).mean() > 5  # repainted
    raw = tiny_pipe(
        "a red circle", image=image, mask_image=mask, seed=1, num_inference_steps=4, composite=False, progress=False
    ).images[0]
    assert not np.array_equal(np.asarray(raw)[:, :32], b[:, :32])  # the raw decode changes it: what composite fixes
    assert "Denoising strength: 1, Inpaint method: replace" in out.parameters[0]


def test_an_all_white_mask_is_txt2img_on_that_canvas(tiny_pipe):
    white = Image.fromarray(np.full((64, 64), 255, np.uint8))
    out = tiny_pipe(
        "a red circle",
        image=picture(),
        mask_image=white,
        seed=2,
        num_inference_steps=4,
        output_type="np",
        progress=False,
        composite=False,
    )
    plain = tiny_pipe("a red circle", seed=2, num_inference_steps=4, output_type="np", progress=False)
    assert out.images.shape == plain.images.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_image=Image.fromarray(np.zeros((64, 64), np.uint8))), "mask_image selects nothing"),
        (dict(image=None), "mask_image needs image"),
        (dict(inpaint_method="outpaint"), r"unknown inpaint_method .outpaint.; choose one of: replace, repaint"),
        (dict(mask_image=[right_half()] * 3), "got 3 masks for 1 prompts"),
    ],
)
def test_bad_inpainting_input_is_a_value_error(tiny_pipe, kwargs, message):
    kwargs = {"image": picture(), "mask_image": right_half(), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_pipe("a red circle", progress=False, **kwargs)


def test_a_mask_of_another_size_is_resized_with_a_warning(tiny_pipe):
    with pytest.warns(LdmWarning, match=r"mask_image is 32x32 but the image is 64x64; resizing the mask"):
        tiny_pipe("a red circle", image=picture(), mask_image=right_half(32), num_inference_steps=2, progress=False)


def test_the_cli_inpaints_with_mask_and_keeps_the_rest(tiny_pipeline_dir, tmp_path, capsys):
    from ldm.cli.img2img import main

    picture().save(tmp_path / "in.png")
    right_half().save(tmp_path / "mask.png")
    base = [str(tmp_path / "in.png"), "a red circle", "--model", str(tiny_pipeline_dir), "--steps", "3", "--quiet"]
    assert main([*base, "--mask", str(tmp_path / "mask.png"), "--outdir", str(tmp_path / "out")]) == 0
    written = Image.open(capsys.readouterr().out.split()[0])
    assert np.array_equal(np.asarray(written)[:, :32], np.asarray(picture())[:, :32])
    assert "Denoising strength: 1, Inpaint method: replace" in written.info["parameters"]
    with pytest.raises(SystemExit) as e:
        main([*base, "--no-composite", "--outdir", str(tmp_path / "out2")])
    assert e.value.code == 2 and "--no-composite applies only with --mask or --outpaint" in capsys.readouterr().err
