"""Restoration's cost per method, and SMC-Diff against plain replacement on box masks.

    python scripts/bench_restore.py --num 50 --out outputs/bench-restore

1. Seconds per 64 px image and peak resident memory (one process per method, so the peaks do not
   mix) for txt2img and each restoration method at its defaults on the default model.
2. Inpainting of held-out two-object scenes with one object's box masked and the caption changed
   (`ldm-shapes eval --task inpaint`'s cases): the scorer's pass rate of the new caption for
   replacement (ldm-img2img's default, ddpm for a like-for-like sampler) and SMC with K particles.
Prints Markdown tables and writes OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def cost(method: str, repeats: int) -> dict:
    """Run in a child process: seconds per image (median of `repeats` single-image calls) and peak RSS."""
    import torch

    from ldm import LatentPipeline
    from ldm.pipeline import DEFAULT_MODEL

    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL)
    y = torch.rand(3, 16, 16)
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    calls = {
        "txt2img": lambda s: pipe("a red circle", seed=s, progress=False),
        "consistency": lambda s: pipe.restore(y, "a red circle", degradation="downsample:4", seed=s, progress=False),
        "exemplar (gray, the default)": lambda s: pipe.restore(torch.rand(1, 64, 64), "a red circle",
                                                               degradation="gray", seed=s, progress=False),
        "consistency (gray, from noise, K=1)": lambda s: pipe.restore(torch.rand(1, 64, 64), "a red circle",
                                                                      degradation="gray", method="consistency",
                                                                      particles=1, restarts=0, seed=s, progress=False),
        "consistency (gray: K=4, 1 restart)": lambda s: pipe.restore(torch.rand(1, 64, 64), "a red circle",
                                                                     degradation="gray", method="consistency", seed=s,
                                                                     progress=False),
        "guidance": lambda s: pipe.restore(y, "a red circle", degradation="downsample:4", method="guidance", seed=s,
                                           progress=False),
        "smc K=4": lambda s: pipe.restore(torch.rand(3, 64, 64), "a red circle", degradation="mask",
                                          mask_image=mask, method="smc", seed=s, progress=False),
    }
    calls[method](0)  # warm-up
    times = []
    for s in range(repeats):
        tick = time.perf_counter()
        calls[method](s + 1)
        times.append(time.perf_counter() - tick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    return {"seconds": float(np.median(times)), "peak_rss_gib": round(peak, 2)}


def smc_against_replacement(num: int, particles: list[int]) -> dict:
    import torch

    from ldm import LatentPipeline
    from ldm.data.shapes_eval import inpaint_cases
    from ldm.data.shapes_score import score_image
    from ldm.pipeline import DEFAULT_MODEL

    pipe = LatentPipeline.from_pretrained(DEFAULT_MODEL)
    cases = inpaint_cases(num, 0, "gray")
    rows = {}
    for name in ["replacement (ddpm)"] + [f"smc K={k}" for k in particles]:
        passed, tick = [], time.perf_counter()
        for i, case in enumerate(cases):
            mask = torch.from_numpy(np.asarray(case.mask, dtype=np.float32) / 255)
            if name.startswith("replacement"):
                image = pipe(case.text, image=case.image, mask_image=case.mask, seed=i, sampler="ddpm",
                             progress=False).images[0]
            else:
                known = torch.from_numpy(np.asarray(case.image, dtype=np.float32) / 255).permute(2, 0, 1) * (1 - mask)
                image = pipe.restore(known, case.text, degradation="mask", mask_image=mask, method="smc",
                                     particles=int(name.split("=")[1]), seed=i, progress=False).images[0]
            passed.append(score_image(np.asarray(image), case.text).passed)
        rows[name] = {"pass": float(np.mean(passed)), "seconds_per_image": (time.perf_counter() - tick) / num}
        print(f"{name}: {rows[name]['pass']:.1%}", file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=50, help="inpainting cases for SMC against replacement")
    p.add_argument("--particles", default="2,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--cost-of", help=argparse.SUPPRESS)  # the child process's one measurement
    args = p.parse_args()
    if args.cost_of:
        print(json.dumps(cost(args.cost_of, args.repeats)))
        return
    methods = ["txt2img", "consistency", "exemplar (gray, the default)", "consistency (gray, from noise, K=1)",
               "consistency (gray: K=4, 1 restart)", "guidance", "smc K=4"]
    costs = {}
    for m in methods:
        done = subprocess.run([sys.executable, __file__, "--out", args.out, "--cost-of", m, "--repeats",
                               str(args.repeats)], capture_output=True, text=True, check=True)
        costs[m] = json.loads(done.stdout.strip().splitlines()[-1])
    smc = smc_against_replacement(args.num, [int(k) for k in args.particles.split(",")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"cost": costs, "smc": smc}, indent=2) + "\n")
    print("| method (64 px, 25 steps) | s/image | peak RSS |\n|---|---:|---:|")
    for m, c in costs.items():
        print(f"| {m} | {c['seconds']:.2f} | {c['peak_rss_gib']:.2f} GiB |")
    print(f"\n| box-mask inpainting ({args.num} held-out cases) | pass | s/image |\n|---|---:|---:|")
    for name, row in smc.items():
        print(f"| {name} | {row['pass']:.1%} | {row['seconds_per_image']:.2f} |")
    best = max((r for n, r in smc.items() if n.startswith("smc")), key=lambda r: r["pass"])
    print(f"\nsummary: consistency {costs['consistency']['seconds'] / costs['txt2img']['seconds']:.1f}x txt2img's "
          f"time; best SMC {best['pass']:.1%} against replacement {smc['replacement (ddpm)']['pass']:.1%}")


if __name__ == "__main__":
    main()
