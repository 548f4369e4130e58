"""Samplers by name, and the denoising loop with guidance wrapped around the network.

The samplers themselves are diffusers' schedulers: we only choose them by a short name and build
them from the pipeline's training-scheduler config, so the β schedule, prediction type and timestep
spacing the model was trained with carry over. What diffusers lacks, and this module adds, is the
k-diffusion separation: `GuidedDenoiser` wraps the U-Net with classifier-free guidance and its
corrections, and `denoise` is a loop over a scheduler that never knows guidance exists.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.quiet import library_quiet
from ldm.guidance import classifier_free_guidance, dynamic_threshold, guidance_embedding, rescale_guidance
from ldm.schedule import alpha_cumprod_at, model_output_from_z0, predicted_z0


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: which diffusers scheduler class, with which settings, and what people call it."""

    scheduler: str  # a class name in `diffusers`
    overrides: dict = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise every step (uses the per-image generators)
    description: str = ""
    a1111: str = ""  # AUTOMATIC1111's display name ("DPM++ 2M Karras"), where it has the same sampler
    aliases: tuple[str, ...] = ()  # A1111's / k-diffusion's short names ("k_dpmpp_2m_ka")


# The default model's pass rate with a sampler at its defaults (CFG 7.5, 25 steps, φ 0.7; 240
# held-out prompts, ldm-shapes eval, 2026-12-01), where it falls far below euler's 89.2%: on a
# zero-terminal-SNR model under strong guidance these samplers are known to fail (see below).
WEAK_ON_ZERO_SNR = {"plms": 11.7, "dpm++2m_sde": 48.8, "unipc": 58.3}


def weak_sampler_warning(name: str, training_config: dict, guidance_scale: float) -> str | None:
    """A warning's text when sampler `name` is known to fail on this kind of model (zero terminal
    SNR, CFG above 3), else None."""
    if name is None:  # the folder's own scheduler, under a name we do not know
        return None
    name = resolve_sampler(name)
    score = WEAK_ON_ZERO_SNR.get(name)
    if score is None or not training_config.get("rescale_betas_zero_snr") or guidance_scale <= 3:
        return None
    return (f"sampler {name} is known to fail on zero-terminal-SNR models under strong guidance (the default model "
            f"passes {score}% of held-out prompts with it at CFG 7.5, 89.2% with euler); use euler or heun, "
            "or a CFG near 3")


