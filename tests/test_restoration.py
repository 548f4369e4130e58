"""Restoration (ldm.restoration, LatentPipeline.restore, ldm-restore): the operators against their
algebra (adjoints, pseudo-inverses, Wiener's exact inverse), PSNR/SSIM against scikit-image, each
method's step against an analytic case or diffusers' DDPM, the default model restoring a rendered
scene, and every bad input as one line."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import render_array
from ldm.data.shapes_eval import eval_scene
from ldm.pipeline import DEFAULT_MODEL
from ldm.restoration import (
    Blur, CustomOperator, DataConsistency, Downsample, Grayscale, ParticleFilter, PixelMask, ReconstructionGuidance,
    check_restoration, colour_transfer, luma_table, measure, parse_degradation, particle_seed, psnr, residual_rms,
    ssim,
)

torch.set_default_dtype(torch.float32)


def smooth_images(n=2, size=32, seed=0):
    """Band-limited images in [−1, 1]: a few low frequencies per channel, which a σ 1 blur keeps."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linspace(0, 2 * np.pi, size + 1, dtype=torch.float64)[:-1]
    x = torch.zeros(n, 3, size, size, dtype=torch.float64)
    for fy, fx in ((0, 1), (1, 0), (1, 1), (2, 1)):
        a = torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64) * 0.2
        x += a * torch.cos(fy * u[:, None] + fx * u[None, :])
    return x


def operators(size=32):
    mask = (torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(1)) < 0.6).double()
    return [Downsample(2), Downsample(4), Blur(1.5), Grayscale(), PixelMask(mask)]


