"""How close is `ldm.budget`'s memory estimate to the real peak? Measures one U-Net call and one
VAE decode per case, each in a fresh process (peak RSS above the RSS before the call, on the CPU,
float32), next to the estimate without its margin (with the fixed RUNTIME term); prints a table
and the largest ratio, which `ldm.budget.MARGIN` must exceed.

    python scripts/bench_memory_estimate.py            # the default model's networks and SD 1.5's (random weights)
    python scripts/bench_memory_estimate.py --quick    # the default model's only (seconds)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "sample_size": 64,
}
SD15_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

CHILD = r"""
import json, resource, sys
import psutil, torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
kind, config, size, n, tiled = json.loads(sys.argv[1])
torch.manual_seed(0)
with torch.no_grad():
    if kind == "unet":
        model = UNet2DConditionModel.from_config(config).eval()
        model.set_attn_processor(AttnProcessor2_0())
        h = size // 8
        x = torch.randn(n, model.config.in_channels, h, h)
        c = torch.randn(n, 77, model.config.cross_attention_dim)
        before = psutil.Process().memory_info().rss
        model(x, 500, encoder_hidden_states=c)
    else:
        model = AutoencoderKL.from_config(config).eval()
        model.set_attn_processor(AttnProcessor2_0())
        f = 2 ** (len(model.config.block_out_channels) - 1)
        z = torch.randn(n, model.config.latent_channels, size // f, size // f)
        before = psutil.Process().memory_info().rss
        if tiled:
            torch.cat([model.tiled_decode(z[i:i + 1], return_dict=False)[0] for i in range(n)])
        else:
            model.decode(z, return_dict=False)[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(peak - before))
"""


def measure(kind: str, config: dict, size: int, n: int, tiled: bool = False) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([kind, config, size, n, tiled])],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from ldm.assets import asset_path
    from ldm.budget import MARGIN, RUNTIME, unet_call_bytes, vae_decode_bytes
    from ldm.models import read_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default model's networks only")
    args = parser.parse_args()
    default = asset_path("default-model")
    unet_cfg, vae_cfg = read_json(default / "unet" / "config.json"), read_json(default / "vae" / "config.json")
    cases = [
        ("default", "unet", unet_cfg, 64, 16, False),
        ("default", "unet", unet_cfg, 256, 8, False),
        ("default", "vae", vae_cfg, 256, 8, False),
        ("default", "vae", vae_cfg, 512, 1, False),
        ("default", "vae", vae_cfg, 512, 2, True),
    ]
    if not args.quick:
        cases += [
            ("SD 1.5", "unet", SD15_UNET, 512, 2, False),
            ("SD 1.5", "vae", SD15_VAE, 256, 1, False),
            ("SD 1.5", "vae", SD15_VAE, 512, 1, False),
        ]
    print(
        f"{'model':8} {'network':7} {'size':>5} {'rows':>4} {'tiled':>5} {'estimate':>10} {'measured':>10} {'ratio':>6}"
    )
    worst = 0.0
    for model, kind, config, size, n, tiled in cases:
        if kind == "unet":
            estimate = unet_call_bytes(config, size // 8, size // 8, n, 4) + RUNTIME
        else:
            estimate = vae_decode_bytes(config, size, size, n, 4, tiled) + RUNTIME
        measured = measure(kind, config, size, n, tiled)
        ratio = measured / estimate
        worst = max(worst, ratio)
        sizes = f"{estimate / 2**20:>8.0f}MB {measured / 2**20:>8.0f}MB"
        print(f"{model:8} {kind:7} {size:>5} {n:>4} {str(tiled):>5} {sizes} {ratio:>6.2f}")
    print(
        f"largest measured/estimated ratio {worst:.2f}; ldm.budget.MARGIN is {MARGIN} "
        f"({'covers it' if MARGIN >= worst else 'TOO SMALL: raise it'})"
    )


if __name__ == "__main__":
    main()
