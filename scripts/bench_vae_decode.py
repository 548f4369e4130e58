"""VAE decoding memory: whole vs tiled, for SD's VAE architecture (random weights) at growing sizes.

    python scripts/bench_vae_decode.py --sizes 512 1024 2048 [--device cuda] [--dtype fp16]

Each (size, mode) decodes one image in its own process, so its peak memory is its own (CPU: max
RSS; GPU: torch.cuda.max_memory_allocated). Tiled decoding is LatentPipeline's (diffusers'
tiled_decode with its blended overlaps, one image at a time), so seams are exactly diffusers';
the table also gives the mean and max |tiled − whole| in 0-255 pixels where both ran.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def sd_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                         scaling_factor=0.18215).eval()


def worker(size: int, tiled: bool, device: str, dtype: str, out: str) -> dict:
    import numpy as np
    import torch

    from ldm.pipeline import LatentPipeline

    vae = sd_vae().to(device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1)).to(device, vae.dtype)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        image = LatentPipeline._vae_decode(SimpleNamespace(vae=vae), z, tiled)  # the pipeline's decode path, VAE only
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(out, ((image.float().clamp(-1, 1) + 1) * 127.5).cpu().numpy().astype(np.float32))
    return {"size": size, "tiled": tiled, "seconds": seconds, "peak_mb": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--whole-up-to", type=int, default=1024, help="largest size also decoded whole (whole 2048 px needs tens of GB)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(**spec)))
        return 0
    import tempfile

    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            images = {}
            for tiled in ([False, True] if size <= args.whole_up_to else [True]):
                out = str(Path(tmp) / f"{size}-{tiled}.npy")
                spec = {"size": size, "tiled": tiled, "device": args.device, "dtype": args.dtype, "out": out}
                result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{size} px tiled={tiled} failed:\n{result.stderr[-2000:]}")
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                images[tiled] = np.load(out)
            if len(images) == 2:
                diff = np.abs(images[True] - images[False])
                rows[-1]["mean_abs_diff"], rows[-1]["max_abs_diff"] = float(diff.mean()), float(diff.max())
    print(f"{'size':>6}{'mode':>8}{'seconds':>10}{'peak MiB':>10}{'mean|Δ|':>9}{'max|Δ|':>8}")
    for r in rows:
        extra = f"{r['mean_abs_diff']:>9.2f}{r['max_abs_diff']:>8.1f}" if "mean_abs_diff" in r else ""
        print(f"{r['size']:>6}{'tiled' if r['tiled'] else 'whole':>8}{r['seconds']:>10.1f}{r['peak_mb']:>10.0f}{extra}")
    tiled = [r for r in rows if r["tiled"]]
    print(f"summary: tiled decoding peaks at {min(r['peak_mb'] for r in tiled):.0f}-{max(r['peak_mb'] for r in tiled):.0f} MiB "
          f"for {min(r['size'] for r in tiled)}-{max(r['size'] for r in tiled)} px on {args.device} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
