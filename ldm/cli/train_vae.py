"""ldm-train-vae: train the stage-1 KL autoencoder (diffusers' AutoencoderKL) with the LDM losses.
See docs/train-vae.md."""

from __future__ import annotations

import logging

from ldm.cli.common import ArgumentParser, run


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ldm-train-vae",
        description="Train a KL-regularised autoencoder (L1 [+ LPIPS] + KL + PatchGAN) and write OUTPUT/final, "
                    "an AutoencoderKL folder with its latent scaling_factor. Runs under `accelerate launch` too.",
        epilog="Example: ldm-train-vae --config configs/vae/shapes-f8.yaml --data data/shapes --output-dir runs/vae-shapes "
               "optim.lr=2e-4 run.batch_size=16",
    )
    p.add_argument("--config", required=True, help="YAML preset (configs/vae/*.yaml); keys map 1:1 onto VAETrainConfig")
    p.add_argument("--data", help="training images (folder, metadata.jsonl/csv or tar shards); sets data.path")
    p.add_argument("--output-dir", help="run folder for checkpoints, samples, metrics and final/; sets run.output_dir")
    p.add_argument("--max-steps", type=int, help="optimizer updates; sets run.max_steps")
    p.add_argument("--resume", metavar="latest|DIR", help="continue exactly from the newest checkpoint in the output dir, or from DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys, e.g. loss.disc_start=5000")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may follow any flag
    from ldm.config import load_config
    from ldm.train.vae import VAETrainConfig, train

    cfg = load_config(VAETrainConfig, args.config, args.overrides)
    # Set directly, not as overrides: a path must stay a string even when YAML would read it otherwise.
    if args.data is not None:
        cfg.data.path = args.data
    if args.output_dir is not None:
        cfg.run.output_dir = args.output_dir
    if args.max_steps is not None:
        cfg.run.max_steps = args.max_steps
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ldm.train.guards import RunStopped, report_stop

    try:
        final = train(cfg, resume=args.resume, progress=not args.quiet)
    except RunStopped as stopped:  # a signal (75: resume me) or a diverged run (3): one line, no traceback
        return report_stop(stopped, "ldm-train-vae")
    print(final)
    return 0


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-train-vae")


if __name__ == "__main__":
    raise SystemExit(main())
