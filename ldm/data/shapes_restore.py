"""`ldm-shapes eval --task restore`: inverse problems where the truth is known.

Held-out scene i (`eval_scene(seed, i)`, the evaluation stream no training set draws from) is rendered at
EDIT_SIZE = 64 px, degraded, y = A(x) + n with n ~ N(0, σ_y²) drawn from the case's own generator (y stays
a float tensor: no 8-bit rounding), and restored with its caption (`LatentPipeline.restore`). For each
degradation (default RESTORE_TASKS: ×4 area downsampling, so y is 16 px; Gaussian blur σ 2; grayscale; a
random mask of 70% of the pixels) the report gives PSNR and SSIM to the truth, the scorer's pass rate of
the caption (per kind), and the measurement residual, beside the baselines a user has otherwise: bicubic
upsampling, Wiener deconvolution (its λ the best of WIENER_LAMBDAS on these very scenes: an oracle), the
pseudo-inverse, the gray picture itself, the surroundings' fill for masks, and txt2img from the caption
alone (same seeds).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image

from .shapes import KIND_TITLES, KINDS, render_array
from .shapes_eval import EDIT_SIZE, check_outdir, eval_scene
from .shapes_score import score_image, write_report

RESTORE_TASKS = ("downsample:4", "blur:2", "gray", "random-mask:0.7")
DEFAULT_SIGMA_Y = 0.02
WIENER_LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def check_restore_tasks(tasks) -> list[str]:
    """The evaluation's degradations: the library's names, or random-mask:P (a share P in (0, 1) of the
    pixels missing, drawn per scene)."""
    from ldm.restoration import parse_degradation

    for task in tasks:
        name, _, value = task.partition(":")
        if name == "random-mask":
            try:
                share = float(value)
            except ValueError:
                share = -1.0
            if not 0 < share < 1:
                raise ValueError(f"random-mask takes the share of pixels missing in (0, 1), e.g. random-mask:0.7; "
                                 f"got {task!r}")
        elif name == "mask":
            raise ValueError("the evaluation draws its masks: use random-mask:P (a share P of the pixels missing)")
        else:
            parse_degradation(task)
    return list(tasks)


def restore_cases(num: int, seed: int, task: str, sigma_y: float):
    """(captions, kinds, truth (N, 3, 64, 64) in [−1, 1], operator, y in [−1, 1]) for `task` on held-out
    scenes 0..num-1; scene i's noise (and random mask) from its own generator."""
    from ldm.restoration import PixelMask, measure, parse_degradation

    scenes = [eval_scene(seed, i, unnamed_background="gray")[0] for i in range(num)]
    truth = torch.from_numpy(np.stack([render_array(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(num)]
    name, _, value = task.partition(":")
    if name == "random-mask":
        size = (1, 1, EDIT_SIZE, EDIT_SIZE)
        operator = PixelMask(torch.cat([(torch.rand(size, generator=g) < float(value)).float() for g in generators]))
        y = torch.cat([measure(truth[i:i + 1], PixelMask(operator.mask[i:i + 1]), sigma_y, g)
                       for i, g in enumerate(generators)])
    else:
        operator = parse_degradation(task)
        y = torch.cat([measure(truth[i:i + 1], operator, sigma_y, g) for i, g in enumerate(generators)])
    return [s.caption for s in scenes], [s.kind for s in scenes], truth, operator, y


def baselines(operator, y: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """The non-generative restorations of `y` a user would reach for, (N, 3, H, W) in [−1, 1] each."""
    from ldm.editing import fill_masked
    from ldm.restoration import Blur, Downsample, Grayscale, PixelMask, bicubic_upsample, psnr

    out = {"pseudo-inverse": operator.pseudo_inverse(y).expand(-1, 3, -1, -1).clamp(-1, 1)}
    if isinstance(operator, Grayscale):  # what a user shows: the luma in every channel (A⁺ tints it: w y / ‖w‖²)
        out["gray picture"] = y.expand(-1, 3, -1, -1).clamp(-1, 1)
    if isinstance(operator, Downsample):
        out["bicubic"] = bicubic_upsample(y, operator.factor)
    if isinstance(operator, Blur):
        tried = {lam: operator.fourier_inverse(y, lam).clamp(-1, 1) for lam in WIENER_LAMBDAS}
        best = max(tried, key=lambda lam: float(psnr(tried[lam], truth).mean()))
        out[f"wiener (λ {best:g})"] = tried[best]
    if isinstance(operator, PixelMask):
        out["fill"] = fill_masked(y.clamp(-1, 1), operator.mask)
    return out


def measures(images: torch.Tensor, truth: torch.Tensor, y: torch.Tensor, operator, captions, kinds) -> dict:
    """PSNR, SSIM, residual (means) and the scorer's pass rate of the captions, overall and per kind."""
    from ldm.restoration import psnr, residual_rms, ssim

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    passed = [score_image(p, c).passed for p, c in zip(pixels, captions)]
    per_kind = {k: [ok for ok, kind in zip(passed, kinds) if kind == k] for k in KINDS}
    with torch.no_grad():
        residual = residual_rms(y, operator(images.float()), operator)
    return {"psnr": float(psnr(images, truth).mean()), "ssim": float(ssim(images, truth).mean()),
            "residual": float(residual.mean()), "pass": float(np.mean(passed)),
            "kinds": {k: float(np.mean(v)) for k, v in per_kind.items() if v}}


def _save(folder: str, name: str, images: torch.Tensor) -> None:
    for i, image in enumerate(images):
        array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = array.expand(3, -1, -1) if len(array) == 1 else array
        Image.fromarray(array.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}-{name}.png"))


def evaluate_restore(model: str, outdir: str, *, tasks=RESTORE_TASKS, method: str | None = None,
                     sigma_y: float = DEFAULT_SIGMA_Y, num_prompts: int = 100, seed: int = 0, steps: int | None = None,
                     cfg: float = 7.5, step_size: float | None = None, iterations: int | None = None,
                     particles: int | None = None, restarts: int | None = None, batch_size: int = 16,
                     device: str | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Restore held-out scenes under each of `tasks` into OUTDIR/<task>/ (truth, measurement, the restored
    image and each baseline as PNGs; report.json) and OUTDIR/report.json with every row; returns it.
    txt2img from the captions alone (OUTDIR/txt2img, same seeds) is the generative baseline."""
    from ldm import LatentPipeline
    from ldm.restoration import PixelMask, check_restoration, default_method, parse_degradation
    from ldm.sampling import DEFAULT_STEPS

    tasks = check_restore_tasks(tasks)
    steps = steps or DEFAULT_STEPS
    methods = {}  # each task's: `method`, else the operator's default
    for task in tasks:  # every setting checked before the model loads
        probe = "mask" if task.startswith("random-mask") else task
        mask = torch.zeros(1, 1, EDIT_SIZE, EDIT_SIZE) if probe == "mask" else None
        operator = parse_degradation(probe, mask)
        methods[task] = method or default_method(operator)
        check_restoration(methods[task], None, sigma_y, operator, step_size=step_size,
                          iterations=iterations, particles=particles, restarts=restarts)
    check_outdir(outdir, overwrite)
    pipe = LatentPipeline.from_pretrained(model, device=device)
    settings = {"model": os.fspath(model), "method": method or "default", "sigma_y": sigma_y,
                "num_prompts": num_prompts, "seed": seed, "steps": steps, "cfg": cfg, "step_size": step_size,
                "iterations": iterations, "particles": particles, "restarts": restarts, "size": EDIT_SIZE}
    report = {"settings": settings, "tasks": {}}
    txt2img = None
    for task in tasks:
        captions, kinds, truth, operator, y = restore_cases(num_prompts, seed, task, sigma_y)
        folder = os.path.join(outdir, task.replace(":", "-"))
        os.makedirs(folder, exist_ok=True)
        if txt2img is None:  # the captions are the same for every task: one txt2img run serves them all
            out = pipe(captions, seed=seed, num_inference_steps=steps, guidance_scale=cfg, output_type="pt",
                       batch_size=batch_size, progress=progress)
            txt2img = out.images * 2 - 1
        restored, seconds = [], 0.0
        for start in range(0, num_prompts, batch_size):
            rows = slice(start, start + batch_size)
            op = PixelMask(operator.mask[rows]) if isinstance(operator, PixelMask) else operator
            tick = time.perf_counter()
            out = pipe.restore((y[rows] + 1) / 2, captions[rows], degradation=op, method=methods[task], sigma_y=sigma_y,
                               step_size=step_size, iterations=iterations, particles=particles, restarts=restarts,
                               seed=seed + start,
                               guidance_scale=cfg,
                               num_inference_steps=steps, output_type="pt", progress=progress)
            seconds += time.perf_counter() - tick
            restored.append(out.images * 2 - 1)
        restored = torch.cat(restored)
        rows = {methods[task]: restored, "txt2img (caption only)": txt2img} | baselines(operator, y, truth)
        for name, images in {"truth": truth, "measurement": (y.clamp(-1, 1)), **rows}.items():
            _save(folder, name.split(" ")[0], images)
        scored = {name: measures(images, truth, y, operator, captions, kinds) for name, images in rows.items()}
        result = {"method": methods[task], "rows": scored, "seconds_per_image": round(seconds / num_prompts, 3)}
        write_report(result, os.path.join(folder, "report.json"))
        report["tasks"][task] = result
    write_report(report, os.path.join(outdir, "report.json"))
    return report


def format_restore(report: dict) -> str:
    """Each task's rows as a table: PSNR, SSIM, pass rate and residual; then the restored rows' per-kind pass rates."""
    lines = []
    for task, result in report["tasks"].items():
        method = result.get("method", report["settings"]["method"])  # reports before exemplar: one method
        lines.append(f"{task} (σ_y {report['settings']['sigma_y']:g}; {result['seconds_per_image']} s per image)")
        lines.append(f"  {'':26}{'PSNR':>8}{'SSIM':>8}{'pass':>8}{'residual':>10}")
        for name, row in result["rows"].items():
            lines.append(f"  {name:26}{row['psnr']:8.2f}{row['ssim']:8.3f}{100 * row['pass']:7.1f}%"
                         f"{row['residual']:10.4f}")
        kinds = result["rows"][method]["kinds"]
        lines.append("  " + method + " by kind: " + ", ".join(f"{KIND_TITLES[k]} {100 * v:.0f}%"
                                                             for k, v in kinds.items()))
    return "\n".join(lines)
