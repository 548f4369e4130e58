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
