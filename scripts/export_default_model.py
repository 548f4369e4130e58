"""Export a trained shapes-world pipeline as the embedded default model (assets/default-model/).

    python scripts/export_default_model.py runs/unet-shapes/final [assets/default-model]

Casts the U-Net, the text encoder and the VAE to float16 (the weights are stored in half precision
to keep the shipped folder small; loading on a CPU casts them back to float32), lists the world's
words in training_words.txt (the out-of-world prompt warning reads it), and keeps the folder's
model card (README.md) across the replacement. Prints the size of the folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MB = 40.0


def main(src: str, out: str) -> None:
    from ldm import LatentPipeline
    from ldm.data.shapes import world_words

    out_dir = Path(out)
    card = (out_dir / "README.md").read_text(encoding="utf-8") if (out_dir / "README.md").is_file() else None
    pipe = LatentPipeline.from_pretrained(src, device="cpu", dtype="fp32")
    pipe.training_words = frozenset(world_words())
    # torch_dtype, not a cast of the modules: a save keeps the dtype of the folder loaded from
    pipe.save_pretrained(out_dir, torch_dtype=torch.float16)
    if card is not None:
        (out_dir / "README.md").write_text(card, encoding="utf-8")
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file()) / 2**20
    print(f"{out_dir}: {size:.1f} MiB")
    if size > BUDGET_MB:
        sys.exit(f"{out_dir} is {size:.1f} MiB, over the {BUDGET_MB:.0f} MiB budget for the embedded model")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a trained shapes pipeline folder (RUN/final, or an --export of a checkpoint)")
    p.add_argument("out", nargs="?", default=str(ROOT / "assets" / "default-model"), help="default: assets/default-model")
    args = p.parse_args()
    try:
        main(args.src, args.out)
    except (FileNotFoundError, ValueError) as e:  # a wrong folder: one line, exit status 2
        p.exit(2, f"export_default_model.py: error: {e}\n")
