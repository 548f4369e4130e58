"""ldm-train-vae: train the stage-1 KL autoencoder (diffusers' AutoencoderKL) with the LDM losses.
See docs/train-vae.md."""

from __future__ import annotations

from ldm.cli.common import TRAINING_EXIT_STATUSES, ArgumentParser, add_training_arguments, load_training_config, run, run_training


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ldm-train-vae",
        description="Train a KL-regularised autoencoder (L1 [+ LPIPS] + KL + PatchGAN) and write OUTPUT/final, "
                    "an AutoencoderKL folder with its latent scaling_factor. Runs under `accelerate launch` too.",
        epilog=f"{TRAINING_EXIT_STATUSES} Example: ldm-train-vae --config configs/vae/shapes-f8.yaml --data data/shapes "
               "--output-dir runs/vae-shapes optim.lr=2e-4 run.batch_size=16",
    )
    add_training_arguments(p, "configs/vae/*.yaml", "ldm.train.vae.VAETrainConfig", "loss.disc_start=5000 optim.lr=2e-4")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may follow any flag
    from ldm.train.vae import VAETrainConfig, train

    config = load_training_config(VAETrainConfig, args)
    return run_training(lambda: train(config, resume=args.resume, progress=not args.quiet), "ldm-train-vae")


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-train-vae")


if __name__ == "__main__":
    raise SystemExit(main())