_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec("DDPMScheduler", {}, True, "ancestral DDPM (Ho et al. 2020, Alg. 2); needs many steps",
                        "DDPM"),
    "ddim": SamplerSpec("DDIMScheduler", {}, False,
                        "DDIM (Song et al. 2021); eta > 0 adds noise (eta = 1 is DDPM-like)", "DDIM"),
    "plms": SamplerSpec("PNDMScheduler", {"skip_prk_steps": True}, False,
                        "pseudo linear multistep (Liu et al. 2022), SD's original default; on a zero-SNR model "
                        "at CFG 7.5 it fails (default model: 12%; 71% at CFG 3)", "PLMS", ("pndm",)),
    "euler": SamplerSpec("EulerDiscreteScheduler", {"use_karras_sigmas": False}, False,
                         "Euler steps on the probability-flow ODE (Karras et al. 2022, Alg. 1 without its 2nd-order "
                         "correction); the default", "Euler", ("k_euler",)),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler", {}, True, "Euler ancestral (k-diffusion); stochastic",
                           "Euler a", ("k_euler_a", "k_euler_ancestral", "euler_ancestral")),
    "heun": SamplerSpec("HeunDiscreteScheduler", {"use_karras_sigmas": False}, False,
                        "Heun's 2nd-order method (Karras et al. 2022, Alg. 1); two U-Net calls per step "
                        "(default model: 92.1%)", "Heun", ("k_heun",)),
    "lms": SamplerSpec("LMSDiscreteScheduler", {"use_karras_sigmas": False}, False,
                       "linear multistep on σ (k-diffusion's LMS, order 4); needs scipy", "LMS", ("k_lms",)),
    "lms_karras": SamplerSpec("LMSDiscreteScheduler", {"use_karras_sigmas": True}, False,
                              "LMS on Karras et al.'s σ spacing", "LMS Karras", ("k_lms_ka",)),
    "dpm2": SamplerSpec("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}, False,
                        "DPM-Solver-2 in k-diffusion's form; two U-Net calls per step", "DPM2", ("k_dpm_2",)),
    "dpm2_karras": SamplerSpec("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, False,
                               "DPM2 on Karras et al.'s σ spacing", "DPM2 Karras", ("k_dpm_2_ka",)),
    "dpm2_a": SamplerSpec("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}, True,
                          "DPM2 ancestral; stochastic", "DPM2 a", ("k_dpm_2_a",)),
    "dpm2_a_karras": SamplerSpec("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, True,
                                 "DPM2 ancestral on Karras et al.'s σ spacing", "DPM2 a Karras", ("k_dpm_2_a_ka",)),
    "dpm++2m": SamplerSpec(
        "DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": False}, False,
        "DPM-Solver++(2M) (Lu et al. 2022); sharp in 20-25 steps, but weaker than euler on a zero-SNR model at CFG 7.5 "
        "(default model: 80.4% against 89.2%)", "DPM++ 2M", ("k_dpmpp_2m", "dpmpp_2m"),
    ),
    "dpm++2m_karras": SamplerSpec(
        "DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": True}, False,
        "DPM-Solver++(2M) on Karras et al.'s σ spacing", "DPM++ 2M Karras", ("k_dpmpp_2m_ka", "dpmpp_2m_karras"),
    ),
    "dpm++2m_sde": SamplerSpec(
        "DPMSolverMultistepScheduler", {**_SDE, "use_karras_sigmas": False}, True,
        "DPM-Solver++(2M) SDE variant (Lu et al. 2022); stochastic", "DPM++ 2M SDE", ("k_dpmpp_2m_sde", "dpmpp_2m_sde"),
    ),
    "dpm++2m_sde_karras": SamplerSpec(
        "DPMSolverMultistepScheduler", {**_SDE, "use_karras_sigmas": True}, True,
        "DPM-Solver++(2M) SDE on Karras et al.'s σ spacing; stochastic", "DPM++ 2M SDE Karras",
        ("k_dpmpp_2m_sde_ka", "dpmpp_2m_sde_karras"),
    ),
    "lcm": SamplerSpec("LCMScheduler", {}, True,
                       "latent consistency sampling (Luo et al. 2023): 1-8 steps, for LCM students only "
                       "(ldm-distill --method lcm)", "LCM"),
    "unipc": SamplerSpec("UniPCMultistepScheduler", {"use_karras_sigmas": False}, False,
                         "UniPC (Zhao et al. 2023), predictor-corrector; strong at 10-20 steps, weak on a zero-SNR "
                         "model at CFG 7.5 (default model: 58%)", "UniPC"),
}


def _key(name: str) -> str:
    """A name as typed, folded: case, spaces, '_' and '-' do not matter ("DPM++ 2M Karras" = "dpm++2m_karras")."""
    return re.sub(r"[\s_-]+", "", name.lower())


# Every name a sampler answers to, folded → our name: ours, A1111's display names, their aliases.
SAMPLER_NAMES: dict[str, str] = {
    _key(alias): name for name, spec in SAMPLERS.items() for alias in (name, spec.a1111, *spec.aliases) if alias
}


def resolve_sampler(name: str) -> str:
    """Our name for sampler `name`, typed any way people do ("DDIM", "Euler a", "DPM++ 2M Karras",
    "k_lms"); a ValueError suggesting the closest names on a typo."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a name, got {name!r}")
    found = SAMPLER_NAMES.get(_key(name))
    if found is not None:
        return found
    close = difflib.get_close_matches(_key(name), SAMPLER_NAMES, n=2, cutoff=0.6)
    guesses = list(dict.fromkeys(SAMPLER_NAMES[c] for c in close))
    hint = f"did you mean {' or '.join(guesses)}? " if guesses else ""
    raise ValueError(f"unknown sampler {name!r}; {hint}choose one of: {', '.join(SAMPLERS)} (or AUTOMATIC1111's names)")


# Euler, not DPM-Solver++(2M): on the shapes world's zero-terminal-SNR model at CFG 7.5 and 25 steps
# (240 held-out prompts, 2026-12-01) the one-step samplers score well: heun 92.1%, euler 89.2%, ddim
# 88.8%, euler_a 80.0%; the multistep ones, which extrapolate from earlier strongly guided outputs,
# do not: dpm++2m 80.4% (64.2% without guidance rescale), unipc 58.3%, dpm++2m_sde 48.8%, plms 11.7%.
# The extrapolation is the cause: DPM-Solver++ at order 1 (the same solver, no history) scores
# 89.2%, and plms recovers to 70.8% at CFG 3. Stepping the last interval with Euler (euler_at_final)
# changes nothing; ending at σ_min instead of 0 is worse (71.2%).
DEFAULT_SAMPLER = "euler"
DEFAULT_STEPS = 25


def sampler_of(scheduler) -> str | None:
    """Our name for a diffusers scheduler (the one a pipeline folder names, or `pipe.scheduler = ...`):
    the first sampler of SAMPLERS with its class and settings, or None when we have no name for it."""
    config = scheduler.config
    for name, spec in SAMPLERS.items():
        if type(scheduler).__name__ == spec.scheduler and all(config.get(k) == v for k, v in spec.overrides.items()):
            return name
    return None


def set_timesteps(scheduler, num_inference_steps: int, device, timesteps=None, sigmas=None) -> None:
    """The scheduler's steps: N evenly laid out, or the `timesteps` / `sigmas` given, where its
    `set_timesteps` takes them (diffusers' `retrieve_timesteps`); a ValueError naming them otherwise."""
    if timesteps is None and sigmas is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
        return
    name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if name not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"{name}: the sampler's scheduler ({type(scheduler).__name__}) does not take custom {name}")
    try:
        scheduler.set_timesteps(**{name: list(values)}, device=device)
    except (ValueError, TypeError, IndexError) as e:
        reason = " ".join(str(e).split())
        raise ValueError(f"{name}: {type(scheduler).__name__} cannot use {list(values)!r} ({reason})") from None


