"""Wall time of each editing mode against txt2img, on the same machine in the same run.

    python scripts/bench_editing.py [--model MODEL] [--num 48] [--batch-size 16] [--repeats 2]

Each mode draws `--num` images of held-out cases (the inputs of `ldm-shapes eval --task img2img` /
`--task inpaint`) in batches of `--batch-size`, with the pipeline's defaults (25 steps, CFG 7.5);
the best of `--repeats` runs is reported, after one warm-up batch. Prints a Markdown table: seconds
per image, U-Net calls per image (counted), and the cost relative to txt2img.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded default model)")
    p.add_argument("--num", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from ldm import LatentPipeline
    from ldm.data.shapes_eval import inpaint_cases, sdedit_cases

    pipe = LatentPipeline.from_pretrained(args.model, device="cpu")
    paintings = sdedit_cases(args.num, 0, "gray")
    scenes = inpaint_cases(args.num, 0, "gray")
    modes = {
        "txt2img": lambda c, s: dict(prompt=[x.text for x in c]),
        "img2img, strength 0.3": lambda c, s: dict(prompt=[x.text for x in c], image=[x.image for x in c],
                                                   strength=0.3),
        "img2img, strength 0.75": lambda c, s: dict(prompt=[x.text for x in c], image=[x.image for x in c]),
        "inpaint, replace": lambda c, s: dict(prompt=[x.text for x in s], image=[x.image for x in s],
                                              mask_image=[x.mask for x in s]),
        "inpaint, repaint (j 5, r 3)": lambda c, s: dict(prompt=[x.text for x in s], image=[x.image for x in s],
                                                         mask_image=[x.mask for x in s], inpaint_method="repaint"),
        "inpaint, only masked (padding 8)": lambda c, s: dict(
            prompt=[x.text for x in s], image=[x.image for x in s], mask_image=[x.mask for x in s],
            inpaint_area="masked", masked_padding=8),
        "outpaint 16 px each side (96x96)": lambda c, s: dict(
            prompt=[x.text for x in s], image=[x.image for x in s], outpaint=(16, 16, 16, 16)),
    }
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, a: calls.append(len(a[0])))
    rows, base = [], None
    import warnings

    warnings.simplefilter("ignore")  # outpainting's size warning
    for name, make in modes.items():
        pipe(**make(paintings[: args.batch_size], scenes[: args.batch_size]), seed=0, progress=False)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            calls.clear()
            start = time.perf_counter()
            for i in range(0, args.num, args.batch_size):
                chunk = slice(i, i + args.batch_size)
                pipe(**make(paintings[chunk], scenes[chunk]), seed=i, progress=False)
            best = min(best, time.perf_counter() - start)
        per_image = best / args.num
        base = base or per_image
        unet_calls = len(calls) / (args.num / args.batch_size)  # per image: one batched call serves a whole batch
        rows.append(f"| {name} | {per_image:.3f} | {unet_calls:.0f} | {per_image / base:.2f}× |")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| mode | s/image | U-Net calls per image | vs txt2img |\n|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
