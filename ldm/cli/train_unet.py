"""ldm-train-unet: stage 2, a text-conditioned latent-diffusion U-Net on a frozen VAE.

One process: `ldm-train-unet --config configs/unet/shapes.yaml --vae runs/vae/final --data DIR`.
Many: `accelerate launch --num_processes K -m ldm.cli.train_unet ...` (see docs/train-unet.md).
"""

from __future__ import annotations

import logging
import sys

from ldm.cli.common import ArgumentParser, run


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ldm-train-unet",
        description="Train a text-conditioned latent diffusion U-Net (stage 2) with condition dropout, on the latents of a frozen VAE.",
        epilog="Exit status: 0 done; 2 bad input; 3 too many non-finite steps in a row (run.max_bad_steps); "
               "75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun with --resume latest). "
               "Example: ldm-train-unet --config configs/unet/shapes.yaml --vae runs/vae-shapes/final --data data/shapes "
               "--output-dir runs/unet-shapes optim.lr=2e-4 run.batch_size=64",
    )
    p.add_argument("--config", required=True, help="a YAML config (configs/unet/*.yaml), keys as in ldm.train.unet.UNetTrainConfig")
    p.add_argument("--vae", help="the frozen AutoencoderKL folder (config.json with scaling_factor + safetensors), or a pipeline folder with vae/; overrides the config's vae")
    p.add_argument("--data", help="training data (folder, metadata.jsonl/csv, tar shards); overrides data.path")
    p.add_argument("--output-dir", help="run folder for checkpoints, samples, metrics and final/; overrides run.output_dir")
    p.add_argument("--max-steps", type=int, help="optimizer updates; overrides run.max_steps")
    p.add_argument("--resume", metavar="latest|DIR", help="continue from the newest checkpoint of the output folder, or from a checkpoint folder")
    p.add_argument("--build-cache", action="store_true", help="encode the dataset once into the latent cache (VAE posteriors; text embeddings for a frozen encoder) and exit; later runs use it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys, values as YAML (e.g. optim.lr=3e-4 objective.p_uncond=0.1)")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may follow any flag
    from ldm.config import load_config
    from ldm.train.unet import UNetTrainConfig, train

    overrides = list(args.overrides)
    for flag, key in ((args.vae, "vae"), (args.data, "data.path"), (args.output_dir, "run.output_dir"), (args.max_steps, "run.max_steps")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    config = load_config(UNetTrainConfig, args.config, overrides)
    from ldm.train.guards import RunStopped, report_stop

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = train(config, resume=args.resume, build_cache_only=args.build_cache)
    except RunStopped as stopped:  # a signal (75: resume me) or a diverged run (3): one line, no traceback
        return report_stop(stopped, "ldm-train-unet")
    print(result)
    return 0


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-train-unet")


if __name__ == "__main__":
    sys.exit(main())
