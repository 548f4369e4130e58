"""img2img (SDEdit, ldm.editing): the same images as diffusers' StableDiffusionImg2ImgPipeline on
the same weights, scheduler, seeds and strength; bad strengths and images are one clear error."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)
from helpers import stroke_picture as picture
from PIL import Image

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 4]
REFERENCE = {
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "dpm++2m": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2),
}




@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", sorted(REFERENCE))
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_same_images_as_diffusers_img2img(tiny_pipe, reference, sampler, strength):
    reference.scheduler = REFERENCE[sampler](tiny_pipe.scheduler.config)
    image = picture()
    # 8 steps, as the txt2img parity test: at CFG 7.5 float rounding differences (ours encodes each
    # half of guidance alone) grow with the steps; at CFG 1 the two agree to 2e-5 after 10 steps.
    kw = dict(num_inference_steps=8, guidance_scale=7.5, strength=strength, output_type="np")
    ours = tiny_pipe(PROMPTS, image=image, sampler=sampler, seed=SEEDS[0], progress=False, **kw).images
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    theirs = reference(PROMPTS, image=[image, image], generator=generators, **kw).images
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-3
    plain = tiny_pipe(
        PROMPTS, sampler=sampler, seed=SEEDS[0], progress=False, num_inference_steps=8, output_type="np"
    ).images
    assert np.abs(ours - plain).max() > 0.05  # the image took part


def test_low_strength_keeps_the_picture_and_high_strength_departs_from_it(tiny_pipe):
    image = picture()
    target = np.asarray(image) / 255
    close = tiny_pipe(
        "a red circle", image=image, strength=0.1, num_inference_steps=20, seed=1, output_type="np", progress=False
    )
    far = tiny_pipe(
        "a red circle", image=image, strength=1.0, num_inference_steps=20, seed=1, output_type="np", progress=False
    )
    assert np.abs(close.images[0] - target).mean() < np.abs(far.images[0] - target).mean()
    assert "Denoising strength: 0.1" in close.parameters[0]


def test_the_default_size_is_the_images_rounded_down(tiny_pipe):
    out = tiny_pipe("a red circle", image=picture(70), num_inference_steps=2, seed=1, output_type="np", progress=False)
    assert out.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0), r"strength must be a number in \(0, 1\], got 0"),
        (dict(strength=1.5), r"strength must be a number in \(0, 1\], got 1.5"),
        (
            dict(strength=0.05, num_inference_steps=10),
            r"strength 0.05 runs no step of 10; the smallest that works is 0.1",
        ),
        (
            dict(image=[picture(), picture(), picture()]),
            r"got 3 images for 1 prompts; pass one image, or one per prompt",
        ),
        (dict(image="not a picture"), r"image: not a picture"),
        (dict(image=None, strength=0.5), r"strength applies to img2img and inpainting: pass image"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(tiny_pipe, kwargs, message):
    kwargs = {"image": picture(), "num_inference_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_pipe("a red circle", progress=False, **kwargs)


def test_the_cli_writes_what_the_api_draws(tiny_pipe, tiny_pipeline_dir, tmp_path, capsys):
    from ldm.cli.img2img import main

    picture().save(tmp_path / "sketch.png")
    argv = [
        str(tmp_path / "sketch.png"),
        "a red circle",
        "--model",
        str(tiny_pipeline_dir),
        "--strength",
        "0.6",
        "--steps",
        "5",
        "--seed",
        "9",
        "--quiet",
        "--outdir",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    path = capsys.readouterr().out.split()[0]
    written = Image.open(path)
    assert "Denoising strength: 0.6" in written.info["parameters"]
    api = tiny_pipe(
        "a red circle", image=picture(), strength=0.6, num_inference_steps=5, seed=9, output_type="np", progress=False
    )
    assert np.abs(np.asarray(written) / 255 - api.images[0]).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strength", "0.01"], "strength 0.01 runs no step of 25; the smallest that works is 0.04"),
        (["--strength", "2"], r"strength must be a number in (0, 1], got 2.0"),
        (["IMAGE=missing.png"], "missing.png: missing_image"),
        (["IMAGE=garbage.png"], "garbage.png: unreadable_image"),
    ],
)
def test_bad_cli_input_is_one_line_and_status_2(tiny_pipeline_dir, tmp_path, capsys, extra, message):
    from ldm.cli.img2img import main

    picture().save(tmp_path / "sketch.png")
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    image = str(tmp_path / "sketch.png")
    if extra[0].startswith("IMAGE="):
        image, extra = str(tmp_path / extra[0][6:]), []
    with pytest.raises(SystemExit) as e:
        main([image, "a red circle", "--model", str(tiny_pipeline_dir), "--outdir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing written
