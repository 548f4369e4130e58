"""Does a shapes-world model read the relation words? Generate the same object pairs under all four
relations with the same seeds and measure where the two objects land.

    python scripts/probe_relations.py --model runs/unet-shapes/final [--cfg 7.5] [--num 24]

For each pair "A REL B" and each REL in {to the left of, to the right of, above, below}, image i is
drawn with seed `--seed + i` (the same seeds for all four relations), the shapes scorer's detector
finds the objects by colour, and for the images where exactly one A and one B are found the table
gives the mean offset of A from B (dx right, dy down, in pixels) and how often the relation holds
with the scorer's margin. A model that reads the relation moves A: dx < 0 for "to the left of",
dx > 0 for "to the right of", dy < 0 for "above", dy > 0 for "below". A model that ignores the
relation draws the same layout from the same seed whatever REL says: the four rows of a pair then
show the same offsets, and "holds" sits near chance (about 0.4: a random placement satisfies a
given relation with margin that often; the summary line measures that chance on the same images).

Measured (2-core CPU, dpm++2m, 25 steps, CFG 7.5, --num 16) on the shapes preset's run (2-level U-Net,
joint CLIP text encoder): the relation holds in 47% / 44% / 49% of images at steps 5,000 / 9,240 /
22,000, against 47% / 46% / 49% if the word were ignored: the model never learned to read it (its
position score stayed at 7.5-12.5%). At 22,000 steps "a red circle REL a blue square" lands with mean
dx -5.3, -5.4, -5.5, -6.8 px for left, right, above, below alike (24 seeds). The text encoder told
above from below at step 5,000 (embeddings 8.6 apart at a token norm of 15) and then stopped (0.7
at 9,240, 0.9 at 22,000): trained jointly, it drops what the U-Net does not use.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

PAIRS = [("red", "circle", "blue", "square"), ("green", "triangle", "yellow", "circle"), ("purple", "square", "orange", "triangle")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a shapes-world pipeline folder")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--num", type=int, default=24, help="seeds per pair and relation")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be at least 1")

    import torch

    from ldm import LatentPipeline
    from ldm.data.shapes import (
        RELATIONS,
        ObjectSpec,
        Prompt,
        _relation_holds,
        format_prompt,
    )
    from ldm.data.shapes_score import RELATION_MARGIN_SCORE, analyze

    pipe = LatentPipeline.from_pretrained(args.model, device="cpu")
    with torch.no_grad():  # does the text encoder itself tell the relations apart?
        embeds = pipe.encode_prompts([f"a red circle {rel} a blue square" for rel in RELATIONS])

    def gap(i: int, j: int) -> float:  # the largest difference over the tokens
        return (embeds[i] - embeds[j]).norm(dim=-1).max().item()

    print(f"text encoder, 'a red circle REL a blue square': left vs right embeddings differ by {gap(0, 1):.2f}, "
          f"above vs below by {gap(2, 3):.2f} (token norm {embeds.norm(dim=-1).mean().item():.1f})")
    kw = {} if args.steps is None else {"num_inference_steps": args.steps}
    print(f"{'prompt':58s} {'found':>5s} {'dx':>6s} {'dy':>6s} {'holds':>6s}")
    held, total, chance = 0, 0, []
    for ca, sa, cb, sb in PAIRS:
        centres = []  # every image of this pair, whatever its relation: (centre of A, centre of B, margin)
        for rel in RELATIONS:
            prompt = format_prompt(Prompt("relation", (ObjectSpec(ca, sa), ObjectSpec(cb, sb)), rel))
            images = pipe([prompt] * args.num, seed=args.seed, guidance_scale=args.cfg, progress=False, **kw).images
            offsets, holds = [], []
            for image in images:
                found = analyze(image)
                a = [o for o in found.objects if o.color == ca]
                b = [o for o in found.objects if o.color == cb]
                if len(a) == 1 and len(b) == 1:
                    offsets.append((a[0].cx - b[0].cx, a[0].cy - b[0].cy))
                    margin = RELATION_MARGIN_SCORE * found.size  # the scorer's margin
                    holds.append(_relation_holds((a[0].cx, a[0].cy), (b[0].cx, b[0].cy), rel, margin))
                    centres.append(((a[0].cx, a[0].cy), (b[0].cx, b[0].cy), margin))
            if offsets:
                dx, dy = np.mean(offsets, axis=0)
                print(f"{prompt:58s} {len(offsets):5d} {dx:6.1f} {dy:6.1f} {np.mean(holds):6.2f}")
            else:
                print(f"{prompt:58s} {0:5d} {'-':>6s} {'-':>6s} {'-':>6s}")
            held, total = held + sum(holds), total + len(holds)
        # chance: the pair's images, pooled over the four prompts, scored against each relation in turn
        chance += [np.mean([_relation_holds(a, b, rel, m) for a, b, m in centres]) for rel in RELATIONS] if centres else []
    rate = held / total if total else float("nan")
    print(f"relation holds in {held}/{total} images with both objects found ({rate:.0%}); "
          f"{np.mean(chance):.0%} if the relation word were ignored (the same images scored against every relation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
