"""ldm-txt2img: text → PNG files with a latent diffusion pipeline folder.

Prints the path of each PNG it writes on stdout, one per line; progress and warnings go to stderr.
Every setting is checked before any weights load, so a typo costs nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ldm.cli.common import ArgumentParser, run
from ldm.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, resolve_sampler

MAX_PROMPTS_BYTES = 16 * 2**20  # ~200,000 prompts; a file that never ends is refused at this size


def build_parser(editing: bool = False) -> ArgumentParser:
    """ldm-txt2img's flags; with `editing`, ldm-img2img's: an IMAGE first, and --strength."""
    if editing:
        p = ArgumentParser(
            prog="ldm-img2img",
            description="Edit a picture with a latent diffusion model: SDEdit (Meng et al. 2022) noises the image's "
                        "latents to a level set by --strength, then denoises them guided by the prompts.",
            epilog='Example: ldm-img2img sketch.png "a red circle to the left of a blue square" --strength 0.6',
        )
        from ldm.cli.img2img import add_arguments

        add_arguments(p)
    else:
        p = ArgumentParser(
            prog="ldm-txt2img",
            description="Generate images from text prompts with a latent diffusion model (classifier-free guidance).",
            epilog="Example: ldm-txt2img \"a red circle to the left of a blue square\" --cfg 7.5 --seed 1",
        )
    p.add_argument("prompt", nargs="*", help="one or more prompts (quote each one)")
    p.add_argument("--prompts-file", type=Path, help="a UTF-8 text file with one prompt per line (blank lines skipped)")
    p.add_argument("--negative", default="", help="negative prompt: what the image should not show (the unconditional half of guidance)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale w; 0 = unconditional, 1 = no guidance")
    p.add_argument("--steps", type=int,
                   help=f"number of denoising steps (default: {DEFAULT_STEPS}, or a distilled student's own count)")
    p.add_argument("--sampler", metavar="NAME",
                   help=f"sampler: {', '.join(SAMPLERS)}; AUTOMATIC1111's names work too ('Euler a', 'DPM++ 2M "
                        "Karras', 'k_lms', ...), in any case (default: the one the model's folder names, as in "
                        f"diffusers; {DEFAULT_SAMPLER} for models trained here and the default model)")
    p.add_argument("--clip-skip", type=int, metavar="N",
                   help="AUTOMATIC1111's Clip skip: condition on the text encoder's N-th layer from the end (1: the "
                        "last, the default; 2: the one before, as NovelAI-derived SD 1.x models want); CLIP only")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA file (.safetensors, diffusers/peft or kohya keys) at SCALE (default 1); "
                        "repeatable")
    p.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="where the prompt tags <lora:NAME:SCALE> (AUTOMATIC1111's) find NAME.safetensors")
    p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random, printed in each PNG's metadata)")
    size = "the image's, rounded down to the latent factor" if editing else "the model's size"
    p.add_argument("--height", type=int,
                   help=f"image height in pixels, a multiple of the model's latent factor (default: {size})")
    p.add_argument("--width", type=int, help=f"image width in pixels (default: {size})")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch (memory vs speed; the images do not change)")
    p.add_argument("--model", help="a diffusers pipeline folder (SD 1.x/2.x or one trained with ldm) or a hub id (default: the embedded default model)")
    p.add_argument("--config", help="with a single-file original-format .safetensors --model: a diffusers pipeline folder of the same architecture (configs, tokenizer, scheduler)")
    p.add_argument("--outdir", type=Path, default=Path("outputs"), help="folder for the PNGs (never overwritten; numbering continues)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp32 on the CPU, bf16/fp16 on a GPU (the VAE decodes in a dtype that cannot overflow)")
    p.add_argument("--guidance-rescale", type=float, metavar="PHI",
                   help="guidance rescale φ (Lin et al. 2023), 0-1 (default: 0.7 for a zero-terminal-SNR model, as Lin et al. prescribe, else 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's η (ddim sampler only): 0 deterministic, 1 DDPM-like")
    p.add_argument("--dynamic-threshold", type=float, metavar="P", help="Imagen dynamic thresholding of the predicted latent at percentile P (e.g. 0.995); off by default")
    p.add_argument("--threshold-bound", type=float, default=1.0, help="the range dynamic thresholding pulls the predicted latent into")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="attention kernels: torch SDPA, or xformers where installed")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (CUDA graphs on a GPU), with channels-last layout and fused QKV projections: slow first batch, faster after; for long --prompts-file runs")
    p.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"], help="decode in overlapping tiles so large images fit a fixed memory budget (auto: above 1024x1024 pixels)")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pipeline folder whose weights are only pickle files (.bin/.ckpt), read by torch's weights-only unpickler; only for files you trust, convert them to safetensors instead when you can")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, "rb") as f:  # a pipe or a device is read too, but never past the limit
                data = f.read(MAX_PROMPTS_BYTES + 1)
            if len(data) > MAX_PROMPTS_BYTES:
                limit = MAX_PROMPTS_BYTES >> 20
                raise ValueError(f"prompts file {args.prompts_file} is longer than {limit} MB; split it into runs")
            text = data.decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"prompts file not found: {args.prompts_file}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompts file {args.prompts_file}: {e}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass PROMPT arguments or --prompts-file FILE with one prompt per line")
    return prompts


def check_clip_skip(n: int | None, text_encoder_config: dict) -> int | None:
    """--clip-skip N (A1111's count) as the pipeline's clip_skip (N − 1), checked against the
    folder's text encoder config before any weights load."""
    if n is None or n == 1:
        return None
    layers = text_encoder_config.get("num_hidden_layers", 0)
    if text_encoder_config.get("model_type") != "clip_text_model":
        raise ValueError(f"--clip-skip applies to CLIP text encoders; this model's is "
                         f"{text_encoder_config.get('model_type')}")
    if not 1 <= n <= layers:
        raise ValueError(f"--clip-skip must be in [1, {layers}] for this text encoder, got {n}")
    return n - 1


def check_loras(args, prompts: list[str] = ()) -> list[tuple[Path, float]]:
    """--lora FILE[:SCALE] as (file, scale), every file and every prompt tag's file checked before
    any weights load: a .safetensors file with an honest header, found by name in --lora-dir."""
    from ldm.lora import parse_lora_arg, prompt_tags, resolve_tag
    from ldm.models import check_safetensors

    loras = [parse_lora_arg(text) for text in args.lora]
    stems = [path.stem for path, _ in loras]
    if len(set(stems)) != len(stems):
        raise ValueError("--lora: two files with the same name; rename one")
    if getattr(args, "lora_dir", None) is not None and not args.lora_dir.is_dir():
        raise ValueError(f"--lora-dir {args.lora_dir} is not a folder")
    files = [path for path, _ in loras]
    files += [resolve_tag(name, getattr(args, "lora_dir", None)) for p in prompts for name, _ in prompt_tags(p)[1]]
    for path in files:
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path}: a LoRA must be a .safetensors file (pickles are refused: loading one can run "
                             "code)")
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        check_safetensors(path)
    return loras


