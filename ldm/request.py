"""A call's request and result, apart from the pipeline that runs it: the checks every generation
setting goes through before any work (`check_generation_args`, `check_prompts`, `check_seeds`), and
the output with the settings text each PNG carries (`LatentPipelineOutput`, `infotext`: the
AUTOMATIC1111 format other tools read)."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.sampling import check_sampler, check_schedule, resolve_sampler

MAX_SEED = 2**63 - 1


def check_generation_args(
    *,
    latent_factor: int,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    sampler: str | None,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    num_images_per_prompt: int = 1,
    batch_size: int | None = None,
    dynamic_threshold: float | None = None,
    threshold_bound: float = 1.0,
    scheduler_config: dict | None = None,
) -> None:
    """Validate generation settings before any work; a ValueError names the first bad one.
    `scheduler_config` (the model's) bounds the step count by its training timesteps and lets the
    sampler be checked against its noise schedule."""
    num_train_timesteps = (scheduler_config or {}).get("num_train_timesteps")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < latent_factor:
            raise ValueError(f"{name} must be a whole number of pixels ≥ {latent_factor}, got {value!r}")
        if value % latent_factor:
            lo = value // latent_factor * latent_factor
            options = f"{lo} or {lo + latent_factor}" if lo >= latent_factor else f"{lo + latent_factor}"
            raise ValueError(f"{name} {value} is not a multiple of {latent_factor} (the model's latent factor); "
                             f"use {options}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {num_inference_steps!r}")
    if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps {num_inference_steps} exceeds the model's {num_train_timesteps} "
                         "training timesteps")
    if not _finite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance scale (cfg) must be a number ≥ 0, got {guidance_scale!r}")
    if sampler is not None:  # None: the folder's own scheduler, a class we have no name for
        sampler = resolve_sampler(sampler)
        check_sampler(sampler, scheduler_config)
        if scheduler_config is not None:
            check_schedule(sampler, scheduler_config, num_inference_steps)
    if not _finite(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if not _finite(eta) or eta < 0:
        raise ValueError(f"eta must be a number ≥ 0, got {eta!r}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only (sampler is {sampler or 'the folder’s own'})")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {num_images_per_prompt!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    if dynamic_threshold is not None and (not _finite(dynamic_threshold) or not 0 < dynamic_threshold <= 1):
        raise ValueError(f"dynamic_threshold is a percentile in (0, 1], got {dynamic_threshold!r}")
    if not _finite(threshold_bound) or threshold_bound <= 0:
        raise ValueError(f"threshold_bound must be > 0, got {threshold_bound!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_prompts(prompt, negative_prompt=None) -> tuple[list[str], list[str]]:
    """(prompts, negative prompts) as equal-length lists of strings, or a ValueError."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a list of strings")
    if not prompts:
        raise ValueError("the prompt list is empty")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one, or one "
                             "per prompt")
    else:
        raise ValueError("negative_prompt must be a string or a list of strings")
    return list(prompts), negatives


def check_seeds(seed, n: int) -> list[int]:
    """Per-image seeds: an int s gives s, s+1, …; a list gives one per image; None draws one."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    if isinstance(seed, (list, tuple)):
        seeds = list(seed)
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images; pass one seed, or one per image")
    else:
        seeds = [seed + i if isinstance(seed, int) and not isinstance(seed, bool) else seed for i in range(n)]
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {s!r}")
    return seeds


def infotext(prompt: str, negative_prompt: str, settings: dict) -> str:
    """The `parameters` text other SD tools read (AUTOMATIC1111's format): prompt, negative, settings.
    Values are written as A1111 writes them: whole numbers without ".0", and a value holding a
    comma, a colon or a line break quoted as a JSON string (modules/infotext_utils.py, `quote`), so
    a reader splitting the line on ", " gets every field back."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_infotext_value(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def _infotext_value(value) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


@dataclass
class LatentPipelineOutput:
    """What a call returns: images, and for each image the seed and settings that reproduce it."""

    images: list | np.ndarray | torch.Tensor
    seeds: list[int | None]
    prompts: list[str]
    negative_prompts: list[str]
    parameters: list[str] = field(default_factory=list)  # one infotext per image
    residuals: list[float] | None = None  # restore(): ‖y − A(x̂)‖ per image, RMS in [0, 1] pixel units

    def save(self, outdir: str | os.PathLike) -> list[Path]:
        """Write each PIL image to `outdir` as NNNNN-SEED.png with its `parameters` text chunk.

        Never overwrites: numbering continues after the highest index already in the folder, and
        a file that appears meanwhile is skipped over (exclusive create).
        """
        from PIL import PngImagePlugin

        if not self.images or not hasattr(self.images[0], "save"):
            raise ValueError("save() needs PIL images; call the pipeline with output_type='pil'")
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name[:5]) for p in outdir.glob("*.png") if p.name[:5].isdigit()]
        index = max(taken, default=-1) + 1
        paths = []
        for image, seed, text in zip(self.images, self.seeds, self.parameters):
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", text)
            while True:
                path = outdir / f"{index:05d}-{seed if seed is not None else 'nogen'}.png"
                index += 1
                try:
                    f = open(path, "xb")
                except FileExistsError:
                    continue
                try:
                    with f:
                        image.save(f, format="PNG", pnginfo=info)
                except BaseException as e:  # a full disk or an interrupt: no half-written PNG is left behind
                    path.unlink(missing_ok=True)
                    if isinstance(e, OSError) and not e.filename:
                        raise OSError(e.errno, e.strerror, str(path)) from None
                    raise
                break
            paths.append(path)
        return paths
