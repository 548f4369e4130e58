"""Sampling speed: ldm's LatentPipeline against diffusers' StableDiffusionPipeline, side by side.

Both load the same folder and run the same scheduler (dpm++2m), steps, CFG and per-image seeds in
one process; runs alternate (ours, theirs, ours, ...) so drift in the machine's speed hits both,
and the median of the timed runs is reported after one untimed warm-up each. Every case also
reports the largest pixel difference between the two pipelines' images (0-255 scale).

    python scripts/bench_sampling.py --case cpu      # the embedded default model on the CPU
    python scripts/bench_sampling.py --case gpu      # SD 1.5's architecture, random weights, 512 px, fp16
    python scripts/bench_sampling.py --case gpu --compile   # ... with torch.compile + CUDA graphs
    python scripts/bench_sampling.py --case gpu --device cpu --dtype bf16 --size 64 --steps 2 --repeats 1   # dry run, 40 s

Cases
  cpu: batch 1 (one prompt), and a list of 16 prompts. Ours takes the list in one call (the 16
       prompts batched, both guidance halves in one U-Net call); diffusers is timed both ways a
       user would call it: the list in one call, and one call per prompt (a loop).
  gpu: batch 1 and batch 8 in half precision; diffusers' default fp16 pipeline vs ours with SDPA,
       channels-last and fused QKV projections (and --compile). Guided steps/s = steps / seconds
       per image at batch 1.
--dtype bf16 (cpu case) runs both pipelines in bfloat16, fast on CPUs with AMX or AVX512-BF16,
and also reports how far our bf16 images are from our fp32 ones (same seeds).
Every row also gives the U-Net's achieved TFLOP/s (its FLOPs per image, counted by torch's
FlopCounterMode, times images/s), and a last line compares them with the best rate of one large
matrix product on the device. It is a reference, not a hard ceiling (small compiled kernels that
stay in cache can beat it), but a network that already runs near it has little room left for an
exact speed-up, one that keeps the arithmetic (and so the images) as they are.
Prints a table and a one-line summary; --json PATH writes the rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_16 = [
    "a red circle", "a blue square to the left of a green triangle", "three yellow circles", "a large purple triangle",
    "an orange square above a small blue circle", "two green triangles on a white background", "a small red square",
    "a yellow triangle and a purple circle", "four blue circles", "a large green circle below a red triangle",
    "an orange circle on a black background", "two purple squares", "a blue triangle to the right of a yellow square",
    "a small green square and an orange triangle", "three red triangles on a gray background", "a large blue square",
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def build_sd15_random(folder: Path, size: int) -> Path:
    """SD 1.5's architecture (U-Net 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M) with random
    weights, saved in float16 in the diffusers layout: speed does not depend on the weights."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm import LatentPipeline
    from ldm.assets import asset_path
    from ldm.config import load_config
    from ldm.train.unet import UNetTrainConfig, build_unet

    torch.manual_seed(0)
    config = load_config(UNetTrainConfig, ROOT / "configs" / "unet" / "sd15.yaml")
    unet = build_unet(config.model, latent_channels=4, cross_attention_dim=768, sample_size=size // 8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    clip = asset_path("clip-tokenizer")
    tokenizer = CLIPTokenizer(vocab=str(clip / "vocab.json"), merges=str(clip / "merges.txt"), model_max_length=77)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                              steps_offset=1, clip_sample=False)
    pipe = LatentPipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval(), scheduler)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(torch.float16)
    return pipe.save_pretrained(folder)


def load_both(folder: Path, device: str, dtype: torch.dtype, levers: dict):
    from diffusers import StableDiffusionPipeline

    from ldm import LatentPipeline
    from ldm.sampling import make_scheduler

    ours = LatentPipeline.from_pretrained(folder, device=device, dtype=dtype).optimize(**levers)
    theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = make_scheduler("dpm++2m", ours.scheduler.config)  # the same scheduler as ours
    return ours, theirs


