"""Is `ldm-shapes score` right on colour backgrounds (the shapes world's extension)? Renders held-out
scenes of the background kind with backgrounds drawn from --backgrounds, and prints per background:
the pass rate of each image against its own caption, clean and corrupted (should be ~100%), and
three things that must fail (~0%): the same image against its caption with the background changed
to gray (a model that ignores the background words), the same scene drawn on gray against its own
caption, and the image against its caption naming another colour background. Then the pairs
(object colour on background) that fell under 100% in any corruption.

    python scripts/check_scorer_backgrounds.py --num 600                           # all six colours
    python scripts/check_scorer_backgrounds.py --num 600 --backgrounds blue,green
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

import numpy as np
from PIL import Image, ImageFilter

from ldm.data.shapes import COLORS, EVAL_DOMAIN, check_backgrounds, format_prompt, make_scene, render
from ldm.data.shapes_score import score_image


def noisy(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(image).astype(np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def with_background(prompt, background: str) -> str:
    return format_prompt(dataclasses.replace(prompt, background=background))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=600, help="scenes (all of the background kind)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed: scene i is make_scene(seed, i, "
                                                           "domain=EVAL_DOMAIN, kinds=['background'], backgrounds=...)")
    parser.add_argument("--backgrounds", default=",".join(COLORS), help="comma list of background names to draw from "
                                                                        "(default: the six object colours)")
    parser.add_argument("--failures", action="store_true", help="also list each own-caption failure and why")
    args = parser.parse_args(argv)
    backgrounds = check_backgrounds([b.strip() for b in args.backgrounds.split(",")])

    rng = np.random.default_rng(args.seed)
    corruptions = {
        "clean": lambda im: im,
        "blur 1.5": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
        "noise 5": lambda im: noisy(im, 5, rng),
        "blur+noise": lambda im: noisy(im.filter(ImageFilter.GaussianBlur(1.5)), 5, rng),
        "noise 10": lambda im: noisy(im, 10, rng),
    }
    wrong = ("says gray", "drawn gray", "other colour")
    table = defaultdict(lambda: defaultdict(int))  # background -> column -> passes ("n": scenes)
    pairs = defaultdict(lambda: [0, 0])  # (object colour, background) -> [passes, trials] over the corruptions
    colours = list(COLORS)
    failures = []
    for i in range(args.num):
        scene = make_scene(args.seed, i, domain=EVAL_DOMAIN, kinds=["background"], backgrounds=backgrounds)
        image, row = render(scene), table[scene.background]
        row["n"] += 1
        for name, corrupt in corruptions.items():
            result = score_image(corrupt(image), scene.caption)
            passed = result.passed
            row[name] += passed
            if not passed:
                failures.append(f"scene {i}, {name}: {scene.caption!r}: {result.reason}")
            for color in {o.color for o in scene.objects}:
                pairs[color, scene.background][0] += passed
                pairs[color, scene.background][1] += 1
        row["says gray"] += score_image(image, with_background(scene.prompt, "gray")).passed
        row["drawn gray"] += score_image(render(dataclasses.replace(scene, background="gray")), scene.caption).passed
        if scene.background in COLORS:  # the next colour round the list that no object has
            start = colours.index(scene.background)
            taken = {o.color for o in scene.objects} | {scene.background}
            other = next(c for c in colours[start:] + colours[:start] if c not in taken)
            row["other colour"] += score_image(image, with_background(scene.prompt, other)).passed

    columns = [*corruptions, *wrong]
    print(f"own caption (should pass) | {', '.join(wrong)} (should fail); {args.num} scenes, seed {args.seed}")
    print(f"{'background':<12}{'scenes':>7}" + "".join(f"{c:>13}" for c in columns))
    total = defaultdict(int)
    for background in sorted(table, key=lambda b: list(COLORS).index(b) if b in COLORS else -1):
        row = table[background]
        for c in ["n", *columns]:
            total[c] += row[c]
        print(f"{background:<12}{row['n']:>7}" + "".join(f"{100 * row[c] / row['n']:>12.1f}%" for c in columns))
    print(f"{'all':<12}{total['n']:>7}" + "".join(f"{100 * total[c] / total['n']:>12.1f}%" for c in columns))
    weak = sorted((100 * p / n, color, bg, n) for (color, bg), (p, n) in pairs.items() if p < n)
    print("pairs under 100% over the corruptions: "
          + (", ".join(f"{color} on {bg} {rate:.1f}% of {n} scorings" for rate, color, bg, n in weak) or "none"))
    if args.failures:
        print("\n".join(failures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
