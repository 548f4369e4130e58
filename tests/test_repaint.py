"""RePaint (ldm.editing.jump_schedule, Resampling): its time schedule against a hand-computed case
and diffusers' RePaintScheduler, the jump's forward process against the composed β steps, the
known region exact at the end, per-image seeds, and the cost it states."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, RePaintScheduler
from helpers import right_half, stroke_picture as picture

from ldm.editing import Resampling, jump_schedule, repaint_calls


def test_the_jump_schedule_by_hand():
    # 4 steps, jump 1 level back once (2 samples) at every level but the noisiest: positions are
    # "the step from level p to p + 1"; a repeat means the sample was re-noised back to p first.
    assert jump_schedule(4, 1, 2) == [0, 1, 1, 2, 2, 3, 3]
    assert jump_schedule(6, 2, 3) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5, 4, 5, 4, 5]
    assert jump_schedule(5, 1, 1) == [0, 1, 2, 3, 4]  # one sample: no jumps, plain replacement
    assert repaint_calls(6, 2, 3) == 14 and repaint_calls(25, 5, 3) == 65


@pytest.mark.parametrize("steps, jump_length, jump_samples", [(25, 5, 3), (250, 10, 10), (10, 3, 2), (7, 7, 3)])
def test_the_jump_schedule_is_diffusers_repaint_schedule(steps, jump_length, jump_samples):
    reference = RePaintScheduler(num_train_timesteps=1000)
    reference.set_timesteps(steps, jump_length, jump_samples)
    levels = (reference.timesteps // (1000 // steps)).tolist()  # its visits; a model step where the level falls
    down, last = [], levels[0] + 1
    for level in levels:
        if level < last:
            down.append(steps - 1 - level)
        last = level
    assert jump_schedule(steps, jump_length, jump_samples) == down
    assert repaint_calls(steps, jump_length, jump_samples) == len(down)


def test_a_jump_is_the_forward_process_over_the_levels_it_skips():
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(10)
    levels = scheduler.timesteps  # 901, 801, ..., 1
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(1, 1, 4, 4)  # all known: the result is the known latents, then the jump
    positions = [0, 1, 2, 1]  # after the step at 2 (reaching level 3), jump back to level 1
    constraint = Resampling(scheduler, z0, keep, levels, positions, torch.Generator().manual_seed(7))
    out = constraint(2, torch.zeros_like(z0))
    g = torch.Generator().manual_seed(7)
    first, second = torch.randn(z0.shape, generator=g), torch.randn(z0.shape, generator=g)
    known = scheduler.add_noise(z0, first, levels[3:4])
    # q(z_s | z_t) composes the single steps x_k = √(1 − β_k) x_{k−1} + √β_k ε over the skipped levels
    betas = scheduler.betas[int(levels[3]) + 1 : int(levels[1]) + 1].double()
    ratio = torch.prod(1 - betas)
    assert torch.isclose(ratio, scheduler.alphas_cumprod[levels[1]].double() / scheduler.alphas_cumprod[levels[3]])
    expected = ratio.sqrt() * known + (1 - ratio).sqrt() * second
    assert torch.allclose(out, expected.float(), atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_repaint_keeps_the_known_latents_and_counts_its_calls(tiny_pipe, sampler):
    calls = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = tiny_pipe("a red circle", image=picture(), mask_image=right_half(), inpaint_method="repaint",
                        sampler=sampler, num_inference_steps=6, jump_length=2, jump_samples=3, seed=3,
                        output_type="latent", progress=False)
    finally:
        hook.remove()
    assert len(calls) == repaint_calls(6, 2, 3) == 14
    from ldm.editing import encode_images

    z0 = encode_images(tiny_pipe.vae, tiny_pipe.prepare_images(picture(), 1, None, None),
                       [torch.Generator().manual_seed(3)])
    h = z0.shape[-1] // 2
    assert torch.equal(out.images[..., :h], z0[..., :h])  # the known half is the image's own latents
    assert not torch.allclose(out.images[..., h:], z0[..., h:], atol=0.1)
    assert "Inpaint method: repaint, Jump length: 2, Jump samples: 3" in out.parameters[0]


def test_repaint_images_do_not_depend_on_the_batch(tiny_pipe):
    kw = dict(image=picture(), mask_image=right_half(), inpaint_method="repaint", sampler="ddpm",
              num_inference_steps=4, jump_length=1, jump_samples=2, output_type="np", progress=False)
    both = tiny_pipe(["a red circle", "a blue square"], seed=[11, 12], **kw).images
    alone = tiny_pipe("a blue square", seed=12, **kw).images
    assert np.abs(both[1] - alone[0]).max() <= 1e-5
    again = tiny_pipe("a blue square", seed=13, **kw).images  # stochastic: another seed, another image
    assert np.abs(again[0] - alone[0]).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="euler"), r"steps back in time, which sampler euler cannot .*use one of: ddpm, ddim"),
        (dict(jump_length=4), r"jump_length 4 leaves no room to jump back in the 4 steps that run"),
        (dict(jump_samples=0), r"jump_samples must be an integer ≥ 1, got 0"),
        (dict(jump_length=1.5), r"jump_length must be an integer ≥ 1, got 1.5"),
        (dict(inpaint_method="replace", jump_length=2), "apply to inpaint_method='repaint' only"),
        (dict(mask_image=None, inpaint_method=None, jump_samples=2), "apply to inpainting"),
        (dict(mask_image=None, inpaint_method="replace"), "inpaint_method applies to inpainting: pass mask_image"),
    ],
)
def test_bad_repaint_input_is_a_value_error(tiny_pipe, kwargs, message):
    kwargs = {"image": picture(), "mask_image": right_half(), "num_inference_steps": 4, "sampler": "ddim",
              "inpaint_method": "repaint", **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_pipe("a red circle", progress=False, **kwargs)


def test_repaint_frees_every_latent_cell_the_mask_touches():
    from ldm.editing import latent_mask

    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:5, 9:10] = 1  # a sliver: rows 3-4 of cell row 0 (pixels 0-7), one column of cell column 1
    cover = latent_mask(mask, (2, 2), cover=True)
    assert cover[0, 0].tolist() == [[0, 1], [0, 0]]
    assert latent_mask(mask, (2, 2)).sum() == 0  # nearest neighbour (diffusers', for replace) misses it
