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

Replacement alone harmonises poorly: the model sees the known region only through noisy latents,
and each step's drawn part never gets to adapt to what the next replacement puts beside it.
RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
Models", Alg. 1 and §4.2) resamples: after a step to t − 1, with fresh noise in the known region
(eq. 8a), it sometimes jumps back j steps by the forward process, z_{t−1+j} ~ q(z_{t−1+j} | z_{t−1})
= N(√(ᾱ_{t−1+j}/ᾱ_{t−1}) z_{t−1}, (1 − ᾱ_{t−1+j}/ᾱ_{t−1}) I) (eq. 1 composed j times), and re-runs
those j steps, r − 1 extra times per jump point (`jump_schedule`). The reverse steps are the sampler's
own (DDPM's ancestral step as in the paper, or DDIM's); only samplers whose step depends on
nothing but (t, t_prev) can be sent back in time, so RePaint drives `REPAINT_SAMPLERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


INPAINT_METHODS = ("replace", "repaint")
# Samplers whose step is a function of (t, t_prev) alone (no step counter, no history), so that
# RePaint can send the sample back in time and step again. "ddpm" is the paper's ancestral step.
REPAINT_SAMPLERS = ("ddpm", "ddim")
REPAINT_DEFAULT_SAMPLER = "ddim"  # on the default model's held-out edits it beat ddpm at the same jumps
DEFAULT_JUMP_LENGTH = 5
DEFAULT_JUMP_SAMPLES = 3


def unet_takes_mask(unet_channels: int, latent_channels: int) -> bool:
    """Whether the U-Net is an inpainting one (SD's inpainting checkpoints: latents, the latent mask
    and the masked image's latents stacked, 2C + 1 input channels) rather than an ordinary one (C);
    a ValueError for any other count."""
    if unet_channels == latent_channels:
        return False
    if unet_channels == 2 * latent_channels + 1:
        return True
    raise ValueError(f"this U-Net takes {unet_channels} input channels; ldm runs ordinary U-Nets ({latent_channels}, "
                     f"the VAE's latent channels) and inpainting U-Nets ({2 * latent_channels + 1})")


def check_inpainting(method: str | None, inpainting_unet: bool, sampler: str | None = None,
                     jump_length=None, jump_samples=None, steps: int | None = None) -> str:
    """The inpainting method to run (None: "replace" with an ordinary U-Net, "unet" with an
    inpainting one), or a ValueError for a method not built, one the U-Net cannot take, a sampler
    RePaint cannot send back in time, or a jump schedule that cannot run in `steps` steps."""
    if method is not None and method not in INPAINT_METHODS:
        raise ValueError(f"unknown inpaint_method {method!r}; choose one of: {', '.join(INPAINT_METHODS)}")
    if inpainting_unet and method is not None:
        raise ValueError(f"inpaint_method {method!r} applies to ordinary U-Nets; this is an inpainting U-Net, which "
                         "inpaints by itself from the mask and the masked image (leave inpaint_method unset)")
    method = method or ("unet" if inpainting_unet else "replace")
    if method != "repaint":
        if jump_length is not None or jump_samples is not None:
            raise ValueError("jump_length and jump_samples apply to inpaint_method='repaint' only")
        return method
    if sampler is not None and sampler not in REPAINT_SAMPLERS:
        raise ValueError(f"inpaint_method 'repaint' steps back in time, which sampler {sampler} cannot (it "
                         f"counts its steps or keeps a history); use one of: {', '.join(REPAINT_SAMPLERS)}")
    for name, value in (("jump_length", jump_length), ("jump_samples", jump_samples)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    jump = DEFAULT_JUMP_LENGTH if jump_length is None else jump_length
    if steps is not None and (jump_samples or DEFAULT_JUMP_SAMPLES) > 1 and jump >= steps:
        raise ValueError(f"jump_length {jump} leaves no room to jump back in the {steps} steps that run; use a "
                         f"jump_length below {steps}, or more steps")
    return method


def jump_schedule(steps: int, jump_length: int, jump_samples: int) -> list[int]:
    """RePaint's time schedule (Lugmayr et al. 2022, §4.2, App. B; diffusers' `RePaintScheduler.set_timesteps`)
    as the step each U-Net call takes: position p means "step from the p-th to the (p+1)-th of the
    `steps` noise levels" (p + 1 = `steps`: to the clean sample). Where a position is lower than
    its predecessor + 1 the sample was first re-noised back to it. Every `jump_length` levels (from
    the clean end, and not within the first `jump_length` steps) the last `jump_length` steps are
    repeated `jump_samples` − 1 times: about `jump_samples` × the U-Net calls (`repaint_calls`)."""
    jumps = {level: jump_samples - 1 for level in range(0, steps - jump_length, jump_length)}
    positions, level = [], steps  # level: the diffusers index of the step about to run, counting down
    while level >= 1:
        level -= 1
        positions.append(steps - 1 - level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            level += jump_length  # re-noise jump_length levels up, then step down over them again
    return positions


def repaint_calls(steps: int, jump_length: int, jump_samples: int) -> int:
    """The U-Net calls (per guidance half) RePaint makes for `steps` steps: steps + jumps · j · (r − 1)."""
    return steps + len(range(0, steps - jump_length, jump_length)) * jump_length * (jump_samples - 1)


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


def masked_image_latents(vae, images: torch.Tensor, masks: torch.Tensor, generators) -> torch.Tensor:
    """What an inpainting U-Net reads beside the latents (Rombach et al. 2022, §4.5; SD's inpainting
    checkpoints): the latent mask and the latents of the image with the masked part blanked to 0
    (mid-gray), (B, 1 + C, h, w). Diffusers' `prepare_mask_latents`, draw for draw."""
    blanked = images * (masks < 0.5)
    latents = encode_images(vae, blanked.to(vae.dtype), generators)
    return torch.cat([latent_mask(masks, latents.shape[-2:]).to(latents.dtype), latents], dim=1)


def noised_latents(scheduler, z0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0) at the first timestep SDEdit runs: √ᾱ_t z_0 + √(1 − ᾱ_t) ε (the scheduler's own
    `add_noise`, so σ-parameterised samplers get z_0 + σ_t ε, their form of the same point)."""
    return scheduler.add_noise(z0, noise, timestep.repeat(len(z0)))


def latent_mask(mask: torch.Tensor, latent_shape: tuple[int, int], cover: bool = False) -> torch.Tensor:
    """A binary pixel mask (B, 1, H, W) at latent resolution (B, 1, H/f, W/f): nearest neighbour, as
    diffusers resizes it (`prepare_mask_latents`), or with `cover` every latent cell the mask
    touches. A cell is f × f pixels and the VAE's latents reach wider still, so under nearest
    neighbour the kept cells along the mask's edge still carry what is to be replaced; RePaint uses
    `cover` (on the default model's held-out edits: 83% pass against 78% with nearest)."""
    if cover:
        return torch.nn.functional.adaptive_max_pool2d(mask, latent_shape)
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


class Resampling:
    """RePaint's per-step constraint (see the module docstring): called after the step at
    `positions[i]` with the latents, puts the known region at the level reached, with fresh noise
    (Lugmayr et al. 2022, eq. 8a-8c), then, where the schedule jumps back, re-noises the whole
    sample to the level the next step starts from (eq. 1 composed). Noise is drawn from the
    per-image generators, so an image is the same alone as in a batch."""

    def __init__(self, scheduler, z0: torch.Tensor, mask: torch.Tensor, levels: torch.Tensor, positions: list[int],
                 generator):
        self.scheduler, self.z0, self.levels, self.positions = scheduler, z0, levels, positions
        self.generator = generator
        self.mask = mask.to(z0.dtype)  # (B, 1, h, w): 1 = repaint, 0 = keep

    def alpha_bar(self, position: int) -> torch.Tensor:
        """ᾱ at a position of the schedule; past the last level, the clean end (the sampler's final ᾱ)."""
        if position < len(self.levels):
            return self.scheduler.alphas_cumprod[int(self.levels[position])].to(torch.float64)
        return torch.as_tensor(getattr(self.scheduler, "final_alpha_cumprod", 1.0), dtype=torch.float64)

    def _noise(self) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self.z0.shape, generator=self.generator, device=self.z0.device, dtype=self.z0.dtype)

    def __call__(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        reached = self.positions[i] + 1
        known = self.z0
        if reached < len(self.levels):
            known = self.scheduler.add_noise(self.z0, self._noise(), self.levels[reached : reached + 1])
        latents = (1 - self.mask) * known + self.mask * latents
        if i + 1 < len(self.positions) and self.positions[i + 1] < reached:  # jump back: q(z_s | z_t), s > t
            ratio = self.alpha_bar(self.positions[i + 1]) / self.alpha_bar(reached)
            latents = ratio.sqrt().to(latents.dtype) * latents + (1 - ratio).sqrt().to(latents.dtype) * self._noise()
        return latents


# ---- what AUTOMATIC1111 users expect around a mask (modules/masking.py, processing.py there) --------


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of (B, C, H, W) with OpenCV's kernel for σ (2·round(2.5σ) + 1 taps)
    and its default border (mirrored without repeating the edge): AUTOMATIC1111's mask blur."""
    if sigma <= 0:
        return x
    radius = int(2.5 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    for dim in (-1, -2):
        size = x.shape[dim]
        pad = [radius, radius, 0, 0] if dim == -1 else [0, 0, radius, radius]
        x = torch.nn.functional.pad(x, pad, mode="reflect" if radius < size else "replicate")
        weight = kernel.view(1, 1, 1, -1) if dim == -1 else kernel.view(1, 1, -1, 1)
        x = torch.nn.functional.conv2d(x, weight.repeat(channels, 1, 1, 1), groups=channels)
    return x


# AUTOMATIC1111's "fill" (masked content 0): the masked part painted with the colours around it,
# blurred at falling radii, each layer laid over the last. Before encoding, so that the latents
# around the mask no longer carry what is to be replaced.
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (blur radius px, times laid)
MASKED_CONTENT = ("original", "fill")


def fill_masked(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`images` (B, 3, H, W) in [−1, 1] with the masked part ((B, 1, H, W), 1 = repaint) filled from
    its surroundings (FILL_LAYERS, on 8-bit premultiplied RGBA as AUTOMATIC1111 does)."""
    from PIL import Image, ImageFilter

    filled = []
    for image, mask in zip(images, masks):
        rgb = ((image.float().permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        keep = ((1 - mask[0].float().cpu().numpy()) * 255).round().astype(np.uint8)
        known = Image.fromarray(np.dstack([rgb, keep]), "RGBA").convert("RGBa")  # premultiplied: blur ignores holes
        canvas = Image.new("RGBA", known.size)
        for radius, times in FILL_LAYERS:
            layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
            for _ in range(times):
                canvas.alpha_composite(layer)
        out = torch.from_numpy(np.asarray(canvas.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        filled.append(torch.where(mask.cpu() > 0.5, out, image.float().cpu()))  # outside: the input, unrounded
    return torch.stack(filled).to(images.device, images.dtype)


def crop_region(mask: torch.Tensor, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the box around the mask's nonzero pixels ((H, W)), grown by `padding` px and
    then to the aspect ratio of the `width` × `height` it is inpainted at, kept inside the image
    (AUTOMATIC1111's "inpaint area: only masked")."""
    rows, cols = torch.nonzero(mask > 0, as_tuple=True)
    H, W = mask.shape
    x0, x1 = max(int(cols.min()) - padding, 0), min(int(cols.max()) + 1 + padding, W)
    y0, y1 = max(int(rows.min()) - padding, 0), min(int(rows.max()) + 1 + padding, H)
    if (x1 - x0) * height > (y1 - y0) * width:  # too wide for the target: grow the height
        y0, y1 = _grow(y0, y1, round((x1 - x0) * height / width), H)
    else:
        x0, x1 = _grow(x0, x1, round((y1 - y0) * width / height), W)
    return x0, y0, x1, y1


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """The interval [lo, hi) grown about its centre to length `want`, shifted to stay in [0, limit)."""
    want = min(want, limit)
    lo -= (want - (hi - lo)) // 2
    lo = min(max(lo, 0), limit - want)
    return lo, lo + want


def check_outpaint(outpaint) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels to add, or a ValueError."""
    if (not isinstance(outpaint, (list, tuple)) or len(outpaint) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in outpaint)
            or not any(outpaint)):
        raise ValueError(f"outpaint must be four whole numbers of pixels ≥ 0 to add (left, top, right, bottom), "
                         f"not all 0, got {outpaint!r}")
    return tuple(outpaint)


def outpaint_canvas(images: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas, mask): `images` (B, 3, H, W) on a canvas grown by (left, top, right, bottom) pixels,
    the new border filled from the picture's edges (`fill_masked`), and the mask of that border."""
    left, top, right, bottom = pads
    B, _, H, W = images.shape
    canvas = torch.zeros(B, 3, top + H + bottom, left + W + right, dtype=images.dtype, device=images.device)
    canvas[:, :, top : top + H, left : left + W] = images
    masks = torch.ones(B, 1, *canvas.shape[-2:], dtype=images.dtype, device=images.device)
    masks[:, :, top : top + H, left : left + W] = 0
    return fill_masked(canvas, masks), masks


INPAINT_AREAS = ("whole", "masked")
DEFAULT_MASKED_PADDING = 32  # AUTOMATIC1111's default


def check_mask_options(has_mask: bool, *, mask_blur=0, mask_invert=False, masked_content="original",
                       inpaint_area="whole", masked_padding=DEFAULT_MASKED_PADDING, outpaint=None) -> None:
    """A ValueError for a mask option with no mask to apply it to, or a value out of its range."""
    given = [name for name, value, default in (
        ("mask_blur", mask_blur, 0), ("mask_invert", mask_invert, False),
        ("masked_content", masked_content, "original"),
        ("inpaint_area", inpaint_area, "whole"), ("masked_padding", masked_padding, DEFAULT_MASKED_PADDING),
    ) if value != default]
    if given and not has_mask:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to inpainting: pass mask_image "
                         "(white = repaint) or outpaint")
    if not isinstance(mask_blur, (int, float)) or isinstance(mask_blur, bool) or not 0 <= mask_blur <= 256:
        raise ValueError(f"mask_blur is a blur radius in pixels in [0, 256], got {mask_blur!r}")
    if not isinstance(mask_invert, bool):
        raise ValueError(f"mask_invert must be True or False, got {mask_invert!r}")
    if masked_content not in MASKED_CONTENT:
        raise ValueError(f"unknown masked_content {masked_content!r}; choose one of: {', '.join(MASKED_CONTENT)}")
    if inpaint_area not in INPAINT_AREAS:
        raise ValueError(f"unknown inpaint_area {inpaint_area!r}; choose one of: {', '.join(INPAINT_AREAS)}")
    if not isinstance(masked_padding, int) or isinstance(masked_padding, bool) or masked_padding < 0:
        raise ValueError(f"masked_padding must be a whole number of pixels ≥ 0, got {masked_padding!r}")
    if outpaint is not None:
        check_outpaint(outpaint)
        if mask_invert or inpaint_area != "whole":
            raise ValueError("outpaint makes its own mask (the new border): mask_invert and inpaint_area do not apply")


@dataclass
class Edit:
    """A picture to edit, prepared. `canvas` (B, 3, H, W) in [−1, 1] is what the result lands on:
    the input, or the outpainting canvas. `source` is what the latents start from (the canvas, its
    masked part filled with masked_content "fill", or with inpaint area "masked" the crops around
    the mask at the size they are drawn at) and `masks` its binary masks (1 = repaint); `overlay`
    the canvas-size mask the result is composited through (blurred by mask_blur), and `regions` the
    crop boxes (x0, y0, x1, y1) the drawn crops are pasted back into."""

    canvas: torch.Tensor
    source: torch.Tensor
    masks: torch.Tensor | None = None
    overlay: torch.Tensor | None = None
    regions: list[tuple[int, int, int, int]] | None = None

    def repeat(self, n: int) -> "Edit":
        """Each picture n times in a row (num_images_per_prompt)."""
        twice = lambda x: None if x is None else x.repeat_interleave(n, dim=0)  # noqa: E731
        regions = None if self.regions is None else [r for r in self.regions for _ in range(n)]
        return Edit(twice(self.canvas), twice(self.source), twice(self.masks), twice(self.overlay), regions)

    def finish(self, drawn: torch.Tensor, composite: bool = True) -> torch.Tensor:
        """Decoded pictures (B, 3, h, w) onto the canvas: crops resized back into their boxes, then
        (with `composite`) laid in through the overlay, so that outside it every pixel is the input's."""
        canvas = self.canvas.to(drawn.device, drawn.dtype)
        if self.regions is not None:
            pasted = canvas.clone()
            for i, (x0, y0, x1, y1) in enumerate(self.regions):
                pasted[i, :, y0:y1, x0:x1] = torch.nn.functional.interpolate(
                    drawn[i : i + 1], size=(y1 - y0, x1 - x0), mode="bicubic", antialias=True)[0]
            drawn = pasted
        if self.overlay is None or not composite:
            return drawn
        overlay = self.overlay.to(drawn.device, drawn.dtype)
        return overlay * drawn + (1 - overlay) * canvas