def unet_flops_per_image(pipe, size: int, steps: int) -> float:
    """U-Net FLOPs to sample one image: `steps` guided steps, each the U-Net on 2 latents (the
    conditional and unconditional halves) and the pipeline's text length, counted by torch's
    FlopCounterMode on the eager U-Net."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # a compiled module's eager original
    p = next(unet.parameters())
    h = size // pipe.latent_factor
    x = torch.zeros(2, unet.config.in_channels, h, h, device=p.device, dtype=p.dtype)
    c = torch.zeros(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500, 500], device=p.device), c)
    return counter.get_total_flops() * steps


def matmul_peak_tflops(device: str, dtype: torch.dtype) -> float:
    """The best TFLOP/s of one large square matrix product on this device and dtype: the practical
    ceiling for a network whose time is mostly convolutions and matrix products."""
    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(6):
        t, _ = timed(lambda: a @ b, device)
        best = min(best, t)
    return 2 * n**3 / best / 1e12


def run_case(name: str, ours, theirs, prompts: list[str], *, steps: int, cfg: float, repeats: int, device: str,
             size: int, loop: bool = False, reference=None) -> dict:
    """Time ours (one call for all prompts) and theirs (one call, or one call per prompt if loop).
    `reference`: a float32 LatentPipeline of the same model; the row then also says how far ours
    (in a lower precision) is from it."""
    from ldm.guidance import default_guidance_rescale

    seeds = list(range(len(prompts)))
    rescale = default_guidance_rescale(ours.scheduler.config)  # ours applies it by default; diffusers is told the same

    def run_ours(pipe=ours):
        return pipe(prompts, seed=seeds, guidance_scale=cfg, num_inference_steps=steps, sampler="dpm++2m",
                    height=size, width=size, output_type="np", progress=False).images

    def run_theirs():
        if loop:
            return np.concatenate([theirs(p, generator=torch.Generator().manual_seed(s), guidance_scale=cfg, guidance_rescale=rescale, num_inference_steps=steps,
                                          height=size, width=size, output_type="np").images for p, s in zip(prompts, seeds)])
        return theirs(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], guidance_scale=cfg, guidance_rescale=rescale,
                      num_inference_steps=steps, height=size, width=size, output_type="np").images

    _, a = timed(run_ours, device)  # warm-up (and compilation, with --compile)
    _, b = timed(run_theirs, device)
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(timed(run_ours, device)[0])
        t_theirs.append(timed(run_theirs, device)[0])
    n = len(prompts)
    ours_ips, theirs_ips = n / statistics.median(t_ours), n / statistics.median(t_theirs)
    row = {
        "case": name, "images": n, "steps": steps, "cfg": cfg, "size": size,
        "ours_img_s": ours_ips, "diffusers_img_s": theirs_ips, "ratio": ours_ips / theirs_ips,
        "max_pixel_diff": float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() * 255),
        "ours_s": t_ours, "diffusers_s": t_theirs,
    }
    if n == 1:
        row["ours_steps_s"], row["diffusers_steps_s"] = steps * ours_ips, steps * theirs_ips
    if reference is not None:
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(run_ours(reference), np.float64)) * 255
        row["max_pixel_diff_vs_fp32"], row["mean_pixel_diff_vs_fp32"] = float(diff.max()), float(diff.mean())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--device", help="default: cpu for the cpu case, cuda for the gpu case")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline per case (after one warm-up)")
    p.add_argument("--size", type=int, help="image size (default: 64 for cpu, 512 for gpu)")
    p.add_argument("--model", help="cpu case: a pipeline folder (default: the embedded default model)")
    p.add_argument("--compile", action="store_true", help="torch.compile ours (CUDA graphs on a GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels-last layout for ours (always on in the gpu case)")
    p.add_argument("--fuse-qkv", action="store_true", help="fused QKV projections for ours (always on in the gpu case)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="cpu case: both pipelines in this dtype; with bf16 the rows also give ours' largest pixel difference from ours in fp32")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import __version__ as diffusers_version

    from ldm.pipeline import DEFAULT_MODEL

    rows = []
    if args.case == "cpu":
        device, size = args.device or "cpu", args.size or 64
        levers = dict(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        folder = Path(args.model or DEFAULT_MODEL)
        ours, theirs = load_both(folder, device, dtype, levers)
        common = dict(steps=args.steps, cfg=args.cfg, repeats=args.repeats, device=device, size=size)
        if dtype != torch.float32:  # what the lower precision costs: ours against ours in fp32, same seeds
            from ldm import LatentPipeline

            common["reference"] = LatentPipeline.from_pretrained(folder, device=device, dtype=torch.float32)
        tag = "" if args.dtype == "fp32" else f" {args.dtype}"
        rows.append(run_case(f"cpu{tag} batch 1", ours, theirs, PROMPTS_16[:1], **common))
        rows.append(run_case(f"cpu{tag} 16 prompts vs diffusers list", ours, theirs, PROMPTS_16, **common))
        rows.append(run_case(f"cpu{tag} 16 prompts vs diffusers loop", ours, theirs, PROMPTS_16, loop=True, **common))
    else:
        device, size = args.device or "cuda", args.size or 512
        # fp16 on a GPU; `--device cpu --dtype bf16 --size 64 --steps 2` is a quick dry run of this
        # case's code on a machine without one (fp16 is refused on the CPU)
        dtype = torch.float16 if device.startswith("cuda") else {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_sd15_random(Path(tmp) / "sd15-random", size)
            levers = dict(channels_last=True, fuse_qkv=True, compile=args.compile)
            ours, theirs = load_both(folder, device, dtype, levers)
            common = dict(steps=args.steps, cfg=args.cfg, repeats=args.repeats, device=device, size=size)
            tag = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
            rows.append(run_case(f"gpu sd1.5 {size}px {tag} batch 1", ours, theirs, PROMPTS_16[:1], **common))
            rows.append(run_case(f"gpu sd1.5 {size}px {tag} batch 8", ours, theirs, PROMPTS_16[:8], **common))

    # How close each pipeline's U-Net runs to the rate of one large matrix product on the device:
    # the room an exact speed-up (same arithmetic, same images) has left.
    flops = unet_flops_per_image(ours, size, args.steps)
    peak = matmul_peak_tflops(device, dtype)
    for r in rows:
        r["unet_tflop_per_image"] = flops / 1e12
        r["ours_unet_tflops"], r["diffusers_unet_tflops"] = r["ours_img_s"] * flops / 1e12, r["diffusers_img_s"] * flops / 1e12
    print(f"{'case':<36}{'ours img/s':>12}{'diffusers':>12}{'ratio':>8}{'max Δ px':>10}{'U-Net TFLOP/s ours / diffusers':>34}")
    for r in rows:
        print(f"{r['case']:<36}{r['ours_img_s']:>12.3f}{r['diffusers_img_s']:>12.3f}{r['ratio']:>7.2f}×{r['max_pixel_diff']:>10.2f}"
              f"{r['ours_unet_tflops']:>20.3f} / {r['diffusers_unet_tflops']:.3f}"
              + (f"   vs ours fp32: max Δ {r['max_pixel_diff_vs_fp32']:.1f}, mean Δ {r['mean_pixel_diff_vs_fp32']:.2f}" if "max_pixel_diff_vs_fp32" in r else ""))
    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    ratios = ", ".join(f"{r['ratio']:.2f}× ({r['case']})" for r in rows)
    on = [k for k, v in levers.items() if v]
    print(f"summary: ours/diffusers = {ratios}; ours with {', '.join(on) or 'no speed levers'}; "
          f"{hardware}; torch {torch.__version__}, diffusers {diffusers_version}; {args.steps} steps, CFG {args.cfg}")
    print(f"reference: one large {str(dtype).removeprefix('torch.')} matrix product runs at {peak:.3f} TFLOP/s here; the U-Net reached "
          + ", ".join(f"{r['ours_unet_tflops'] / peak:.0%} (ours) / {r['diffusers_unet_tflops'] / peak:.0%} (diffusers) of it in {r['case']}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware, "levers": levers, "torch": torch.__version__, "diffusers": diffusers_version,
                                               "matmul_peak_tflops": peak,
                                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