@pytest.mark.parametrize("op", operators(), ids=lambda op: op.name)
def test_adjoint_and_pseudo_inverse_satisfy_their_definitions(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    v = torch.randn(op(x).shape, generator=g, dtype=torch.float64)
    assert torch.allclose((op(x) * v).sum(), (x * op.adjoint(v)).sum(), rtol=1e-10)  # ⟨Ax, v⟩ = ⟨x, Aᵀv⟩
    if not isinstance(op, Blur):  # A A⁺ A = A (Blur's drops near-zero frequencies: below)
        assert torch.allclose(op(op.pseudo_inverse(op(x))), op(x), atol=1e-10)
    assert op.measured_size(32, 32) == tuple(op(x).shape[-2:])
    assert op.image_size(*op(x).shape[-2:]) == (32, 32)
    if not isinstance(op, Blur):  # the restarts' projection lands on {A x = y} and is idempotent
        y = op(torch.randn(x.shape, generator=g, dtype=torch.float64))
        moved = op.project(x, y)
        assert torch.allclose(op(moved), y, atol=1e-10) and torch.allclose(op.project(moved, y), moved, atol=1e-10)


def test_gray_projection_replaces_luma_and_keeps_chroma():
    """x + (y − A x) in every channel: YCbCr's Cb and Cr (differences to the luma) stay; the same for Blur
    on a band-limited image, whose A⁺ is exact there."""
    x, truth = smooth_images(seed=1), smooth_images(seed=2)
    gray = Grayscale()
    moved = gray.project(x, gray(truth))
    assert torch.allclose(moved - gray(moved), x - gray(x), atol=1e-12)  # R − Y, G − Y, B − Y unchanged
    assert torch.allclose(gray(moved), gray(truth), atol=1e-12)
    blur = Blur(1.0)
    assert torch.allclose(blur(blur.project(x, blur(truth))), blur(truth), atol=1e-9)


def test_blur_inverses_recover_a_band_limited_image():
    x = smooth_images()
    blur = Blur(1.0)
    assert torch.allclose(blur.pseudo_inverse(blur(x)), x, atol=1e-9)
    assert torch.allclose(blur.fourier_inverse(blur(x), 1e-12), x, atol=1e-6)  # Wiener at λ → 0
    shrunk = blur.fourier_inverse(blur(x), 1.0)
    assert shrunk.abs().sum() < x.abs().sum()  # a large λ pulls toward 0
    kernel = blur.transfer(32, 32)
    assert kernel[0, 0] == pytest.approx(1.0) and (kernel <= 1 + 1e-12).all()  # rows sum to 1: constants kept


def test_psnr_and_ssim_equal_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    for i in range(2):
        x, t = b[i].double().numpy(), a[i].double().numpy()
        assert float(psnr(b, a)[i]) == pytest.approx(metrics.peak_signal_noise_ratio(t, x, data_range=2), rel=1e-9)
        reference = metrics.structural_similarity(t, x, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False, data_range=2)
        assert float(ssim(b, a)[i]) == pytest.approx(reference, rel=1e-6)


def test_measurement_noise_and_the_residual_are_in_unit_pixels():
    x = torch.zeros(1, 3, 64, 64)
    y = measure(x, Downsample(4), 0.05, torch.Generator().manual_seed(0))
    assert residual_rms(y, Downsample(4)(x), Downsample(4)).item() == pytest.approx(0.05, rel=0.1)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1  # half missing: the residual counts the measured half only
    op = PixelMask(mask)
    y = op(x + 0.1)
    assert residual_rms(y, op(x), op).item() == pytest.approx(0.05, rel=1e-6)


class Identity:
    """A denoiser whose clean estimate is z_t itself (prediction type "sample")."""

    def __call__(self, z, t):
        return z.clone()

    predict = __call__


def test_guidance_step_is_dps_normalised_gradient_through_the_adjoint():
    """With ẑ_0(z) = z and D = id, ∇_z ‖y − Az‖ = −Aᵀ(y − Az) / ‖y − Az‖:
    DPS's step, per image."""
    op = Downsample(2)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    guide = ReconstructionGuidance(Identity(), lambda v: v, op, y, 0.5, torch.linspace(0.9, 0.1, 10), "sample")
    assert torch.equal(guide(z, 3), z)
    r = y - op(z)
    expected = -op.adjoint(r) / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(guide.gradient, expected, atol=1e-6)
    assert torch.allclose(guide.constraint(0, z), z - 0.5 * expected, atol=1e-6)


def test_consistency_fits_the_clean_estimate_and_stops_at_the_noise():
    op = Downsample(2)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 8, 8, generator=g)
    y = op(torch.randn(2, 3, 8, 8, generator=g))
    y[1] = op(z)[1] + 0.01  # image 1 already explains y within σ_y: the discrepancy principle leaves it
    table = torch.linspace(0.999, 0.5, 10)
    fit = DataConsistency(Identity(), lambda v: v, op, y, 0.1, table, "sample", iterations=200,
                          timesteps=torch.tensor([9, 4]), sigma_y=0.01)
    fit(z, 9)  # ends at step 4's level: ᾱ_4
    moved = fit.shift / table[4].sqrt()
    assert (op(z[:1] + moved[:1]) - y[:1]).norm() < 0.05 * (op(z[:1]) - y[:1]).norm()  # fitted
    assert moved[1].abs().max() == 0  # not fitted past its noise
    assert torch.allclose(fit.constraint(0, z), z + fit.shift)
    fit(z, 4)  # the last step ends clean: ᾱ = 1
    assert torch.allclose(fit.shift[:1], fit.constraint(1, z)[:1] - z[:1])


