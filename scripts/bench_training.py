"""Training speed and memory: the project's own loops, run for real through ldm.train.

Stage 2 compares the project's loop reading the latent cache (VAE posteriors, and text embeddings
when the text encoder is frozen; built once beforehand) with the same loop without a cache, which
runs the VAE encoder (and a frozen text encoder) on every batch as common fine-tuning scripts do.
Stage 1 (the VAE) is timed with and without gradient checkpointing. On the CPU both stages are also
timed under bf16 autocast (fast where the CPU has AMX or AVX512-BF16; attention cores stay float32,
ldm.train.common.float_attention_processor). Each configuration runs in its
own process, so peak memory (CPU: max RSS; GPU: torch.cuda.max_memory_allocated) is its own.
Throughput counts images between the first and last logged step after a warm-up.

    python scripts/bench_training.py --case cpu   # shapes presets (the default model's recipe), CPU
    python scripts/bench_training.py --case gpu   # SD 1.5's U-Net at 256 px in bf16 (random weights), with MFU
    python scripts/bench_training.py --case sd15-cpu   # SD 1.5's U-Net on the CPU: the cache at SD scale; memory, AdamW vs 8-bit

GPU: model FLOP utilisation = (U-Net forward+backward FLOPs per image, counted with
torch.utils.flop_counter on one batch) × images/s ÷ the GPU's dense bf16 peak (--peak-tflops;
known: H100/H200 989). Prints a table and a one-line summary; --json PATH writes the rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None  # optim.optimizer=adamw8bit
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


def rate_from_metrics(path: Path, batch: int, warmup_steps: int) -> float:
    """Images/s between the first logged step at or after `warmup_steps` and the last one."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "images_per_s" in r and r["step"] >= warmup_steps]
    if len(rows) < 2:
        raise ValueError(f"{path}: fewer than two logged steps after step {warmup_steps}; run more steps")
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) * batch / (last["time"] - first["time"])


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict) -> dict:
    """Run one training configuration in this process; returns its figures."""
    import torch

    from ldm.config import load_config

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    if spec["stage"] == "unet":
        from ldm.train.unet import UNetTrainConfig as config_class, train
    else:
        from ldm.train.vae import VAETrainConfig as config_class, train
    config = load_config(config_class, spec["config"], spec["overrides"])
    if spec.get("build_cache"):
        train(config, build_cache_only=True)
        return {}
    start = time.perf_counter()
    train(config)
    wall = time.perf_counter() - start
    rate = rate_from_metrics(out / "metrics.jsonl", config.run.batch_size, spec["warmup_steps"])
    row = {"name": spec["name"], "images_per_s": rate, "peak_mb": peak_memory_mb(spec["device"]), "wall_s": wall}
    if spec.get("flops_per_image"):
        row["tflops_per_s"] = spec["flops_per_image"] * rate / 1e12
    return row


def run_worker(spec: dict) -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    # progress as each configuration ends, so a run cut short (a GPU lease ending) still shows what it measured
    print(f"[bench_training] {spec['name']}: {time.perf_counter() - start:.0f} s" + (f", {row['images_per_s']:.1f} img/s, peak {row['peak_mb']:.0f} MiB"
          if "images_per_s" in row else ""), file=sys.stderr, flush=True)
    return row


