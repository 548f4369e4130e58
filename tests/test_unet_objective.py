"""The stage-2 objective's pieces: condition dropout, per-sample draws, the loss against a hand computation."""

import pytest
import torch

from ldm import schedule as S
from ldm.text import PromptEncoder
from ldm.train.unet import (ObjectiveConfig, TextEncoderConfig, check_config, diffusion_loss, draw_randomness, load_text_encoder, text_conditioning,
                            timestep_weights)


@pytest.fixture(scope="module")
def prompt_encoder():
    torch.manual_seed(0)
    encoder, tokenizer = load_text_encoder(TextEncoderConfig(mode="joint", max_length=12, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32))
    return PromptEncoder(encoder.eval(), tokenizer)


def test_condition_dropout_rate_and_substitution(prompt_encoder):
    p = 0.25
    draws = draw_randomness(0, 7, list(range(4000)), p_uncond=p, num_train_timesteps=1000, latent_shape=(4, 1, 1))
    rate = draws.uncond.float().mean().item()
    assert abs(rate - p) < 3 * (p * (1 - p) / 4000) ** 0.5, rate  # within 3σ of the configured rate
    # on a batch, exactly the dropped rows carry the empty prompt's embedding, the others their caption's
    captions = ["a red circle", "two blue squares", "a green triangle", "a large purple square"] * 4
    uncond = draws.uncond[:16]
    assert 0 < uncond.sum() < 16
    c = text_conditioning({"caption": captions}, uncond, prompt_encoder, None, trainable=False)
    empty, own = prompt_encoder.encode([""]), prompt_encoder.encode(captions)
    for i in range(16):
        expected = empty[0] if uncond[i] else own[i]
        torch.testing.assert_close(c[i], expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(c[i], own[i] if uncond[i] else empty[0])
    # cached token ids take the same path
    ids, mask = prompt_encoder.tokenize(captions)
    torch.testing.assert_close(text_conditioning({"input_ids": ids, "attention_mask": mask}, uncond, prompt_encoder, None, False), c)
    # cached frozen embeddings: the stored empty embedding is substituted
    got = text_conditioning({"text_embeds": own}, uncond, prompt_encoder, empty, False)
    assert torch.equal(got[uncond], empty.expand(int(uncond.sum()), -1, -1)) and torch.equal(got[~uncond], own[~uncond])


def test_draws_depend_only_on_seed_step_and_global_index():
    a = draw_randomness(3, 5, [0, 1, 2, 3], p_uncond=0.5, num_train_timesteps=1000, latent_shape=(4, 2, 2))
    b = draw_randomness(3, 5, [2, 0], p_uncond=0.5, num_train_timesteps=1000, latent_shape=(4, 2, 2))
    assert torch.equal(b.noise[0], a.noise[2]) and torch.equal(b.noise[1], a.noise[0]) and torch.equal(b.timesteps, a.timesteps[[2, 0]])
    c = draw_randomness(3, 6, [0, 1, 2, 3], p_uncond=0.5, num_train_timesteps=1000, latent_shape=(4, 2, 2))
    assert not torch.equal(c.noise, a.noise)
    t = draw_randomness(0, 0, list(range(3000)), p_uncond=0.1, num_train_timesteps=1000, latent_shape=(1, 1, 1)).timesteps
    assert t.min() >= 0 and t.max() <= 999 and abs(t.float().mean().item() - 499.5) < 20


@pytest.mark.parametrize("strategy", ["later", "earlier"])
def test_timestep_bias_draws_the_biased_portion_as_often_as_its_weight(strategy):
    """portion 0.25, multiplier 3: the biased quarter holds 3·250 / (3·250 + 750) = 1/2 of the mass."""
    obj = ObjectiveConfig(timestep_bias_strategy=strategy, timestep_bias_multiplier=3.0, timestep_bias_portion=0.25)
    w = timestep_weights(obj)
    assert w.shape == (1000,) and abs(w.sum().item() - 1) < 1e-12
    biased = slice(750, 1000) if strategy == "later" else slice(0, 250)
    assert abs(w[biased].sum().item() - 0.5) < 1e-12 and torch.allclose(w[biased], 3 * w[500])
    t = draw_randomness(0, 0, list(range(4000)), p_uncond=0.1, num_train_timesteps=1000, latent_shape=(1, 1, 1), timestep_weights=w).timesteps
    inside = ((t >= biased.start) & (t < biased.stop)).float().mean().item()
    assert abs(inside - 0.5) < 3 * (0.25 / 4000) ** 0.5, inside  # within 3σ of 1/2 (uniform t: 1/4)
    assert t.min() >= 0 and t.max() <= 999


def test_no_timestep_bias_means_uniform_draws():
    assert timestep_weights(ObjectiveConfig()) is None  # strategy none
    assert timestep_weights(ObjectiveConfig(timestep_bias_strategy="later", timestep_bias_multiplier=1.0)) is None


@pytest.mark.parametrize("key, value", [("timestep_bias_multiplier", 0.0), ("timestep_bias_portion", 0.0), ("timestep_bias_portion", 1.5),
                                        ("timestep_bias_from_step", -1)])
def test_bad_timestep_bias_is_a_value_error_naming_the_key(key, value):
    from ldm.train.unet import UNetTrainConfig

    config = UNetTrainConfig(vae="some/vae")
    setattr(config.objective, key, value)
    with pytest.raises(ValueError, match=key):
        check_config(config)


class Recorder(torch.nn.Module):
    """A stand-in U-Net returning a fixed prediction and recording its inputs."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, z_t, t, encoder_hidden_states):
        self.z_t, self.t = z_t, t
        return type("Out", (), {"sample": self.prediction})()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_diffusion_loss_against_a_hand_computation(kind, weighting):
    obj = ObjectiveConfig(prediction_type=kind, loss_weighting=weighting, snr_gamma=5.0, offset_noise=0.1)
    ac = S.alphas_cumprod_from_betas(S.make_betas("scaled_linear"))
    draws = draw_randomness(0, 0, list(range(6)), p_uncond=0.0, num_train_timesteps=1000, latent_shape=(4, 4, 4))
    z0 = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    prediction = torch.zeros(6, 4, 4, 4)
    net = Recorder(prediction)
    loss = diffusion_loss(net, z0, torch.zeros(6, 3, 8), draws, ac, obj)
    a = ac[draws.timesteps].sqrt().float().view(6, 1, 1, 1)
    s = (1 - ac[draws.timesteps]).sqrt().float().view(6, 1, 1, 1)
    eps = draws.noise + 0.1 * draws.offset
    torch.testing.assert_close(net.z_t, a * z0 + s * eps)
    target = eps if kind == "epsilon" else a * eps - s * z0
    per_sample = (target**2).mean(dim=(1, 2, 3))
    if weighting == "min_snr":
        snr = (a**2 / s**2).flatten()
        per_sample = per_sample * (snr.clamp(max=5) / (snr if kind == "epsilon" else snr + 1))
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-5, atol=1e-6)
