"""How strongly the VAE's latents carry the objects, per background colour of the shapes world.

    python scripts/probe_latent_contrast.py --vae runs/vae-shapes-f8/final --data runs/data/shapes-100k-v2

For single-object scenes of each background, encodes up to --num images and reports, in units of
the scaled latent (z = scaling_factor · posterior mean, the U-Net's x_0):

- contrast: the spatial standard deviation of z over the latent grid, as a norm over channels,
  averaged over images. This is the object's signal: what a denoiser must find under the noise.
- DC: the norm over channels of z's spatial mean (the background's offset from 0).
- posterior std: the encoder's mean σ (scaled like z).

At a given timestep the signal-to-noise ratio of the object is contrast² · ᾱ_t / (1 − ᾱ_t), so
a background with a third of another's contrast has its objects emerge at a ninth of the SNR,
later in sampling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="an AutoencoderKL folder, or a pipeline folder with vae/")
    p.add_argument("--data", required=True, help="a shapes dataset folder (ldm-shapes make)")
    p.add_argument("--num", type=int, default=48, help="images per background (default 48)")
    p.add_argument("--kind", default="single", help="caption kind to measure (default: single, one object per scene)")
    args = p.parse_args(argv)
    from ldm.train.unet import load_vae

    meta = Path(args.data) / "metadata.jsonl"
    if not meta.is_file():
        p.error(f"no metadata.jsonl in {args.data}")
    try:
        vae = load_vae(args.vae)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    scale = vae.config.scaling_factor
    groups: dict[str, list[str]] = {}
    with meta.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("kind") == args.kind and len(groups.setdefault(row["background"], [])) < args.num:
                groups[row["background"]].append(row["file_name"])
            if len(groups) == 3 and all(len(v) == args.num for v in groups.values()):  # white, gray, black: all full
                break
    print(f"{'background':<12}{'images':>8}{'contrast':>10}{'DC':>8}{'posterior std':>15}")
    for background, files in sorted(groups.items()):
        x = torch.stack([torch.from_numpy(np.array(Image.open(Path(args.data) / name).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                         for name in files])
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
        z = posterior.mean * scale
        contrast = z.std(dim=(2, 3)).pow(2).sum(1).sqrt().mean().item()
        dc = z.mean(dim=(2, 3)).pow(2).sum(1).sqrt().mean().item()
        print(f"{background:<12}{len(files):>8}{contrast:>10.2f}{dc:>8.2f}{(posterior.std * scale).mean().item():>15.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
