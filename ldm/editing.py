"""Editing a picture the user already has: the math that img2img (SDEdit) and inpainting add to sampling.

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", §3, Alg. 1): perturb the input x^g to an intermediate time t_0 with the
forward process, z_{t_0} = √ᾱ_{t_0} z_0 + √(1 − ᾱ_{t_0}) ε (Ho et al. 2020, eq. 4; here in the VAE's
latent space, z_0 = s · (E(x^g) − shift)), then run the ordinary reverse process from t_0 to 0. The
strength s = t_0 / T trades faithfulness to the input (small s) against realism (large s); s = 1
starts from (almost) pure noise.

The timestep cut is diffusers' (`StableDiffusionImg2ImgPipeline.get_timesteps`): of the N steps
the sampler lays out, the last ⌊N·s⌋ run, so images equal diffusers' on the same weights, scheduler,
seed and strength.

Inpainting by replacement (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App.
I.2; the base of RePaint, Lugmayr et al. 2022, eq. 8-9): after every reverse step the known region
(mask 0) is overwritten with the image's latents noised to the level of the next step, z_{t-1} =
m ⊙ z_{t-1} + (1 − m) ⊙ q(z_{t-1} | z_0), and with z_0 itself after the last; the unknown region
(mask 1) is what the model draws. This is diffusers' path for ordinary 4-channel U-Nets
(`StableDiffusionInpaintPipeline`), reproduced step for step.
"""

from __future__ import annotations

import math

import torch

DEFAULT_STRENGTH = 0.75  # diffusers' default


def check_strength(strength, num_inference_steps: int) -> None:
    """A ValueError unless `strength` is in (0, 1] and large enough for at least one step to run."""
    if (
        not isinstance(strength, (int, float))
        or isinstance(strength, bool)
        or not math.isfinite(strength)
        or not 0 < strength <= 1
    ):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if int(num_inference_steps * strength) < 1:
        smallest = 1 / num_inference_steps
        raise ValueError(
            f"strength {strength} runs no step of {num_inference_steps}; the smallest that works is "
            f"{smallest:.3g} (or raise num_inference_steps)"
        )


INPAINT_METHODS = ("replace",)


def check_inpainting(method: str, unet_channels: int, latent_channels: int) -> None:
    """A ValueError for an inpainting method not built, or a U-Net these methods cannot drive."""
    if method not in INPAINT_METHODS:
        raise ValueError(f"unknown inpaint_method {method!r}; choose one of: {', '.join(INPAINT_METHODS)}")
    if unet_channels != latent_channels:
        raise ValueError(f"this U-Net takes {unet_channels} input channels (an inpainting U-Net: latents, mask and "
                         f"masked image); ldm inpaints with ordinary {latent_channels}-channel U-Nets only so far")


def sdedit_timesteps(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The timesteps SDEdit runs: the last ⌊N·s⌋ of the N the scheduler laid out (its `set_timesteps`
    must have been called), with the scheduler told where it starts (multistep solvers count steps)."""
    run = min(int(num_inference_steps * strength), num_inference_steps)
    start = (num_inference_steps - run) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generators: list | torch.Generator | None) -> torch.Tensor:
    """z_0 = s · (z − shift), z ~ q(z | x): one posterior sample per image, each drawn from its own
    generator (diffusers' order: the posterior sample before the noise). `images` in [−1, 1]."""
    config = vae.config
    if isinstance(generators, list):
        latents = torch.cat(
            [vae.encode(images[i : i + 1]).latent_dist.sample(generator=generators[i]) for i in range(len(images))]
        )
    else:
        latents = vae.encode(images).latent_dist.sample(generator=generators)
    if config.get("shift_factor") is not None:
        latents = latents - config.shift_factor
    return latents * config.scaling_factor  # (B, C, H/f, W/f)


def noised_latents(scheduler, z0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0) at the first timestep SDEdit runs: √ᾱ_t z_0 + √(1 − ᾱ_t) ε (the scheduler's own
    `add_noise`, so σ-parameterised samplers get z_0 + σ_t ε, their form of the same point)."""
    return scheduler.add_noise(z0, noise, timestep.repeat(len(z0)))


def latent_mask(mask: torch.Tensor, latent_shape: tuple[int, int]) -> torch.Tensor:
    """A binary pixel mask (B, 1, H, W) at latent resolution (B, 1, H/f, W/f): nearest
    neighbour, as diffusers resizes it (`prepare_mask_latents`)."""
    return torch.nn.functional.interpolate(mask, size=latent_shape)


class Replacement:
    """The per-step constraint of inpainting by replacement (see the module docstring): called
    after step i with the latents, returns them with the known region replaced."""

    def __init__(self, scheduler, z0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor):
        self.scheduler, self.z0, self.noise, self.timesteps = scheduler, z0, noise, timesteps
        self.mask = mask.to(z0.dtype)  # (B, 1, h, w): 1 = repaint, 0 = keep

    def __call__(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        known = self.z0
        if i < len(self.timesteps) - 1:  # noised to the level the next step starts from
            known = self.scheduler.add_noise(self.z0, self.noise, self.timesteps[i + 1 : i + 2])
        return (1 - self.mask) * known + self.mask * latents
