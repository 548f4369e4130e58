"""The shapes-world quality number of a model: generate images for held-out prompts, then score them.

Prompts come from `shapes.eval_prompts(num_prompts, seed)`, the evaluation seed stream that no
training dataset draws from (see `ldm.data.shapes`); they are drawn at the reference size 64 so
that the prompt list of a seed is the same whatever resolution the model generates at. `kinds` and
`backgrounds` pass to it (e.g. a colour-background concept's held-out prompts: kinds=["background"],
backgrounds=["blue", "green"]); the defaults are the spec's balanced prompts.
Image i is generated with seed `seed + i`, so any image can be reproduced alone with ldm-txt2img.

The editing tasks (`ldm-shapes eval --task img2img|inpaint`) measure what a model does with a picture it
is given, on the same held-out stream, at EDIT_SIZE = 64 px:

- img2img (SDEdit): held-out scene i (`make_scene(seed, i, domain=EVAL_DOMAIN)`, whose prompt is
  `eval_prompts(n, seed)[i]`) painted crudely, each object a flat jittered blob of its colour on the
  scene's background (`stroke_painting`), is edited toward its caption at strength s. A pass: the scorer
  accepts the caption *and* an assignment of objects it accepts keeps every object's centroid within
  PLACEMENT_TOLERANCE * S of its blob's (`sdedit_checks`).
- inpaint: a held-out two-object scene, rendered; one object's box, grown to hold a large object and by
  MASK_DILATION px more, is masked
  and that object's colour or shape changed in the caption (`inpaint_case`). A pass: the scorer accepts
  the new caption *and* every pixel outside the mask equals the input's, compared exactly (`inpaint_checks`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import (
    BACKGROUNDS, COLORS, EVAL_DOMAIN, KIND_TITLES, KINDS, SHAPES, SIZE_FRACTIONS, SIZE_JITTER, Scene, SceneObject,
    background_rgb, check_backgrounds, check_counts, check_kinds, check_mix, eval_prompts, format_prompt, object_box,
    sample_scene, scene_rng,
)
from .shapes_score import (
    analyze, assignments, background_candidates, centroid, match, parse_caption, score_folder, score_image,
    write_report,
)

TASKS = ("txt2img", "img2img", "inpaint")
EDIT_SIZE = 64  # px: the editing tasks' inputs are scenes of the world's reference size
PLACEMENT_TOLERANCE = 0.1  # of S: how far an object's centroid may end up from its blob's
MASK_DILATION = 3  # px the inpainting mask reaches beyond the changed object's box
INPAINT_KINDS = ("two", "position")  # the kinds whose scenes always hold two objects
# What each editing task checks per image ("passed" first: the pass), and the report's column titles.
CHECKS = {"img2img": ("passed", "accepted", "placed"), "inpaint": ("passed", "accepted", "unchanged")}
CHECK_TITLES = {"passed": "pass", "accepted": "caption", "placed": "placement", "unchanged": "outside kept"}


def check_eval_args(*, latent_factor: int, default_size: int, outdir: str, num_prompts: int, seed: int,
                    sampler: str | None, steps: int | None, cfg: float, batch_size: int, size: int | None,
                    overwrite: bool, guidance_rescale: float | None = None,
                    scheduler_config: dict | None = None, student: dict | None = None,
                    embedded: bool = False) -> tuple[str, int, int, float]:
    """Validate every evaluation setting (before any weights load); returns (sampler, steps, size,
    guidance_rescale) with the defaults filled in: a distilled student's (its card, `student`) are its
    own sampler and steps, and no rescale for a U-Net with guidance built in (`embedded`). Raises
    ValueError naming the bad setting."""
    from ldm.guidance import default_guidance_rescale
    from ldm.pipeline import check_generation_args
    from ldm.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, resolve_sampler
    from ldm.train.distill import check_built_in_guidance, check_student

    own_sampler, own_steps = (student["sampler"], student["steps"]) if student else (DEFAULT_SAMPLER, DEFAULT_STEPS)
    sampler = own_sampler if sampler is None else resolve_sampler(sampler)
    steps = own_steps if steps is None else steps  # not `or`: 0 steps is an error, not the default
    size = default_size if size is None else size
    if guidance_rescale is None:
        guidance_rescale = 0.0 if embedded else default_guidance_rescale(scheduler_config)
    check_student(student, sampler, steps)
    check_built_in_guidance(embedded, [], guidance_rescale)
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {num_prompts}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    check_generation_args(latent_factor=latent_factor, height=size, width=size, num_inference_steps=steps,
                          guidance_scale=cfg, sampler=sampler, batch_size=batch_size,
                          guidance_rescale=guidance_rescale, scheduler_config=scheduler_config)
    check_outdir(outdir, overwrite)
    return sampler, steps, size, guidance_rescale


def check_outdir(outdir: str, overwrite: bool) -> None:
    """A ValueError if `outdir` is a file, or holds an evaluation (metadata.jsonl) and not `overwrite`."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ValueError(f"--outdir {outdir} exists and is not a folder")
    meta_path = os.path.join(outdir, "metadata.jsonl")
    if os.path.exists(meta_path) and not overwrite:
        raise ValueError(f"{meta_path} exists; choose another --outdir (or --overwrite)")


