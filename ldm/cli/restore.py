"""ldm-restore: restore a degraded picture with the diffusion prior, guided by a caption; no retraining.

Prints the path of the PNG it writes on stdout and the consistency check ‖y − A(x̂)‖ on stderr (also
in the PNG's parameters). Every setting is checked before any weights load.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.cli.common import ArgumentParser, run
from ldm.restoration import (
    DEFAULT_GRAY_METHOD, DEFAULT_ITERATIONS, DEFAULT_METHOD, DEFAULT_PARTICLES, DEFAULT_RESTARTS, DEFAULT_STEP_SIZE,
    DEFAULT_STRENGTH,
    DEGRADATIONS, RESTART_STRENGTH,
    MAX_PARTICLES, METHODS,
)
from ldm.sampling import DEFAULT_STEPS

# Measured on the 2-core Xeon (64x64, the default model, 25 steps, one image; docs/restoration.md)
COST = ("Cost per 64x64 image on a 2-core CPU with the default model (docs/restoration.md): txt2img 0.35 s, "
        "exemplar the same; "
        "consistency 1.3 s from a first estimate, 4.6 s from noise (10 decoder forward+backward passes a step, no "
        "U-Net backward), 14.5 s for consistency on gray (4 particles, one restart); guidance 1.0 s (a U-Net "
        "and decoder backward every step, their activations kept); smc "
        "K particles in one batch, K times txt2img's work and activations.")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ldm-restore",
        description="Restore the image behind a degraded measurement y = A(x) + noise with a latent diffusion model "
                    "as the prior, guided by a caption: super-resolution, deblurring, colourisation, inpainting.",
        epilog='Example: ldm-restore low.png "two red circles" --degradation downsample:4 --sigma-y 0.02. ' + COST,
    )
    p.add_argument("measurement", type=Path, help="the degraded picture y (any format PIL reads)")
    p.add_argument("prompt", help="a caption of the picture (quote it)")
    p.add_argument("--degradation", required=True, metavar="D",
                   help=f"what made y from the picture: {', '.join(DEGRADATIONS)}. downsample:F: area downsampling "
                        "by F (2, 4, 8; the picture is F times y's size); blur:SIGMA: Gaussian blur of SIGMA px "
                        "(circular edges); gray: luma (ITU-R 601, PIL's 'L'); mask: the pixels white in --mask are "
                        "missing")
    p.add_argument("--mask", type=Path, help="with --degradation mask: white where y's pixels are missing, at y's size")
    p.add_argument("--sigma-y", type=float, default=0.0,
                   help="the measurement's noise, a standard deviation in [0, 1] pixel units (0.02 is about 5 of "
                        "255): the residual a restoration that explains y leaves")
    p.add_argument("--method", choices=METHODS,
                   help=f"(default: {DEFAULT_GRAY_METHOD} for gray, else {DEFAULT_METHOD}) "
                        "exemplar, gray only: the model draws the caption (txt2img; any sampler) and y takes its "
                        "colours by luma (Welsh et al.'s colour transfer), the cost of txt2img. "
                        "consistency: each step's clean estimate is fitted to y through the decoder (ReSample's hard "
                        "data consistency; with --particles K, K of them steered by their residual), sampler ddim. "
                        "guidance: DPS's gradient step "
                        "-ζ∇‖y - A(D(ẑ_0))‖ through "
                        "the U-Net and decoder, samplers ddim or ddpm. smc: SMC-Diff's K particles of replacement "
                        "sampling resampled every step, for masks, sampler ddpm")
    p.add_argument("--step-size", type=float, metavar="ZETA",
                   help="guidance: ζ; consistency: Adam's learning rate (default: "
                        f"{', '.join(f'{m} {v:g}' for m, v in DEFAULT_STEP_SIZE.items())})")
    p.add_argument("--iterations", type=int,
                   help=f"consistency: Adam steps per sampling step (default: {DEFAULT_ITERATIONS})")
    p.add_argument("--particles", type=int, metavar="K",
                   help=f"particles per image, 1-{MAX_PARTICLES}, K times the time and memory of one. smc: replacement "
                        "samplers; consistency: samplers resampled by how well they explain y, the best returned; "
                        "exemplar: exemplars, the one whose lumas cover y's best kept "
                        f"(default: smc {DEFAULT_PARTICLES}; consistency 4 for gray, else 1)")
    p.add_argument("--restarts", type=int, metavar="R",
                   help=f"consistency: R more passes, each from the last output moved onto A x = y and noised to "
                        f"strength {RESTART_STRENGTH:g} (default: {DEFAULT_RESTARTS} for gray, else 0); about "
                        f"{RESTART_STRENGTH:g} of a pass each")
    p.add_argument("--strength", type=float,
                   help="start from the non-generative estimate (bicubic, Wiener, the gray picture, fill) noised to "
                        "this level, in (0, 1], as img2img does (CCDF); 1 starts from noise (default: "
                        f"{DEFAULT_STRENGTH} for consistency with downsample, blur and mask; else 1)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale w of the caption")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps")
    p.add_argument("--sampler", metavar="NAME", help="ddim or ddpm, as the method allows (default: its first)")
    p.add_argument("--seed", type=int, help="seed (default: random, printed in the PNG's metadata)")
    p.add_argument("--model", help="a diffusers pipeline folder or hub id (default: the embedded default model)")
    p.add_argument("--outdir", type=Path, default=Path("outputs"), help="folder for the PNG (never overwritten)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ldm.cli.txt2img import check_outdir
    from ldm.data.images import load_image
    from ldm.models import resolve_model
    from ldm.pipeline import DEFAULT_MODEL, LatentPipeline, resolve_device
    from ldm.restoration import check_restoration, default_method, parse_degradation
    from ldm.sampling import resolve_sampler

    # 1. Everything that can be checked without weights: the operator, the method's settings, the files.
    mask = None
    if args.mask is not None:
        import numpy as np
        import torch

        if not args.degradation.strip().lower() == "mask":
            raise ValueError(f"--mask applies to --degradation mask, not {args.degradation!r}")
        picture = load_image(args.mask, key=f"--mask {args.mask}")
        mask = torch.from_numpy(np.asarray(picture.convert("L")) > 127).float()[None, None]
    operator = parse_degradation(args.degradation, mask)
    sampler = resolve_sampler(args.sampler) if args.sampler is not None else None
    method = args.method or default_method(operator)
    sampler = check_restoration(method, sampler, args.sigma_y, operator, step_size=args.step_size,
                                iterations=args.iterations, particles=args.particles, restarts=args.restarts,
                                strength=args.strength)
    if args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
    if args.strength is not None:
        from ldm.editing import check_strength

        check_strength(args.strength, args.steps)
    if args.seed is not None and not 0 <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    measurement = load_image(args.measurement, key=f"MEASUREMENT {args.measurement}")
    check_outdir(args.outdir)
    model = args.model or str(DEFAULT_MODEL)
    resolve_model(model)

    # 2. Load and restore.
    import random

    pipe = LatentPipeline.from_pretrained(model, device=resolve_device(args.device))
    out = pipe.restore(measurement, args.prompt, degradation=operator, method=method, sigma_y=args.sigma_y,
                       step_size=args.step_size, iterations=args.iterations, particles=args.particles,
                       restarts=args.restarts, strength=args.strength,
                       negative_prompt=args.negative, guidance_scale=args.cfg, num_inference_steps=args.steps,
                       sampler=sampler,
                       seed=args.seed if args.seed is not None else random.SystemRandom().randrange(2**32),
                       progress=not args.quiet)
    for path in out.save(args.outdir):
        print(path, flush=True)
    r = out.residuals[0]
    verdict = (f"explains y within its noise (σ_y {args.sigma_y:g})" if r <= 1.5 * args.sigma_y + 0.01 else
               "does NOT explain y: raise --step-size/--iterations, or check --degradation")
    print(f"measurement residual ‖y − A(x̂)‖ (RMS, [0, 1] units): {r:.4f}; the restoration {verdict}",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-restore")


if __name__ == "__main__":
    sys.exit(main())
