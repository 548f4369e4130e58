"""Plot SDEdit's strength sweep: pass rate, caption acceptance and placement vs strength.

    ldm-shapes eval --task img2img --strength 0.3,0.5,0.6,0.75,0.9 --outdir outputs/sdedit
    python scripts/plot_sdedit_strength.py outputs/sdedit/sweep.json [--out docs/images/sdedit_strength.png]

Reads the sweep.json that `ldm-shapes eval --task img2img` writes (one row per strength: the
overall pass, caption-accept and placement rates) and draws them against the strength. Low
strength keeps the blobs where they were but leaves them blobs (the caption's shapes are not
drawn); high strength draws the shapes but may move them: the pass needs both. Needs matplotlib
(`python -m pip install matplotlib`), which ldm itself does not depend on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINES = (("pass_rate", "pass (caption and placement)", "-o"), ("accept_rate", "caption accepted", "--s"),
         ("placement_rate", "objects where their blobs were", ":^"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="sweep.json written by ldm-shapes eval --task img2img")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "sdedit_strength.png"), help="PNG to write")
    args = p.parse_args()
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("this script needs matplotlib: python -m pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = json.loads(Path(args.sweep).read_text())
    rows = sorted(sweep["sweep"], key=lambda row: row["strength"])
    settings = sweep["settings"]
    strengths = [row["strength"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label, style in LINES:
        ax.plot(strengths, [100 * row[key] for row in rows], style, label=label)
    ax.set_xlabel("SDEdit strength (fraction of the noise schedule re-run)")
    ax.set_ylabel("% of held-out stroke paintings")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"img2img on {rows[0]['n']} stroke paintings: {settings['sampler']}, {settings['steps']} steps, "
                 f"CFG {settings['cfg']:g}", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print("strength  pass  caption  placement")
    for row in rows:
        print(f"{row['strength']:>8g} {100 * row['pass_rate']:>5.1f} {100 * row['accept_rate']:>8.1f} "
              f"{100 * row['placement_rate']:>10.1f}")
    best = max(rows, key=lambda row: row["pass_rate"])
    print(f"best pass rate {100 * best['pass_rate']:.1f}% at strength {best['strength']:g}; wrote {args.out}")


if __name__ == "__main__":
    main()
