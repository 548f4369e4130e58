"""ldm-data check PATH: the preflight. Reads and fully decodes every sample, prints counts per problem.

Exit status 0 when the dataset has at least one valid sample (problems are reported, not fatal:
training skips them the same way), 1 with --strict when any sample would be skipped, 2 when
nothing is usable or the path is not a dataset.
"""

from __future__ import annotations

import json
import sys

from ldm.cli.common import ArgumentParser, run
from ldm.data.datasets import FORMATS, check_dataset
from ldm.data.images import BAD_REASONS, DEFAULT_MAX_PIXELS, NOTE_REASONS


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ldm-data", description="Image-caption dataset tools.",
                       epilog="Example: ldm-data check data/shapes   |   ldm-data check 'shards/train-{000..009}.tar'")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("check", help="read every sample and print counts per problem",
                       description="Fully decode every sample of a dataset and print counts per problem.")
    c.add_argument("path", help="a folder (image + .txt, or metadata.jsonl/.csv), a metadata file, .tar shards "
                                "(file, folder, glob or brace range 'x-{000..009}.tar'), or a `datasets` save_to_disk folder")
    c.add_argument("--format", choices=FORMATS, help="skip detection and read PATH as this format")
    c.add_argument("--caption-column", default="text", help="caption field of metadata rows / dataset columns")
    c.add_argument("--image-column", default="image", help="image column of a `datasets` dataset")
    c.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse images with more pixels (decompression bomb guard)")
    c.add_argument("--min-size", type=int, default=0, help="count images whose shorter side is below this as too_small")
    c.add_argument("--strict", action="store_true", help="exit 1 if any sample would be skipped")
    c.add_argument("--json", action="store_true", help="print the counts as one JSON object instead of a table")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels must be positive, got {args.max_pixels}")
    result = check_dataset(args.path, format=args.format, caption_column=args.caption_column,
                           image_column=args.image_column, max_pixels=args.max_pixels, min_size=args.min_size)
    report = result["report"]
    if args.json:
        out = {k: v for k, v in result.items() if k != "report"}
        print(json.dumps({**out, **report.to_dict()}))
    else:
        total = report.ok + report.num_bad
        print(f"{args.path}: format {result['format']}, {total} samples: {report.ok} valid, {report.num_bad} would be skipped")
        for title, counts, meanings in (("skipped", report.bad, BAD_REASONS), ("note", report.notes, NOTE_REASONS)):
            for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                print(f"  {title:<8}{n:>8}  {reason:<18} {meanings[reason]}")
                print(f"  {'':<8}{'':>8}  {'':<18} e.g. {', '.join(report.examples[reason])}")
        if result["min_size"]:
            (w0, h0), (w1, h1) = result["min_size"], result["max_size"]
            print(f"  image sizes from {w0}x{h0} to {w1}x{h1}")
        if result.get("orphan_captions"):
            orphans = result["orphan_captions"]
            print(f"  {len(orphans)} caption files without an image, e.g. {', '.join(orphans[:3])}")
    if report.ok == 0:
        raise ValueError(f"no valid sample in {args.path}")
    return 1 if args.strict and report.num_bad else 0


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-data")


if __name__ == "__main__":
    sys.exit(main())
