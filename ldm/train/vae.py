"""Stage 1: train the KL-regularised autoencoder (`ldm-train-vae`).

The model is diffusers' `AutoencoderKL`, built from a preset (`configs/vae/*.yaml`) or loaded from
an existing AutoencoderKL folder to fine-tune; the losses are LDM's (see `ldm.train.vae_losses`).
One optimizer update, in order:

    for each of grad_accum micro-batches x:
        x̂, μ, log σ² = D(z), z ~ q(z|x) = N(μ, σ²)
        autoencoder: NLL(x, x̂) + w_KL·KL + λ·w_D·(−D(x̂))      (GAN term from loss.disc_start on)
        discriminator: hinge(D(x), D(x̂.detach()))              (from loss.disc_start on)
    step both optimizers, the LR schedule and the EMA; log, validate, checkpoint

At the end the latents' scale is measured and stored as `scaling_factor` in the VAE config, and
OUTPUT/final/ is written as an AutoencoderKL folder (safetensors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.config import DataConfig, EMAConfig, OptimConfig, RunConfig, check_shared_sections, save_config
from ldm.models import load_component
from ldm.text import LdmWarning
from ldm.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, step_dir
from ldm.train.guards import StepGuard
from ldm.train.common import (
    DataPosition, MetricsLog, check_optim, check_run_paths, fit_attention_to_precision, make_accelerator, make_ema, make_loader, make_lr_scheduler, make_optimizer,
    progress_bar, save_grid, seed_everything,
)
from ldm.train.metrics import psnr, ssim
from ldm.train.vae_losses import LPIPS, AutoencoderLoss

log = logging.getLogger("ldm.train")


# ---- config ----------------------------------------------------------------------------------------


@dataclass
class VAEModelConfig:
    """The autoencoder: a preset architecture, or `pretrained` (an AutoencoderKL folder) to fine-tune.

    One encoder/decoder block per entry of `block_out_channels`; every block but the last halves
    the resolution, so the downsampling factor is f = 2^(len − 1) (8 for SD's four blocks).
    """

    pretrained: str | None = None  # an AutoencoderKL folder (safetensors); the fields below are then ignored
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True


@dataclass
class VAELossConfig:
    """Weights of the LDM autoencoder loss (see `ldm.train.vae_losses`)."""

    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0  # LPIPS weight; used only when lpips_path is given
    lpips_path: str | None = None  # local LPIPS-VGG .safetensors (see docs/train-vae.md); None: L1 only
    disc_weight: float = 0.5  # 0 turns the GAN off
    disc_start: int = 50001  # optimizer step at which the discriminator and its loss begin
    disc_channels: int = 64
    disc_layers: int = 3
    logvar_init: float = 0.0


@dataclass
class VAETrainConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4.5e-6, betas=(0.5, 0.9), max_grad_norm=None))
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/vae"))
    validate_every: int = 500  # optimizer steps between validation passes (PSNR, SSIM); 0: only at the end
    scale_samples: int = 512  # images encoded at the end to measure the latents' std


def check_config(cfg: VAETrainConfig) -> None:
    """Reject settings that cannot work, before anything is built: one ValueError naming the key."""
    m, r = cfg.model, cfg.run
    if cfg.data.path is None:
        raise ValueError("no training data: pass --data PATH or set data.path")
    if m.pretrained is None:
        if not m.block_out_channels:
            raise ValueError("model.block_out_channels must name at least one block")
        for c in m.block_out_channels:
            if c < 1 or c % m.norm_num_groups:
                raise ValueError(f"model.block_out_channels: {c} is not a positive multiple of model.norm_num_groups ({m.norm_num_groups})")
        factor = 2 ** (len(m.block_out_channels) - 1)
        if cfg.data.resolution % factor:
            raise ValueError(f"data.resolution {cfg.data.resolution} is not a multiple of the downsampling factor {factor}")
        if m.latent_channels < 1 or m.layers_per_block < 1:
            raise ValueError("model.latent_channels and model.layers_per_block must be at least 1")
    for key in ("kl_weight", "perceptual_weight", "disc_weight"):
        if getattr(cfg.loss, key) < 0:
            raise ValueError(f"loss.{key} must be non-negative, got {getattr(cfg.loss, key)}")
    check_shared_sections(cfg.data, cfg.optim, cfg.ema, r)
    for key, value in (("validate_every", cfg.validate_every), ("loss.disc_start", cfg.loss.disc_start)):
        if value < 0:
            raise ValueError(f"{key} must be non-negative, got {value}")
    if cfg.validate_every and cfg.data.validation_path is None:
        warnings.warn(f"validate_every={cfg.validate_every} but data.validation_path is not set, so no validation pass "
                      "will run; set data.validation_path to held-out images (or validate_every=0)",
                      LdmWarning, stacklevel=2)
    if cfg.scale_samples < 1:
        raise ValueError(f"scale_samples must be at least 1, got {cfg.scale_samples}")
    check_optim(cfg.optim)


# ---- model -------------------------------------------------------------------------------------------


def build_vae(model: VAEModelConfig, resolution: int):
    """An AutoencoderKL from the preset fields, or loaded from `model.pretrained` (safetensors only)."""
    from diffusers import AutoencoderKL

    if model.pretrained is not None:
        folder = Path(model.pretrained)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.pretrained: no AutoencoderKL folder (config.json) at {folder}")
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"model.pretrained: {folder} has no .safetensors weights (pickled weights are not loaded)")
        return load_component(folder, "vae", "AutoencoderKL")
    n = len(model.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(model.block_out_channels), layers_per_block=model.layers_per_block,
        latent_channels=model.latent_channels, norm_num_groups=model.norm_num_groups,
        mid_block_add_attention=model.mid_block_add_attention, sample_size=resolution,
    )


class Reconstruct(nn.Module):
    """x → (x̂, μ, log σ²): encoder, a posterior sample, decoder, as one forward call, so that
    DistributedDataParallel sees (and synchronises) the whole autoencoder."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator):
        posterior = self.vae.encode(x).latent_dist  # μ, log σ²: (B, C_z, H/f, W/f)
        z = posterior.sample(generator=generator)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar, z


def step_generator(seed: int, step: int, rank: int, micro: int, device) -> torch.Generator:
    """The posterior noise of one micro-batch, from its coordinates alone: a resumed run draws the
    same noise as an uninterrupted one, however many random numbers anything else consumed."""
    entropy = np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(entropy) % 2**63)


