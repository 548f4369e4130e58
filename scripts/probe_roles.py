"""Which parts of a relation caption does a shapes-world model read? A sampling-free probe, seconds
per model, for checkpoints too early for scripts/probe_relations.py to say anything.

    python scripts/probe_roles.py --model runs/eval/unet-22000 [--timesteps 999 900 700]

At t = T on a zero-terminal-SNR model the U-Net's input is pure noise, so the ideal x0 prediction is
the caption's conditional mean image (Lin et al. 2023, sec. 3.1): for "a red circle to the left of a
blue square" a red wash on the left and a blue one on the right. The probe decodes the x0 prediction
(x0 = sqrt(a) x_t - sqrt(1 - a) v) for 32 fixed noises and compares captions that differ in one
respect, as the mean |difference| of the decoded images (0-1 scale):

- left vs right   "A to the left of B" vs "A to the right of B": does the relation word matter?
- subject swapped "A to the left of B" vs "B to the left of A": does word order (which object is the
                  subject) matter? A model that reads a bag of words gives 0 here, and then the relation
                  word cannot tell it anything about the layout.
- other caption   vs "a green triangle": the scale of a difference the model surely sees.

and, for each relation, how far the two objects' colour centroids move apart between opposite
relations (px; positive when the model moves them the right way; the data's mean offset between
"left" and "right" captions is ~40-55 px).

Measured (2-core CPU, ~1 min per timestep), t = 999:

    model                                        left vs right  subject swapped  other caption  separation
    CLIP preset run, step 22,000 (EMA)                  0.0030           0.1057         0.1717    ~0 px
    T5 encoder + axis-aligned relations, step 4,000 (raw)  0.0106       0.0001         0.1800    ~0 px

The CLIP model reads word order (the first-named object has a place of its own) but not the relation
word; the young T5 model reads a bag of words. Neither moves the objects by the relation.
"""

from __future__ import annotations

import argparse

PAIRS = [("red", "circle", "blue", "square"), ("green", "triangle", "yellow", "circle"), ("purple", "square", "orange", "triangle")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a shapes-world pipeline folder (zero-terminal-SNR, v-prediction)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 700])
    p.add_argument("--num", type=int, default=32, help="noises per caption")
    args = p.parse_args(argv)

    import torch

    from ldm import LatentPipeline
    from ldm.data.shapes import COLORS, RELATIONS, ObjectSpec, Prompt, format_prompt

    def caption(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
        return format_prompt(Prompt("relation", (ObjectSpec(*first), ObjectSpec(*second)), relation))

    pipe = LatentPipeline.from_pretrained(args.model, device="cpu")
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    if not all(0 <= t < len(sched.alphas_cumprod) for t in args.timesteps) or args.num < 1:
        p.error(f"--timesteps must lie in [0, {len(sched.alphas_cumprod) - 1}] and --num be at least 1")
    noise = torch.randn(args.num, unet.config.in_channels, pipe.default_size // pipe.latent_factor, pipe.default_size // pipe.latent_factor,
                        generator=torch.Generator().manual_seed(0))
    xs = torch.arange(pipe.default_size, dtype=torch.float32)

    @torch.no_grad()
    def x0_images(prompt: str, t: int) -> torch.Tensor:  # (N, 3, H, W) in [0, 1]
        a = sched.alphas_cumprod[t].float()
        out = unet(noise, torch.full((args.num,), t), encoder_hidden_states=pipe.encode_prompts([prompt] * args.num)).sample
        x0 = a.sqrt() * noise - (1 - a).sqrt() * out if sched.config.prediction_type == "v_prediction" else (noise - (1 - a).sqrt() * out) / a.sqrt().clamp(min=1e-4)
        return (vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2

    def centroid(images: torch.Tensor, color: str) -> torch.Tensor:  # (N, 2): x, y of the pixels near the colour
        target = torch.tensor(COLORS[color], dtype=torch.float32).view(1, 3, 1, 1) / 255
        w = torch.exp(-8 * (images - target).pow(2).sum(1))  # (N, H, W)
        return torch.stack([(w.sum(1) * xs).sum(-1), (w.sum(2) * xs).sum(-1)], -1) / w.sum((1, 2)).unsqueeze(-1)

    print(f"{'t':>4s} {'left vs right':>14s} {'subject swapped':>16s} {'other caption':>14s} {'L/R separation px':>18s} {'A/B separation px':>18s}")
    for t in args.timesteps:
        diffs, sep_lr, sep_ab = [], [], []
        for ca, sa, cb, sb in PAIRS:
            imgs = {rel: x0_images(caption((ca, sa), rel, (cb, sb)), t) for rel in RELATIONS}
            base = imgs["to the left of"]
            swapped, other = x0_images(caption((cb, sb), "to the left of", (ca, sa)), t), x0_images("a green triangle", t)
            diffs.append([(base - x).abs().mean().item() for x in (imgs["to the right of"], swapped, other)])
            offset = {rel: (centroid(im, ca) - centroid(im, cb)).mean(0) for rel, im in imgs.items()}  # A minus B
            sep_lr.append((offset["to the right of"][0] - offset["to the left of"][0]).item())
            sep_ab.append((offset["below"][1] - offset["above"][1]).item())
        d = torch.tensor(diffs).mean(0).tolist()
        print(f"{t:4d} {d[0]:14.4f} {d[1]:16.4f} {d[2]:14.4f} {sum(sep_lr) / len(sep_lr):+18.1f} {sum(sep_ab) / len(sep_ab):+18.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
