"""Can a U-Net + text encoder of a config learn where a relation caption puts each object? A
minutes-long test, without diffusion noise in the targets, of the step the shapes-world models fail.

    python scripts/probe_binding.py --data runs/data/shapes-100k-v2 --vae runs/vae-shapes-f8/final \
        [--config configs/unet/shapes.yaml] [--encoder config|table] [--steps 800] [--noisy-target]
        [--model PIPELINE_FOLDER]   (measure a trained model's relation contrast instead)

At t = T of a zero-terminal-SNR model the input is pure noise and the best x0 prediction is the
caption's mean latent (Lin et al. 2023, sec. 3.1); that is where a denoiser decides the layout.
This script takes the dataset's relation captions ("a red circle to the left of a blue square"),
encodes their images with the VAE, and averages the latents per (relation, colour of A, colour of
B): 144 targets. A fresh U-Net and text encoder built from --config (model: and text_encoder:)
then regress those targets from pure noise at t = T (x0 = -v there), AdamW at the config's
learning rate. Printed every 50 steps: the mean squared error to the targets, next to two
references computed from the data: "blind", the error of the best prediction that ignores the
relation word (the mean per colour pair), and "global", the error of one mean for all.

    error ~ blind   the pair learned its colours but not where the relation puts them
    error << blind  it binds each object to its side

--encoder table replaces the text encoder by a learned (4, width) code per target (no words, no
composition): it shows what the U-Net alone can do. --noisy-target regresses each image's own
latent instead of its group's mean, as diffusion training does at t = T (the error is still
measured to the means): the relation is then a small part of a large irreducible variance.

Measured on the 2-core CPU (preset configs/unet/shapes.yaml, seed 0; the 29,865 relation captions
of shapes-100k-v2; about 0.65 s a step; blind 0.0110, global 0.0194):

    encoder                                 error after 100 / 200 / 300 / 400 / 600 steps
    table (the U-Net alone)                 0.0154 / 0.0024 / 0.0011 / -      / -
    clip (the preset's, causal)             0.0194 / 0.0117 / 0.0055 / 0.0021 / 0.0008
    bert (text_encoder.architecture=bert)   0.0182 / 0.0123 / 0.0115 / 0.0035 / 0.0010

Every one binds the objects to their sides within a few hundred steps: from clean targets the
relation is easy for these networks, text encoder included.

The relation contrast (printed after the error; also `--model FOLDER`, which measures a trained
pipeline instead of training one): each of 128 probe captions and its twin with the opposite
relation word go through the network with the same noise; their output difference, projected on
the data's difference of the two (relation, colours) means. 1 = the data's full left-minus-right
layout, 0 = the relation word is ignored. The twins share the rest of the caption, so unlike the
error it is clean for --noisy-target (each image's own latent as the target, as diffusion training
has at t = T; the error there mostly measures the rest of the caption and Adam's jitter).

    --noisy-target, clip, the relation captions of       contrast after 100 / 300 / 400 / 600 steps
    shapes-100k-v2 (the spec's random unnamed background)  +0.000 / +0.000 / +0.000 / +0.002
    the same scenes, unnamed background gray               +0.000 / +0.062 / +0.801 / +0.880
      (ldm-shapes make --unnamed-background gray)

    --model, trained by diffusion (ldm-train-unet, the preset)       contrast at t = T
    22,000 steps on random backgrounds (its data, shapes-100k)        +0.000
    4,000 / 6,000 steps on the gray data                              +0.000 / +0.000
    8,000 (the last 2,000 with timestep_bias later, x4 on the top 20%) +0.000

A background the caption does not name is the largest variance in the per-image targets, and it
hides the relation words: same scenes, same steps, only the unnamed backgrounds differ. With it
gone, this t = T test needs ~25k relation samples (400 steps of 64); a diffusion run sees ~2 a
step near t = T (30% relation captions, ~10% of timesteps), so its contrast, still 0 at 8,000
steps, is expected later, if at all: that is what the runs in progress measure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a shapes dataset folder (ldm-shapes make): PNGs + metadata.jsonl")
    p.add_argument("--vae", required=True, help="the shapes VAE folder (ldm-train-vae's final/)")
    p.add_argument("--config", default="configs/unet/shapes.yaml", help="the U-Net training config whose model and text encoder to test")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. text_encoder.architecture=bert")
    p.add_argument("--encoder", choices=("config", "table"), default="config")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, default=30000, help="at most this many relation captions (default 30000)")
    p.add_argument("--noisy-target", action="store_true", help="regress each image's latent, not its group's mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="measure a trained pipeline folder (its U-Net and text encoder at t = T) instead of training")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be at least 1")

    import numpy as np
    import torch
    from PIL import Image

    from ldm.config import load_config
    from ldm.data.shapes import COLORS, RELATIONS, parse_caption
    from ldm.text import PromptEncoder
    from ldm.train.unet import UNetTrainConfig, build_models, encode_latents, load_vae

    meta = Path(args.data) / "metadata.jsonl"
    if not meta.is_file():
        p.error(f"{meta} not found: --data must be a folder written by ldm-shapes make")
    config = load_config(UNetTrainConfig, args.config, [*args.set, f"vae={args.vae}"])
    colours = list(COLORS)
    num_pairs = len(colours) ** 2  # (colour of A, colour of B); a target is a (relation, pair)
    num_groups = len(RELATIONS) * num_pairs
    rows = []
    for line in meta.read_text().splitlines():
        row = json.loads(line)
        prompt = parse_caption(row["text"])
        if prompt is not None and prompt.form == "relation":
            pair = colours.index(prompt.objects[0].color) * len(colours) + colours.index(prompt.objects[1].color)
            group = RELATIONS.index(prompt.relation) * num_pairs + pair
            rows.append((row["file_name"], row["text"], group))
        if len(rows) >= args.max_images:
            break
    if len(rows) < 1000:
        p.error(f"{meta}: {len(rows)} relation captions; at least 1000 are needed for the group means")

    torch.manual_seed(args.seed)
    if args.model:  # the trained pipeline's U-Net and text encoder, with the --vae given
        from ldm.pipeline import LatentPipeline

        vae = load_vae(config.vae)
        trained = LatentPipeline.from_pretrained(args.model)
        text_encoder, tokenizer, unet = trained.text_encoder.float(), trained.tokenizer, trained.unet.float()
    else:
        vae, text_encoder, tokenizer, unet, _ = build_models(config)  # the config's networks, new weights
    unet.train()
    t0 = time.time()
    latents = []
    with torch.no_grad():
        for i in range(0, len(rows), 256):
            pixels = np.stack([np.asarray(Image.open(Path(args.data) / name).convert("RGB"), np.float32) for name, _, _ in rows[i : i + 256]])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1
            latents.append(encode_latents({"pixel_values": x}, vae, torch.zeros(())))  # the posterior mean, shifted and scaled
    z0 = torch.cat(latents)
    group = torch.tensor([g for _, _, g in rows])
    pair = group % num_pairs
    means, pair_means = torch.zeros(num_groups, *z0.shape[1:]), torch.zeros(num_pairs, *z0.shape[1:])
    for g in group.unique():
        means[g] = z0[group == g].mean(0)
    for g in pair.unique():
        pair_means[g] = z0[pair == g].mean(0)
    target = means[group]
    blind = ((pair_means[pair] - target) ** 2).mean().item()
    overall = ((z0.mean(0) - target) ** 2).mean().item()
    print(f"{len(rows)} relation captions from {args.data}, encoded in {time.time() - t0:.0f} s; blind {blind:.4f}, global {overall:.4f}")

    prompts = PromptEncoder(text_encoder, tokenizer)
    input_ids, attention_mask = prompts.tokenize([text for _, text, _ in rows])

    # The relation contrast: each probe caption and its twin with the opposite relation word
    # ("left of" <-> "right of", "above" <-> "below"; nothing else changed), through the network
    # with the same input noise. Its output difference, projected on the data's difference of the
    # two (relation, colours) means: 1 = the full left-minus-right layout, 0 = the word is ignored,
    # < 0 = reversed. Unlike the error above it is not confounded by the rest of the caption (the
    # twins share it) and is clean for --noisy-target too.
    gen = torch.Generator().manual_seed(args.seed + 1)
    probe = torch.randperm(len(rows), generator=gen)[:128]
    twin_texts = []
    for i in probe.tolist():
        r = group[i].item() // num_pairs
        twin_texts.append(rows[i][1].replace(RELATIONS[r], RELATIONS[r ^ 1]))  # RELATIONS pairs opposites: (0, 1), (2, 3)
    twin_ids, twin_mask = prompts.tokenize(twin_texts)
    twin_group = (group[probe] // num_pairs ^ 1) * num_pairs + group[probe] % num_pairs
    data_diff = means[group[probe]] - means[twin_group]
    probe_noise = torch.randn(len(probe), *z0.shape[1:], generator=gen)
    T = config.objective.num_train_timesteps - 1

    @torch.no_grad()
    def contrast() -> str:
        was_training = unet.training
        unet.eval()
        x0 = []
        for ids, mask, groups in ((input_ids[probe], attention_mask[probe], group[probe]), (twin_ids, twin_mask, twin_group)):
            cond = table[groups] if args.encoder == "table" else prompts.embed(ids, mask)
            x0.append(-unet(probe_noise, torch.full((len(probe),), T), encoder_hidden_states=cond).sample)
        unet.train(was_training)
        diff = x0[0] - x0[1]
        projection = ((diff * data_diff).sum() / (data_diff**2).sum()).item()
        return f"{projection:+.3f} (cos {torch.nn.functional.cosine_similarity(diff.flatten(), data_diff.flatten(), 0).item():+.2f})"
    table = torch.nn.Parameter(torch.randn(num_groups, 4, unet.config.cross_attention_dim))
    params = [q for q in unet.parameters()] + ([table] if args.encoder == "table" else [q for q in text_encoder.parameters() if q.requires_grad])
    if args.model:
        print(f"{args.model}: relation contrast at t = T {contrast()} (1 = the data's, 0 = none)")
        return 0
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=0.0)
    window, t0 = [], time.time()
    print(f"encoder {args.encoder if args.encoder == 'table' else config.text_encoder.architecture}, "
          f"{'noisy' if args.noisy_target else 'mean'} targets; step, error to the targets (mean of the last 50 steps), relation contrast")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(rows), (args.batch_size,))
        cond = table[group[idx]] if args.encoder == "table" else prompts.embed(input_ids[idx], attention_mask[idx])
        v = unet(torch.randn(args.batch_size, *z0.shape[1:]), torch.full((args.batch_size,), T), encoder_hidden_states=cond).sample
        x0 = -v  # zero terminal SNR: alpha_T = 0, so x0 = sqrt(a) x_T - sqrt(1 - a) v = -v
        loss = ((x0 - (z0[idx] if args.noisy_target else target[idx])) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
        optimizer.step()
        window.append(((x0.detach() - target[idx]) ** 2).mean().item())
        if step % 50 == 0 or step == args.steps:
            print(f"{step:6d} {sum(window) / len(window):.4f}  {contrast()}   (blind {blind:.4f}, {time.time() - t0:.0f} s)", flush=True)
            window = []
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
