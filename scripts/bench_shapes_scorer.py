"""How right is `ldm-shapes score`? Pass rates on fresh ground-truth scenes under corruptions, and
on images scored against other images' captions (which should fail). Prints a table and a summary.

    python scripts/bench_shapes_scorer.py --num 1200 --seed 7
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image, ImageFilter

from ldm.data.shapes import make_scene, render
from ldm.data.shapes_score import score_image


def noisy(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(image).astype(np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=1200, help="scenes to score")
    parser.add_argument("--seed", type=int, default=7, help="scene seed (use one no training set used)")
    parser.add_argument("--size", type=int, default=64, help="canvas size")
    args = parser.parse_args()

    scenes = [make_scene(args.seed, i, size=args.size) for i in range(args.num)]
    images = [render(s) for s in scenes]
    captions = [s.caption for s in scenes]
    rng = np.random.default_rng(args.seed)
    derangement = np.roll(rng.permutation(args.num), 1)  # image i gets the caption of another scene
    cases = {
        "clean": (lambda im: im, captions),
        "blur σ1.5": (lambda im: im.filter(ImageFilter.GaussianBlur(1.5)), captions),
        "blur σ2.0": (lambda im: im.filter(ImageFilter.GaussianBlur(2.0)), captions),
        "noise σ5": (lambda im: noisy(im, 5, rng), captions),
        "noise σ10": (lambda im: noisy(im, 10, rng), captions),
        "blur σ1.5 + noise σ5": (lambda im: noisy(im.filter(ImageFilter.GaussianBlur(1.5)), 5, rng), captions),
        "jpeg q75": (lambda im: jpeg(im, 75), captions),
        "another image's caption": (lambda im: im, [captions[j] for j in derangement]),
    }
    print(f"{'case':<26} {'pass rate':>9} {'ms/image':>9}")
    rates = {}
    for name, (corrupt, caps) in cases.items():
        start = time.perf_counter()
        passed = [score_image(corrupt(im), c).passed for im, c in zip(images, caps)]
        ms = (time.perf_counter() - start) / args.num * 1e3
        rates[name] = float(np.mean(passed))
        print(f"{name:<26} {rates[name]:>9.3f} {ms:>9.2f}")
    mismatched = rates.pop("another image's caption")
    print(f"summary: ground truth passes {min(rates.values()):.1%}-{max(rates.values()):.1%} across corruptions; "
          f"mismatched captions pass {mismatched:.1%} ({args.num} scenes, seed {args.seed})")


if __name__ == "__main__":
    main()
