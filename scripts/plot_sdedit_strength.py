"""Plot SDEdit's strength sweep: pass rate, caption acceptance and placement vs strength.

    ldm-shapes eval --task img2img --strength 0.3,0.5,0.6,0.75,0.9 --outdir outputs/sdedit
    python scripts/plot_sdedit_strength.py outputs/sdedit/sweep.json [--out docs/images/sdedit_strength.png]

Reads the sweep.json that `ldm-shapes eval --task img2img` writes (one row per strength: the
overall pass, caption-accept and placement rates) and draws them against the strength. Low
strength keeps the blobs where they were but leaves them blobs (the caption's shapes are not
drawn); high strength draws the shapes but may move them: the pass needs both. Thin lines: the
pass rate split by the painting's background (a model trained with gray unnamed backgrounds cannot
keep a white or black one its caption does not name). Needs matplotlib
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
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    for key, label, style in LINES:
        ax.plot(strengths, [100 * row[key] for row in rows], style, label=label)
    for name, color in (("gray", "0.45"), ("white", "0.75"), ("black", "0.1")):  # the input's background
        if all(name in row.get("background_pass_rates", {}) for row in rows):
            ax.plot(strengths, [100 * row["background_pass_rates"][name] for row in rows], "-", color=color,
                    linewidth=0.8, label=f"pass, paintings on {name}")
    ax.set_xlabel("SDEdit strength (fraction of the noise schedule re-run)")
    ax.set_ylabel("% of held-out stroke paintings")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
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
