"""Tiny stage-2 set-ups for the ldm-train-unet tests: a random VAE folder, a 32 px shapes dataset,
and a config of a ~0.8M-parameter U-Net with a jointly trained 2-layer text encoder."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_CONFIG = {
    "model": {"block_out_channels": [32, 64], "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 4, "norm_num_groups": 16},
    "text_encoder": {"mode": "joint", "max_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
    "data": {"resolution": 32, "num_workers": 0},
    "optim": {"lr": 1e-3},
    "ema": {"enabled": True, "decay": 0.9},
    "run": {"batch_size": 4, "max_steps": 4, "checkpoint_every": 0, "sample_every": 0, "log_every": 1},
    "samples": {"prompts": ["a red circle", "two blue squares"], "steps": 2},
}


def make_vae_dir(path: Path, seed: int = 0) -> Path:
    """A tiny random AutoencoderKL (latent factor 8, scaling_factor 0.5) saved as a folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=32, scaling_factor=0.5)
    vae.save_pretrained(path, safe_serialization=True)
    return Path(path)


def make_shapes_data(path: Path, num: int = 16) -> Path:
    from ldm.data.shapes import write_dataset

    write_dataset(str(path), num, size=32, seed=0)
    return Path(path)


def write_config(path: Path, **sections) -> Path:
    """TINY_CONFIG with `sections` merged in one level deep (e.g. run={"max_steps": 2})."""
    config = {k: dict(v) for k, v in TINY_CONFIG.items()}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    Path(path).write_text(yaml.safe_dump(config))
    return Path(path)
