"""docs/images/lora.png: the default model against itself with a LoRA, on the same prompts and seeds.

    python scripts/lora_figure.py --lora runs/lora-five/final/lora.safetensors --scales 0.5,1 \
        --prompts "five red circles|five blue squares|five yellow triangles|four green circles|a red circle" \
        --out docs/images/lora.png

Rows: the base model, then the LoRA at each scale; one column per prompt, each drawn with seed 0.
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from ldm import LatentPipeline
from ldm.models import resolve_model
from ldm.pipeline import DEFAULT_MODEL


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the base pipeline (default: the embedded default model)")
    p.add_argument("--lora", required=True)
    p.add_argument("--scales", default="1")
    p.add_argument("--prompts", required=True, help="prompts separated by |")
    p.add_argument("--zoom", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    prompts = args.prompts.split("|")
    pipe = LatentPipeline.from_pretrained(resolve_model(args.model or DEFAULT_MODEL))
    rows = [("base", pipe(prompts, seed=0, progress=False).images)]
    pipe.load_lora_weights(args.lora, adapter_name="lora")
    for scale in (float(s) for s in args.scales.split(",")):
        pipe.set_adapters(["lora"], [scale])
        rows.append((f"LoRA {scale:g}", pipe(prompts, seed=0, progress=False).images))
    size, label = rows[0][1][0].width * args.zoom, 70
    sheet = Image.new("RGB", (label + size * len(prompts), 16 + size * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, prompt in enumerate(prompts):
        draw.text((label + j * size + 2, 2), prompt[: size // 6], fill="black")
    for i, (name, images) in enumerate(rows):
        draw.text((4, 16 + i * size + size // 2 - 6), name, fill="black")
        for j, image in enumerate(images):
            sheet.paste(image.resize((size, size), Image.NEAREST), (label + j * size, 16 + i * size))
    sheet.save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
