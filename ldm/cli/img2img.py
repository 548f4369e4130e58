"""ldm-img2img: edit a picture with a latent diffusion model, the same way ldm-txt2img draws.

SDEdit (img2img), inpainting (replacement, RePaint, or an inpainting U-Net's own) and outpainting,
with the mask options AUTOMATIC1111 users know. Prints the path of each PNG it writes on stdout,
one per line; progress and warnings go to stderr. Every flag of ldm-txt2img works here too, and
every setting is checked before any weights load.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ldm.cli.common import run
from ldm.editing import (
    DEFAULT_JUMP_LENGTH, DEFAULT_JUMP_SAMPLES, DEFAULT_MASKED_PADDING, DEFAULT_STRENGTH, INPAINT_AREAS, INPAINT_METHODS,
    MASKED_CONTENT, REPAINT_DEFAULT_SAMPLER, REPAINT_SAMPLERS, repaint_calls,
)
from ldm.sampling import DEFAULT_STEPS

REPAINT_CALLS = repaint_calls(DEFAULT_STEPS, DEFAULT_JUMP_LENGTH, DEFAULT_JUMP_SAMPLES)
MASK_FLAGS = ("mask_blur", "mask_invert", "masked_content", "inpaint_area", "masked_padding")


def add_arguments(p) -> None:
    """ldm-img2img's own flags, beside ldm-txt2img's."""
    p.add_argument("image", type=Path, help="the picture to start from (any format PIL reads)")
    p.add_argument("--strength", type=float,
                   help="how far to depart from the image: the share of the steps run from its noised latents, "
                        f"in (0, 1]; small keeps it, 1 draws anew (default: {DEFAULT_STRENGTH}; 1 with --mask or "
                        "--outpaint, as diffusers)")
    m = p.add_argument_group("inpainting and outpainting")
    m.add_argument("--mask", type=Path, help="inpaint: a mask image, white where to repaint, black where to keep")
    m.add_argument("--outpaint", metavar="L,T,R,B",
                   help="grow the canvas by these pixels on the left, top, right and bottom (right and bottom rounded "
                        "up to the latent factor) and paint the new border; instead of --mask")
    m.add_argument("--inpaint-method", choices=INPAINT_METHODS,
                   help="replace: after each step the kept region is the image's latents noised to that level (one "
                        "U-Net call per step, as txt2img; the default with an ordinary U-Net). repaint: RePaint's "
                        "resampling (Lugmayr et al. 2022), which jumps back --jump-length steps and redoes them, "
                        "until each stretch has run --jump-samples times; it costs steps + jumps x length x "
                        f"(samples - 1) U-Net calls: {REPAINT_CALLS} instead of {DEFAULT_STEPS} at the defaults. "
                        "Runs on samplers "
                        f"{' and '.join(REPAINT_SAMPLERS)} (default: {REPAINT_DEFAULT_SAMPLER}). An inpainting U-Net "
                        "(9 input channels) inpaints by itself and takes neither")
    m.add_argument("--jump-length", type=int,
                   help=f"repaint: steps to jump back each time (default: {DEFAULT_JUMP_LENGTH})")
    m.add_argument("--jump-samples", type=int,
                   help=f"repaint: times each stretch of steps is run (default: {DEFAULT_JUMP_SAMPLES}; 1 = no jumps)")
    m.add_argument("--mask-blur", type=float, default=0, metavar="PX",
                   help="Gaussian blur of the mask's edge, in pixels, that the result is blended through "
                        "(AUTOMATIC1111's default is 4)")
    m.add_argument("--mask-invert", action="store_true", help="repaint the black part of the mask and keep the white")
    m.add_argument("--masked-content", choices=MASKED_CONTENT, default="original",
                   help="what the masked part starts from below strength 1: the picture itself, or the colours "
                        "around it (fill)")
    m.add_argument("--inpaint-area", choices=INPAINT_AREAS, default="whole",
                   help="masked: draw only the box around the mask, at --height x --width (default: the model's "
                        "size), and paste it back: full resolution for a small mask in a large picture")
    m.add_argument("--masked-padding", type=int, default=DEFAULT_MASKED_PADDING, metavar="PX",
                   help="with --inpaint-area masked: pixels of context around the mask's box")
    m.add_argument("--no-composite", action="store_true",
                   help="keep the raw decode instead of pasting the result into the picture through the mask "
                        "(which keeps every pixel outside it)")


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """"L,T,R,B" as four whole numbers of pixels, or a ValueError."""
    parts = text.split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise ValueError(f"--outpaint takes four whole numbers of pixels ≥ 0, left,top,right,bottom; got {text!r}")
    return values


def editing_request(args, latent_factor: int) -> tuple[dict, int, int]:
    """(pipeline keywords, default height, default width) for ldm-img2img's flags: every check that
    needs no weights, and the pictures read (RGB, fully decoded, decompression bombs refused)."""
    from ldm.data.images import load_image
    from ldm.editing import check_inpainting, check_mask_options, check_strength

    inpainting = args.mask is not None or args.outpaint is not None
    if args.mask is not None and args.outpaint is not None:
        raise ValueError("--outpaint makes its own mask (the new border); pass --mask or --outpaint, not both")
    given = [f"--{name}" for name in ("inpaint-method", "jump-length", "jump-samples", "no-composite")
             if getattr(args, name.replace("-", "_")) not in (None, False)]
    if given and not inpainting:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with --mask or --outpaint")
    outpaint = parse_outpaint(args.outpaint) if args.outpaint is not None else None
    options = {name: getattr(args, name) for name in MASK_FLAGS}
    try:
        check_mask_options(inpainting, outpaint=outpaint, **options)
    except ValueError as e:  # the Python names, as flags
        flags = lambda m: "--mask" if m[0] == "mask_image" else "--" + m[0].replace("_", "-")  # noqa: E731
        raise ValueError(re.sub(rf"\b({'|'.join(('mask_image', 'outpaint') + MASK_FLAGS)})\b", flags, str(e))) from None
    strength = args.strength if args.strength is not None else 1.0 if inpainting else DEFAULT_STRENGTH
    check_strength(strength, args.steps if args.steps >= 1 else 1)
    if inpainting and args.inpaint_method == "repaint":  # the U-Net's kind is only known once it loads
        check_inpainting("repaint", False, args.sampler, args.jump_length, args.jump_samples,
                         int(max(args.steps, 1) * strength))
    image = load_image(args.image, key=f"IMAGE {args.image}")
    request = {"image": image, "strength": strength}
    if inpainting:
        request.update(options, outpaint=outpaint, inpaint_method=args.inpaint_method, jump_length=args.jump_length,
                       jump_samples=args.jump_samples, composite=not args.no_composite)
        if args.mask is not None:
            request["mask_image"] = load_image(args.mask, key=f"--mask {args.mask}")
    f = latent_factor
    width, height = image.width // f * f, image.height // f * f
    if not (width and height):
        raise ValueError(f"IMAGE {args.image} is {image.width}x{image.height}, smaller than the model's latent "
                         f"factor {f}")
    if outpaint is not None:
        left, top, right, bottom = outpaint
        width, height = -(-(width + left + right) // f) * f, -(-(height + top + bottom) // f) * f
        if args.height is not None or args.width is not None:
            raise ValueError("--outpaint sets the size (the picture plus its new border); drop --height/--width")
    if args.inpaint_area == "masked":
        width = height = None  # the model's size, unless --height/--width say otherwise
    return request, height, width


def main(argv=None) -> int:
    from ldm.cli.txt2img import _main

    return run(lambda args: _main(args, editing=True), argv, prog="ldm-img2img")


if __name__ == "__main__":
    sys.exit(main())