def test_consistency_particles_are_steered_by_their_residual():
    """K = 4 particles per image: the weight is exp(−λ ρ) of the unfitted residual's RMS ρ ([0, 1] units), a
    group whose effective sample size falls below K/2 is resampled onto its likely particles, and after the
    last step every row holds its group's best."""
    from ldm.restoration import POTENTIAL_SCALE

    op = Downsample(2)
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(2, 3, 8, 8, generator=g)
    y = op(truth).repeat_interleave(4, 0)  # rows: image 0's four particles, then image 1's
    z = truth.repeat_interleave(4, 0) + torch.tensor([0.0, 2.0, -2.0, 1.0, 0.01, -0.02, 0.03, -0.04]).view(-1, 1, 1, 1)
    table = torch.linspace(0.999, 0.5, 10)
    fit = DataConsistency(Identity(), lambda v: v, op, y, 0.0, table, "sample", iterations=1,
                          timesteps=torch.tensor([9, 4]), sigma_y=0.0, particles=4,
                          generators=[torch.Generator().manual_seed(i) for i in range(8)])
    fit(z, 9)  # learning rate 0: no fit, the shift is 0
    rho = (y - op(z)).flatten(1).norm(dim=1) / 48**0.5 / 2  # 3 × 4 × 4 measured entries per image
    assert torch.allclose(fit.potential, -POTENTIAL_SCALE * rho.double(), rtol=1e-5)
    after = fit.constraint(0, z)
    assert torch.equal(after[:4], z[[0, 0, 0, 0]])  # image 0 resampled onto its good particle (others e^-25 or less)
    assert torch.equal(fit.log_weights[:4], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(after[4:], z[4:]) and len(set(fit.log_weights[4:].tolist())) == 4  # image 1 kept as it was
    fit(after, 4)
    last = fit.constraint(1, after)
    best = 4 + int(rho[4:].argmin())  # the weights telescope to the last potential: the lowest residual wins
    assert all(torch.equal(row, z[best]) for row in last[4:])


def test_particle_filter_transition_is_diffusers_ddpm_step():
    """SMC's weights use DDPM's reverse transition: its mean and variance must be diffusers' own."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                              beta_schedule="scaled_linear", clip_sample=False)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    z0, z_t, out = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    known = torch.zeros(2, 1, 4, 4)
    known[..., :2] = 1

    class Fixed:
        def __call__(self, z, t):
            return out

    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    smc = ParticleFilter(Fixed(), z0, known, scheduler.timesteps, scheduler.alphas_cumprod, "v_prediction", 2,
                         generators)
    i, t = 3, scheduler.timesteps[3]
    smc(z_t, t)
    noise_generator = torch.Generator().manual_seed(7)
    stepped = scheduler.step(out, t, z_t, generator=noise_generator).prev_sample
    noise = torch.randn(z_t.shape, generator=torch.Generator().manual_seed(7))
    variance = scheduler._get_variance(int(t))
    mean = stepped - variance.sqrt() * noise
    gap = ((smc.observations[i + 1] - mean) * known).pow(2).flatten(1).sum(1)
    assert torch.allclose(smc.log_weights, -gap / (2 * variance), rtol=1e-4)
    # resampling: the likelier particle of the pair wins both rows; the known cells hold the observation
    latents = torch.stack([torch.zeros(4, 4, 4), torch.ones(4, 4, 4)])
    smc.log_weights = torch.tensor([0.0, -1e4])
    after = smc.constraint(i, latents)
    assert torch.equal(after * (1 - known), torch.zeros_like(after))
    assert torch.equal(after * known, smc.observations[i + 1] * known)


def test_observation_trajectory_has_the_forward_process_marginals():
    """y_i ~ q(y_i | y_0 = z_0): mean √ᾱ_i z_0 and variance 1 − ᾱ_i, the same path for an image's particles."""
    table = torch.linspace(0.99, 0.05, 1000)
    timesteps = torch.tensor([900, 500, 100])
    z0 = torch.full((4000, 1, 1, 1), 0.5)
    smc = ParticleFilter(Identity(), z0, torch.ones(4000, 1, 1, 1), timesteps, table, "sample", 2,
                         [torch.Generator().manual_seed(i) for i in range(4000)])
    for i, t in enumerate(timesteps):
        path = smc.observations[i]
        assert torch.equal(path[0::2], path[1::2])
        a = table[int(t)].item()
        assert path.mean().item() == pytest.approx(np.sqrt(a) * 0.5, abs=0.04)
        assert path.var().item() == pytest.approx(1 - a, rel=0.1)
    assert torch.equal(smc.observations[-1], z0)


@pytest.mark.parametrize(("spec", "message"), [
    ("sharpen", "unknown degradation 'sharpen'; choose one of: downsample:F, blur:SIGMA, gray, mask"),
    ("downsample:3", "downsample takes a factor of 2, 4, 8"),
    ("blur:0", "blur takes a standard deviation in pixels in (0, 16]"),
    ("mask", "degradation mask needs the mask"),
])
def test_bad_degradations_are_named(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_degradation(spec)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(method="smc", sigma_y=0.0, operator=Blur(2), particles=2), "method smc fills a mask"),
    (dict(method="smc", sigma_y=0.0, operator=PixelMask(torch.ones(1, 1, 8, 8)), particles=0),
     r"particles \(K\) must be a whole number in \[1, 64\]"),
    (dict(method="guidance", sigma_y=-0.1, operator=Grayscale()), "sigma_y .* must be ≥ 0"),
    (dict(method="guidance", sigma_y=0.0, operator=Grayscale(), particles=4), "particles is not a setting of method "
                                                                                "guidance"),
    (dict(method="consistency", sigma_y=0.0, operator=Grayscale(), sampler="euler"), "runs on sampler ddim"),
    (dict(method="consistency", sigma_y=0.0, operator=Grayscale(), restarts=11),
     r"restarts must be a whole number in \[0, 10\]"),
    (dict(method="guidance", sigma_y=0.0, operator=Grayscale(), restarts=1), "restarts is not a setting of method "
                                                                              "guidance"),
    (dict(method="consistency", sigma_y=0.0, operator=CustomOperator(lambda x: x), restarts=1),
     "needs the <lambda> operator's pseudo_inverse"),
    (dict(method="dps", sigma_y=0.0, operator=Grayscale()), "unknown restoration method 'dps'"),
    (dict(method="exemplar", sigma_y=0.0, operator=Blur(2)), "method exemplar colours a gray picture"),
    (dict(method="exemplar", sigma_y=0.0, operator=Grayscale(), step_size=0.1), "step_size is not a setting of "
                                                                                 "method exemplar"),
    (dict(method="exemplar", sigma_y=0.0, operator=Grayscale(), strength=0.5), "strength is not a setting of "
                                                                                "method exemplar"),
])
def test_bad_method_settings_are_named(kwargs, message):
    kwargs = {"sampler": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        check_restoration(kwargs.pop("method"), kwargs.pop("sampler"), kwargs.pop("sigma_y"), kwargs.pop("operator"),
                          **kwargs)


def flat_scene(size=32, flip=False):
    """A gray background with a yellow square and a blue disc, in [−1, 1]; `flip`: mirrored, a different layout
    of the same colours. Their lumas (0.65, −0.40) lie either side of the background's (0), so no edge's
    smoothed luma passes through the other shape's."""
    x = torch.zeros(1, 3, size, size, dtype=torch.float64)
    x[:, :, 4:14, 4:14] = torch.tensor([0.9, 0.8, -0.8], dtype=torch.float64).view(1, 3, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - 22) ** 2 + (xx - 20) ** 2 < 36)[None, None].expand(1, 3, -1, -1)
    x = torch.where(disc, torch.tensor([-0.7, -0.5, 0.9], dtype=torch.float64).view(1, 3, 1, 1), x)
    return x.flip(-1) if flip else x


