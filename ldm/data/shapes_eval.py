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


def check_eval_args(*, latent_factor: int, default_size: int, outdir: str, num_prompts: int, seed: int, sampler: str | None,
                    steps: int | None, cfg: float, batch_size: int, size: int | None, overwrite: bool,
                    guidance_rescale: float | None = None, scheduler_config: dict | None = None) -> tuple[str, int, int, float]:
    """Validate every evaluation setting (before any weights load); returns (sampler, steps, size,
    guidance_rescale) with the defaults filled in. Raises ValueError naming the bad setting."""
    from ldm.guidance import default_guidance_rescale
    from ldm.pipeline import check_generation_args
    from ldm.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, resolve_sampler

    sampler = DEFAULT_SAMPLER if sampler is None else resolve_sampler(sampler)
    steps = DEFAULT_STEPS if steps is None else steps  # not `or`: 0 steps is an error, not the default
    size = default_size if size is None else size
    guidance_rescale = default_guidance_rescale(scheduler_config) if guidance_rescale is None else guidance_rescale
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {num_prompts}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    check_generation_args(latent_factor=latent_factor, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
                          sampler=sampler, batch_size=batch_size, guidance_rescale=guidance_rescale,
                          scheduler_config=scheduler_config)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ValueError(f"--outdir {outdir} exists and is not a folder")
    meta_path = os.path.join(outdir, "metadata.jsonl")
    if os.path.exists(meta_path) and not overwrite:
        raise ValueError(f"{meta_path} exists; choose another --outdir (or --overwrite)")
    return sampler, steps, size, guidance_rescale


def generate_eval_folder(pipe, outdir: str, *, num_prompts: int, seed: int = 0, sampler: str | None = None,
                         steps: int | None = None, cfg: float = 7.5, batch_size: int = 16, size: int | None = None,
                         overwrite: bool = False, progress: bool = False, guidance_rescale: float | None = None) -> list[dict]:
    """Generate one image per evaluation prompt with `pipe` (a LatentPipeline) into `outdir`
    as PNGs + metadata.jsonl (format (b)); returns the rows written. `guidance_rescale` is φ of
    Lin et al. (2023), Eq. 15-16 (0: plain classifier-free guidance; None: the model's default)."""
    sampler, steps, size, guidance_rescale = check_eval_args(
        latent_factor=pipe.latent_factor, default_size=pipe.default_size, outdir=outdir, num_prompts=num_prompts, seed=seed,
        sampler=sampler, steps=steps, cfg=cfg, batch_size=batch_size, size=size, overwrite=overwrite,
        guidance_rescale=guidance_rescale, scheduler_config=pipe.scheduler.config)
    meta_path = os.path.join(outdir, "metadata.jsonl")
    os.makedirs(outdir, exist_ok=True)
    prompts = eval_prompts(num_prompts, seed)
    rows = []
    for start in range(0, num_prompts, batch_size):
        batch = prompts[start:start + batch_size]
        texts = [format_prompt(p) for p in batch]
        out = pipe(prompt=texts, guidance_scale=cfg, num_inference_steps=steps, sampler=sampler,
                   guidance_rescale=guidance_rescale, seed=seed + start, height=size, width=size, progress=progress)
        for i, (image, text, prompt) in enumerate(zip(out.images, texts, batch)):
            name = f"{start + i:05d}.png"
            image.save(os.path.join(outdir, name))
            rows.append({"file_name": name, "text": text, "kind": prompt.kind, "seed": int(out.seeds[i]),
                         "sampler": sampler, "steps": steps, "cfg": cfg, "guidance_rescale": guidance_rescale})
    with open(meta_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def evaluate(model: str, outdir: str, *, num_prompts: int, seed: int = 0, sampler: str | None = None,
             steps: int | None = None, cfg: float = 7.5, batch_size: int = 16, size: int | None = None,
             device: str | None = None, overwrite: bool = False, progress: bool = False, guidance_rescale: float | None = None) -> dict:
    """Load `model`, generate the evaluation folder, score it; writes and returns `outdir/report.json`."""
    from ldm import LatentPipeline
    from ldm.models import inspect_pipeline, resolve_model
    from ldm.pipeline import resolve_device

    info = inspect_pipeline(resolve_model(model))  # configs only: every setting is checked before weights load
    device = resolve_device(device)
    sampler, steps, size, guidance_rescale = check_eval_args(
        latent_factor=info.latent_factor, default_size=info.default_size, outdir=outdir, num_prompts=num_prompts, seed=seed,
        sampler=sampler, steps=steps, cfg=cfg, batch_size=batch_size, size=size, overwrite=overwrite,
        guidance_rescale=guidance_rescale, scheduler_config=info.scheduler_config)
    start = time.time()
    pipe = LatentPipeline.from_pretrained(model, device=device)
    generate_eval_folder(pipe, outdir, num_prompts=num_prompts, seed=seed, sampler=sampler, steps=steps, cfg=cfg,
                         batch_size=batch_size, size=size, overwrite=overwrite, progress=progress, guidance_rescale=guidance_rescale)
    report = score_folder(outdir)
    report["settings"] = {"model": os.fspath(model), "num_prompts": num_prompts, "seed": seed, "sampler": sampler,
                          "steps": steps, "cfg": cfg, "guidance_rescale": guidance_rescale, "size": size, "seconds": round(time.time() - start, 1)}
    write_report(report, os.path.join(outdir, "report.json"))
    return report
