"""Does the shapes scorer reject what a person would reject? Held-out scenes drawn wrong on purpose,
each scored against its own (unchanged) caption, beside the same scenes drawn right.

    python scripts/check_scorer_misdrawn.py --num 300

The mis-drawings (the failures issue 30 saw in the default model's pictures):
- ring: every circle drawn as a ring (an annulus whose hole is half the diameter);
- rounded square: every square with rounded corners, the corner radius a fraction of the half side
  (0.35: clearly rounded; 0.7: nearly a circle);
- small drawn large: an object the caption calls small drawn at the large size (same centre);
- fused: counting scenes with their objects moved together until neighbours overlap by 2 px.
A pass on a mis-drawing is a false accept; a fail on a right drawing is a false reject. Prints a
Markdown table. (2-core CPU: about a minute for 300 scenes per row.)
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from ldm.data.shapes import (
    COLORS, EVAL_DOMAIN, SIZE_FRACTIONS, SUPERSAMPLE, Scene, background_rgb, make_scene, render_array,
)
from ldm.data.shapes_score import score_image


def coverage(o, size: int, ring: bool = False, corner: float = 0.0) -> np.ndarray:
    """Supersampled coverage of object `o` on the whole canvas, drawn as a ring or with rounded corners."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    axis = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1)
    X, Y = axis[None, :], axis[:, None]
    half = o.extent / 2
    dx, dy = np.abs(X - o.cx), np.abs(Y - o.cy)
    if o.shape == "circle":
        inside = dx ** 2 + dy ** 2 <= half ** 2
        if ring:
            inside &= dx ** 2 + dy ** 2 >= (half / 2) ** 2
    elif o.shape == "square":
        r = corner * half
        inside = (dx <= half) & (dy <= half)
        if r > 0:  # outside the corner circles' reach is cut away
            cx, cy = np.maximum(dx - (half - r), 0), np.maximum(dy - (half - r), 0)
            inside &= cx ** 2 + cy ** 2 <= r ** 2
    else:
        top = o.cy - half
        inside = (Y >= top) & (Y <= o.cy + half) & (np.abs(X - o.cx) <= (Y - top) / 2)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def draw(scene: Scene, **style) -> np.ndarray:
    bg = np.array(background_rgb(scene.background), np.float32)
    image = np.zeros((scene.size, scene.size, 3), np.float32) + bg
    for o in scene.objects:
        cover = coverage(o, scene.size, **style)[..., None]
        image = image + cover * (np.array(COLORS[o.color], np.float32) - image)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def fused(scene: Scene) -> Scene:
    """The objects pulled towards their common centre until the nearest two overlap by 2 px."""
    objects = scene.objects
    cx, cy = np.mean([o.cx for o in objects]), np.mean([o.cy for o in objects])
    for k in np.linspace(1, 0, 101):
        moved = [dataclasses.replace(o, cx=cx + k * (o.cx - cx), cy=cy + k * (o.cy - cy)) for o in objects]
        gap = min(max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.extent + b.extent) / 2
                  for i, a in enumerate(moved) for b in moved[i + 1:])
        if gap <= -2:
            return dataclasses.replace(scene, objects=tuple(moved))
    return dataclasses.replace(scene, objects=tuple(moved))


def rate(pairs) -> str:
    pairs = list(pairs)
    return f"{100 * np.mean([score_image(image, caption).passed for image, caption in pairs]):.1f}% of {len(pairs)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=300, help="held-out scenes per row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    def scenes(kinds, keep):
        found, i = [], 0
        while len(found) < args.num:
            scene = make_scene(args.seed, i, domain=EVAL_DOMAIN, kinds=kinds, unnamed_background="gray")
            i += 1
            if keep(scene):
                found.append(scene)
        return found

    circles = scenes(["single", "counting", "two"], lambda s: any(o.shape == "circle" for o in s.objects))
    squares = scenes(["single", "counting", "two"], lambda s: any(o.shape == "square" for o in s.objects))
    small = scenes(["attributes"], lambda s: any(spec.size == "small" for spec in s.prompt.objects))
    counts = scenes(["counting"], lambda s: True)
    rows = [
        ("circles: right / as rings", circles, lambda s: draw(s), lambda s: draw(s, ring=True)),
        ("squares: right / corners rounded 0.35", squares, lambda s: draw(s), lambda s: draw(s, corner=0.35)),
        ("squares: right / corners rounded 0.7", squares, lambda s: draw(s), lambda s: draw(s, corner=0.7)),
        ("counting: right / objects fused", counts, lambda s: draw(s), lambda s: draw(fused(s))),
    ]
    print("| scenes | right drawing passes (1 − false reject) | mis-drawing passes (false accept) |")
    print("|---|---:|---:|")
    for name, group, right, wrong in rows:
        right_rate, wrong_rate = rate((right(s), s.caption) for s in group), rate((wrong(s), s.caption) for s in group)
        print(f"| {name} | {right_rate} | {wrong_rate} |", flush=True)
    grown = []
    for s in small:  # every object the caption calls small, drawn at the large size
        named = [spec.size for spec in s.prompt.objects]
        objects = tuple(dataclasses.replace(o, extent=o.extent * SIZE_FRACTIONS["large"] / SIZE_FRACTIONS["small"])
                        if size == "small" else o for o, size in zip(s.objects, named + [None] * 4))
        grown.append((render_array(dataclasses.replace(s, objects=objects)), s.caption))
    print(f"| attributes: right / small drawn large | {rate((render_array(s), s.caption) for s in small)} | "
          f"{rate(grown)} |")


if __name__ == "__main__":
    main()
