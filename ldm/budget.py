"""The memory a generation request needs, estimated from the configs before anything is built.

A `--height` of a million, or a batch that cannot fit, would otherwise allocate until torch fails
with a traceback (or the kernel kills the process). The estimate adds up what stays alive at the
peak of each phase, in the model's own dtype:

  weights       every parameter of the U-Net, VAE and text encoder (counted from the headers)
  U-Net call    the down path's skip connections, kept for the up path, plus the working tensors of
                the widest level (a ResNet block's few, or a transformer block's feed-forward, 4C
                wide and gated), for 2B rows (both halves of classifier-free guidance)
  VAE decode    the decoder's working tensors at its widest level, for the whole batch; with tiling,
                one tile's, plus the decoded tiles and the blended image diffusers keeps
  images        the decoded batch as float32, and its 8-bit copies

Attention is assumed to use a memory-efficient kernel (torch SDPA's flash/efficient paths, or
xformers), whose memory grows with the tokens rather than their square. Each term is multiplied
by `MARGIN`, measured by `scripts/bench_memory_estimate.py` so that the estimate stays above the
real peak (allocator slack, library temporaries); the table is in docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

MARGIN = 1.5  # on top of the sums below, which real peaks exceed by at most ~1.2 (scripts/bench_memory_estimate.py)
RUNTIME = 64 * 2**20  # what the first calls add whatever the size: kernels' scratch space, thread pools
MB = 2**20


@dataclass(frozen=True)
class Estimate:
    weights: int
    unet: int
    vae: int
    images: int

    @property
    def activations(self) -> int:
        """The peak while generating: the U-Net's and the decoder's phases do not overlap."""
        return max(self.unet, self.vae + self.images)

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def describe(self, with_weights: bool = True) -> str:
        parts = ([f"weights {_size(self.weights)}"] if with_weights else []) + [
            f"U-Net {_size(self.unet)}",
            f"VAE decode {_size(self.vae)}",
            f"images {_size(self.images)}",
        ]
        return ", ".join(parts)


def _size(n: float) -> str:
    return f"{n / 2**30:,.1f} GB" if n >= 2**30 else f"{n / MB:,.0f} MB"


def _ints(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_call_bytes(config: dict, latent_h: int, latent_w: int, rows: int, itemsize: int) -> int:
    """Peak activations of one U-Net call on `rows` latents of latent_h × latent_w (no gradients)."""
    channels = list(config.get("block_out_channels", [320, 640, 1280, 1280]))
    layers = _ints(config.get("layers_per_block", 2), len(channels))
    blocks = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * len(channels)))
    cells = [math.ceil(latent_h / 2**i) * math.ceil(latent_w / 2**i) for i in range(len(channels))]
    skips = sum((n + 1) * c * hw for n, c, hw in zip(layers, channels, cells))
    # a ResNet block of the up path sees its input and a skip concatenated (2C): norms, activations,
    # convolutions and the shortcut keep ~12C alive; a transformer block's gated feed-forward (8C,
    # then 4C and 4C) with the residual stream and the attention projections ~24C
    working = max(12 * c * hw for c, hw in zip(channels, cells))
    attention = max((24 * c * hw for c, hw, b in zip(channels, cells, blocks) if "Attn" in b), default=0)
    unfold = max(
        9 * 2 * c * hw for c, hw in zip(channels, cells)
    )  # a 3×3 convolution's im2col buffer, one row at a time
    return (rows * (skips + max(working, attention)) + unfold) * itemsize


def vae_decode_bytes(config: dict, height: int, width: int, images: int, itemsize: int, tiled: bool) -> int:
    """Peak activations of decoding `images` images of height × width, whole or in tiles."""
    channels = list(config.get("block_out_channels", [128, 256, 512, 512]))

    def decode(h: int, w: int, n: int) -> int:
        # the decoder's widest level, C_l channels at (h, w) / 2^l: ~5C per image alive in a ResNet
        # block, and one image's im2col buffer (9C) for its 3×3 convolutions
        widest = max(c * math.ceil(h / 2**i) * math.ceil(w / 2**i) for i, c in enumerate(channels))
        return (5 * n + 9) * widest * itemsize

    if not tiled:
        return decode(height, width, images)
    size = config.get("sample_size", 512) or 512
    tile = min(size[0] if isinstance(size, list) else int(size), max(height, width))
    kept = 4 * 3 * height * width * itemsize  # the decoded tiles (overlapping), the blended rows, the image
    return decode(tile, tile, 1) + images * kept


def estimate(
    unet_config,
    vae_config,
    height: int,
    width: int,
    batch: int,
    itemsize: int,
    vae_itemsize: int | None = None,
    tiled: bool = False,
    weights: int = 0,
) -> Estimate:
    """The memory a batch of `batch` images of height × width needs with these U-Net and VAE
    configs, the networks in `itemsize`-byte floats (the VAE in `vae_itemsize`); `weights` is the
    bytes of the weights themselves (0 once they are loaded: they are not available memory then)."""
    vae_itemsize = vae_itemsize or itemsize
    f = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    unet = unet_call_bytes(unet_config, math.ceil(height / f), math.ceil(width / f), 2 * batch, itemsize)
    vae = vae_decode_bytes(vae_config, height, width, batch, vae_itemsize, tiled)
    images = batch * 3 * height * width * (4 + 4 + 1)  # float32 in [0, 1], the float array, the uint8 copy
    return Estimate(weights, int(MARGIN * unet) + RUNTIME, int(MARGIN * vae) + RUNTIME, images)


def weights_bytes(info, itemsize: int, vae_itemsize: int | None = None) -> int:
    """The memory the weights of a checked pipeline folder (`ldm.models.PipelineInfo`) take once
    loaded in `itemsize`-byte floats, counted from the headers."""
    params = {
        c: sum(math.prod(shape) for _, shape in (part.weights or {}).values()) for c, part in info.components.items()
    }
    return (params.get("unet", 0) + params.get("text_encoder", 0)) * itemsize + params.get("vae", 0) * (
        vae_itemsize or itemsize
    )


def available_bytes(device) -> tuple[int, str]:
    """(bytes this process can still allocate on `device`, where that figure comes from)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {torch.cuda.get_device_name(device)}"
    import psutil

    available, source = psutil.virtual_memory().available, "RAM available"
    limit = _cgroup_room()
    if limit is not None and limit < available:
        available, source = limit, "left under this container's memory limit"
    return available, source


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers, Slurm jobs), or None if unlimited."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(int(limit) - int(f.read()), 0)
    except (OSError, ValueError):
        return None


def check_fits(need: Estimate, device, what: str, hint: str, include_weights: bool = True) -> None:
    """A ValueError with the estimate, what is available and `hint` (what to change) when `need`
    cannot fit on `device`. LDM_SKIP_MEMORY_CHECK=1 turns the check off, for when the estimate is
    wrong (please report it)."""
    if os.environ.get("LDM_SKIP_MEMORY_CHECK") == "1":
        return
    total = need.total if include_weights else need.activations
    available, source = available_bytes(device)
    if total > available:
        raise ValueError(
            f"{what} needs ~{_size(total)} of memory ({need.describe(include_weights)}), "
            f"but only {_size(available)} is {source}; {hint} (LDM_SKIP_MEMORY_CHECK=1 skips this check)"
        )
