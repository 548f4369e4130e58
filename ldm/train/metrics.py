"""Reconstruction quality: PSNR and SSIM, per image, on images in [0, 1].

Written here rather than imported (torchvision, scikit-image and torchmetrics would be
dependencies for two small functions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(range² / MSE) in dB: (B, C, H, W) → (B,).
    Identical images give +inf."""
    _check(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised (size, size) Gaussian window of Wang et al. 2004 (sec. III-C: 11×11, σ = 1.5)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13 with the Gaussian-weighted local
    statistics of eq. 14–16), averaged over every valid window position and channel: (B, C, H, W) → (B,).

        SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),  C_i = (K_i L)²

    Windows lie wholly inside the image ('valid', as the reference MATLAB code), so H and W must be
    at least `window_size`.
    """
    _check(x, y)
    b, c, h, w = x.shape
    if min(h, w) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}×{window_size} pixels, got {h}×{w}")
    x, y = x.double(), y.double()
    window = gaussian_window(window_size, sigma).to(x.device).expand(c, 1, window_size, window_size)

    def local_mean(t):  # Gaussian-weighted mean over each window, per channel
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()

