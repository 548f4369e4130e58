"""ldm-shapes: make a shapes-world dataset, score a folder of images against its captions, or
evaluate a model (generate for held-out prompts, then score). See docs/data.md for the grammar."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ldm.cli.common import ArgumentParser, run


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ldm-shapes", description="The shapes world: a procedural text-to-image world with an exact grammar.",
                       epilog="Example: ldm-shapes make --out data/shapes --num 50000 --seed 0 && ldm-shapes score data/shapes")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("make", help="write PNGs + metadata.jsonl (deterministic for a seed)",
                       description="Write N scenes as PNGs + metadata.jsonl (file_name, text, and the ground truth).")
    m.add_argument("--out", required=True, help="output folder (created; must not hold a metadata.jsonl)")
    m.add_argument("--num", type=int, required=True, help="number of images")
    m.add_argument("--size", type=int, default=64, help="canvas size S in pixels")
    m.add_argument("--seed", type=int, default=0, help="dataset seed: image i is scene (seed, i) of the training stream")
    m.add_argument("--overwrite", action="store_true", help="replace an existing metadata.jsonl in --out")
    m.add_argument("--unnamed-background", choices=("random", "white", "gray", "black"), default="random",
                   help="the background of scenes whose caption names none (default: random, as the spec says; "
                        "the default model's recipe uses gray, see docs/data.md)")
    m.add_argument("--kinds", default=None, metavar="K1,K2,...",
                   help="caption kinds to cycle through: scene i has kind K[i mod n]; list a kind twice to draw it "
                        "twice as often (default: the spec's six, balanced: single,two,counting,position,attributes,background)")
    m.add_argument("--backgrounds", default=None, metavar="B1,B2,...",
                   help="the backgrounds the background kind names, drawn uniformly from this list (list one twice to "
                        "draw it twice as often): white, gray, black, or an object colour (red, orange, yellow, green, "
                        "blue, purple: an extension of the spec; no object then has the background's colour). Other "
                        "kinds are unchanged (default: white,gray,black, the spec's scenes exactly)")
    m.add_argument("--counts", default=None, metavar="N1,N2,...",
                   help="the numbers counting scenes show, drawn uniformly from this list: 2-5 (five is an extension "
                        "of the spec; default: 2,3,4 as the spec draws them)")
    m.add_argument("--mix", default="usual", metavar="MIX[,MIX...]",
                   help="usual: the spec's draws; hard: the hard mix (two-object prompts of one colour, counts of "
                        "three and four, both sizes named, a third of the scenes on black; docs/data.md); a comma "
                        "list cycles through them, e.g. usual,hard for half each (default: usual)")

    s = sub.add_parser("score", help="score a folder of images against their captions",
                       description="Score every image of a folder (metadata.jsonl rows file_name, text) against its caption.")
    s.add_argument("folder", help="folder with metadata.jsonl (or .csv) and the images it names")
    s.add_argument("--json", metavar="PATH", help="also write the full report (with failures) to PATH")

    e = sub.add_parser("eval", help="generate images for held-out prompts with a model, then score them",
                       description="Draw prompts from the evaluation seed stream (never used for training data), "
                                   "generate with the model, write images + metadata.jsonl + report.json, and score. "
                                   "--task img2img and inpaint measure editing instead, --task restore "
                                   "restoration (see --help of each option).")
    e.add_argument("--task", choices=("txt2img", "img2img", "inpaint", "restore"), default="txt2img",
                   help="txt2img: generate from each prompt. img2img (SDEdit): edit a crude stroke painting of each "
                        "held-out scene (flat blobs of its colours) toward its caption; a pass is the caption "
                        "accepted and every object within 0.1 S of its blob. inpaint: repaint one object's box of a "
                        "two-object scene with its colour or shape changed; a pass is the new caption accepted "
                        "and every pixel outside the mask unchanged. restore: degrade each held-out scene "
                        "(--degradations) and restore it with its caption (ldm-restore); PSNR, SSIM, pass rate and "
                        "the measurement residual beside bicubic, Wiener, the pseudo-inverse, fill and txt2img")
    e.add_argument("--degradations", default=None, metavar="D1,D2,...",
                   help="restore: the degradations (default: downsample:4,blur:2,gray,random-mask:0.7; random-mask:P "
                        "drops a share P of the pixels, drawn per scene)")
    e.add_argument("--method", default=None,
                   help="restore: consistency, guidance, smc or exemplar (default: exemplar for gray, "
                        "else consistency)")
    e.add_argument("--sigma-y", type=float, default=None,
                   help="restore: the measurement noise, in [0, 1] pixel units (default: 0.02)")
    e.add_argument("--step-size", type=float, default=None, help="restore: as ldm-restore's (default: the method's)")
    e.add_argument("--iterations", type=int, default=None, help="restore: as ldm-restore's (default: 10)")
    e.add_argument("--particles", type=int, default=None, metavar="K",
                   help="restore: as ldm-restore's (default: the method's; smc 4, consistency 4 on gray, else 1)")
    e.add_argument("--restarts", type=int, default=None, metavar="R",
                   help="restore: as ldm-restore's (default: 1 for gray with consistency, else 0)")
    e.add_argument("--strength", action="append", metavar="S[,S...]",
                   help="img2img strength(s) in (0, 1], repeatable or a comma list (e.g. 0.3,0.5,0.75,0.9): one "
                        "evaluation each, into OUTDIR/strength-S, and a table of strength vs pass rate in "
                        "OUTDIR/sweep.json (default: 0.75)")
    e.add_argument("--inpaint-method", default=None, metavar="METHOD",
                   help="inpaint: replace (the known region replaced after every step) or repaint (RePaint's "
                        "resampling) (default: the pipeline's, replace for an ordinary U-Net)")
    e.add_argument("--jump-length", type=int, default=None,
                   help="inpaint with repaint: RePaint's jump length j (default: the pipeline's)")
    e.add_argument("--jump-samples", type=int, default=None,
                   help="inpaint with repaint: RePaint's resamplings r (default: the pipeline's)")
    e.add_argument("--unnamed-background", choices=("gray", "white", "black", "random"), default=None,
                   help="img2img and inpaint: the background of input scenes whose caption names none (default: "
                        "gray, which is what such a caption means to the default model, trained on gray-unnamed "
                        "data; random: any of the three, which that model cannot keep)")
    e.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="txt2img: a LoRA file on the model, at a scale (default 1); repeatable")
    e.add_argument("--model", help="a pipeline folder (diffusers layout) trained in the shapes world "
                                   "(default: the embedded default model)")
    e.add_argument("--num-prompts", type=int, default=600,
                   help="number of prompts (balanced over the mix's caption kinds, or cycling through --kinds; "
                        "inpaint: over two and position; restore: scenes per degradation)")
    e.add_argument("--kinds", default=None, metavar="K1,K2,...",
                   help="txt2img: the caption kinds of the prompts, cycled as for make (default: the mix's own: the "
                        "spec's six, balanced, for the usual mix)")
    e.add_argument("--backgrounds", default=None, metavar="B1,B2,...",
                   help="txt2img: the backgrounds the background kind's prompts name, as for make; e.g. --kinds "
                        "background --backgrounds blue,green for a colour-background concept's held-out prompts "
                        "(default: white,gray,black)")
    e.add_argument("--counts", default=None, metavar="N1,N2,...",
                   help="txt2img: the numbers the counting prompts name, as for make; e.g. --kinds counting --counts 5")
    e.add_argument("--mix", default=None, metavar="MIX",
                   help="txt2img: usual (the spec's balanced kinds) or hard (the default model's hard cases: "
                        "two-object prompts of one colour, counts of three and four, both sizes named, a third on "
                        "black; docs/data.md) (default: usual)")
    e.add_argument("--seed", type=int, default=0,
                   help="evaluation seed: picks the prompts; image i is generated with seed + i")
    e.add_argument("--sampler", default=None,
                   help="sampler name, ours or AUTOMATIC1111's (default: the project's default sampler, or a distilled "
                        "student's own; for "
                        "img2img and inpaint, the pipeline's own choice, which the report names)")
    e.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the project's default, or a distilled student's own)")
    e.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    e.add_argument("--guidance-rescale", type=float, metavar="PHI",
                   help="guidance rescale φ (Lin et al. 2023), 0-1 (default: the model's, as ldm-txt2img: 0.7 for a "
                        "zero-terminal-SNR model, else 0)")
    e.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    e.add_argument("--size", type=int, default=None, help="txt2img image size (default: the model's; the editing "
                                                            "tasks edit 64 px scenes)")
    e.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    e.add_argument("--outdir", default="outputs/shapes-eval", help="folder for images, metadata.jsonl and report.json")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --outdir")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make":
        from ldm.data.shapes import write_dataset

        if args.num < 1:
            raise ValueError(f"--num must be at least 1, got {args.num}")
        if args.size < 16:
            raise ValueError(f"--size must be at least 16, got {args.size}")
        if args.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {args.seed}")
        start = time.time()
        unnamed = None if args.unnamed_background == "random" else args.unnamed_background
        kinds, backgrounds, counts = parse_lists(args)  # write_dataset checks them
        written = write_dataset(args.out, args.num, size=args.size, seed=args.seed, overwrite=args.overwrite,
                                unnamed_background=unnamed, kinds=kinds, backgrounds=backgrounds, counts=counts,
                                mix=args.mix)
        seconds = time.time() - start
        print(f"wrote {args.num} images ({written / 2**20:.1f} MiB) and metadata.jsonl to {args.out} "
              f"in {seconds:.1f} s ({args.num / max(seconds, 1e-9):.0f} images/s)")
        return 0

    from ldm.data.shapes_score import format_report, score_folder, write_report

    if args.command == "score":
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ValueError(f"--json {args.json}: its folder does not exist")  # before scoring, not after
        report = score_folder(args.folder)
        print(format_report(report))
        if args.json:
            write_report(report, args.json)
        return 0

    from ldm.data import shapes_eval

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    check_task_options(args)
    from ldm.pipeline import DEFAULT_MODEL

    if args.model is None and not DEFAULT_MODEL.is_dir():
        raise ValueError(f"the default model is missing from this installation (expected at {DEFAULT_MODEL}); "
                         "pass --model PATH with a pipeline folder trained in the shapes world")
    common = dict(num_prompts=args.num_prompts, seed=args.seed, sampler=args.sampler, steps=args.steps, cfg=args.cfg,
                  batch_size=args.batch_size, device=args.device, overwrite=args.overwrite, progress=not args.quiet,
                  guidance_rescale=args.guidance_rescale)
    model = args.model or str(DEFAULT_MODEL)
    unnamed = args.unnamed_background or "gray"
    backgrounds = {"unnamed_background": None if unnamed == "random" else unnamed}
    if args.task == "restore":
        from ldm.data.shapes_restore import DEFAULT_SIGMA_Y, RESTORE_TASKS, evaluate_restore, format_restore

        tasks = [t.strip() for t in args.degradations.split(",")] if args.degradations else RESTORE_TASKS
        sigma_y = DEFAULT_SIGMA_Y if args.sigma_y is None else args.sigma_y
        report = evaluate_restore(model, args.outdir, tasks=tasks, method=args.method, sigma_y=sigma_y,
                                  step_size=args.step_size, iterations=args.iterations, particles=args.particles,
                                  restarts=args.restarts,
                                  **{k: v for k, v in common.items() if k not in ("sampler", "guidance_rescale")})
        print(format_restore(report))
        print(f"truth, measurement, restoration and baselines per scene, and report.json, in "
              f"{args.outdir}/<degradation>/")
    elif args.task == "img2img":
        strengths = parse_strengths(args.strength or ["0.75"])
        report = shapes_eval.evaluate_img2img(model, args.outdir, strengths=strengths, **common, **backgrounds)
        for strength, run in report["strengths"].items():
            print(f"strength {strength}:\n{shapes_eval.format_checks(run, shapes_eval.CHECKS['img2img'])}\n")
        print(shapes_eval.format_sweep(report["sweep"]))
        print(f"outputs beside their stroke paintings in {args.outdir}/strength-S/; sweep.json and report.json in "
              f"{args.outdir}")
    elif args.task == "inpaint":
        report = shapes_eval.evaluate_inpaint(model, args.outdir, inpaint_method=args.inpaint_method,
                                              jump_length=args.jump_length, jump_samples=args.jump_samples, **common,
                                              **backgrounds)
        print(shapes_eval.format_checks(report, shapes_eval.CHECKS["inpaint"]))
        seconds = report["settings"]["seconds"]
        print(f"{report['settings']['seconds_per_image']:.3f} s per image ({seconds:.1f} s in the pipeline); "
              f"inputs, masks, outputs, metadata.jsonl and report.json in {args.outdir}")
    else:
        from ldm.cli.txt2img import check_loras

        kinds, backgrounds, counts = parse_lists(args)
        report = shapes_eval.evaluate(model, args.outdir, size=args.size, kinds=kinds, backgrounds=backgrounds,
                                      counts=counts, mix=args.mix or "usual", loras=check_loras(args), **common)
        print(format_report(report))
        print(f"images, metadata.jsonl and report.json in {args.outdir}")
    return 0


def check_task_options(args) -> None:
    """A ValueError for an option that does not apply to --task (it would be silently ignored)."""
    only = {"strength": ("img2img",), "inpaint_method": ("inpaint",), "jump_length": ("inpaint",),
            "jump_samples": ("inpaint",), "size": ("txt2img",), "unnamed_background": ("img2img", "inpaint"),
            "kinds": ("txt2img",), "backgrounds": ("txt2img",), "counts": ("txt2img",), "lora": ("txt2img",),
            "mix": ("txt2img",), "degradations": ("restore",), "method": ("restore",), "sigma_y": ("restore",),
            "step_size": ("restore",), "iterations": ("restore",), "particles": ("restore",),
            "restarts": ("restore",), "sampler": ("txt2img", "img2img", "inpaint"),
            "guidance_rescale": ("txt2img", "img2img", "inpaint")}
    for name, tasks in only.items():
        if getattr(args, name) not in (None, []) and args.task not in tasks:
            raise ValueError(f"--{name.replace('_', '-')} applies to --task {' and '.join(tasks)}, not {args.task}")


def parse_lists(args) -> tuple[list[str] | None, list[str] | None, list[int] | None]:
    """--kinds, --backgrounds and --counts as lists (unchecked: the Python API names what is wrong), or
    their defaults (None: the mix's own)."""
    kinds = None if args.kinds is None else [k.strip() for k in args.kinds.split(",")]
    backgrounds = None if args.backgrounds is None else [b.strip() for b in args.backgrounds.split(",")]
    counts = None
    if args.counts is not None:
        try:
            counts = [int(c) for c in args.counts.split(",")]
        except ValueError:
            raise ValueError(f"--counts {args.counts}: expected numbers separated by commas, like 2,3,4,5") from None
    return kinds, backgrounds, counts


def parse_strengths(values: list[str]) -> list[float]:
    """--strength values, each a number or a comma list, as floats in the order given."""
    strengths = []
    for value in values:
        for item in value.split(","):
            try:
                strengths.append(float(item))
            except ValueError:
                raise ValueError(f"--strength takes numbers in (0, 1], got {item.strip()!r}") from None
    return strengths


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-shapes")


if __name__ == "__main__":
    sys.exit(main())
