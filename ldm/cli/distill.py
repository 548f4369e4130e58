"""ldm-distill: a few-step student of a trained pipeline, by latent consistency (LCM) or progressive
distillation (`ldm.train.distill`). Its OUTPUT/final is a pipeline folder that names its own sampler
and step count: `ldm-txt2img PROMPT --model OUTPUT/final` samples it in 4 steps (LCM) or its last round's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.cli.common import (TRAINING_EXIT_STATUSES, ArgumentParser, add_training_arguments, load_training_config, run,
                            run_training)

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "distill"  # the repository's (an editable install)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ldm-distill",
        description="Distill a trained pipeline (the teacher, with classifier-free guidance) into a student that "
                    "samples in 1-8 steps with one U-Net call each: latent consistency distillation (--method lcm; "
                    "Luo et al. 2023) or progressive distillation, halving the steps each round (--method "
                    "progressive; Salimans & Ho 2022, guided as Meng et al. 2023). The teacher stays frozen; the "
                    "student starts from its weights with a guidance-scale embedding. Cost per step: the teacher's "
                    "guided call (two U-Net halves), the student's forward and backward, and the target's forward "
                    "(LCM) or a second teacher call (progressive): about twice a stage-2 step per image (the default "
                    "model on 2 CPU cores in bf16: 90 images/s, ~1.1 GiB); memory: three copies of the U-Net.",
        epilog=f"{TRAINING_EXIT_STATUSES} Example: ldm-distill --teacher assets/default-model --method lcm "
               "--data data/shapes --output-dir runs/lcm, then ldm-txt2img PROMPT --model runs/lcm/final. "
               "Progressive: --method progressive distill.rounds=[8,4,2] (run.max_steps steps per round).",
    )
    add_training_arguments(p, "configs/distill/*.yaml; default: the method's", "ldm.train.unet.UNetTrainConfig",
                           "distill.guidance_max=8 run.batch_size=32")
    p.add_argument("--teacher", required=True, metavar="PIPELINE",
                   help="the trained pipeline folder to distill (its VAE, text encoder, U-Net and noise schedule); "
                        "sets base")
    p.add_argument("--method", choices=("lcm", "progressive"),
                   help="the distillation (default: the --config preset's; without --config, lcm); "
                        "sets distill.method and picks configs/distill/METHOD.yaml when --config is not given")
    p.add_argument("--build-cache", action="store_true",
                   help="encode the dataset once into the latent cache (VAE posteriors and text embeddings) and exit")
    for action in p._actions:  # --config has a default here: the method's preset
        if action.dest == "config":
            action.required = False
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may follow any flag
    from ldm.train.distill import distill
    from ldm.train.unet import UNetTrainConfig

    if args.config is None:
        preset = PRESETS / f"{args.method or 'lcm'}.yaml"
        if not preset.is_file():
            raise ValueError(f"no --config given, and the preset {preset} is not beside this installation; "
                             "pass --config FILE")
        args.config = str(preset)
    config = load_training_config(UNetTrainConfig, args, base=args.teacher, **{"distill.method": args.method})
    if config.distill.method == "none":
        raise ValueError(f"{args.config} sets no distill.method: pass --method lcm or --method progressive")
    progress = not args.quiet
    return run_training(lambda: distill(config, resume=args.resume, build_cache_only=args.build_cache,
                                        progress=progress), "ldm-distill")


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-distill")


if __name__ == "__main__":
    sys.exit(main())