def test_colour_transfer_recovers_flat_colours_from_an_exemplar_of_another_layout():
    """Exemplar colourisation on an analytic case: y the luma of a scene, the exemplar its mirror image (the
    same colours elsewhere). The output's luma is y exactly (σ_y 0), each colour comes back, and only the
    anti-aliasing-free edges' median can differ; with σ_y > 0 the luma is y smoothed, not y."""
    truth, exemplar = flat_scene(), flat_scene(flip=True)
    gray = Grayscale()
    y = gray(truth)
    out, coverage = colour_transfer(y, exemplar, 0.0)
    assert torch.allclose(gray(out), y, atol=1e-12)
    assert psnr(out, truth).item() > 60  # every pixel: the edges are not anti-aliased here
    interior = (slice(None), slice(None), slice(6, 12), slice(6, 12))
    assert torch.allclose(out[interior], truth[interior], atol=1e-6)  # the square's yellow
    assert torch.allclose(out[..., 22, 20], truth[..., 22, 20], atol=1e-6)  # the disc's blue
    noisy, _ = colour_transfer(y + 0.01, exemplar, 0.02)
    assert not torch.allclose(gray(noisy), y + 0.01) and (gray(noisy) - y - 0.01).abs().mean() < 0.02
    # coverage: an exemplar without the disc's luma covers y worse than one with it
    no_disc = exemplar.clone()
    no_disc[:, :, 14:, :] = 0
    assert colour_transfer(y, no_disc, 0.0)[1] < coverage
    density, chroma = luma_table(exemplar[0])
    assert density.sum().item() == pytest.approx(((torch.linspace(-1, 1, 256)[:, None] - torch.linspace(-1, 1, 256)[
        None]) / 0.01).pow(2).mul(-0.5).exp().sum(0).mean().item(), rel=0.2)  # a kernel density of a whole image
    assert chroma.shape == (256, 3)


