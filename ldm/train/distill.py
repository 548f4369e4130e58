"""Few-step students by distillation: latent consistency (LCM) and progressive distillation.

Both train with stage 2's loop (`ldm.train.unet.train`): the same data, latent cache, accelerate,
EMA, checkpoints, exact resume and guards. What differs is the objective (here) and what trains:
a student U-Net, started from the teacher's weights, with diffusers' guidance embedding
(`time_cond_proj_dim`: a sinusoidal embedding of the guidance scale w added to the timestep's,
zero-initialised so the student starts as the teacher). The teacher is frozen and runs with
classifier-free guidance at a w drawn per sample from [guidance_min, guidance_max]; the student
learns the guided result in one U-Net call, so it needs no unconditional half at sampling time.

LCM (Luo et al. 2023, Alg. 1; consistency distillation, Song et al. 2023, Alg. 2). On the skipping
grid t_n = (n+1)·k − 1, k = T / solver_steps:
    z_{n+k} = √ᾱ z_0 + √(1−ᾱ) ε                                      a training latent, noised
    ẑ_n     = DDIM(z_{n+k}; guided teacher at w) from t_{n+k} to t_n  one solver step of the PF-ODE
    f_θ(z, t) = c_skip(t) z + c_out(t) ẑ_0,θ(z, t, w, c)             the consistency function
    L = d(f_θ(z_{n+k}, t_{n+k}), f_θ⁻(ẑ_n, t_n))                     d: pseudo-Huber, θ⁻ an EMA of θ
c_skip, c_out are LCMScheduler's (σ_data 0.5, timestep scaling 10), so diffusers samples the student.
The target network θ⁻ is the run's EMA (ema.decay 0.95 in configs/distill/lcm.yaml): checkpointed and
resumed with everything else; OUTPUT/final holds it, as consistency models sample with the EMA.

Progressive (Salimans & Ho 2022, Alg. 2; guided: Meng et al. 2023). Round r trains a student of N
DDIM steps to land, in one step from t to t' = t − T/N, where its teacher lands in two (t → t − T/2N
→ t'). With z_{t'} the teacher's result, the student's target is the ẑ_0 that one DDIM step maps to it:
    x̃ = (z_{t'} − (σ_{t'}/σ_t) z_t) / (α_{t'} − (σ_{t'}/σ_t) α_t)       (S&H, Alg. 2)
regressed in v (the "SNR+1" weighting of S&H §4). The first round's teacher is the guided original
(both of Meng et al.'s stages at once); each later round's is the previous round's student.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ldm import schedule
from ldm.guidance import classifier_free_guidance, default_guidance_rescale, guidance_embedding, rescale_guidance

METHODS = ("lcm", "progressive")
STUDENT_CARD = "distillation.json"  # a student's pipeline folder: what it was distilled as, its sampler and steps


@dataclass
class DistillConfig:
    """The student and its objective (`ldm-distill`; presets in configs/distill/). method "none" is
    ordinary stage-2 training."""

    method: Literal["none", "lcm", "progressive"] = "none"
    guidance_min: float = 3.0  # the teacher's CFG scale w is drawn uniformly from [min, max] per sample;
    guidance_max: float = 9.0  # the student samples well for w in this range (diffusers' LCM script: 6-16)
    guidance_rescale: float | None = None  # the teacher's φ (Lin et al. 2023); None: its default (0.7 on zero SNR)
    embedding_dim: int = 256  # time_cond_proj_dim of the student's guidance embedding (LCM's 256)
    steps: int = 4  # lcm: the step count the student's folder names as its default
    solver_steps: int = 50  # lcm: the skipping solver's grid, k = T / solver_steps (LCMScheduler's
    # original_inference_steps)
    huber_c: float = 0.001  # lcm: c of the pseudo-Huber distance √(d² + c²) − c
    rounds: tuple[int, ...] = (8, 4, 2)  # progressive: the student's step count after each round (each half the last)


def check_distill(d: DistillConfig, num_train_timesteps: int, text_mode: str, lora: bool, base: str | None) -> None:
    """Cross-field checks of the distill section; a ValueError names the key."""
    if d.method == "none":
        return
    if base is None:
        raise ValueError(f"distill.method={d.method} needs a teacher: pass --teacher PIPELINE (sets base)")
    if text_mode != "frozen":
        raise ValueError("distillation keeps the teacher's text encoder frozen: set text_encoder.mode=frozen")
    if lora:
        raise ValueError("distillation trains the whole student U-Net; lora.enabled is not supported with it")
    if not 0 <= d.guidance_min <= d.guidance_max:
        raise ValueError(f"distill.guidance_min and guidance_max must satisfy 0 ≤ min ≤ max, "
                         f"got {d.guidance_min} and {d.guidance_max}")
    if d.embedding_dim < 2 or d.embedding_dim % 2:
        raise ValueError(f"distill.embedding_dim must be an even number ≥ 2, got {d.embedding_dim}")
    if d.guidance_rescale is not None and not 0 <= d.guidance_rescale <= 1:
        raise ValueError(f"distill.guidance_rescale must be in [0, 1], got {d.guidance_rescale}")
    if d.method == "lcm":
        if d.solver_steps < 1 or num_train_timesteps % d.solver_steps:
            raise ValueError(f"distill.solver_steps must divide the {num_train_timesteps} training timesteps, "
                             f"got {d.solver_steps}")
        if not 1 <= d.steps <= d.solver_steps:
            raise ValueError(f"distill.steps must be in [1, distill.solver_steps={d.solver_steps}], got {d.steps}")
        if d.huber_c <= 0:
            raise ValueError(f"distill.huber_c must be > 0, got {d.huber_c}")
    else:
        r = list(d.rounds)
        if not r or r[0] < 1 or num_train_timesteps % r[0] or any(b * 2 != a for a, b in zip(r, r[1:])):
            raise ValueError(f"distill.rounds must start at a step count that divides {num_train_timesteps} "
                             f"and halve each round (e.g. [8, 4, 2]), got {r}")


# ---- the student --------------------------------------------------------------------------------


def student_unet(unet, embedding_dim: int):
    """`unet` with diffusers' guidance embedding (`time_cond_proj_dim`): the same weights, and a new
    projection of the w-embedding, zero-initialised so the student starts as exactly the teacher.
    A U-Net that has one already (a previous round's student) is returned as it is."""
    from diffusers import UNet2DConditionModel

    have = unet.config.time_cond_proj_dim
    if have is not None:
        if have != embedding_dim:
            raise ValueError(f"the teacher's guidance embedding has {have} dimensions, distill.embedding_dim "
                             f"{embedding_dim}; set distill.embedding_dim={have}")
        return unet
    student = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and missing == ["time_embedding.cond_proj.weight"], (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(unet.dtype).train()


def scheduler_and_card(d: DistillConfig, training_scheduler, teacher: str | None) -> tuple[object, dict]:
    """The scheduler a student's folder names (LCMScheduler; DDIM for a progressive student) on the
    teacher's noise schedule, and its card (STUDENT_CARD): method, sampler, steps, guidance range."""
    from ldm.sampling import make_scheduler

    config = training_scheduler.config
    if d.method == "lcm":
        scheduler = make_scheduler("lcm", {**config, "original_inference_steps": d.solver_steps})
        card = {"method": "lcm", "sampler": "lcm", "steps": d.steps, "max_steps": d.solver_steps}
    else:
        scheduler = make_scheduler("ddim", config)
        card = {"method": "progressive", "sampler": "ddim", "steps": d.rounds[-1], "max_steps": d.rounds[-1]}
    card["guidance_scale"] = [d.guidance_min, d.guidance_max]
    if teacher:
        card["teacher"] = str(teacher)
    return scheduler, card


def write_card(folder: str | Path, card: dict) -> None:
    (Path(folder) / STUDENT_CARD).write_text(json.dumps(card, indent=2) + "\n")


def read_card(folder: str | Path) -> dict | None:
    """A pipeline folder's student card, or None for a model that is not a distilled student."""
    path = Path(folder) / STUDENT_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
        steps, top = int(card["steps"]), int(card["max_steps"])
        low, high = (float(g) for g in card.get("guidance_scale", (0, math.inf)))
        return {**card, "sampler": str(card["sampler"]), "steps": steps, "max_steps": top,
                "guidance_scale": [low, high]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid student card ({type(e).__name__}: {e})") from None


def check_student(card: dict | None, sampler: str | None, steps) -> None:
    """A ValueError when a sampling request does not fit the model: sampler lcm on a model that is not
    an LCM student, a student asked for another sampler than its own, or more steps than it supports."""
    if card is None:
        if sampler == "lcm":
            raise ValueError("sampler lcm samples latent consistency students (ldm-distill --method lcm); "
                             "this model is not one: choose another sampler")
        return
    method, own = card.get("method", "distilled"), card["sampler"]
    kind = {"lcm": "an LCM", "progressive": "a progressive"}.get(method, f"a {method}")
    if sampler is not None and sampler != own:
        raise ValueError(f"this model is {kind} student distilled for sampler {own}; {sampler} would not "
                         f"sample it (drop the sampler, or choose {own})")
    if not isinstance(steps, int) or isinstance(steps, bool):
        return  # the step count's own check says what is wrong with it
    if method == "progressive" and steps != card["steps"]:
        raise ValueError(f"this progressive student was distilled for exactly {card['steps']} steps, got {steps} "
                         "(its teacher samples other step counts)")
    if steps > card["max_steps"]:
        raise ValueError(f"this {kind.split()[-1]} student supports at most {card['max_steps']} steps, got {steps}")


# ---- the run: one stage-2 training per student ----------------------------------------------------


def distill(config, resume: str | None = None, build_cache_only: bool = False, progress: bool = True) -> Path:
    """Distill `config.base` into a student (config: a `UNetTrainConfig` with its distill section);
    returns OUTPUT/final, the student's pipeline folder. LCM is one stage-2 run in OUTPUT. Progressive
    distillation is one run per round, in OUTPUT/round-R-Nsteps, each the next round's teacher; their
    latent cache is shared (OUTPUT/cache: the VAE and text encoder never change), a finished round is
    not run again, and `resume` continues the first unfinished one. OUTPUT/final is the last round's."""
    import dataclasses
    import shutil

    from ldm.train.unet import check_config, resolve_base, train

    d = config.distill
    if d.method == "none":
        raise ValueError(f"distill.method must be one of {', '.join(METHODS)}")
    if d.method == "lcm":
        return train(config, resume=resume, build_cache_only=build_cache_only, progress=progress)
    check_config(resolve_base(config))  # every round's settings (distill.rounds whole), before the first one runs
    output = Path(config.run.output_dir)
    cache = dataclasses.replace(config.cache, dir=config.cache.dir or str(output / "cache"))
    teacher, folder = config.base, None
    for r, steps in enumerate(d.rounds, start=1):
        folder = output / f"round-{r}-{steps}steps"
        round_config = dataclasses.replace(
            config, cache=cache, distill=dataclasses.replace(d, rounds=(steps,)),
            run=dataclasses.replace(config.run, output_dir=str(folder), seed=config.run.seed + r - 1),
            samples=dataclasses.replace(config.samples, steps=steps, sampler="ddim"))  # each round's grid: its own
        if r > 1:  # the teacher is the last student: its VAE, text encoder, U-Net and schedule
            round_config = dataclasses.replace(
                round_config, base=str(teacher), vae=None, model=dataclasses.replace(config.model, pretrained=None),
                text_encoder=dataclasses.replace(config.text_encoder, path=None))
        if build_cache_only:
            return train(round_config, build_cache_only=True, progress=progress)
        if not (folder / "final" / "model_index.json").is_file():
            train(round_config, resume=resume if folder.exists() else None, progress=progress)
        teacher = folder / "final"
    final = output / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(folder / "final", final)
    card = read_card(final)
    write_card(final, {**card, "teacher": str(config.base), "rounds": list(d.rounds)})
    return final


def check_built_in_guidance(embedded: bool, negatives, guidance_rescale: float | None) -> None:
    """A ValueError for what a guidance-distilled U-Net (`embedded`) cannot do: a negative prompt (it
    has no unconditional half to replace), or a guidance rescale (its teacher's is built in)."""
    if not embedded:
        return
    if any(negatives):
        raise ValueError("this model was distilled with guidance built in: it takes no negative prompt")
    if guidance_rescale:
        raise ValueError("this model was distilled with guidance built in (its teacher's rescale included): "
                         "guidance_rescale does not apply")


# ---- the objectives ------------------------------------------------------------------------------


def _unet(unet, z, t, cond, w_embedding=None):
    return unet(z, t, encoder_hidden_states=cond, timestep_cond=w_embedding, return_dict=False)[0]


class GuidedTeacher:
    """The frozen teacher's guided prediction at z_t: classifier-free guidance at w (per sample,
    (B,)) with guidance rescale φ, as `ldm.sampling.GuidedDenoiser` samples it; or, for a teacher
    that is itself a guidance-distilled student, its single call with the w-embedding."""

    def __init__(self, unet, uncond: torch.Tensor, rescale: float):
        self.unet = unet
        self.uncond = uncond  # (1, L, D): the empty prompt's embedding
        self.rescale = rescale
        self.embedded = unet.config.time_cond_proj_dim is not None

    @torch.no_grad()
    def __call__(self, z_t, t, cond, w, w_embedding):
        if self.embedded:
            return _unet(self.unet, z_t, t, cond, w_embedding)
        uncond = self.uncond.to(cond.device, cond.dtype).expand_as(cond)
        out_u, out_c = _unet(self.unet, torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        w = w.to(out_c.dtype).reshape(-1, 1, 1, 1)
        return rescale_guidance(classifier_free_guidance(out_u, out_c, w), out_c, self.rescale)


def _eps(z0: torch.Tensor, z_t: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """ε̂ = (z_t − √ᾱ ẑ_0) / √(1 − ᾱ) (ᾱ < 1 on every grid point a step leaves from)."""
    return schedule.model_output_from_z0(z0, z_t, alpha_cumprod, "epsilon")


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency function f = c_skip z + c_out ẑ_0 (Song et al. 2023, eq. 8, in
    LCM's discrete form: LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
    scaled = timestep_scaling * t.double()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.reshape(-1, 1, 1, 1), c_out.reshape(-1, 1, 1, 1)


class Objective:
    """What the stage-2 loop calls as `objective(unet, z0, cond, draws)` for a distillation run."""

    def __init__(self, d: DistillConfig, teacher_unet, uncond_embed: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction_type: str, scheduler_config: dict, target_unet=None, ema=None):
        self.d = d
        self.teacher = GuidedTeacher(teacher_unet, uncond_embed, default_guidance_rescale(scheduler_config)
                                     if d.guidance_rescale is None else d.guidance_rescale)
        self.alphas_cumprod = alphas_cumprod  # (T,) float64
        self.prediction_type = prediction_type
        self.target = target_unet  # lcm: θ⁻, refreshed from the EMA before each use
        self.ema = ema
        T = len(alphas_cumprod)
        if d.method == "lcm":
            k = T // d.solver_steps
            self.grid = torch.arange(1, d.solver_steps + 1) * k - 1  # t_n: LCMScheduler's (and diffusers' LCM script's)
            self.prev = (self.grid - k).clamp(min=0)
        else:
            self.grid, self.prev = ddim_grid(scheduler_config, d.rounds[-1])  # one round per run (ldm-distill)

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at t, with t = −1 meaning the clean end (ᾱ = 1, DDIM's set_alpha_to_one)."""
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))

    def _z0(self, out, z_t, alpha_cumprod):
        return schedule.predicted_z0(out, z_t, alpha_cumprod, self.prediction_type)

    def __call__(self, unet, z0: torch.Tensor, cond: torch.Tensor, draws) -> torch.Tensor:
        device = z0.device
        n = draws.timesteps * len(self.grid) // len(self.alphas_cumprod)  # uniform over the grid's points
        t, t_prev = self.grid[n], self.prev[n]
        w = self.d.guidance_min + (self.d.guidance_max - self.d.guidance_min) * draws.spare  # (B,) CFG scales
        w_embedding = guidance_embedding(w, self.d.embedding_dim).to(device, z0.dtype)
        a_t, a_prev = self._alpha(t), self._alpha(t_prev)
        z_t = schedule.q_sample(z0, draws.noise.to(device), a_t)
        student = _unet(unet, z_t, t.to(device), cond, w_embedding)
        if self.d.method == "lcm":
            return self._lcm(student, z_t, t, t_prev, a_t, a_prev, cond, w, w_embedding)
        return self._progressive(student, z_t, t, t_prev, a_t, a_prev, cond, w, w_embedding)

    def _lcm(self, student, z_t, t, t_prev, a_t, a_prev, cond, w, w_embedding):
        device = z_t.device
        c_skip, c_out = boundary_scalings(t)
        c_skip, c_out = c_skip.to(device, torch.float32), c_out.to(device, torch.float32)
        f = c_skip * z_t.float() + c_out * self._z0(student, z_t, a_t).float()
        with torch.no_grad():
            teacher_z0 = self._z0(self.teacher(z_t, t.to(device), cond, w, w_embedding), z_t, a_t)
            # one DDIM step of the PF-ODE (Song et al. 2021, eq. 12, η = 0): z_s = √ᾱ_s ẑ_0 + √(1−ᾱ_s) ε̂
            z_prev = schedule.q_sample(teacher_z0, _eps(teacher_z0, z_t, a_t), a_prev)
            self.ema.copy_to(self.target.parameters())  # θ⁻: the EMA of the student's weights
            target_z0 = self._z0(_unet(self.target, z_prev, t_prev.to(device), cond, w_embedding), z_prev, a_prev)
            c_skip, c_out = boundary_scalings(t_prev)
            c_skip, c_out = c_skip.to(device, torch.float32), c_out.to(device, torch.float32)
            target = c_skip * z_prev.float() + c_out * target_z0.float()
        c = self.d.huber_c
        return (torch.sqrt((f - target) ** 2 + c * c) - c).mean()

    def _progressive(self, student, z_t, t, t_prev, a_t, a_prev, cond, w, w_embedding):
        device = z_t.device
        t_mid = (t + t_prev + 1) // 2  # the teacher's grid: two steps of T/2N (t' = −1 is the clean end: t_mid ≥ 0)
        a_mid = self._alpha(t_mid)
        with torch.no_grad():
            z0 = self._z0(self.teacher(z_t, t.to(device), cond, w, w_embedding), z_t, a_t)
            z_mid = schedule.q_sample(z0, _eps(z0, z_t, a_t), a_mid)  # DDIM steps, as in _lcm
            z0 = self._z0(self.teacher(z_mid, t_mid.to(device), cond, w, w_embedding), z_mid, a_mid)
            z_prev = schedule.q_sample(z0, _eps(z0, z_mid, a_mid), a_prev)
            s_t, s_prev = (1 - a_t).sqrt(), (1 - a_prev).sqrt()  # σ_t, σ_t'
            ratio = (s_prev / s_t).to(device, z_t.dtype).reshape(-1, 1, 1, 1)
            alpha_t = a_t.sqrt().to(device, z_t.dtype).reshape(-1, 1, 1, 1)
            alpha_prev = a_prev.sqrt().to(device, z_t.dtype).reshape(-1, 1, 1, 1)
            x_target = (z_prev - ratio * z_t) / (alpha_prev - ratio * alpha_t)  # S&H Alg. 2
            target = schedule.model_output_from_z0(x_target, z_t, a_t, "v_prediction")
        v_student = schedule.model_output_from_z0(self._z0(student, z_t, a_t), z_t, a_t, "v_prediction")
        return ((v_student.float() - target.float()) ** 2).mean()


def ddim_grid(scheduler_config: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t') of each of a `steps`-step DDIM run on this schedule, as diffusers' DDIMScheduler lays
    them out (its timestep spacing) and steps them (t' = t − T // steps; t' < 0: the clean end)."""
    from ldm.sampling import make_scheduler

    scheduler = make_scheduler("ddim", scheduler_config)
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps.long()
    prev = t - scheduler.config.num_train_timesteps // steps
    return t, prev.clamp(min=-1)


__all__ = ["DistillConfig", "METHODS", "STUDENT_CARD", "check_distill", "student_unet", "scheduler_and_card",
           "write_card", "read_card", "check_student", "check_built_in_guidance", "distill", "Objective",
           "GuidedTeacher", "boundary_scalings", "ddim_grid"]