def generate_eval_folder(pipe, outdir: str, *, num_prompts: int, seed: int = 0, sampler: str | None = None,
                         steps: int | None = None, cfg: float = 7.5, batch_size: int = 16, size: int | None = None,
                         overwrite: bool = False, progress: bool = False, guidance_rescale: float | None = None,
                         kinds: typing.Sequence[str] | None = None, backgrounds: typing.Sequence[str] | None = None,
                         counts: typing.Sequence[int] | None = None,
                         mix: str | typing.Sequence[str] = "usual") -> list[dict]:
    """Generate one image per evaluation prompt (`eval_prompts(num_prompts, seed, kinds=, backgrounds=)`)
    with `pipe` (a LatentPipeline) into `outdir` as PNGs + metadata.jsonl (format (b)); returns the rows
    written. `guidance_rescale` is φ of Lin et al. (2023), Eq. 15-16 (0: plain classifier-free guidance;
    None: the model's default)."""
    kinds = None if kinds is None else check_kinds(kinds)
    backgrounds, counts, mix = check_backgrounds(backgrounds), check_counts(counts), check_mix(mix)
    sampler, steps, size, guidance_rescale = check_eval_args(
        latent_factor=pipe.latent_factor, default_size=pipe.default_size, outdir=outdir, num_prompts=num_prompts,
        seed=seed, sampler=sampler, steps=steps, cfg=cfg, batch_size=batch_size, size=size, overwrite=overwrite,
        guidance_rescale=guidance_rescale, scheduler_config=pipe.scheduler.config, student=pipe.student,
        embedded=pipe.unet.config.time_cond_proj_dim is not None)
    meta_path = os.path.join(outdir, "metadata.jsonl")
    os.makedirs(outdir, exist_ok=True)
    prompts = eval_prompts(num_prompts, seed, kinds=kinds, backgrounds=backgrounds, counts=counts, mix=mix)
    rows = []
    for start in range(0, num_prompts, batch_size):
        batch = prompts[start:start + batch_size]
        texts = [format_prompt(p) for p in batch]
        out = pipe(prompt=texts, guidance_scale=cfg, num_inference_steps=steps, sampler=sampler,
                   guidance_rescale=guidance_rescale, seed=seed + start, height=size, width=size, progress=progress)
        for i, (image, text, prompt) in enumerate(zip(out.images, texts, batch)):
            name = f"{start + i:05d}.png"
            image.save(os.path.join(outdir, name))
            rows.append({"file_name": name, "text": text, "kind": prompt.kind, "seed": int(out.seeds[i]),
                         "sampler": sampler, "steps": steps, "cfg": cfg, "guidance_rescale": guidance_rescale})
    with open(meta_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def evaluate(model: str, outdir: str, *, num_prompts: int, seed: int = 0, sampler: str | None = None,
             steps: int | None = None, cfg: float = 7.5, batch_size: int = 16, size: int | None = None,
             device: str | None = None, overwrite: bool = False, progress: bool = False,
             guidance_rescale: float | None = None, kinds: typing.Sequence[str] | None = None,
             backgrounds: typing.Sequence[str] | None = None, counts: typing.Sequence[int] | None = None,
             loras: typing.Sequence[tuple[str, float]] = (), mix: str | typing.Sequence[str] = "usual") -> dict:
    """Load `model` (with the LoRA files `loras` at their scales), generate the evaluation folder, score
    it; writes and returns `outdir/report.json`. `mix`, `kinds`, `backgrounds` and `counts` choose the
    prompts (see `eval_prompts`); the defaults are the spec's."""
    kinds = None if kinds is None else check_kinds(kinds)
    backgrounds, counts, mix = check_backgrounds(backgrounds), check_counts(counts), check_mix(mix)
    from ldm import LatentPipeline
    from ldm.lora import apply_loras
    from ldm.models import inspect_pipeline, resolve_model
    from ldm.pipeline import resolve_device

    from ldm.train.distill import read_card

    info = inspect_pipeline(resolve_model(model))  # configs only: every setting is checked before weights load
    device = resolve_device(device)
    sampler, steps, size, guidance_rescale = check_eval_args(
        latent_factor=info.latent_factor, default_size=info.default_size, outdir=outdir, num_prompts=num_prompts,
        seed=seed, sampler=sampler, steps=steps, cfg=cfg, batch_size=batch_size, size=size, overwrite=overwrite,
        guidance_rescale=guidance_rescale, scheduler_config=info.scheduler_config, student=read_card(info.path),
        embedded=info.unet_config.get("time_cond_proj_dim") is not None)
    start = time.time()
    pipe = LatentPipeline.from_pretrained(model, device=device)
    apply_loras(pipe, list(loras))
    generate_eval_folder(pipe, outdir, num_prompts=num_prompts, seed=seed, sampler=sampler, steps=steps, cfg=cfg,
                         batch_size=batch_size, size=size, overwrite=overwrite, progress=progress,
                         guidance_rescale=guidance_rescale, kinds=kinds, backgrounds=backgrounds, counts=counts,
                         mix=mix)
    report = score_folder(outdir)
    report["settings"] = {"task": "txt2img", "model": os.fspath(model), "num_prompts": num_prompts, "seed": seed,
                          "sampler": sampler, "steps": steps, "cfg": cfg, "guidance_rescale": guidance_rescale,
                          "size": size, "mix": ",".join(mix), "kinds": kinds and list(kinds),
                          "backgrounds": backgrounds and list(backgrounds),
                          "counts": counts and list(counts),
                          "loras": [[os.fspath(path), scale] for path, scale in loras],
                          "seconds": round(time.time() - start, 1)}
    write_report(report, os.path.join(outdir, "report.json"))
    return report


# ---------------------------------------------------------------------------------------------
# The editing tasks' inputs


def eval_scene(seed: int, index: int, kinds: typing.Sequence[str] = KINDS,
               unnamed_background: str | None = None) -> tuple[Scene, np.random.Generator]:
    """Held-out scene `index` at EDIT_SIZE (`make_scene(seed, index, domain=EVAL_DOMAIN, kinds=kinds)`)
    and its random stream, left where the scene's draws end, for the case's further draws. A caption
    that names no background gets `unnamed_background` (None: a random one), as `ldm-shapes make`."""
    rng = scene_rng(seed, index, EVAL_DOMAIN)
    return sample_scene(rng, EDIT_SIZE, kinds[index % len(kinds)], unnamed_background), rng


@dataclass(frozen=True)
class Blob:
    """A painted blob: its colour and the centroid of its pixels (px; x right, y down, as `analyze`)."""

    color: str
    cx: float
    cy: float


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # (S, S) each
    return xx, yy


def blob_mask(o: SceneObject, size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S) bool: a jittered ellipse about o's centre. Its outline r(θ) is an ellipse (semi-axes 0.8-1,
    random tilt) times 1 + Σ a_k cos(kθ + φ_k), k = 2..5, |a_k| ≤ 0.08, scaled to reach o's bounding box
    on its widest axis and never leave it: boxes are MIN_GAP_PX apart, so blobs never touch."""
    axes, tilt = rng.uniform(0.8, 1.0, 2), rng.uniform(0, np.pi)
    k, amplitude, phase = np.arange(2, 6), rng.uniform(-0.08, 0.08, 4), rng.uniform(0, 2 * np.pi, 4)

    def radius(theta: np.ndarray) -> np.ndarray:
        ellipse = 1 / np.hypot(np.cos(theta - tilt) / axes[0], np.sin(theta - tilt) / axes[1])
        return ellipse * (1 + (amplitude * np.cos(k * theta[..., None] + phase)).sum(axis=-1))

    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    reach = np.abs(radius(theta)[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)).max()
    xx, yy = _pixel_centres(size)
    dx, dy = xx - o.cx, yy - o.cy
    return np.hypot(dx, dy) <= o.extent / 2 / reach * radius(np.arctan2(dy, dx))


def stroke_painting(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, list[Blob]]:
    """A crude painting of `scene` as (S, S, 3) uint8: its background colour, each object a flat blob
    of its exact colour (`blob_mask`), not its shape; and the blobs, in the scene's object order."""
    image = np.empty((scene.size, scene.size, 3), np.uint8)
    image[:] = background_rgb(scene.background)
    xx, yy = _pixel_centres(scene.size)
    blobs = []
    for o in scene.objects:
        inside = blob_mask(o, scene.size, rng)
        image[inside] = COLORS[o.color]
        blobs.append(Blob(o.color, float(xx[inside].mean()), float(yy[inside].mean())))
    return image, blobs


