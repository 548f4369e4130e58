"""Build CLIP's BPE tokenizer files (vocab.json + merges.txt) from the open_clip_torch wheel, offline.

OpenAI CLIP's tokenizer (and so SD 1.x's) is byte-level BPE over a vocabulary of 49 408 tokens:
the 256 byte symbols, the same with the end-of-word marker "</w>", 48 894 merges, and the two
specials <|startoftext|> (49406) and <|endoftext|> (49407). The merge list ships inside the
open_clip_torch wheel as `open_clip/bpe_simple_vocab_16e6.txt.gz`; this script rebuilds the token
table exactly as CLIP's `simple_tokenizer.py` does, and writes the files transformers'
CLIPTokenizer reads. The wheel is only read as a zip, never installed (it would pull torchvision).

    pip download --no-deps open_clip_torch -d /tmp/w
    python scripts/build_clip_vocab.py /tmp/w/open_clip_torch-*.whl --out assets/clip-tokenizer

The output is deterministic (same wheel file → same bytes); the script checks the result against
known CLIP token ids before writing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import zipfile
from pathlib import Path

MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48 894 merges of the file (line 0 is a header)
# OpenAI CLIP token ids, for checking the build: "a red circle" with the specials.
KNOWN = {"a red circle": [49406, 320, 736, 7117, 49407], "A photo of a cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407]}


def build(merges_text: str) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) exactly as CLIP's SimpleTokenizer builds its encoder."""
    merges = merges_text.split("\n")[1 : NUM_MERGES + 1]
    from ldm.text import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 distinct tokens, got {len(vocab)}: is this CLIP's bpe_simple_vocab_16e6?")
    return vocab, merges


def write(vocab: dict[str, int], merges: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def check(folder: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    for text, ids in KNOWN.items():
        got = tokenizer(text).input_ids
        if got != ids:
            raise ValueError(f"built tokenizer gives {got} for {text!r}, CLIP gives {ids}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheel", type=Path, help="the open_clip_torch wheel (from pip download --no-deps open_clip_torch)")
    p.add_argument("--out", type=Path, default=Path("assets/clip-tokenizer"), help="output folder")
    args = p.parse_args(argv)
    with zipfile.ZipFile(args.wheel) as wheel:
        merges_text = gzip.decompress(wheel.read(MEMBER)).decode("utf-8")
    vocab, merges = build(merges_text)
    with tempfile.TemporaryDirectory() as tmp:
        write(vocab, merges, Path(tmp))
        check(Path(tmp))
    write(vocab, merges, args.out)
    print(f"wrote {args.out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges); checked against CLIP ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