LEGACY_FIXUPS = {"steps_offset": 1, "clip_sample": False}  # what diffusers' StableDiffusionPipeline sets on load


def legacy_fixups(scheduler):
    """The scheduler with the config fix-ups diffusers' StableDiffusionPipeline applies when it loads
    an older SD folder (steps_offset 1, clip_sample off), and a one-line warning where one changes
    the images (an offset under "leading" spacing, or clipping); where none applies, the scheduler."""
    config = scheduler.config
    changes = {k: v for k, v in LEGACY_FIXUPS.items() if k in config and config[k] != v}
    if not changes:
        return scheduler
    matters = [k for k in changes if k == "clip_sample" or config.get("timestep_spacing", "leading") == "leading"]
    if matters:
        import warnings

        from ldm.text import LdmWarning

        was = ", ".join(f"{k} {config[k]}" for k in matters)
        now = ", ".join(f"{k} {changes[k]}" for k in matters)
        warnings.warn(f"this folder's scheduler config is outdated ({was}); using {now}, as diffusers does when it "
                      "loads it (save the pipeline again to update the file)", LdmWarning, stacklevel=3)
    return type(scheduler).from_config({**config, **changes})


def sampling_scheduler(training_scheduler):
    """The scheduler a trained pipeline's folder names: DEFAULT_SAMPLER's, on the training noise
    schedule, so that diffusers (and `ldm` with no sampler named) sample it as `ldm-txt2img` does."""
    return make_scheduler(DEFAULT_SAMPLER, training_scheduler.config)


def check_sampler(name: str, training_config: dict | None = None) -> SamplerSpec:
    """The spec of sampler `name`, or a ValueError listing the valid names. With the model's
    `training_config` (its scheduler config) also a ValueError where the sampler cannot run on
    that noise schedule.

    Karras et al.'s σ spacing (2022, Eq. 5) interpolates between σ_min and σ_max in σ^(1/ρ); a
    zero-terminal-SNR schedule (Lin et al. 2023) has σ_max = ∞ (diffusers clamps it to 4096), so
    the spacing puts most steps at t ≈ T, repeats timesteps, and diffusers' DPM-Solver++ then
    indexes past its σ table. Refused up front instead of crashing mid-sampling.
    """
    name = resolve_sampler(name)
    spec = SAMPLERS[name]
    if spec.scheduler == "LMSDiscreteScheduler" and importlib.util.find_spec("scipy") is None:
        raise ValueError(f"sampler {name} needs scipy (its coefficients are integrals): pip install scipy")
    if spec.overrides.get("use_karras_sigmas") and training_config and training_config.get("rescale_betas_zero_snr"):
        plain = name.replace("_karras", "")
        raise ValueError(f"sampler {name} spaces steps by Karras σ, which needs a finite σ_max; this model has zero terminal SNR "
                         f"(σ_max = ∞): use {plain}, which spaces them by timestep")
    return spec