def check_outdir(outdir: Path) -> None:
    """The output folder must exist or be creatable, and be writable, before any work is done."""
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"--outdir {outdir} exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --outdir {outdir}: {e.strerror}") from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise ValueError(f"--outdir {outdir} is not writable")


def check_request_fits(info, args, device, height: int, width: int, images: int) -> None:
    """Refuse, before any weights load, a request whose memory or disk needs cannot be met."""
    import shutil

    from ldm.budget import check_fits, estimate, weights_bytes
    from ldm.pipeline import VAE_TILING_PIXELS, resolve_dtype, vae_dtype_for

    dtype = resolve_dtype(args.dtype, device)
    itemsize, vae_itemsize = dtype.itemsize, vae_dtype_for(dtype, info.vae_config).itemsize
    tiled = {"on": True, "off": False}.get(args.vae_tiling, height * width > VAE_TILING_PIXELS)
    batch = min(args.batch_size, images)
    need = estimate(info.unet_config, info.vae_config, height, width, batch, itemsize, vae_itemsize, tiled,
                    weights=weights_bytes(info, itemsize, vae_itemsize))
    what = f"a batch of {batch} image(s) of {width}x{height} (VAE tiling {'on' if tiled else 'off'})"
    hint = "use a smaller --height/--width" + (" or --batch-size" if batch > 1 else "")
    hint += "" if tiled else ", or --vae-tiling on"
    check_fits(need, device, what, hint)
    # PNGs of drawn pictures compress ~10:1 at best; fewer free bytes than that cannot hold them
    smallest = images * height * width * 3 // 10
    free = shutil.disk_usage(args.outdir).free
    if smallest > free:
        raise ValueError(f"{images:,} image(s) of {width}x{height} need at least ~{smallest / 2**20:,.0f} MB in "
                         f"--outdir {args.outdir}, which has {free / 2**20:,.0f} MB free")


