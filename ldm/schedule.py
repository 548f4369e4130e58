"""The diffusion math, as small pure functions of tensors (no networks, no schedulers' state).

Notation follows DDPM (Ho et al. 2020): the forward process is
    z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε,      ε ~ N(0, I)                      (Ho et al. eq. 4)
with ᾱ_t = ∏_{s≤t} (1 − β_s). The equivalent variance-exploding noise level used by k-diffusion
and Karras et al. (2022) is σ_t = √((1 − ᾱ_t) / ᾱ_t), with x = z_t / √ᾱ_t = z_0 + σ_t ε.

A network predicts ε ("epsilon"), z_0 ("sample"), or v = √ᾱ_t · ε − √(1 − ᾱ_t) · z_0
("v_prediction", Salimans & Ho 2022, §4 and appendix D). The conversions below turn any of them
into the others given z_t and ᾱ_t.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t): the VE noise level of each discrete timestep (Karras et al. 2022, §2)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def alpha_cumprod_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
    """ᾱ at a possibly fractional timestep `t`.

    Integer t reads the table. Fractional t (Euler-type samplers on Karras σ spacing produce them)
    interpolates log σ linearly between neighbouring timesteps: the exact inverse of how diffusers
    maps such a σ to its timestep (`_sigma_to_t`), so ᾱ is the one the sampler is at.
    Returns ᾱ = 1 / (1 + σ²) as a float64 0-d tensor.
    """
    table = alphas_cumprod.detach().to("cpu", torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).cpu().reshape(())
    if not 0 <= float(t) <= len(table) - 1:
        raise ValueError(f"timestep {float(t)} is outside the schedule's range [0, {len(table) - 1}]")
    lo = int(torch.floor(t))
    hi = min(lo + 1, len(table) - 1)
    frac = t - lo
    log_sigmas = sigmas_from_alphas_cumprod(table[[lo, hi]]).log()
    sigma = (log_sigmas[0] + frac * (log_sigmas[1] - log_sigmas[0])).exp()
    return 1 / (1 + sigma**2)


def predicted_z0(model_output: torch.Tensor, z_t: torch.Tensor, alpha_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """ẑ_0 from a model output of the given type (Ho et al. eq. 15; Salimans & Ho 2022, eq. 31)."""
    a, s = _coefficients(alpha_cumprod, z_t)
    if prediction_type == "epsilon":
        return (z_t - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * z_t - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def model_output_from_z0(z0: torch.Tensor, z_t: torch.Tensor, alpha_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The inverse of `predicted_z0`: the model output of `prediction_type` that implies ẑ_0 = z0 at z_t."""
    a, s = _coefficients(alpha_cumprod, z_t)
    if prediction_type == "epsilon":
        return (z_t - a * z0) / s
    if prediction_type == "v_prediction":
        return (a * z_t - z0) / s
    if prediction_type == "sample":
        return z0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def _coefficients(alpha_cumprod: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ, √(1 − ᾱ)) shaped to broadcast over a (B, C, H, W) tensor, in its dtype and device."""
    alpha_cumprod = torch.as_tensor(alpha_cumprod, dtype=torch.float64)
    a = alpha_cumprod.sqrt().to(like.device, like.dtype)
    s = (1 - alpha_cumprod).sqrt().to(like.device, like.dtype)
    while a.ndim < like.ndim:
        a, s = a.unsqueeze(-1), s.unsqueeze(-1)
    return a, s


# ---- training: β schedules, the forward process, targets and loss weights --------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
# The names diffusers' schedulers give the same schedules (`beta_schedule` in scheduler_config.json).
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """β_1 … β_T (float64) of a named schedule.

    linear         β_t evenly spaced from beta_start to beta_end (Ho et al. 2020, §4: 1e-4 → 0.02).
    scaled_linear  √β_t evenly spaced, then squared: the schedule of LDM / Stable Diffusion
                   (Rombach et al. 2022; 0.00085 → 0.012).
    cosine         ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s)) · π/2), s = 0.008, and
                   β_t = 1 − ᾱ(t)/ᾱ(t−1) clipped to 0.999 (Nichol & Dhariwal 2021, eq. 17);
                   beta_start / beta_end are not used.
    """
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer ≥ 2, got {num_train_timesteps!r}")
    T = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * torch.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale β so that the last timestep has SNR exactly 0 (Lin et al. 2023, Algorithm 1).

    √ᾱ_t is shifted so √ᾱ_T = 0 and scaled so √ᾱ_1 keeps its value; the model then trains on
    pure noise at t = T, as it meets at the start of sampling. Needs v prediction (Lin et al. §3.2):
    at SNR 0, z_T = ε, so predicting ε says nothing about z_0.
    """
    alphas_bar_sqrt = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. 2020, §2, the notation above eq. 4)."""
    return torch.cumprod(1 - betas.to(torch.float64), 0)


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021, eq. 1; Hang et al. 2023, §3)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def q_sample(z0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε, a draw of q(z_t | z_0) (Ho et al. 2020, eq. 4).

    `alpha_cumprod` holds ᾱ_t per sample, shape (B,); the result has z0's shape and dtype.
    """
    a, s = _coefficients(alpha_cumprod, z0)
    return a * z0 + s * noise


def v_target(z0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t · ε − √(1 − ᾱ_t) · z_0, the v-prediction target (Salimans & Ho 2022, §4, eq. 31's v)."""
    a, s = _coefficients(alpha_cumprod, z0)
    return a * noise - s * z0


def training_target(z0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network is trained to output: ε (Ho et al. eq. 14) or v (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_target(z0, noise, alpha_cumprod)
    raise ValueError(f"prediction_type for training must be epsilon or v_prediction, got {prediction_type!r}")


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, eq. 7 and §3.4).

    The weight on the z_0 error is min(SNR, γ); written as a loss on the network's own target it is
        ε:  min(SNR, γ) / SNR          v:  min(SNR, γ) / (SNR + 1)
    (‖ε − ε̂‖² = SNR·‖z_0 − ẑ_0‖², ‖v − v̂‖² = (SNR + 1)·‖z_0 − ẑ_0‖²). At SNR = 0 (zero-terminal-SNR's
    last step) the ε weight is taken as its limit, 1.
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma!r}")
    clipped = snr_t.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr_t > 0, clipped / snr_t.clamp(min=torch.finfo(snr_t.dtype).tiny), torch.ones_like(snr_t))
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"prediction_type for training must be epsilon or v_prediction, got {prediction_type!r}")


def offset_noise(noise: torch.Tensor, offset: torch.Tensor, strength: float) -> torch.Tensor:
    """ε + strength · δ, δ ~ N(0, 1) per sample and channel, constant over the image (shape (B, C, 1, 1)).

    "Offset noise" (Guttenberg 2023, "Diffusion with offset noise", crosslabs.org): lets the model
    change an image's mean brightness, which plain ε (whose per-channel mean is ≈ 0 at large
    resolutions) barely can. strength ≈ 0.1 in practice; 0 is plain noise.
    """
    return noise + strength * offset
