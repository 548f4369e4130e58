"""The training half of ldm.schedule against diffusers' DDPMScheduler and analytic values."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm import schedule as S


@pytest.mark.parametrize("name", S.BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_and_alphas_cumprod_match_diffusers(name, zero_snr):
    ref = DDPMScheduler(beta_schedule=S.DIFFUSERS_BETA_SCHEDULES[name], beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=zero_snr)
    betas = S.make_betas(name, 1000, 0.00085, 0.012)
    if zero_snr:
        betas = S.rescale_zero_terminal_snr(betas)
    alphas_cumprod = S.alphas_cumprod_from_betas(betas)
    torch.testing.assert_close(betas.float(), ref.betas, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alphas_cumprod.float(), ref.alphas_cumprod, atol=2e-6, rtol=1e-5)
    if zero_snr:
        assert alphas_cumprod[-1] == 0 and S.snr(alphas_cumprod)[-1] == 0
        assert alphas_cumprod[0] == pytest.approx(1 - S.make_betas(name, 1000, 0.00085, 0.012)[0].item(), rel=1e-12)  # √ᾱ_1 kept


def test_schedules_analytic_values():
    assert S.make_betas("linear", 1000, 1e-4, 0.02)[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    sl = S.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    assert sl[500].sqrt().item() == pytest.approx(math.sqrt(0.00085) + 500 / 999 * (math.sqrt(0.012) - math.sqrt(0.00085)))
    # Nichol & Dhariwal eq. 17: ᾱ_t = f(t)/f(0) exactly where no β is clipped
    ac = S.alphas_cumprod_from_betas(S.make_betas("cosine", 1000))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ac[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        S.make_betas("quadratic")


def test_q_sample_and_v_target_match_diffusers_add_noise_and_get_velocity():
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ac = S.alphas_cumprod_from_betas(S.make_betas("scaled_linear"))
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(S.q_sample(z0, noise, ac[t]), ref.add_noise(z0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S.v_target(z0, noise, ac[t]), ref.get_velocity(z0, noise, t), atol=1e-5, rtol=1e-5)
    assert torch.equal(S.training_target(z0, noise, ac[t], "epsilon"), noise)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_epsilon_and_v_targets_both_recover_z0(zero_snr):
    betas = S.make_betas("scaled_linear")
    if zero_snr:
        betas = S.rescale_zero_terminal_snr(betas)
    ac = S.alphas_cumprod_from_betas(betas)
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 900, 998])
    z_t = S.q_sample(z0, noise, ac[t])
    from_eps = S.predicted_z0(S.training_target(z0, noise, ac[t], "epsilon"), z_t, ac[t], "epsilon")
    from_v = S.predicted_z0(S.training_target(z0, noise, ac[t], "v_prediction"), z_t, ac[t], "v_prediction")
    torch.testing.assert_close(from_eps, z0, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(from_v, z0, atol=1e-10, rtol=1e-10)
    if zero_snr:  # at SNR 0, v still recovers z_0 (v = −z_0 there)
        z_T = S.q_sample(z0, noise, ac[-1:].expand(5))
        torch.testing.assert_close(S.predicted_z0(S.v_target(z0, noise, ac[-1:].expand(5)), z_T, ac[-1:].expand(5), "v_prediction"), z0)


def test_min_snr_weights_values_and_equivalence_to_a_z0_loss():
    snr = torch.tensor([0.0, 0.5, 5.0, 10.0, 100.0], dtype=torch.float64)
    assert S.min_snr_weights(snr, 5.0, "epsilon").tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.05])
    assert S.min_snr_weights(snr, 5.0, "v_prediction").tolist() == pytest.approx([0.0, 0.5 / 1.5, 5 / 6, 5 / 11, 5 / 101])
    # weighted target losses equal min(SNR, γ)·‖z_0 − ẑ_0‖² (Hang et al. eq. 7)
    ac = torch.tensor([0.9, 0.5, 0.05], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    z0, noise, err = (torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    z_t = S.q_sample(z0, noise, ac)
    gamma = 2.0
    for kind in ("epsilon", "v_prediction"):
        target = S.training_target(z0, noise, ac, kind)
        prediction = target + err
        z0_hat = S.predicted_z0(prediction, z_t, ac, kind)
        lhs = S.min_snr_weights(S.snr(ac), gamma, kind) * ((prediction - target) ** 2).mean(dim=(1, 2, 3))
        rhs = S.snr(ac).clamp(max=gamma) * ((z0_hat - z0) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(lhs, rhs)
    with pytest.raises(ValueError, match="gamma"):
        S.min_snr_weights(snr, 0.0, "epsilon")


def test_offset_noise_shifts_each_channel_by_a_constant():
    g = torch.Generator().manual_seed(3)
    noise, offset = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 1, 1, generator=g)
    out = S.offset_noise(noise, offset, 0.1)
    torch.testing.assert_close((out - noise), (0.1 * offset).expand(2, 4, 8, 8))
    assert torch.equal(S.offset_noise(noise, offset, 0.0), noise)
