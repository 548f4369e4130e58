"""The shapes-world quality number of a model: generate images for held-out prompts, then score them.

Prompts come from `shapes.eval_prompts(num_prompts, seed)`, the evaluation seed stream that no
training dataset draws from (see `ldm.data.shapes`); they are drawn at the reference size 64 so
that the prompt list of a seed is the same whatever resolution the model generates at.
Image i is generated with seed `seed + i`, so any image can be reproduced alone with ldm-txt2img.
"""

from __future__ import annotations

import json
import os
import time

from .shapes import eval_prompts, format_prompt
from .shapes_score import score_folder, write_report


def generate_eval_folder(pipe, outdir: str, *, num_prompts: int, seed: int = 0, sampler: str | None = None,
                         steps: int | None = None, cfg: float = 7.5, batch_size: int = 16, size: int | None = None,
                         overwrite: bool = False, progress: bool = False) -> list[dict]:
    """Generate one image per evaluation prompt with `pipe` (a LatentPipeline) into `outdir`
    as PNGs + metadata.jsonl (format (b)); returns the rows written."""
    from ldm.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS

    sampler = sampler or DEFAULT_SAMPLER
    steps = steps or DEFAULT_STEPS
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    meta_path = os.path.join(outdir, "metadata.jsonl")
    if os.path.exists(meta_path) and not overwrite:
        raise ValueError(f"{meta_path} exists; choose another --outdir (or --overwrite)")
    os.makedirs(outdir, exist_ok=True)
    size = size or pipe.default_size
    prompts = eval_prompts(num_prompts, seed)
    rows = []
    for start in range(0, num_prompts, batch_size):
        batch = prompts[start:start + batch_size]
        texts = [format_prompt(p) for p in batch]
        out = pipe(prompt=texts, guidance_scale=cfg, num_inference_steps=steps, sampler=sampler,
                   seed=seed + start, height=size, width=size, progress=progress)
        for i, (image, text, prompt) in enumerate(zip(out.images, texts, batch)):
            name = f"{start + i:05d}.png"
            image.save(os.path.join(outdir, name))
            rows.append({"file_name": name, "text": text, "kind": prompt.kind, "seed": int(out.seeds[i]),
                         "sampler": sampler, "steps": steps, "cfg": cfg})
    with open(meta_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def evaluate(model: str, outdir: str, *, num_prompts: int, seed: int = 0, sampler: str | None = None,
             steps: int | None = None, cfg: float = 7.5, batch_size: int = 16, size: int | None = None,
             device: str | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Load `model`, generate the evaluation folder, score it; writes and returns `outdir/report.json`."""
    from ldm import LatentPipeline
    from ldm.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS

    sampler = sampler or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    steps = steps or DEFAULT_STEPS
    start = time.time()
    pipe = LatentPipeline.from_pretrained(model, device=device)
    generate_eval_folder(pipe, outdir, num_prompts=num_prompts, seed=seed, sampler=sampler, steps=steps, cfg=cfg,
                         batch_size=batch_size, size=size, overwrite=overwrite, progress=progress)
    report = score_folder(outdir)
    report["settings"] = {"model": os.fspath(model), "num_prompts": num_prompts, "seed": seed, "sampler": sampler,
                          "steps": steps, "cfg": cfg, "size": size or pipe.default_size, "seconds": round(time.time() - start, 1)}
    write_report(report, os.path.join(outdir, "report.json"))
    return report