def test_restore_refuses_a_measurement_of_the_wrong_size(tiny_pipe):
    with pytest.raises(ValueError, match="downsample:2 of a 32x32 image measures 16x16 with 3 channel.*the "
                                         "measurement is 32x32"):
        tiny_pipe.restore(torch.rand(3, 32, 32), "a", degradation="downsample:2", height=32, width=32)
    with pytest.raises(ValueError, match="the mask is 16x16 px; .* at the measurement's size, 32x32"):
        tiny_pipe.restore(torch.rand(3, 32, 32), "a", degradation="mask", mask_image=torch.ones(16, 16))
    crop = CustomOperator(lambda x: x[..., :16, :16], "crop")
    with pytest.raises(ValueError, match="crop of a 32x32 image measures 16x16 with 3 channel"):
        tiny_pipe.restore(torch.rand(3, 20, 20), "a", degradation=crop, height=32, width=32)
    with pytest.raises(ValueError, match="not a multiple of the model's latent factor"):
        tiny_pipe.restore(torch.rand(3, 9, 9), "a", degradation="downsample:2")
    with pytest.raises(ValueError, match="this degradation measures 1 channel"):
        tiny_pipe.restore(torch.rand(3, 32, 32), "a", degradation="gray")


def test_restore_runs_every_method_and_reports_its_residual(tiny_pipe):
    half = (torch.arange(32)[None, :] >= 16).float().expand(32, 32)  # the right half missing
    runs = [
        ("guidance", dict(measurement=torch.rand(1, 32, 32), degradation="gray")),
        ("consistency", dict(measurement=torch.rand(3, 8, 8), degradation="downsample:4", iterations=2)),
        ("consistency", dict(measurement=torch.rand(1, 32, 32), degradation="gray", iterations=2, particles=3)),
        ("smc", dict(measurement=torch.rand(3, 32, 32), degradation="mask", mask_image=half, particles=2)),
    ]
    for method, kwargs in runs:
        y = kwargs.pop("measurement")
        out = tiny_pipe.restore(y, ["a red circle", "a"], method=method, seed=1, num_inference_steps=3,
                                output_type="pt", progress=False, **kwargs)
        assert out.images.shape == (2, 3, 32, 32) and len(out.residuals) == 2
        assert f"Restoration: {method}" in out.parameters[0]
        assert f"Measurement residual: {out.residuals[1]:.4f}" in out.parameters[1]
        assert ("Particles: " in out.parameters[0]) == ("particles" in kwargs)
        alone = tiny_pipe.restore(y, "a", method=method, seed=2, num_inference_steps=3, output_type="pt",
                                  progress=False, **kwargs)
        assert torch.allclose(alone.images[0], out.images[1], atol=1e-5)  # image i depends on its seed alone


def test_exemplar_is_grays_default_and_colours_y_from_the_prompts_txt2img(tiny_pipe):
    """Method exemplar by hand: txt2img of the prompt with the image's seed (particle k's for K > 1), then
    `colour_transfer`; of K exemplars the best-covering one. Gray defaults to it; others do not."""
    y = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(seed=5, num_inference_steps=3, output_type="pt", progress=False)
    out = tiny_pipe.restore(y, "a red circle", degradation="gray", sigma_y=0.02, **kwargs)
    assert "Restoration: exemplar" in out.parameters[0] and "Particles" not in out.parameters[0]
    exemplar = tiny_pipe("a red circle", height=32, width=32, **kwargs).images * 2 - 1  # y's size
    by_hand, _ = colour_transfer(y[None] * 2 - 1, exemplar, 0.02)
    assert torch.allclose(out.images * 2 - 1, by_hand, atol=1e-5)
    assert out.residuals[0] == pytest.approx(residual_rms(y[None] * 2 - 1, Grayscale()(by_hand), Grayscale()).item(),
                                             abs=1e-5)
    four = tiny_pipe.restore(y, "a red circle", degradation="gray", sigma_y=0.02, particles=4, **kwargs)
    seeds = [particle_seed(5, k) for k in range(4)]
    exemplars = tiny_pipe("a red circle", num_images_per_prompt=4, height=32, width=32, **{**kwargs, "seed": seeds})
    exemplars = exemplars.images * 2 - 1
    candidates, coverage = colour_transfer((y[None] * 2 - 1).expand(4, -1, -1, -1), exemplars, 0.02)
    assert torch.allclose(four.images[0] * 2 - 1, candidates[int(coverage.argmax())], atol=1e-5)
    assert "Particles: 4" in four.parameters[0]
    with pytest.raises(ValueError, match="method exemplar colours a gray picture"):
        tiny_pipe.restore(torch.rand(3, 32, 32), "a", degradation="blur:1", method="exemplar")