@dataclass(frozen=True)
class InpaintCase:
    """A held-out two-object scene, the object to repaint, and the caption after the change."""

    scene: Scene
    changed: int  # index into scene.objects (and scene.prompt.objects)
    attribute: str  # "color" | "shape"
    new_value: str
    caption: str  # the scene's caption with that object's attribute changed

    @property
    def mask(self) -> np.ndarray:
        return inpaint_mask(self.scene, self.changed)


def inpaint_case(seed: int, index: int, unnamed_background: str | None = None) -> InpaintCase:
    """Case `index`: held-out scene `index` of kinds INPAINT_KINDS. The attribute changed alternates
    (colour, shape) every len(INPAINT_KINDS) cases and the object every twice that, so both balance
    within each kind; the new value is one neither object has, so the caption's objects stay distinct."""
    scene, rng = eval_scene(seed, index, INPAINT_KINDS, unnamed_background)
    attribute = ("color", "shape")[index // len(INPAINT_KINDS) % 2]
    changed = index // (2 * len(INPAINT_KINDS)) % 2
    taken = {getattr(o, attribute) for o in scene.objects}
    options = [v for v in (COLORS if attribute == "color" else SHAPES) if v not in taken]
    new_value = options[int(rng.integers(len(options)))]
    objects = list(scene.prompt.objects)
    objects[changed] = dataclasses.replace(objects[changed], **{attribute: new_value})
    prompt = dataclasses.replace(scene.prompt, objects=tuple(objects))
    return InpaintCase(scene, changed, attribute, new_value, format_prompt(prompt))


def inpaint_mask(scene: Scene, changed: int, dilation: int = MASK_DILATION) -> np.ndarray:
    """(S, S) bool, True = repaint: object `changed`'s pixel box grown by `dilation` px, and further
    to hold the largest object the world draws (the new caption names no size, so a small object may
    rightly be redrawn large), less every other object's box (kept whole)."""
    mask = np.zeros((scene.size, scene.size), bool)
    o = scene.objects[changed]
    largest = SIZE_FRACTIONS["large"] * (1 + SIZE_JITTER) * scene.size
    x0, y0, x1, y1 = object_box(o, scene.size, dilation + max(0, math.ceil((largest - o.extent) / 2)))
    mask[y0:y1, x0:x1] = True
    for j, o in enumerate(scene.objects):
        if j != changed:
            x0, y0, x1, y1 = object_box(o, scene.size)
            mask[y0:y1, x0:x1] = False
    return mask


# ---------------------------------------------------------------------------------------------
# The pass tests


def sdedit_checks(image, caption: str, blobs: typing.Sequence[Blob]) -> dict:
    """The img2img test of one output, blobs in the caption's object order: "accepted" (the scorer
    passes the caption), "placed" (each blob has its own detected object of its colour, any shape or
    size, whose centroid is within PLACEMENT_TOLERANCE * S of the blob's), "passed" (one assignment
    the scorer accepts has every caption object that near its blob: both at once); and "reason"."""
    prompt = parse_caption(caption)
    analysis = analyze(image, background_candidates(prompt))
    tolerance = PLACEMENT_TOLERANCE * analysis.size

    def distance(d, blob: Blob) -> float:
        return math.dist(centroid(d), (blob.cx, blob.cy))

    accepted, reason = match(prompt, analysis)
    moved = [max(map(distance, chosen, blobs)) for chosen in assignments(prompt, analysis)]
    passed = accepted and min(moved) <= tolerance
    if accepted and not passed:
        reason = f"an object moved {min(moved):.1f} px from its blob (tolerance {tolerance:.1f})"

    def placeable(i: int, used: frozenset) -> bool:  # a one-to-one choice, blob by blob
        if i == len(blobs):
            return True
        near = [j for j, d in enumerate(analysis.objects)
                if j not in used and d.color == blobs[i].color and distance(d, blobs[i]) <= tolerance]
        return any(placeable(i + 1, used | {j}) for j in near)

    return {"passed": passed, "accepted": accepted, "placed": placeable(0, frozenset()), "reason": reason}


def inpaint_checks(output, given, mask: np.ndarray, caption: str) -> dict:
    """The inpainting test of one output: "accepted" (the scorer passes the new caption), "unchanged"
    (every pixel outside `mask` (True = repaint) equals the input `given`'s exactly), "passed" (both);
    and "reason"."""
    out, given = np.asarray(output.convert("RGB")), np.asarray(given.convert("RGB"))
    if out.shape != given.shape:
        raise ValueError(f"the output is {out.shape[1]}x{out.shape[0]} px, the input {given.shape[1]}x{given.shape[0]}")
    changed = int((out[~mask] != given[~mask]).any(axis=-1).sum())
    result = score_image(out, caption)
    reasons = [f"{changed} pixels outside the mask changed"] if changed else []
    reasons += [] if result.passed else [result.reason]
    return {"passed": result.passed and not changed, "accepted": result.passed, "unchanged": not changed,
            "reason": "; ".join(reasons) or "ok"}


# ---------------------------------------------------------------------------------------------
# Generating, scoring and reporting an editing task


@dataclass(frozen=True)
class EditCase:
    """One editing request: the caption, the picture (and inpainting's mask, white = repaint), and
    the ground truth its check needs (`record`, written to metadata.jsonl)."""

    text: str
    kind: str
    image: Image.Image
    mask: Image.Image | None
    record: dict


def sdedit_cases(num: int, seed: int, unnamed_background: str | None = None) -> list[EditCase]:
    """The img2img requests: held-out scene i's caption and its stroke painting."""
    cases = []
    for i in range(num):
        scene, rng = eval_scene(seed, i, unnamed_background=unnamed_background)
        painting, blobs = stroke_painting(scene, rng)
        record = {"background": scene.background, "blobs": [dataclasses.asdict(b) for b in blobs]}
        cases.append(EditCase(scene.caption, scene.kind, Image.fromarray(painting), None, record))
    return cases


def inpaint_cases(num: int, seed: int, unnamed_background: str | None = None) -> list[EditCase]:
    """The inpainting requests: the changed caption, the rendered scene and the mask."""
    from .shapes import render

    cases = []
    for i in range(num):
        case = inpaint_case(seed, i, unnamed_background)
        o = case.scene.objects[case.changed]
        record = {"background": case.scene.background, "original_text": case.scene.caption, "changed": case.changed,
                  "attribute": case.attribute, "old_value": getattr(o, case.attribute), "new_value": case.new_value}
        mask = Image.fromarray(case.mask.astype(np.uint8) * 255)
        cases.append(EditCase(case.caption, case.scene.kind, render(case.scene), mask, record))
    return cases


def generate_edit_folder(pipe, outdir: str, cases: list[EditCase], *, seed: int, batch_size: int,
                         **call) -> tuple[float, dict]:
    """Edit each case with `pipe(prompt, image=, mask_image=, seed=, **call)` into `outdir`: NNNNN.png
    (the output) beside NNNNN-input.png (and NNNNN-mask.png), and metadata.jsonl rows {file_name, text,
    kind, seed, input, mask, **record}. Image i has seed `seed + i`. Returns the pipeline's wall seconds
    and the settings it ran, as its infotext names them ("Sampler", "Inpaint method", ...: `call` may
    leave them to the pipeline). The folder is made after the first call, so a bad setting leaves none."""
    rows, seconds = [], 0.0
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        masks = [c.mask for c in batch] if batch[0].mask is not None else None
        tick = time.perf_counter()
        out = pipe(prompt=[c.text for c in batch], image=[c.image for c in batch], mask_image=masks, seed=seed + start,
                   **call)
        seconds += time.perf_counter() - tick
        os.makedirs(outdir, exist_ok=True)
        for i, (case, output) in enumerate(zip(batch, out.images)):
            name = f"{start + i:05d}"
            pictures = {"file_name": output, "input": case.image} | ({"mask": case.mask} if case.mask else {})
            files = {key: f"{name}{'' if key == 'file_name' else '-' + key}.png" for key in pictures}
            for key, picture in pictures.items():
                picture.save(os.path.join(outdir, files[key]))
            rows.append({**files, "text": case.text, "kind": case.kind, "seed": int(out.seeds[i]), **case.record})
    with open(os.path.join(outdir, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return seconds, infotext_settings(out.parameters[0])


def infotext_settings(infotext: str) -> dict:
    """The settings line of a pipeline infotext (AUTOMATIC1111's "Steps: 25, Sampler: euler, ...") as a
    dict of strings; the values read here (sampler and method names, numbers) hold no comma."""
    line = infotext.splitlines()[-1]
    return dict(item.partition(": ")[::2] for item in line.split(", "))


def score_edit_folder(folder: str, task: str) -> dict:
    """Check every row of an editing folder (`sdedit_checks` for img2img, `inpaint_checks` for inpaint)
    from its files and metadata.jsonl alone; see `summarize_checks`."""
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    results = []
    for row in rows:
        output = Image.open(os.path.join(folder, row["file_name"]))
        if task == "img2img":
            checks = sdedit_checks(output, row["text"], [Blob(**b) for b in row["blobs"]])
        else:
            mask = np.asarray(Image.open(os.path.join(folder, row["mask"])).convert("L")) > 127
            checks = inpaint_checks(output, Image.open(os.path.join(folder, row["input"])), mask, row["text"])
        results.append((row, checks))
    report = summarize_checks(results, CHECKS[task])
    report["folder"] = os.fspath(folder)
    return report


def summarize_checks(results: list[tuple[dict, dict]], checks: typing.Sequence[str]) -> dict:
    """`summarize`'s layout for (metadata row, checks) pairs: per kind and overall, "n" and each check's
    count and "<check>_rate" ("accuracy" is the pass rate); the same per input background
    ("input_backgrounds"); and every failed image with its reason."""
    def counts(title: str) -> dict:
        return {"title": title, "n": 0, **{c: 0 for c in checks}}

    kinds = {kind: counts(KIND_TITLES[kind]) for kind in KINDS} | {"overall": counts("overall")}
    backgrounds = {name: counts(f"input on {name}") for name in BACKGROUNDS}
    failures = []
    for row, result in results:
        for line in (kinds[row["kind"]], kinds["overall"], backgrounds[row["background"]]):
            line["n"] += 1
            for c in checks:
                line[c] += int(result[c])
        if not result["passed"]:
            failures.append({"file_name": row["file_name"], "text": row["text"], "reason": result["reason"]})
    for line in [*kinds.values(), *backgrounds.values()]:
        for c in checks:
            line[f"{c}_rate"] = line[c] / line["n"] if line["n"] else None
        line["accuracy"] = line["passed_rate"]
    return {"kinds": kinds, "input_backgrounds": backgrounds, "failures": failures}


def format_checks(report: dict, checks: typing.Sequence[str]) -> str:
    """An editing report as a table: kind (then input background), images, and each check's rate."""
    lines = [f"{'kind':<24}{'images':>8}" + "".join(f"{CHECK_TITLES[c]:>14}" for c in checks)]
    for name, line in [*report["kinds"].items(), *report["input_backgrounds"].items()]:
        if line["n"] or name == "overall":
            rates = "".join(f"{100 * line[f'{c}_rate']:>13.1f}%" if line["n"] else f"{'-':>14}" for c in checks)
            lines.append(f"{line['title']:<24}{line['n']:>8}{rates}")
    return "\n".join(lines)


def _prepare_edits(model: str, folders: list[str], *, num_prompts: int, seed: int, sampler: str | None,
                   steps: int | None, cfg: float, batch_size: int, device: str | None, overwrite: bool,
                   progress: bool, guidance_rescale: float | None, check=None):
    """Check an editing task's settings before any weights load (then `check(info, steps)` for the task's
    own), load the model; returns (pipe, the pipeline keywords, the settings for the report)."""
    from ldm import LatentPipeline
    from ldm.models import inspect_pipeline, resolve_model
    from ldm.pipeline import resolve_device

    info = inspect_pipeline(resolve_model(model))
    device = resolve_device(device)
    _, steps, size, guidance_rescale = check_eval_args(
        latent_factor=info.latent_factor, default_size=info.default_size, outdir=folders[0], num_prompts=num_prompts,
        seed=seed, sampler=sampler, steps=steps, cfg=cfg, batch_size=batch_size, size=EDIT_SIZE, overwrite=overwrite,
        guidance_rescale=guidance_rescale, scheduler_config=info.scheduler_config)
    for folder in folders[1:]:
        check_outdir(folder, overwrite)
    if check is not None:
        check(info, steps)
    call = {"num_inference_steps": steps, "guidance_scale": cfg, "guidance_rescale": guidance_rescale,
            "progress": progress} | ({"sampler": sampler} if sampler is not None else {})  # else the pipeline's own
    settings = {"model": os.fspath(model), "num_prompts": num_prompts, "seed": seed, "sampler": sampler, "steps": steps,
                "cfg": cfg, "guidance_rescale": guidance_rescale, "size": size, "batch_size": batch_size,
                "device": str(device)}
    return LatentPipeline.from_pretrained(model, device=device), call, settings


def _edit_report(folder: str, task: str, settings: dict, seconds: float) -> dict:
    """Score an editing folder and write its report.json, with the settings and the pipeline's wall seconds."""
    report = score_edit_folder(folder, task)
    num = report["kinds"]["overall"]["n"]
    report["settings"] = {"task": task, **settings, "seconds": round(seconds, 1),
                          "seconds_per_image": round(seconds / num, 4)}
    write_report(report, os.path.join(folder, "report.json"))
    return report


def strength_folder(outdir: str, strength: float) -> str:
    return os.path.join(outdir, f"strength-{strength:g}")


def evaluate_img2img(model: str, outdir: str, *, strengths: typing.Sequence[float], num_prompts: int, seed: int = 0,
                     sampler: str | None = None, steps: int | None = None, cfg: float = 7.5, batch_size: int = 16,
                     device: str | None = None, overwrite: bool = False, progress: bool = False,
                     guidance_rescale: float | None = None, unnamed_background: str | None = "gray") -> dict:
    """SDEdit of held-out stroke paintings toward their captions, once per strength, each into
    `outdir/strength-S` (outputs beside their paintings, metadata.jsonl, report.json). A pass: the
    scorer accepts the caption and every object stays where its blob was (`sdedit_checks`). Writes
    `outdir/sweep.json` (per strength: pass, caption and placement rates, seconds per image) and
    `outdir/report.json` (everything); returns the latter. Image i has seed `seed + i` at every strength."""
    from ldm.editing import check_strength

    strengths = list(strengths)
    if not strengths or len(set(strengths)) != len(strengths):
        raise ValueError(f"--strength needs one or more distinct values, got {strengths}")

    def check(info, steps):
        for strength in strengths:
            check_strength(strength, steps)

    folders = [strength_folder(outdir, s) for s in strengths]
    pipe, call, settings = _prepare_edits(model, folders, num_prompts=num_prompts, seed=seed, sampler=sampler,
                                          steps=steps, cfg=cfg, batch_size=batch_size, device=device,
                                          overwrite=overwrite, progress=progress, guidance_rescale=guidance_rescale,
                                          check=check)
    start = time.time()
    cases = sdedit_cases(num_prompts, seed, unnamed_background)
    runs = {}
    for strength in strengths:
        folder = strength_folder(outdir, strength)
        seconds, ran = generate_edit_folder(pipe, folder, cases, seed=seed, batch_size=batch_size, strength=strength,
                                            **call)
        run_settings = {**settings, "sampler": ran["Sampler"], "strength": strength,
                        "placement_tolerance": PLACEMENT_TOLERANCE, "unnamed_background": unnamed_background}
        runs[f"{strength:g}"] = _edit_report(folder, "img2img", run_settings, seconds)
    report = {"task": "img2img", "settings": {**runs[f"{strengths[0]:g}"]["settings"], "strength": strengths,
                                              "seconds": round(time.time() - start, 1)},
              "sweep": [sweep_row(s, runs[f"{s:g}"]) for s in strengths], "strengths": runs}
    write_report({k: report[k] for k in ("task", "settings", "sweep")}, os.path.join(outdir, "sweep.json"))
    write_report(report, os.path.join(outdir, "report.json"))
    return report


def sweep_row(strength: float, report: dict) -> dict:
    """One line of the strength sweep: overall rates, pass rates per kind and per input background,
    and seconds per image."""
    overall, backgrounds = report["kinds"]["overall"], report["input_backgrounds"]
    return {"strength": strength, "n": overall["n"], "pass_rate": overall["passed_rate"],
            "accept_rate": overall["accepted_rate"], "placement_rate": overall["placed_rate"],
            "kind_pass_rates": {k: v["passed_rate"] for k, v in report["kinds"].items() if v["n"] and k != "overall"},
            "background_pass_rates": {k: v["passed_rate"] for k, v in backgrounds.items() if v["n"]},
            "seconds_per_image": report["settings"]["seconds_per_image"]}


def format_sweep(sweep: list[dict]) -> str:
    """The strength sweep as a table."""
    lines = [f"{'strength':>8}{'images':>8}{'pass':>10}{'caption':>10}{'placement':>11}{'s/image':>9}"]
    for row in sweep:
        rates = f"{100 * row['pass_rate']:>9.1f}%{100 * row['accept_rate']:>9.1f}%{100 * row['placement_rate']:>10.1f}%"
        lines.append(f"{row['strength']:>8g}{row['n']:>8}{rates}{row['seconds_per_image']:>9.3f}")
    return "\n".join(lines)


def evaluate_inpaint(model: str, outdir: str, *, num_prompts: int, seed: int = 0, inpaint_method: str | None = None,
                     jump_length: int | None = None, jump_samples: int | None = None, sampler: str | None = None,
                     steps: int | None = None, cfg: float = 7.5, batch_size: int = 16, device: str | None = None,
                     overwrite: bool = False, progress: bool = False, guidance_rescale: float | None = None,
                     unnamed_background: str | None = "gray") -> dict:
    """Inpainting of held-out two-object scenes (`inpaint_case`): one object's box masked, the caption
    changed in that object's colour or shape. A pass: the scorer accepts the new caption and every
    pixel outside the mask is the input's (`inpaint_checks`). `inpaint_method`, `jump_length` and
    `jump_samples` go to the pipeline only when given (it checks them, before any work); the report
    names what ran. Writes input, mask and output per case, metadata.jsonl and `outdir/report.json`
    (with the pipeline's seconds per image); returns the report."""
    if inpaint_method != "repaint" and (jump_length is not None or jump_samples is not None):
        raise ValueError("--jump-length and --jump-samples apply to --inpaint-method repaint only")
    given = {"inpaint_method": inpaint_method, "jump_length": jump_length, "jump_samples": jump_samples}
    pipe, call, settings = _prepare_edits(model, [outdir], num_prompts=num_prompts, seed=seed, sampler=sampler,
                                          steps=steps, cfg=cfg, batch_size=batch_size, device=device,
                                          overwrite=overwrite, progress=progress, guidance_rescale=guidance_rescale)
    cases = inpaint_cases(num_prompts, seed, unnamed_background)
    seconds, ran = generate_edit_folder(pipe, outdir, cases, seed=seed, batch_size=batch_size,
                                        **{k: v for k, v in given.items() if v is not None}, **call)
    settings |= {"sampler": ran["Sampler"], "inpaint_method": ran.get("Inpaint method"), "mask_dilation": MASK_DILATION,
                 "unnamed_background": unnamed_background}
    settings |= {key: int(ran[name]) for key, name in (("jump_length", "Jump length"), ("jump_samples", "Jump samples"))
                 if name in ran}
    return _edit_report(outdir, "inpaint", settings, seconds)
