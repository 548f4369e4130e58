"""ldm-train-unet: stage 2, a text-conditioned latent-diffusion U-Net on a frozen VAE.

One process: `ldm-train-unet --config configs/unet/shapes.yaml --vae runs/vae/final --data DIR`.
Many: `accelerate launch --num_processes K -m ldm.cli.train_unet ...` (see docs/train-unet.md).
"""

from __future__ import annotations

import sys

from ldm.cli.common import TRAINING_EXIT_STATUSES, ArgumentParser, add_training_arguments, load_training_config, run, run_training


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ldm-train-unet",
        description="Train a text-conditioned latent diffusion U-Net (stage 2) with condition dropout, on the latents of a frozen VAE.",
        epilog=f"{TRAINING_EXIT_STATUSES} Example: ldm-train-unet --config configs/unet/shapes.yaml --vae runs/vae-shapes/final "
               "--data data/shapes --output-dir runs/unet-shapes optim.lr=2e-4 run.batch_size=64. "
               "A LoRA: ldm-train-unet --config configs/unet/lora.yaml --base PIPELINE --data DIR "
               "--output-dir runs/lora",
    )
    add_training_arguments(p, "configs/unet/*.yaml", "ldm.train.unet.UNetTrainConfig", "optim.lr=3e-4 objective.p_uncond=0.1")
    p.add_argument("--base", metavar="PIPELINE",
                   help="a pipeline folder to start from: its VAE, text encoder, U-Net and noise schedule; sets base "
                        "(with configs/unet/lora.yaml: train a LoRA on it)")
    p.add_argument("--lora-format", choices=("diffusers", "kohya"),
                   help="the key format of a LoRA run's final/lora.safetensors (default diffusers); sets lora.format")
    p.add_argument("--vae", help="the frozen AutoencoderKL folder (config.json with scaling_factor + safetensors), or a pipeline folder with vae/; sets vae")
    p.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "OUT"),
                   help="write a checkpoint (latest, or a checkpoint folder) as a pipeline folder OUT, with its EMA weights as in final/, and exit; "
                        "give the run's own --config (e.g. OUTPUT/config.yaml) so the networks match")
    p.add_argument("--build-cache", action="store_true", help="encode the dataset once into the latent cache (VAE posteriors; text embeddings for a frozen encoder) and exit; later runs use it")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may follow any flag
    from ldm.train.unet import UNetTrainConfig, train

    config = load_training_config(UNetTrainConfig, args, vae=args.vae, base=args.base,
                                  **{"lora.format": args.lora_format})
    if args.export:
        if args.build_cache or args.resume:
            raise ValueError("--export runs alone: drop --build-cache and --resume")
        from ldm.train.unet import export_checkpoint

        print(export_checkpoint(config, *args.export))
        return 0
    progress = not args.quiet
    return run_training(lambda: train(config, resume=args.resume, build_cache_only=args.build_cache, progress=progress),
                        "ldm-train-unet")


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-train-unet")


if __name__ == "__main__":
    sys.exit(main())