def _main(argv=None, editing: bool = False) -> int:
    args = build_parser(editing).parse_intermixed_args(argv)  # prompts may stand between flags
    from ldm.guidance import default_guidance_rescale
    from ldm.lora import apply_loras
    from ldm.models import inspect_pipeline, resolve_model
    from ldm.pipeline import DEFAULT_MODEL, LatentPipeline, check_generation_args, resolve_device, resolve_dtype
    from ldm.train.distill import check_built_in_guidance, check_student, read_card

    # 1. Everything that can be checked without weights.
    prompts = read_prompts(args)
    args.sampler = resolve_sampler(args.sampler) if args.sampler is not None else None
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    if args.model is None and not DEFAULT_MODEL.is_dir():
        raise ValueError(f"the default model is missing from this installation (expected at {DEFAULT_MODEL}); pass --model PATH with a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    model = args.model or str(DEFAULT_MODEL)
    from ldm.models import PICKLE_SUFFIXES

    if model.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"--model {model}: pickle checkpoints are refused (loading a pickle can run code); use the model's .safetensors release")
    single_file = model.lower().endswith(".safetensors")
    if single_file and not args.config:
        raise ValueError(f"--model {model} is a single-file checkpoint: pass --config with a diffusers pipeline folder of the same architecture")
    if args.config and not single_file:
        raise ValueError("--config applies only to a single-file .safetensors --model")
    if single_file and not Path(model).is_file():
        raise FileNotFoundError(f"checkpoint not found: {model}")
    info = inspect_pipeline(resolve_model(args.config if single_file else model), allow_pickle=args.allow_pickle and not single_file)
    card = None if single_file else read_card(info.path)  # a distilled student's sampler and steps
    embedded = info.unet_config.get("time_cond_proj_dim") is not None
    if args.steps is None:
        args.steps = card["steps"] if card else DEFAULT_STEPS
    check_student(card, args.sampler, args.steps)
    request, default_height, default_width = {}, info.default_size, info.default_size
    if editing:
        from ldm.cli.img2img import editing_request

        request, default_height, default_width = editing_request(args, info.latent_factor)
        default_height = default_height or info.default_size
        default_width = default_width or info.default_size
    height = args.height if args.height is not None else default_height
    width = args.width if args.width is not None else default_width
    if args.guidance_rescale is None:
        rescale = 0.0 if embedded else default_guidance_rescale(info.scheduler_config)
    else:
        rescale = args.guidance_rescale
    check_built_in_guidance(embedded, [args.negative], rescale)
    check_generation_args(
        latent_factor=info.latent_factor, height=height, width=width, num_inference_steps=args.steps,
        guidance_scale=args.cfg, sampler=args.sampler, guidance_rescale=rescale, eta=args.eta,
        num_images_per_prompt=args.num_images, batch_size=args.batch_size, dynamic_threshold=args.dynamic_threshold,
        threshold_bound=args.threshold_bound, scheduler_config=info.scheduler_config,
    )
    if args.seed is not None and not 0 <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    loras = check_loras(args, prompts)
    clip_skip = check_clip_skip(args.clip_skip, info.components["text_encoder"].config)
    check_outdir(args.outdir)
    check_request_fits(info, args, device, height, width, len(prompts) * args.num_images)

    # 2. Load, then generate batch by batch, writing each batch's PNGs as soon as they exist.
    if single_file:
        pipe = LatentPipeline.from_single_file(model, config=info.path, device=device, dtype=args.dtype, attention=args.attention)
    else:
        pipe = LatentPipeline.from_pretrained(model, device=device, dtype=args.dtype, attention=args.attention, allow_pickle=args.allow_pickle)
    pipe.lora_dir = args.lora_dir
    apply_loras(pipe, loras)
    if args.compile:
        pipe.optimize(channels_last=True, fuse_qkv=True, compile=True)
    vae_tiling = {"auto": "auto", "on": True, "off": False}[args.vae_tiling]
    jobs = [p for p in prompts for _ in range(args.num_images)]
    import random

    first_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        out = pipe(
            batch, negative_prompt=args.negative, guidance_scale=args.cfg, num_inference_steps=args.steps,
            **({} if request.get("outpaint") else {"height": height, "width": width}),
            seed=[first_seed + start + i for i in range(len(batch))], sampler=args.sampler,
            guidance_rescale=rescale, eta=args.eta, dynamic_threshold=args.dynamic_threshold,
            threshold_bound=args.threshold_bound, progress=not args.quiet, vae_tiling=vae_tiling, clip_skip=clip_skip,
            **request,
        )
        for path in out.save(args.outdir):
            print(path, flush=True)
    return 0


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-txt2img")


if __name__ == "__main__":
    sys.exit(main())
