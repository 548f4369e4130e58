"""What a LoRA teaches and what it costs: the shapes scorer's pass rate on a concept's held-out prompts
and on the ordinary held-out mix, for the base model and for the base + LoRA over a sweep of scales.

    python scripts/bench_lora.py --lora runs/lora-five/final/lora.safetensors \
        --concept-kinds counting --concept-counts 5 --out outputs/bench-lora-five
    python scripts/bench_lora.py --lora runs/lora-black/final/lora.safetensors --scales 1 \
        --concept-kinds background --concept-backgrounds black --out outputs/bench-lora-black

The concept's prompts are `eval_prompts(kinds=..., backgrounds=..., counts=...)` (e.g. every caption
"five ..."); the ordinary mix is `ldm-shapes eval`'s default (600 prompts, six kinds).
Every image is generated with the same seeds, sampler and guidance at each scale, so the columns
differ only by the adapter. Writes OUT/report.json and prints a Markdown table per kind.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ldm import LatentPipeline
from ldm.data.shapes import KINDS
from ldm.data.shapes_eval import generate_eval_folder
from ldm.data.shapes_score import score_folder


def evaluate(pipe, folder: Path, args, **prompts) -> dict:
    """Generate (unless a complete folder is there from an earlier run) and score one folder."""
    start = time.time()
    meta = folder / "metadata.jsonl"
    if not (meta.is_file() and len(meta.read_text().splitlines()) == prompts["num_prompts"]):
        generate_eval_folder(pipe, str(folder), seed=0, cfg=args.cfg, steps=args.steps, batch_size=args.batch_size,
                             overwrite=True, **prompts)
    report = score_folder(str(folder))
    report["seconds"] = time.time() - start
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the base pipeline (default: the embedded default model)")
    p.add_argument("--lora", required=True, help="the LoRA file")
    p.add_argument("--concept-kinds", required=True, help="comma list: the caption kinds of the concept's prompts")
    p.add_argument("--concept-backgrounds", default=None, help="comma list: the backgrounds they name")
    p.add_argument("--concept-counts", default=None, help="comma list: the numbers they count")
    p.add_argument("--scales", default="0.25,0.5,0.75,1",
                   help="LoRA scales to sweep (the base model is always measured)")
    p.add_argument("--concept-prompts", type=int, default=300)
    p.add_argument("--ordinary-prompts", type=int, default=600)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from ldm.models import resolve_model
    from ldm.pipeline import DEFAULT_MODEL

    pipe = LatentPipeline.from_pretrained(resolve_model(args.model or DEFAULT_MODEL))
    concept = {"num_prompts": args.concept_prompts, "kinds": args.concept_kinds.split(","),
               "backgrounds": args.concept_backgrounds and args.concept_backgrounds.split(","),
               "counts": args.concept_counts and [int(c) for c in args.concept_counts.split(",")]}
    ordinary = {"num_prompts": args.ordinary_prompts, "kinds": KINDS}
    out = Path(args.out)
    rows = [{"scale": "base", "concept": evaluate(pipe, out / "base-concept", args, **concept),
             "ordinary": evaluate(pipe, out / "base-ordinary", args, **ordinary)}]
    pipe.load_lora_weights(args.lora, adapter_name="lora")
    for scale in (float(s) for s in args.scales.split(",")):
        pipe.set_adapters(["lora"], [scale])
        rows.append({"scale": scale, "concept": evaluate(pipe, out / f"scale-{scale:g}-concept", args, **concept),
                     "ordinary": evaluate(pipe, out / f"scale-{scale:g}-ordinary", args, **ordinary)})
        print(f"scale {scale:g}: concept {rows[-1]['concept']['kinds']['overall']['accuracy']:.1%}, "
              f"ordinary {rows[-1]['ordinary']['kinds']['overall']['accuracy']:.1%}", flush=True)
    (out / "report.json").write_text(json.dumps(
        [{k: ({"kinds": v["kinds"], "backgrounds": v.get("backgrounds"), "seconds": v["seconds"]} if isinstance(v, dict)
              else v) for k, v in r.items()} for r in rows], indent=1))
    base = rows[0]["ordinary"]["kinds"]["overall"]["accuracy"]
    print("| scale | concept | ordinary | ordinary kept | " + " | ".join(KINDS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(KINDS))
    for r in rows:
        kinds = " | ".join(f"{r['ordinary']['kinds'][k]['accuracy']:.1%}" for k in KINDS)
        ordinary_acc = r["ordinary"]["kinds"]["overall"]["accuracy"]
        print(f"| {r['scale']} | {r['concept']['kinds']['overall']['accuracy']:.1%} | {ordinary_acc:.1%} | "
              f"{ordinary_acc / base:.1%} | {kinds} |")


if __name__ == "__main__":
    main()