def check_schedule(name: str, training_config: dict, steps: int) -> None:
    """A ValueError when sampler `name` cannot be built from the model's scheduler config or cannot
    lay out `steps` steps on it: a config that diffusers would fail on mid-call fails here first."""
    try:
        with library_quiet():  # a trial run: what it says, the real run says again
            make_scheduler(name, training_config).set_timesteps(steps)
        return
    except ValueError as e:
        if str(e).startswith(("unknown sampler", "sampler ")):
            raise
        reason = " ".join(str(e).split())[:160]
    except Exception as e:  # noqa: BLE001 — whatever diffusers raises on a config it cannot use
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    raise ValueError(f"the model's scheduler config cannot drive sampler {name} for {steps} steps ({reason})")


def make_scheduler(name: str, training_config: dict):
    """A fresh diffusers scheduler for sampler `name`, configured from the training scheduler.

    The training config carries the β schedule, `prediction_type`, `timestep_spacing`,
    `steps_offset` and similar; the sampler's own settings (algorithm, order, σ spacing) override
    whatever a saved scheduler of another kind left there.
    """
    import diffusers

    spec = check_sampler(name, training_config)
    cls = getattr(diffusers, spec.scheduler)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in dict(training_config).items() if not k.startswith("_")}
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in accepted:
        config["trained_betas"] = zero_snr_betas(config)
    config = {k: v for k, v in config.items() if k in accepted}  # what another scheduler kept, dropped here
    return cls.from_config(config, **spec.overrides)


# ᾱ_T of a zero-terminal-SNR schedule as diffusers' own samplers run it (Euler, DPM-Solver, UniPC
# replace ᾱ_T = 0 by this): σ_T = 4096 instead of ∞, so the first step is finite.
ZERO_SNR_ALPHA_CUMPROD_T = 2.0**-24


def zero_snr_betas(config: dict) -> list[float]:
    """The β of a zero-terminal-SNR model (Lin et al. 2023, Alg. 1) with ᾱ_T floored at 2^-24, as
    explicit `trained_betas`, for diffusers schedulers that do not implement `rescale_betas_zero_snr`
    (PNDMScheduler: plms; HeunDiscreteScheduler: heun). They would otherwise drop the key without a
    word and run the unrescaled schedule, one the model was not trained on (SNR 0.0047 at t = T, not
    0): on the default model heun scored 90.8% of 240 prompts with it and 92.1% with this one. The
    schedule is DDIMScheduler's, so it is the one diffusers' zero-SNR samplers use."""
    import diffusers

    alphas_cumprod = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.to(torch.float64).clone()
    alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD_T
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()


@dataclass(frozen=True)
class Guidance:
    """How to combine the conditional and unconditional predictions at each step."""

    scale: float = 7.5  # w in ε̂ = ε_∅ + w(ε_c − ε_∅)
    rescale: float = 0.0  # φ of guidance rescale (Lin et al. 2023); 0 is off, 0.7 their suggestion
    threshold_percentile: float | None = None  # dynamic thresholding (Imagen); None is off
    threshold_bound: float = 1.0  # the range ẑ_0 is pulled back into
    embedded: bool = False  # a guidance-distilled U-Net: w goes in as an embedding, one conditional call

    @property
    def needs_uncond(self) -> bool:
        return self.scale != 1.0 and not self.embedded

    @property
    def needs_cond(self) -> bool:
        return self.scale != 0.0 or self.embedded


