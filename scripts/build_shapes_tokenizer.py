"""Write the shapes world's tokenizer: CLIP's BPE pruned to the words of the world's grammar.

    python scripts/build_shapes_tokenizer.py OUT_DIR

The result is a CLIPTokenizer folder (vocab.json, merges.txt) of ~600 tokens instead of 49,408, so
the default model's jointly trained text encoder needs a 0.15M-parameter embedding table instead
of 12.6M (configs/unet/shapes.yaml sets text_encoder.tokenizer to it). Every world word splits
exactly as under the full CLIP vocabulary; any other text still tokenizes, in smaller pieces.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(out: str) -> None:
    from ldm.data.shapes import world_words
    from ldm.text import prune_clip_bpe

    src = ROOT / "assets" / "clip-tokenizer"
    vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
    lines = (src / "merges.txt").read_text(encoding="utf-8").splitlines()
    header, merges = lines[0], [m for m in lines[1:] if m]
    words = world_words()
    pruned, kept = prune_clip_bpe(vocab, merges, words)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(pruned, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")
    print(f"{out_dir}: {len(pruned)} tokens, {len(kept)} merges, {len(words)} words")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/build_shapes_tokenizer.py OUT_DIR")
    main(sys.argv[1])