# ---- the loop ------------------------------------------------------------------------------------------


def train(cfg: VAETrainConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Train an AutoencoderKL as `cfg` says; returns OUTPUT/final (an AutoencoderKL folder).

    `resume`: "latest" (the newest complete checkpoint in run.output_dir, or a fresh start if there
    is none) or a checkpoint folder. Multi-process under `accelerate launch`.
    """
    from ldm.data import open_dataset

    check_config(cfg)
    run, out = cfg.run, Path(cfg.run.output_dir)
    if cfg.data.path is None:
        raise ValueError("no training data: pass --data PATH or set data.path in the config")
    check_run_paths({"data.path": cfg.data.path, "data.validation_path": cfg.data.validation_path}, run.output_dir,
                    {"model.pretrained": cfg.model.pretrained})
    resume_from = resolve_resume(resume, out)  # checked before anything starts
    accelerator = make_accelerator(run)
    device, rank, is_main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    seed_everything(run.seed, rank)

    # Data: a seeded permutation per epoch, split across processes, resumable mid-epoch.
    dataset = open_dataset(cfg.data.path, resolution=cfg.data.resolution, crop=cfg.data.crop,
                           random_flip=cfg.data.random_flip, seed=run.seed)
    data = DataPosition(make_loader(dataset, run.batch_size, run.seed, rank, accelerator.num_processes, cfg.data.num_workers))
    val_images = _validation_images(cfg) if is_main else None  # (N, 3, R, R), fixed for the run

    # Models, losses, optimizers. The learned log-variance trains with the autoencoder.
    vae = build_vae(cfg.model, cfg.data.resolution)
    fit_attention_to_precision(vae, accelerator)  # bf16 on the CPU: float32 attention cores (its backward is 10× faster)
    if run.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    lpips = _load_lpips(cfg.loss, device)
    loss_fn = AutoencoderLoss(kl_weight=cfg.loss.kl_weight, perceptual_weight=cfg.loss.perceptual_weight, lpips=lpips,
                              disc_weight=cfg.loss.disc_weight, disc_start=cfg.loss.disc_start,
                              disc_channels=cfg.loss.disc_channels, disc_layers=cfg.loss.disc_layers,
                              logvar_init=cfg.loss.logvar_init).to(device)
    g_params = list(vae.parameters()) + [loss_fn.logvar]
    g_opt = make_optimizer(g_params, cfg.optim)
    d_opt = make_optimizer(loss_fn.discriminator.parameters(), cfg.optim)
    g_sched = make_lr_scheduler(g_opt, cfg.optim, run.max_steps)
    # The discriminator's schedule counts its own updates: its warm-up starts when it does.
    d_sched = make_lr_scheduler(d_opt, cfg.optim, max(1, run.max_steps - cfg.loss.disc_start))
    ema = make_ema(vae.parameters(), cfg.ema, foreach=device.type == "cuda")
    model, disc, g_opt, d_opt = accelerator.prepare(Reconstruct(vae), loss_fn.discriminator, g_opt, d_opt)
    if ema is not None:
        ema.to(device)
    last_layer = vae.decoder.conv_out.weight  # G_L of the adaptive weight (Esser et al. 2021, eq. 7)

    # signals stop the run after a step with a checkpoint; non-finite updates are skipped (ldm.train.guards)
    guard = StepGuard(accelerator, max_bad_steps=run.max_bad_steps)
    step = 0
    ckpt = dict(models={"vae": vae, "loss": loss_fn}, optimizers={"vae": g_opt, "disc": d_opt},
                schedulers={"vae": g_sched, "disc": d_sched}, emas={"vae": ema} if ema is not None else {},
                scaler=accelerator.scaler, accelerator=accelerator)
    if resume_from is not None:
        state = load_checkpoint(resume_from, **ckpt)
        step = state["step"]
        data.load(state["data"])
        guard.load(state.get("guard", {}))
        guard.last_good_checkpoint = resume_from
        log.info("resumed from %s at step %d", resume_from, step)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    metrics = MetricsLog(out, enabled=is_main)
    if is_main and lpips is None and cfg.loss.perceptual_weight > 0:
        log.warning("no LPIPS weights (loss.lpips_path): the reconstruction loss is L1 only")

    def save(step_now: int) -> Path:
        folder = save_checkpoint(out, step_now, **ckpt, state={"data": data.state(), "guard": guard.state()}, keep_last=run.keep_last, protect=resume_from)
        guard.last_good_checkpoint = folder
        return folder

    batches = data.batches()
    bar = progress_bar(run.max_steps, step, is_main and progress)
    scores = None  # the latest validation
    images_seen, t0 = 0, time.perf_counter()
    with guard, bar, contextlib.closing(batches):  # the bar closes however the loop ends, before any one-line message
        while step < run.max_steps:
            gan = loss_fn.gan_active(step)
            g_losses, d_losses = [], []
            for micro in range(run.grad_accum):
                x = next(batches)["pixel_values"].to(device)  # (B, 3, R, R) in [-1, 1]
                with accelerator.accumulate(model, disc):
                    # Autoencoder update. Autocast is explicit because the GAN term calls the bare
                    # discriminator (outside DDP: this pass must not train or synchronise it).
                    with accelerator.autocast():
                        x_rec, mean, logvar, z = model(x, step_generator(run.seed, step, rank, micro, device))
                        g_loss, logs = loss_fn.generator_loss(x, x_rec.float(), mean.float(), logvar.float(), step, last_layer)
                    accelerator.backward(g_loss)
                    g_losses.append(g_loss.detach())
                    if accelerator.sync_gradients:
                        if accelerator.num_processes > 1:  # logvar lives outside DDP: average its gradient by hand
                            loss_fn.logvar.grad = accelerator.reduce(loss_fn.logvar.grad, "mean")
                        # a non-finite loss or gradient on any process skips this update on every process
                        if guard.check(g_losses, g_params):
                            logs["grad_norm"] = accelerator.clip_grad_norm_(g_params, cfg.optim.max_grad_norm or math.inf)
                            g_opt.step()
                    g_opt.zero_grad(set_to_none=True)

                    # Discriminator update on the same reconstructions, detached (LDM's optimizer_idx 1).
                    if gan:
                        with accelerator.autocast():
                            d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec, disc)
                        accelerator.backward(d_loss)
                        d_losses.append(d_loss.detach())
                        if accelerator.sync_gradients and guard.check(d_losses, disc.parameters()):  # checked even after a bad G
                            d_logs["grad_norm_disc"] = accelerator.clip_grad_norm_(disc.parameters(), cfg.optim.max_grad_norm or math.inf)
                            d_opt.step()
                        d_opt.zero_grad(set_to_none=True)
                        logs.update(d_logs)
                images_seen += x.shape[0] * accelerator.num_processes
            lr = g_sched.get_last_lr()[0]  # the LR this update used
            if guard.end_step(step):  # False: the update was skipped, so the schedules and EMA stay too
                g_sched.step()
                if gan:
                    d_sched.step()
                if ema is not None:
                    ema.step(vae.parameters())
            step += 1

            # Logging, pictures, validation, checkpoints.
            if is_main:
                rate = images_seen / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss/rec'].item():.4f}", img_s=f"{rate:.1f}")
                if run.log_every and step % run.log_every == 0:
                    z = z.detach().float()
                    metrics.log(step, {**{k: v.item() if torch.is_tensor(v) else v for k, v in logs.items()},
                                       "lr": lr, "latent/mean": z.mean().item(), "latent/std": z.std().item(),
                                       "images_per_s": rate, "bad_steps": guard.bad_total})
                if run.sample_every and step % run.sample_every == 0:
                    _save_reconstructions(vae, ema, val_images if val_images is not None else x[:8], out / "samples" / f"step-{step:07d}.png")
                if val_images is not None and cfg.validate_every and step % cfg.validate_every == 0:
                    scores = _validate(vae, ema, val_images, run.batch_size)
                    metrics.log(step, scores)
                    scores["step"] = step
                    bar.write(f"step {step}: PSNR {scores['val/psnr']:.2f} dB, SSIM {scores['val/ssim']:.4f}")
            if step == run.max_steps or (run.checkpoint_every and step % run.checkpoint_every == 0):
                save(step)
            if guard.stop_requested and step < run.max_steps:  # agreed on by every process in guard.check
                folder = step_dir(out, step) if run.checkpoint_every and step % run.checkpoint_every == 0 else save(step)
                metrics.close()
                raise guard.preempted(step, folder)

    # The end: validation, the latents' scale, and the AutoencoderKL folder.
    final = out / "final"
    if is_main:
        if val_images is not None:
            if scores is None or scores["step"] != step:
                scores = _validate(vae, ema, val_images, run.batch_size)
                metrics.log(step, scores)
                scores["step"] = step
            (out / "validation.json").write_text(json.dumps(scores, indent=1) + "\n")
            log.info("final validation: PSNR %.2f dB, SSIM %.4f", scores["val/psnr"], scores["val/ssim"])
        with _ema_weights(vae, ema):
            scale = latent_scaling_factor(vae, dataset, cfg.scale_samples, run.batch_size, run.seed)
            if cfg.model.pretrained is not None:
                warn_if_scale_moved(vae.config.scaling_factor, scale)
            vae.register_to_config(scaling_factor=scale)
            vae.save_pretrained(final, safe_serialization=True)
        metrics.log(step, {"scaling_factor": scale})
        log.info("scaling_factor %.5f; wrote %s", scale, final)
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


# ---- the pieces the loop calls ---------------------------------------------------------------------


def _load_lpips(loss, device):
    if loss.lpips_path is None or loss.perceptual_weight == 0:
        return None
    return LPIPS.from_file(loss.lpips_path).to(device)


def _validation_images(cfg: VAETrainConfig) -> torch.Tensor | None:
    """The first `data.validation_samples` held-out images, center-cropped: the same every pass."""
    if cfg.data.validation_path is None:
        return None
    from ldm.data import open_dataset

    ds = open_dataset(cfg.data.validation_path, resolution=cfg.data.resolution, crop="center", random_flip=False, seed=0)
    n = min(len(ds), cfg.data.validation_samples)
    return torch.stack([ds[i]["pixel_values"] for i in range(n)])


class _ema_weights:
    """Within the block the model holds its EMA weights (if any), then its own again."""

    def __init__(self, vae, ema):
        self.vae, self.ema = vae, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.vae.parameters())
            self.ema.copy_to(self.vae.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.vae.parameters())


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Deterministic reconstructions (the posterior mean, no sampling) in [-1, 1]."""
    device, dtype = vae.device, vae.dtype
    was_training = vae.training
    vae.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device, dtype)
        outs.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1).cpu())
    vae.train(was_training)
    return torch.cat(outs)