def unet_flops_per_image(config_path: Path, overrides: list[str], batch: int, device: str) -> float:
    """Forward + backward FLOPs of the U-Net for one image, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.config import load_config
    from ldm.train.unet import UNetTrainConfig, build_unet

    config = load_config(UNetTrainConfig, config_path, overrides)
    unet = build_unet(config.model, latent_channels=4, cross_attention_dim=768, sample_size=config.data.resolution // 8).to(device, torch.bfloat16)
    x = torch.randn(batch, 4, config.data.resolution // 8, config.data.resolution // 8, device=device, dtype=torch.bfloat16)
    c = torch.randn(batch, 77, 768, device=device, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, c).sample.float().pow(2).mean().backward()
    return counter.get_total_flops() / batch


def sd15_cpu(args) -> int:
    """SD 1.5's U-Net (860M parameters) trained in the project's loop on the CPU, 256 px, batch 2,
    float32, EMA off (its float32 copy would add 3.4 GB to every row alike), random weights:
    - the plain loop (SD's VAE encoder and the frozen CLIP ViT-L on every batch) against the loop
      reading the latent cache: the cache's gain at SD scale, which the shapes preset (a 0.5M
      encoder, a jointly trained text encoder) cannot show;
    - peak memory with AdamW and with 8-bit AdamW, each with and without gradient checkpointing.
    A few steps each (default 6, timed from step 2): minutes per row on 2 cores."""
    import torch

    steps = args.steps or 6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "ldm.cli.shapes", "make", "--out", str(tmp / "data"), "--num", "16", "--size", "256", "--seed", "0"], check=True, capture_output=True)
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_sampling import build_sd15_random

        print("[bench_training] data written; building SD 1.5 with random weights", file=sys.stderr, flush=True)
        folder = build_sd15_random(tmp / "sd15", 256)
        common = [f"data.path={tmp / 'data'}", "data.resolution=256", f"run.max_steps={steps}", "run.log_every=1", "run.checkpoint_every=0",
                  "run.sample_every=0", "run.batch_size=2", "data.num_workers=0", "ema.enabled=false", f"vae={folder}", f"text_encoder.path={folder}"]

        def spec(name, more=(), cache="cache"):
            out = tmp / name.replace(" ", "_").replace("+", "").replace(",", "")
            return {"name": name, "stage": "unet", "config": str(ROOT / "configs/unet/sd15.yaml"), "device": "cpu", "threads": args.threads,
                    "out": str(out), "warmup_steps": 2, "overrides": [*common, f"run.output_dir={out}", f"cache.dir={tmp / cache}", *more]}

        run_worker({**spec("build cache"), "build_cache": True})
        rows.append(run_worker(spec("AdamW, plain loop (VAE + CLIP every step)", cache="no-cache")))
        configs = [("AdamW", []), ("AdamW + grad checkpointing", ["run.gradient_checkpointing=true"])]
        if HAVE_BNB:
            configs += [("8-bit AdamW", ["optim.optimizer=adamw8bit"]),
                        ("8-bit AdamW + grad checkpointing", ["optim.optimizer=adamw8bit", "run.gradient_checkpointing=true"])]
        else:
            print("[bench_training] bitsandbytes is not installed: no 8-bit rows", file=sys.stderr)
        for name, more in configs:
            rows.append(run_worker(spec(name, more)))
    print(f"{'SD 1.5 U-Net, 256 px, batch 2, fp32, CPU':<46}{'s/step':>10}{'img/s':>10}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['name']:<46}{2 / r['images_per_s']:>10.2f}{r['images_per_s']:>10.3f}{r['peak_mb']:>10.0f}")
    plain, cached = rows[0]["images_per_s"], rows[1]["images_per_s"]
    base = rows[1]["peak_mb"]
    print(f"summary: latent cache {cached / plain:.2f}× the plain loop at SD scale; peak memory "
          + ", ".join(f"{r['name']} {r['peak_mb'] / 1024:.1f} GiB ({r['peak_mb'] / base:.2f}×)" for r in rows[1:])
          + f"; {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; {steps} steps per run")
    if args.json:
        Path(args.json).write_text(json.dumps({"case": "sd15-cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["cpu", "gpu", "sd15-cpu"], default="cpu")
    p.add_argument("--steps", type=int, help="steps per configuration (default: 60 cpu, 80 gpu, 6 sd15-cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads in each run")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: looked up by name)")
    p.add_argument("--vae", help="cpu case: the shapes VAE (an AutoencoderKL or pipeline folder; default: the embedded default model's)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    if args.case == "sd15-cpu":
        return sd15_cpu(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.case == "cpu":
            device, steps, size, batch = "cpu", args.steps or 60, 64, 64
            subprocess.run([sys.executable, "-m", "ldm.cli.shapes", "make", "--out", str(tmp / "data"), "--num", "2048", "--size", str(size), "--seed", "0"],
                           check=True, capture_output=True)
            from ldm.pipeline import DEFAULT_MODEL

            unet_cfg, vae_cfg, vae = ROOT / "configs/unet/shapes.yaml", ROOT / "configs/vae/shapes-f8.yaml", args.vae or str(DEFAULT_MODEL)
            extra: list[str] = []
            vae_batch = 8
        else:
            device, steps, size, batch = "cuda", args.steps or 80, 256, 32
            subprocess.run([sys.executable, "-m", "ldm.cli.shapes", "make", "--out", str(tmp / "data"), "--num", "4096", "--size", str(size), "--seed", "0"],
                           check=True, capture_output=True)
            sys.path.insert(0, str(ROOT / "scripts"))
            from bench_sampling import build_sd15_random

            print("[bench_training] data written; building SD 1.5 with random weights", file=sys.stderr, flush=True)
            folder = build_sd15_random(tmp / "sd15", size)
            unet_cfg, vae_cfg, vae = ROOT / "configs/unet/sd15.yaml", ROOT / "configs/vae/sd-kl-f8.yaml", str(folder)
            extra = [f"text_encoder.path={folder}", "run.mixed_precision=bf16"]
            vae_batch = 8
        warm = max(0, min(max(10, steps // 3), steps - 10))  # leaves at least two logged steps (every 5) to time between
        common = [f"data.path={tmp / 'data'}", f"data.resolution={size}", f"run.max_steps={steps}", "run.log_every=5",
                  "run.checkpoint_every=0", "run.sample_every=0", f"run.batch_size={batch}", f"vae={vae}", *extra]

        def unet_spec(name: str, cache_dir: Path, more=()) -> dict:
            out = tmp / name.split(":")[-1].strip().replace(" ", "_")
            return {"name": name, "stage": "unet", "config": str(unet_cfg), "device": device, "threads": args.threads,
                    "out": str(out), "warmup_steps": warm,
                    "overrides": [*common, f"run.output_dir={out}", f"cache.dir={cache_dir}", *more]}

        if not HAVE_BNB:
            print("[bench_training] bitsandbytes is not installed: no 8-bit AdamW row", file=sys.stderr)
        cache = tmp / "cache"
        t0 = time.perf_counter()
        run_worker({**unet_spec("build cache", cache), "build_cache": True})
        cache_s = time.perf_counter() - t0
        flops = unet_flops_per_image(unet_cfg, common, 4, device) if device == "cuda" else None
        for name, cache_dir, more in [("unet: plain loop (VAE encoder every step)", tmp / "no-cache", []),
                                      ("unet: ldm loop with latent cache", cache, []),
                                      ("unet: latent cache + grad checkpointing", cache, ["run.gradient_checkpointing=true"]),
                                      *([("unet: latent cache + 8-bit AdamW", cache, ["optim.optimizer=adamw8bit"])] if HAVE_BNB else []),
                                      *([("unet: latent cache + bf16 autocast", cache, ["run.mixed_precision=bf16"])] if device == "cpu" else [])]:
            spec = unet_spec(name, cache_dir, more)
            spec["flops_per_image"] = flops
            rows.append(run_worker(spec))
        vae_common = [f"data.path={tmp / 'data'}", f"data.resolution={size}", f"run.max_steps={steps}", "run.log_every=5",
                      "run.checkpoint_every=0", "run.sample_every=0", "validate_every=0", f"run.batch_size={vae_batch}",
                      *(["run.mixed_precision=bf16"] if device == "cuda" else [])]
        for name, more in [("vae", []), ("vae + grad checkpointing", ["run.gradient_checkpointing=true"]),
                           *([("vae + bf16 autocast", ["run.mixed_precision=bf16"])] if device == "cpu" else [])]:
            out = tmp / name.replace(" ", "_")
            rows.append(run_worker({"name": name, "stage": "vae", "config": str(vae_cfg), "device": device, "threads": args.threads,
                                    "out": str(out), "warmup_steps": warm, "overrides": [*vae_common, f"run.output_dir={out}", *more]}))
    plain, cached = rows[0]["images_per_s"], rows[1]["images_per_s"]
    hardware = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if device == "cuda" and k in hardware), None)
    print(f"{'configuration':<46}{'img/s':>10}{'peak MiB':>10}" + ("{:>8}".format("MFU") if flops else ""))
    for r in rows:
        mfu = f"{100 * r['tflops_per_s'] / peak:>7.1f}%" if flops and peak and "tflops_per_s" in r else ""
        print(f"{r['name']:<46}{r['images_per_s']:>10.1f}{r['peak_mb']:>10.0f}{mfu}")
    print(f"summary: latent cache {cached / plain:.2f}× the plain loop ({cached:.1f} vs {plain:.1f} img/s; cache built in {cache_s:.0f} s); "
          f"{hardware}; torch {torch.__version__}; {steps} steps per run")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                               "cache_build_s": cache_s, "flops_per_image": flops, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
