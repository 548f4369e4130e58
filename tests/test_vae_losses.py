"""The stage-1 losses against hand computations: hinge, KL, NLL, the adaptive weight; PatchGAN and
LPIPS shapes and weight layout."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ldm.train.vae_losses import (
    LPIPS, AutoencoderLoss, NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, kl_loss, nll_loss,
)


def test_hinge_losses_on_analytic_logits():
    # D(x) = [2, 0.5, -1]: max(0, 1 − d) = [0, 0.5, 2] → mean 5/6
    # D(x̂) = [-3, 0, 0.25]: max(0, 1 + d) = [0, 1, 1.25] → mean 0.75
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 0.25])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(-(-3 + 0 + 0.25) / 3)
    # A discriminator that is right with margin ≥ 1 on both sides has zero loss.
    assert hinge_d_loss(torch.tensor([1.0, 4.0]), torch.tensor([-1.0, -7.0])).item() == 0.0


def test_kl_against_closed_form_and_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # One element μ = 1, σ² = e: ½ (1 + e − 1 − 1) = (e − 1) / 2
    mean, logvar = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    assert kl_loss(mean, logvar).item() == pytest.approx((math.e - 1) / 2)
    # Summed over elements, averaged over the batch: as LDM's posterior.kl() then sum / B.
    torch.manual_seed(0)
    params = torch.randn(3, 8, 4, 4)
    posterior = DiagonalGaussianDistribution(params)
    assert kl_loss(posterior.mean, posterior.logvar).item() == pytest.approx(posterior.kl().mean().item(), rel=1e-5)


def test_nll_with_learned_log_variance():
    # rec = 0.5 everywhere on (2, 1, 2, 2), s = log 2: per pixel 0.5 / 2 + log 2; 4 pixels per image.
    rec = torch.full((2, 1, 2, 2), 0.5)
    s = torch.tensor(math.log(2.0))
    assert nll_loss(rec, s).item() == pytest.approx(4 * (0.25 + math.log(2.0)))
    # Its minimum over s is at e^s = mean rec (the Laplace scale's maximum-likelihood estimate).
    s = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        nll_loss(rec, s).backward()
        opt.step()
    assert s.exp().item() == pytest.approx(0.5, abs=1e-3)


def test_adaptive_weight_against_a_hand_computation():
    """Toy decoder: h = tanh(A x), x̂ = W h with W the last layer. For L_rec = Σ (x̂ − t)² the gradient
    at W is 2 (x̂ − t) hᵀ; for L_GAN = −mean(c ⊙ x̂) it is −(c / n) hᵀ. λ is the ratio of their norms."""
    rng = np.random.default_rng(0)
    a, x, t, c = rng.normal(size=(5, 3)), rng.normal(size=3), rng.normal(size=4), rng.normal(size=4)
    w = rng.normal(size=(4, 5))
    h = np.tanh(a @ x)
    rec_grad = 2 * np.outer(w @ h - t, h)
    adv_grad = -np.outer(c / 4, h)
    expected = np.linalg.norm(rec_grad) / (np.linalg.norm(adv_grad) + 1e-4)

    A, W = torch.tensor(a, requires_grad=True), torch.tensor(w, requires_grad=True)
    x_rec = W @ torch.tanh(A @ torch.tensor(x))
    rec = (x_rec - torch.tensor(t)).pow(2).sum()
    adv = -(torch.tensor(c) * x_rec).mean()
    weight = adaptive_weight(rec, adv, W)
    assert weight.item() == pytest.approx(expected, rel=1e-10)
    assert not weight.requires_grad  # λ is a constant for the backward pass
    # Both losses keep their graphs: the caller still backpropagates through them.
    (rec + weight * adv).backward()
    assert A.grad is not None

    # No adversarial gradient at W: λ hits the ceiling 1e4 instead of blowing up.
    rec = (W @ torch.tanh(A @ torch.tensor(x)) - torch.tensor(t)).pow(2).sum()
    assert adaptive_weight(rec, (W * 0).sum(), W).item() == 1e4


def test_generator_loss_uses_the_adaptive_weight_once_the_gan_starts():
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(disc_start=5, disc_weight=0.5, disc_channels=8, disc_layers=2)
    last = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_rec = last(torch.randn(2, 4, 16, 16))
    mean, logvar = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    before, logs = loss_fn.generator_loss(x, x_rec, mean, logvar, step=4, last_layer=last.weight)
    assert "loss/g" not in logs
    assert before.item() == pytest.approx(logs["loss/nll"].item() + 1e-6 * logs["loss/kl"].item(), rel=1e-6)
    after, logs = loss_fn.generator_loss(x, x_rec, mean, logvar, step=5, last_layer=last.weight)
    nll, g = nll_loss((x - x_rec).abs(), loss_fn.logvar), hinge_g_loss(loss_fn.discriminator(x_rec))
    expected_weight = 0.5 * adaptive_weight(nll, g, last.weight)
    assert logs["d_weight"].item() == pytest.approx(expected_weight.item(), rel=1e-5)
    assert after.item() == pytest.approx(before.item() + logs["d_weight"].item() * logs["loss/g"].item(), rel=1e-5)
    # The generator pass leaves the discriminator trainable and without gradients.
    after.backward()
    assert all(p.requires_grad and p.grad is None for p in loss_fn.discriminator.parameters())
    assert loss_fn.logvar.grad is not None


def test_patchgan_gives_one_logit_per_patch():
    disc = NLayerDiscriminator(3, base_channels=8, num_layers=3)
    # 256 px → /2 /2 /2 by the strided convolutions, then two stride-1 4×4 convolutions: 32 → 31 → 30
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_lpips_loads_the_lpips_package_layout_and_is_a_distance(tmp_path):
    from safetensors.torch import save_file

    # The `lpips` package's LPIPS(net="vgg") state dict, keys as that package names them.
    torch.manual_seed(0)
    reference = LPIPS()
    keys = {k for k in reference.state_dict() if k not in ("shift", "scale")}
    assert "net.slice1.0.weight" in keys and "net.slice5.28.bias" in keys and "lin4.model.1.weight" in keys
    state = {k: torch.rand_like(v) if k.startswith("lin") else torch.randn_like(v) * 0.05 for k, v in reference.state_dict().items()
             if k in keys}
    state["lins.0.model.1.weight"] = state["lin0.model.1.weight"].clone()  # the package also lists the lins twice
    save_file(state, tmp_path / "lpips_vgg.safetensors")
    model = LPIPS.from_file(tmp_path / "lpips_vgg.safetensors")
    assert torch.equal(model.lin4.model[1].weight, state["lin4.model.1.weight"])

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert model(x, x).abs().max().item() < 1e-6
    d = model(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert torch.allclose(d, model(y, x))

    save_file({"conv.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not LPIPS-VGG weights"):
        LPIPS.from_file(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        LPIPS.from_file(tmp_path / "missing.safetensors")
