"""The stage-1 losses: the LDM autoencoder recipe (Rombach et al. 2022, appendix G; the code's
`LPIPSWithDiscriminator`), itself the VQGAN recipe (Esser et al. 2021) with the codebook swapped
for a KL term.

    generator:      L_G = NLL(x, x̂; log σ²) + w_KL · KL(q(z|x) ‖ N(0, I)) + λ · w_D · L_adv(D(x̂))
    discriminator:  L_D = hinge(D(x), D(x̂))           (both only from `disc_start` on)

Conventions follow the LDM code so that its default weights (KL 1e-6, discriminator 0.5) mean the
same here: the NLL and the KL are summed over pixels / latent elements and averaged over the batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("ldm.train")


# ---- the discriminator ---------------------------------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, sec. 3.2.2; pix2pix's `NLayerDiscriminator` as taming-transformers
    uses it): strided 4×4 convolutions, so each output logit judges one overlapping patch (70×70
    pixels with 3 layers) as real or fake, which penalises texture and edge blur, not layout.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last block keeps the resolution (pix2pix)
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))  # (B, 1, h, w): one logit per patch
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016), as pix2pix and taming use it."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---- the loss terms, each a few lines ----------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator (Lim & Ye 2017, eq. 9; taming's `hinge_d_loss`):
    ½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge game (Lim & Ye 2017, eq. 10): −E[D(x̂)]."""
    return -logits_fake.mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) of the diagonal Gaussian posterior (Kingma & Welling 2014, appendix B):
    ½ Σ (μ² + σ² − 1 − log σ²), summed over latent elements and averaged over the batch (as LDM)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


def nll_loss(rec_loss: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood with one learned log-scale (LDM's `LPIPSWithDiscriminator`):
    Σ rec / e^s + s per pixel, summed over pixels and averaged over the batch. For an L1 error this
    is a Laplace likelihood up to constants; the learned s balances it against the KL term."""
    return (rec_loss / logvar.exp() + logvar).flatten(1).sum(1).mean()


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + 1e-4), clamped to [0, max_weight] and detached
    (Esser et al. 2021, eq. 7): G_L is the decoder's last layer, so the adversarial gradient
    arriving there is scaled to the size of the reconstruction gradient whatever the loss scales.
    """
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ---- LPIPS (optional: only from local weights, never downloaded) ---------------------------------------


# VGG16's `features` (Simonyan & Zisserman 2015) up to relu5_3, cut into LPIPS's five slices; the
# module indices are torchvision's, so the `lpips` package's state-dict keys load unchanged.
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018, eq. 1): d(x, y) = Σ_l mean_hw ‖w_l ⊙ (φ̂_l(x) − φ̂_l(y))‖², with
    φ̂_l the unit-normalised (over channels) VGG16 activations at relu1_2 … relu5_3 and w_l learned.

    Built here, without torchvision, so that LPIPS costs no dependency. The weights are one
    safetensors file with the state-dict keys of the `lpips` package's `LPIPS(net="vgg")`
    (`net.sliceK.N.weight/bias`, `linK.model.1.weight`); see docs/train-vae.md for how to make it.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        features: list[nn.Module] = []
        channels = 3
        for v in _VGG_CFG:
            if v == "M":
                features.append(nn.MaxPool2d(2, 2))
            else:
                features += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
                channels = v
        self.net = nn.Module()
        for k, (a, b) in enumerate(_VGG_SLICES, start=1):
            block = nn.Sequential()
            for i in range(a, b):
                block.add_module(str(i), features[i])
            setattr(self.net, f"slice{k}", block)
        for k, c in enumerate(_LPIPS_CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found: {path}")
        if path.suffix != ".safetensors":
            raise ValueError(f"LPIPS weights must be a .safetensors file (no pickles), got {path}")
        model = cls()
        state = load_file(str(path))
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in state and k not in ("shift", "scale")]
        if missing:
            raise ValueError(f"{path}: not LPIPS-VGG weights; missing {', '.join(missing[:3])}")
        model.load_state_dict({k: state.get(k, v) for k, v in wanted.items()})
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [−1, 1] → (B, 1, 1, 1) distances."""
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for k in range(5):
            block = getattr(self.net, f"slice{k + 1}")
            hx, hy = block(hx), block(hy)
            fx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((fx - fy) ** 2).mean((2, 3), keepdim=True)
        return total


# ---- the whole loss -------------------------------------------------------------------------------------


class AutoencoderLoss(nn.Module):
    """The generator and discriminator losses of the LDM autoencoder, with their state: the learned
    log-variance `logvar` (trained with the autoencoder) and the PatchGAN `discriminator` (trained
    by its own optimizer)."""

    def __init__(
        self,
        *,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        lpips: LPIPS | None = None,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        disc_channels: int = 64,
        disc_layers: int = 3,
        logvar_init: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        self.kl_weight, self.perceptual_weight, self.disc_weight, self.disc_start = kl_weight, perceptual_weight, disc_weight, disc_start
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        # In a tuple, the frozen LPIPS network stays out of state_dict: checkpoints need not carry
        # 58 MB of fixed weights, and a run resumes with or without them.
        self._lpips = (lpips,)
        self.discriminator = NLayerDiscriminator(in_channels, disc_channels, disc_layers)

    def gan_active(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def generator_loss(self, x, x_rec, mean, logvar_z, step: int, last_layer=None, discriminator=None):
        """L_G for a batch; returns (loss, logs). `discriminator` defaults to `self.discriminator`
        (the training loop passes the bare module, outside DDP, since this pass must not train it)."""
        rec_loss = (x - x_rec).abs()  # L1 per pixel, (B, C, H, W)
        lpips = self._lpips[0]
        if lpips is not None and self.perceptual_weight > 0:
            rec_loss = rec_loss + self.perceptual_weight * lpips(x.float(), x_rec.float())  # (B, 1, 1, 1) broadcast
        nll = nll_loss(rec_loss, self.logvar)
        kl = kl_loss(mean, logvar_z)
        loss = nll + self.kl_weight * kl
        logs = {"loss/rec": rec_loss.mean().detach(), "loss/nll": nll.detach(), "loss/kl": kl.detach(), "logvar": self.logvar.detach()}
        if self.gan_active(step):
            discriminator = discriminator or self.discriminator
            discriminator.requires_grad_(False)  # this pass trains the autoencoder only
            g_loss = hinge_g_loss(discriminator(x_rec))
            discriminator.requires_grad_(True)
            d_weight = adaptive_weight(nll, g_loss, last_layer) * self.disc_weight
            loss = loss + d_weight * g_loss
            logs.update({"loss/g": g_loss.detach(), "d_weight": d_weight})
        logs["loss/total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x, x_rec, discriminator=None):
        """L_D on real images and (detached) reconstructions; returns (loss, logs)."""
        discriminator = discriminator or self.discriminator
        logits_real, logits_fake = discriminator(x.detach()), discriminator(x_rec.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"loss/d": loss.detach(), "logits/real": logits_real.mean().detach(), "logits/fake": logits_fake.mean().detach()}
