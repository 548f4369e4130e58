"""Few-step students against their teacher: the shapes scorer's pass rate on held-out prompts and the
images/s, for the teacher at its defaults (25 steps), the teacher at few steps with each of several
samplers (the baseline that needs no training), and each student at a sweep of step counts.

    python scripts/bench_distill.py --lcm runs/lcm/final --progressive runs/progressive/final \
        --out outputs/bench-distill

Every evaluation uses the same prompts and seeds (`ldm-shapes eval`'s usual mix, CFG 7.5), so rows
differ only by model, sampler and steps. Speed: one batch of --speed-images prompts per setting,
timed --repeats times in turn (teacher, student, teacher, ...) in this one process; the median counts.
Writes OUT/report.json and prints Markdown tables (per kind) and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ldm import LatentPipeline
from ldm.data.shapes import KINDS
from ldm.data.shapes_eval import generate_eval_folder
from ldm.data.shapes_score import score_folder


def evaluate(pipe, folder: Path, num_prompts: int, sampler: str | None, steps: int, batch_size: int) -> dict:
    """Generate (unless a complete folder is there from an earlier run) and score one folder."""
    meta = folder / "metadata.jsonl"
    start = time.time()
    if not (meta.is_file() and len(meta.read_text().splitlines()) == num_prompts):
        generate_eval_folder(pipe, str(folder), num_prompts=num_prompts, seed=0, sampler=sampler, steps=steps,
                             cfg=7.5, batch_size=batch_size, overwrite=True)
    report = score_folder(str(folder))
    return {"kinds": {k: v["accuracy"] for k, v in report["kinds"].items()}, "seconds": time.time() - start}


def images_per_s(pipe, prompts: list[str], sampler: str | None, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        pipe(prompts[i:i + batch_size], seed=i, sampler=sampler, num_inference_steps=steps, output_type="np",
             progress=False)
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="the teacher pipeline (default: the embedded default model)")
    p.add_argument("--lcm", help="an LCM student's pipeline folder")
    p.add_argument("--progressive", help="a progressive student's pipeline folder")
    p.add_argument("--num-prompts", type=int, default=600)
    p.add_argument("--teacher-steps", default="2,4,8", help="the teacher's few-step baselines")
    p.add_argument("--samplers", default="euler,ddim,heun,dpm++2m,unipc", help="the teacher's samplers at few steps")
    p.add_argument("--lcm-steps", default="1,2,4,8")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--speed-images", type=int, default=64)
    p.add_argument("--speed-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from ldm.data.shapes import eval_prompts, format_prompt
    from ldm.models import resolve_model
    from ldm.pipeline import DEFAULT_MODEL

    torch.manual_seed(0)
    out = Path(args.out)
    teacher = LatentPipeline.from_pretrained(resolve_model(args.teacher or DEFAULT_MODEL))
    students = {name: LatentPipeline.from_pretrained(path) for name, path in
                (("lcm", args.lcm), ("progressive", args.progressive)) if path}
    n = args.num_prompts
    rows = []

    def row(model, pipe, sampler, steps):
        name = f"{model}-{sampler or 'own'}-{steps}"
        result = evaluate(pipe, out / name, n, sampler, steps, args.batch_size)
        rows.append({"model": model, "sampler": sampler or pipe.student["sampler"], "steps": steps, **result})
        print(f"{model:12s} {rows[-1]['sampler']:9s} {steps:2d} steps: {result['kinds']['overall']:.1%} "
              f"({result['seconds']:.0f} s)", flush=True)

    row("teacher", teacher, "euler", 25)
    for steps in (int(s) for s in args.teacher_steps.split(",")):
        for sampler in args.samplers.split(","):
            row("teacher", teacher, sampler, steps)
    if "lcm" in students:
        for steps in (int(s) for s in args.lcm_steps.split(",")):
            row("lcm", students["lcm"], None, steps)
    if "progressive" in students:
        row("progressive", students["progressive"], None, students["progressive"].student["steps"])

    # speed: same prompts, same process, settings in turn
    prompts = [format_prompt(prompt) for prompt in eval_prompts(args.speed_images, 1)]
    settings = [("teacher", teacher, "euler", 25)] + [(name, pipe, None, pipe.student["steps"])
                                                      for name, pipe in students.items()]
    if "lcm" in students:
        settings.append(("lcm", students["lcm"], None, 2))
    speed = {f"{m}-{s}": [] for m, _, _, s in settings}
    for pipe_settings in settings:  # warm-up
        images_per_s(pipe_settings[1], prompts[:args.speed_batch], *pipe_settings[2:], args.speed_batch)
    for _ in range(args.repeats):
        for model, pipe, sampler, steps in settings:
            speed[f"{model}-{steps}"].append(images_per_s(pipe, prompts, sampler, steps, args.speed_batch))
    speed = {k: statistics.median(v) for k, v in speed.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"rows": rows, "images_per_s": speed,
                                                 "threads": torch.get_num_threads()}, indent=1))

    base = rows[0]["kinds"]["overall"]
    print("\n| model | sampler | steps | pass rate | of teacher's | " + " | ".join(KINDS) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(KINDS))
    for r in rows:
        kinds = " | ".join(f"{r['kinds'].get(k, float('nan')):.1%}" for k in KINDS)
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['kinds']['overall']:.1%} | "
              f"{r['kinds']['overall'] / base:.1%} | {kinds} |")
    print("\n| setting | images/s |\n|---|---:|")
    for k, v in speed.items():
        print(f"| {k} steps | {v:.1f} |")
    if "lcm" in students:
        lcm4 = next(r for r in rows if r["model"] == "lcm" and r["steps"] == 4)["kinds"]["overall"]
        best4 = max(r["kinds"]["overall"] for r in rows if r["model"] == "teacher" and r["steps"] == 4)
        print(f"\nLCM at 4 steps: {lcm4:.1%} ({lcm4 / base:.0%} of the teacher's {base:.1%} at 25; the teacher's best "
              f"at 4 steps {best4:.1%}); {speed['lcm-4'] / speed['teacher-25']:.1f}x the teacher's images/s")


if __name__ == "__main__":
    main()
