"""PSNR and SSIM against analytic cases and a window-by-window reference."""

import math

import numpy as np
import pytest
import torch

from ldm.train.metrics import gaussian_window, psnr, ssim

C1, C2 = 0.01**2, 0.03**2


def test_psnr_analytic():
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 → 20 dB
    y[1, :, :4] += 0.2  # half the pixels off by 0.2: MSE 0.02 → 10 log10(50)
    assert psnr(x, y).tolist() == pytest.approx([20.0, 10 * math.log10(50)], rel=1e-6)
    assert psnr(x, x).isinf().all()
    assert psnr(x * 255, y * 255, data_range=255).tolist() == pytest.approx([20.0, 10 * math.log10(50)], rel=1e-6)


def test_gaussian_window():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    # The centre over a neighbour one step away is e^{1/(2σ²)}.
    assert (w[5, 5] / w[5, 6]).item() == pytest.approx(math.exp(1 / (2 * 1.5**2)))


def test_ssim_analytic_cases():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # Constant images a, b: σ = 0 everywhere, so SSIM = (2ab + C1) / (a² + b² + C1).
    a, b = 0.2, 0.7
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert ssim(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b)).item() == pytest.approx(expected, rel=1e-6)
    # Negating the structure around the same mean: y = 1 − x on a mean-½ image flips the sign of σxy.
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    x = 0.25 + 0.5 * checker.float().view(1, 1, 16, 16)
    s = ssim(x, 1 - x).item()
    assert s < -0.9  # contrast-structure term ≈ (−2σ² + C2) / (2σ² + C2) with σ² ≈ 1/16


def test_ssim_matches_a_window_by_window_reference():
    """Eq. 13–16 of Wang et al. 2004 evaluated directly at every valid 11×11 window position."""
    rng = np.random.default_rng(1)
    x = rng.random((13, 14))
    y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1)
    w = gaussian_window().numpy()
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    got = ssim(torch.tensor(x).view(1, 1, 13, 14), torch.tensor(y).view(1, 1, 13, 14)).item()
    assert got == pytest.approx(float(np.mean(values)), rel=1e-5)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