class GuidedDenoiser:
    """The U-Net with classifier-free guidance around it: (z_t, t) → one guided model output.

    Both halves go through the U-Net in one batched call (uncond first, as diffusers orders them),
    which is what makes guidance cost one U-Net call per step rather than two. At w = 1 only the
    conditional half is computed and at w = 0 only the unconditional one: the formula gives exactly
    those, at half the cost. A guidance-distilled student (`guidance.embedded`: a U-Net with
    `time_cond_proj_dim`, from `ldm-distill`) learnt the guided output: it reads w as an embedding
    beside t and runs once, on the prompt alone (as diffusers' pipelines run it).
    """

    def __init__(self, unet, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: Guidance, prediction_type: str,
                 alphas_cumprod: torch.Tensor, extra: torch.Tensor | None = None,
                 cross_attention_kwargs: dict | None = None):
        self.unet = unet
        self.extra = extra  # (B, E, h, w) stacked after the latents on the channels (an inpainting U-Net's input)
        self.cross_attention_kwargs = cross_attention_kwargs  # for the attention processors (a LoRA's scale, ...)
        self.cond = cond  # (B, L, D)
        self.uncond = uncond  # (B, L, D) or None when not needed
        self.guidance = guidance
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod
        if guidance.needs_uncond and guidance.needs_cond:
            self._both = torch.cat([uncond, cond])  # (2B, L, D): one U-Net call per step
        self.w_embedding = None
        if guidance.embedded:
            w = guidance_embedding(guidance.scale, unet.config.time_cond_proj_dim)  # (1, E)
            self.w_embedding = w.expand(len(cond), -1).to(cond.device, cond.dtype)  # (B, E)

    def _unet(self, z: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        if self.extra is not None:
            z = torch.cat([z, self.extra.repeat(len(z) // len(self.extra), 1, 1, 1)], dim=1)
        return self.unet(z, t, encoder_hidden_states=context, timestep_cond=self.w_embedding,
                         cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, z_t: torch.Tensor, t) -> torch.Tensor:
        return self.predict(z_t, t)

    def predict(self, z_t: torch.Tensor, t) -> torch.Tensor:
        """The guided output, with autograd's graph where grad is enabled (reconstruction guidance
        differentiates it with respect to z_t: `ldm.restoration`)."""
        g = self.guidance
        # At w = 1 or w = 0 the U-Net's output would go to the scheduler as it is, and some keep it
        # (PNDM's history). A U-Net compiled with CUDA graphs (optimize(compile=True) on a GPU) writes
        # every output into the same static buffer, overwriting what was kept: hand over a copy.
        if not g.needs_uncond:  # w = 1, or a guidance-distilled student
            out = self._unet(z_t, t, self.cond).clone()
        elif not g.needs_cond:
            out = self._unet(z_t, t, self.uncond).clone()
        else:
            uncond_out, cond_out = self._unet(torch.cat([z_t, z_t]), t, self._both).chunk(2)
            out = classifier_free_guidance(uncond_out, cond_out, g.scale)
            out = rescale_guidance(out, cond_out, g.rescale)
        if g.threshold_percentile is not None:
            alpha_cumprod = alpha_cumprod_at(self.alphas_cumprod, t)
            z0 = predicted_z0(out, z_t, alpha_cumprod, self.prediction_type)
            z0 = dynamic_threshold(z0, g.threshold_percentile, g.threshold_bound)
            out = model_output_from_z0(z0, z_t, alpha_cumprod, self.prediction_type)
        return out


def guard_ddim_variance(scheduler) -> None:
    """Make diffusers' DDIM step finite at η = 1 on a zero-terminal-SNR schedule. Its first step
    (ᾱ_t = 0) has σ² = 1 − ᾱ_prev exactly, and the step takes √(1 − ᾱ_prev − (η√σ²)²): the
    square of the square root can round above σ², the root of a negative number is NaN, and the
    image is lost. σ² scaled by 1 − 1e-6 (5e-7 of the noise's scale) keeps the argument ≥ 0."""
    if getattr(scheduler, "_variance_guarded", False):
        return
    raw = scheduler._get_variance

    def variance(timestep, prev_timestep):
        return raw(timestep, prev_timestep) * (1 - 1e-6)

    scheduler._get_variance = variance
    scheduler._variance_guarded = True


def denoise(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float | None = None,
    progress: bool = True,
    constraint: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run `scheduler` over `timesteps` (laid out by its `set_timesteps`) from `latents` to ẑ_0: the
    reverse process, one model output per step. From pure noise that is txt2img; from an image's
    noised latents and the last of the timesteps, SDEdit (`ldm.editing`).

    Stochastic samplers draw their per-step noise from `generator` (a list gives each image its own
    stream, so image i of a batch equals a run of image i alone). `constraint(i, latents)`, applied
    after step i, is how editing holds a known region (`ldm.editing.Replacement`); the sampler and
    the guided denoiser never know about it. `callback(i, t, latents)`, last after step i, may
    return latents to go on from (diffusers' `callback_on_step_end`).
    """
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs = {}
    if "generator" in accepted:
        step_kwargs["generator"] = generator
    if eta is not None and "eta" in accepted:
        step_kwargs["eta"] = eta
        if eta > 0 and hasattr(scheduler, "_get_variance"):
            guard_ddim_variance(scheduler)
    for i, t in enumerate(tqdm(timesteps, desc="denoising", file=sys.stderr, disable=not progress, leave=False)):
        z_t = scheduler.scale_model_input(latents, t)  # the VP-scaled input the network expects
        model_output = denoiser(z_t, t)
        latents = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
        if constraint is not None:
            latents = constraint(i, latents)
        if callback is not None:
            latents = callback(i, t, latents)
    return latents
