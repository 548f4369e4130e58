"""Draw the README's pictures with the embedded default model (or MODEL), reproducibly.

    python scripts/readme_figures.py [--model MODEL] [--outdir docs/images]

Writes
- `first-picture.png`: what the README's first command makes, `ldm-txt2img "a red circle to the
  left of a blue square" --cfg 7.5 --seed 0` (64 px, shown 4× larger with nearest-neighbour
  upscaling so the pixels stay visible);
- `gallery.png`: one row per caption kind of the shapes world, the first four of that kind's
  held-out evaluation prompts (`ldm.data.shapes.eval_prompts`, seed 0), each drawn with seed 0;
  the prompts are printed, in order, for the README's caption.
- `editing.png`: one row per editing mode, input(s) then output(s): SDEdit of held-out stroke
  painting 1 at strengths 0.5 and 0.75; inpainting of held-out case 0 (input, mask, replace,
  RePaint); outpainting of held-out scene 0 by 32 px on each side (input, then the 128 px output).
Every image is scored by the shapes scorer and its verdict printed, so the README can say which
pictures are wrong instead of choosing only the good ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIRST_PROMPT = "a red circle to the left of a blue square"
SCALE = 4
PER_KIND = 4
PAD = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded default model)")
    p.add_argument("--outdir", default=str(ROOT / "docs" / "images"))
    args = p.parse_args()

    from ldm import LatentPipeline
    from ldm.data.shapes import KINDS, eval_prompts, format_prompt
    from ldm.data.shapes_score import score_image

    pipe = LatentPipeline.from_pretrained(args.model, device="cpu")
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)

    def big(image: Image.Image) -> Image.Image:
        return image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)

    pool = eval_prompts(PER_KIND * len(KINDS), 0)  # balanced: prompt i has kind KINDS[i % 6]
    rows = [[format_prompt(q) for q in pool if q.kind == kind][:PER_KIND] for kind in KINDS]
    prompts = [FIRST_PROMPT] + [prompt for row in rows for prompt in row]
    # One batched call; every image has seed 0 and depends only on its seed, not on the batch.
    images = pipe(prompts, guidance_scale=7.5, seed=[0] * len(prompts), progress=False).images
    verdicts = [score_image(image.convert("RGB"), prompt).passed for image, prompt in zip(images, prompts)]

    big(images[0]).save(out / "first-picture.png")
    print(f"first-picture.png: {FIRST_PROMPT!r} seed 0: {'pass' if verdicts[0] else 'FAIL'}")

    cell = pipe.default_size * SCALE
    grid = Image.new("RGB", (PER_KIND * (cell + PAD) + PAD, len(KINDS) * (cell + PAD) + PAD), "white")
    for i, (image, prompt, ok) in enumerate(zip(images[1:], prompts[1:], verdicts[1:])):
        r, c = divmod(i, PER_KIND)
        grid.paste(big(image), (PAD + c * (cell + PAD), PAD + r * (cell + PAD)))
        print(f"gallery row {r + 1} ({KINDS[r]}) col {c + 1}: {prompt!r}: {'pass' if ok else 'FAIL'}")
    grid.save(out / "gallery.png")
    print(f"gallery.png: {sum(verdicts[1:])}/{len(prompts) - 1} pass the scorer")
    editing_figure(pipe, out, big)


def editing_figure(pipe, out: Path, big) -> None:
    """`editing.png` (see the module docstring), each output's verdict printed."""
    from ldm.data.shapes_eval import inpaint_cases, sdedit_cases
    from ldm.data.shapes_score import score_image

    painting = sdedit_cases(2, 0, "gray")[1]
    case = inpaint_cases(1, 0, "gray")[0]
    from ldm.data.shapes import EVAL_DOMAIN, make_scene, render

    scene = make_scene(0, 0, 64, EVAL_DOMAIN, unnamed_background="gray")
    rows = [[painting.image], [case.image, case.mask.convert("RGB")], [render(scene)]]
    for strength in (0.5, 0.75):
        image = pipe(painting.text, image=painting.image, strength=strength, seed=0, progress=False).images[0]
        rows[0].append(image)
        print(f"editing row 1: SDEdit {painting.text!r} at {strength}: {verdict(score_image(image, painting.text))}")
    for method in ("replace", "repaint"):
        image = pipe(case.text, image=case.image, mask_image=case.mask, inpaint_method=method, seed=0,
                     progress=False).images[0]
        rows[1].append(image)
        print(f"editing row 2: inpaint ({method}) {case.text!r}: {verdict(score_image(image, case.text))}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size warning: outpainting draws at 128 px on purpose
        image = pipe(scene.caption, image=render(scene), outpaint=(32, 0, 32, 0), seed=0, progress=False).images[0]
    rows[2].append(image)
    print(f"editing row 3: outpaint {scene.caption!r} by 32 px left and right: {image.size}")
    height = pipe.default_size * SCALE
    width = max(sum(big(i).width + PAD for i in row) + PAD for row in rows)
    grid = Image.new("RGB", (width, len(rows) * (height + PAD) + PAD), "white")
    for r, row in enumerate(rows):
        x = PAD
        for image in row:
            grid.paste(big(image), (x, PAD + r * (height + PAD)))
            x += big(image).width + PAD
    grid.save(out / "editing.png")


def verdict(result) -> str:
    return "pass" if result.passed else f"FAIL ({result.reason})"


if __name__ == "__main__":
    main()