def _validate(vae, ema, images: torch.Tensor, batch_size: int) -> dict:
    """PSNR and SSIM of reconstructions of the held-out images, on [0, 1] pixels, averaged over images."""
    with _ema_weights(vae, ema):
        rec = reconstruct(vae, images, batch_size)
    x, y = (images.float() + 1) / 2, (rec + 1) / 2
    return {"val/psnr": psnr(x, y).mean().item(), "val/ssim": ssim(x, y).mean().item()}


def _save_reconstructions(vae, ema, images: torch.Tensor, path: Path) -> None:
    """A grid: originals in odd rows, their reconstructions below them."""
    images = images[:8]
    with _ema_weights(vae, ema):
        rec = reconstruct(vae, images, len(images))
    save_grid(torch.cat([images.float().cpu(), rec]), path, nrow=len(images))


def warn_if_scale_moved(before: float, after: float, factor: float = 2.0) -> None:
    """Warn when fine-tuning moved the latents' scale by more than `factor` either way: a stage-2
    U-Net trained on the old latents no longer fits them (nor does anything cached from them)."""
    ratio = after / before
    if not 1 / factor <= ratio <= factor:
        warnings.warn(f"scaling_factor moved from {before:.5g} (model.pretrained) to {after:.5g} (x{ratio:.3g}): the "
                      "latents' spread changed that much, so a U-Net trained on the old VAE's latents will not "
                      "fit this one; retrain stage 2, or lower optim.lr / raise loss.kl_weight if this was meant "
                      "as a light fine-tune", LdmWarning, stacklevel=2)


@torch.no_grad()
def latent_scaling_factor(vae, dataset, num_samples: int, batch_size: int, seed: int) -> float:
    """1 / std of the latents z ~ q(z|x) over `num_samples` images (Rombach et al. 2022, sec. 4.3.2
    and appendix G: the "rescaling" that gives the diffusion model unit-variance inputs)."""
    was_training = vae.training
    vae.eval()
    n = min(num_samples, len(dataset))
    generator = torch.Generator(device=vae.device).manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, n, batch_size):
        x = torch.stack([dataset[j]["pixel_values"] for j in range(i, min(n, i + batch_size))]).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.sample(generator=generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    vae.train(was_training)
    var = total_sq / count - (total / count) ** 2
    return float(1.0 / math.sqrt(var))