def test_a_restart_starts_from_the_projected_output(tiny_pipe):
    """restarts=1 is a second pass from the first pass's output moved onto {A x = y}, noised to
    RESTART_STRENGTH through img2img's path: the same as running those two pieces by hand."""
    from ldm.restoration import RESTART_STRENGTH, Restoration, measurement_tensor

    y = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(degradation="downsample:2", seed=3, num_inference_steps=4, output_type="pt", progress=False)
    first = tiny_pipe.restore(y, "a red circle", restarts=0, **kwargs)
    both = tiny_pipe.restore(y, "a red circle", restarts=1, **kwargs)
    measured = measurement_tensor(y, 3)
    moved = Downsample(2).project(first.images * 2 - 1, measured)
    by_hand = tiny_pipe("a red circle", image=list(((moved + 1) / 2).clamp(0, 1)), strength=RESTART_STRENGTH, seed=3,
                        sampler="ddim", num_inference_steps=4, output_type="pt", progress=False,
                        restoration=Restoration(Downsample(2), measured, "consistency", 0.01, 10, 1, 0.0))
    assert torch.allclose(both.images, by_hand.images, atol=1e-6)
    assert not torch.allclose(both.images, first.images, atol=1e-3)
    assert "Restarts: 1" in both.parameters[0] and "Restarts" not in first.parameters[0]
    assert "Denoising strength: 0.3," in both.parameters[0]  # the first pass's (from bicubic), not the restart's
    with pytest.raises(ValueError, match="a restart runs the last 0.5 of the steps, none of 1"):
        tiny_pipe.restore(torch.rand(1, 32, 32), "a", degradation="gray", method="consistency",
                          num_inference_steps=1)  # consistency restarts gray once


def test_particles_of_an_image_start_from_different_noise(tiny_pipe, monkeypatch):
    """torch's CPU generator reads a seed's low 32 bits: particle k's seed must differ there (s + k·2³², the
    first version, drew K copies of one particle), and miss the next images' seeds s + 1, s + 2, …"""
    from ldm.request import MAX_SEED

    for s in (0, 7, 2**32 - 1, 2**40 + 5, MAX_SEED):
        seeds = [particle_seed(s, k) for k in range(64)]
        low = {x % 2**32 for x in seeds}
        assert seeds[0] == s and all(0 <= x <= MAX_SEED for x in seeds)
        assert len(low) == 64 and not low & {(s + j) % 2**32 for j in range(1, 10_000)}
    first = {}
    call = ParticleFilter.__call__

    def record(self, z_t, t):
        first.setdefault("z", z_t.clone())
        return call(self, z_t, t)

    monkeypatch.setattr(ParticleFilter, "__call__", record)
    half = (torch.arange(32)[None, :] >= 16).float().expand(32, 32)
    tiny_pipe.restore(torch.rand(3, 32, 32), "a", degradation="mask", mask_image=half, method="smc", particles=3,
                      seed=5, num_inference_steps=2, output_type="pt", progress=False)
    z = first["z"]
    assert len(z) == 3 and all((z[i] - z[j]).abs().max() > 0.1 for i, j in ((0, 1), (0, 2), (1, 2)))


@pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason="the embedded default model is not shipped")
def test_default_model_restores_a_held_out_scene_from_16_pixels():
    """×4 super-resolution of a rendered held-out scene: the restoration explains y (residual near σ_y) far
    better than the caption alone does, beats the pseudo-inverse's PSNR, and the scorer accepts it."""
    from ldm import LatentPipeline
    from ldm.data.shapes_score import score_image

    scene = eval_scene(0, 4, unnamed_background="gray")[0]
    truth = torch.from_numpy(render_array(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
    op = Downsample(4)
    y = measure(truth, op, 0.02, torch.Generator().manual_seed(0))
    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL)
    out = pipe.restore((y + 1) / 2, scene.caption, degradation="downsample:4", sigma_y=0.02, seed=0,
                       output_type="pt", progress=False)
    caption_only = pipe(scene.caption, seed=0, sampler="ddim", output_type="pt", progress=False).images
    restored = out.images * 2 - 1
    assert out.residuals[0] < 0.05
    assert out.residuals[0] < residual_rms(y, op(caption_only * 2 - 1), op).item() / 2
    assert psnr(restored, truth).item() > psnr(op.pseudo_inverse(y).clamp(-1, 1), truth).item()
    pixels = (out.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert score_image(pixels, scene.caption).passed, scene.caption


@pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason="the embedded default model is not shipped")
def test_default_model_colours_a_held_out_gray_scene():
    """Gray at its default (exemplar): the scorer accepts the colours, the residual is within the noise, and
    PSNR beats the gray picture's by far (the luma is y's, the chroma the caption's)."""
    from ldm import LatentPipeline
    from ldm.data.shapes_score import score_image

    scene = eval_scene(0, 7, unnamed_background="gray")[0]
    truth = torch.from_numpy(render_array(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
    op = Grayscale()
    y = measure(truth, op, 0.02, torch.Generator().manual_seed(0))
    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL)
    out = pipe.restore((y + 1) / 2, scene.caption, degradation="gray", sigma_y=0.02, seed=0, output_type="pt",
                       progress=False)
    assert out.residuals[0] < 0.02
    assert psnr(out.images * 2 - 1, truth).item() > psnr(y.expand(-1, 3, -1, -1), truth).item() + 5
    pixels = (out.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert score_image(pixels, scene.caption).passed, scene.caption


def test_restore_cli(tmp_path, tiny_pipeline_dir, capsys):
    from ldm.cli.restore import main

    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "rgb.png")
    common = ["--model", str(tiny_pipeline_dir), "--steps", "2", "--seed", "3", "--quiet",
              "--outdir", str(tmp_path / "o")]
    assert main([str(tmp_path / "gray.png"), "a red circle", "--degradation", "downsample:4", "--iterations", "2",
                 "--sigma-y", "0.02", *common]) == 0
    captured = capsys.readouterr()
    written = Image.open(captured.out.split()[0])
    assert written.size == (32, 32)
    assert "Degradation: downsample:4" in written.info["parameters"] and "Sigma y: 0.02" in written.info["parameters"]
    assert "measurement residual" in captured.err
    bad = [
        (["--degradation", "sharpen"], "unknown degradation 'sharpen'; choose one of"),
        (["--degradation", "downsample:4", "--sigma-y", "-1"], "sigma_y"),
        (["--degradation", "mask", "--method", "smc", "--particles", "0", "--mask", str(tmp_path / "rgb.png")],
         "particles (K) must be a whole number"),
        (["--degradation", "blur:2", "--method", "guidance", "--particles", "3"],
         "particles is not a setting of method guidance"),
        (["--degradation", "mask", "--mask", str(tmp_path / "gray.png")], "the mask is 8x8 px"),
        (["--degradation", "blur:2", "--method", "exemplar"], "method exemplar colours a gray picture"),
        (["--degradation", "gray", "--strength", "0.5"], "strength is not a setting of method exemplar"),
    ]
    for flags, message in bad:
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "rgb.png"), "a red circle", *flags, *common])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_restore_evaluation_scores_every_row_against_the_rendered_truth(tmp_path, tiny_pipeline_dir):
    from ldm.data.shapes_restore import check_restore_tasks, evaluate_restore, format_restore, restore_cases

    with pytest.raises(ValueError, match="random-mask takes the share"):
        check_restore_tasks(["random-mask:1.5"])
    with pytest.raises(ValueError, match="the evaluation draws its masks"):
        check_restore_tasks(["mask"])
    report = evaluate_restore(str(tiny_pipeline_dir), str(tmp_path / "eval"),
                              tasks=["downsample:4", "random-mask:0.5", "gray"], num_prompts=2, steps=2, batch_size=2)
    captions, kinds, truth, op, y = restore_cases(2, 0, "downsample:4", 0.02)
    rows = report["tasks"]["downsample:4"]["rows"]
    assert set(rows) == {"consistency", "txt2img (caption only)", "pseudo-inverse", "bicubic"}
    bicubic = torch.nn.functional.interpolate(y, scale_factor=4, mode="bicubic").clamp(-1, 1)
    assert rows["bicubic"]["psnr"] == pytest.approx(float(psnr(bicubic, truth).mean()), rel=1e-6)
    assert rows["pseudo-inverse"]["residual"] < 0.01  # A A⁺ y = y: only the clamp to [−1, 1] is left
    assert "fill" in report["tasks"]["random-mask:0.5"]["rows"]
    assert (tmp_path / "eval" / "downsample-4" / "00001-consistency.png").is_file()
    assert "consistency by kind" in format_restore(report) and "exemplar by kind" in format_restore(report)
    assert set(report["tasks"]["gray"]["rows"]) == {"exemplar", "txt2img (caption only)", "pseudo-inverse",
                                                    "gray picture"}
