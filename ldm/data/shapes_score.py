"""Scoring images against shapes-world captions by image analysis alone (no learned model).

GenEval-style (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating
Text-to-Image Alignment"): an image passes only if the exact set of objects it shows matches its
caption: the same number of objects, each with the caption's colour and shape, the size where
the caption states one, the relation between centres, and the background where stated.

The analysis, in order:
1. Background: the one of the three whose colour the most pixels are near (distance < 60). A colour
   background (the world's extension) is a candidate only where the caption names it, so an image
   scored against a caption of the spec is analysed exactly as before, and a large blue object on
   gray is never taken for a blue background unless a blue one is asked for.
2. Colour segmentation against the six exact colours *relative to that background*: a pixel x
   is explained by colour c as the mixture b + a(c - b) nearest to it (a = projection of x - b
   onto c - b). The colour whose mixture line passes nearest (residual < RESIDUAL_MAX) labels the
   pixel, and a (clipped to [0, 1]) is its soft coverage. Antialiased or blurred edges are exactly
   such mixtures, so they are labelled by the colour they blend in, not by whichever colour is
   nearest (a blurred red-on-white edge is nearer to orange than to red). On a colour background
   that colour is no object colour (its mixture line is a point: every background pixel is on it).
3. Objects are the 4-connected components of coverage >= ALPHA_MIN = 0.6 per colour; components
   under MIN_AREA * S^2 (stray edge pixels) are ignored. 0.6 rather than 0.5 keeps the blurred
   2 px gap between two same-coloured objects (coverage ~0.5 at sigma 1.5) out, so they stay apart.
4. Each object's measurements use its soft coverage within 3 px of the component, because a
   Gaussian blur preserves them: mass (area), centroid, third central moment, and the row/column
   sums through the interior. Width and height = the largest row and column sums; fill =
   mass / (width * height) is 1 for a square, pi/4 for a circle, 1/2 for a triangle. A triangle
   (apex up) is told by its mass sitting low: vertical skewness about -0.57 (about -0.45 after
   the blur raises the variance), 0 for circle and square. A box far from square or a fill
   under 0.3 is "unknown" and never matches. On a colour background the coverage is the object
   colour's own alpha at every pixel there that its line explains, whatever labelled it (see
   `_own_line_weight`: there some colours' lines lie close, and noise flips labels inside objects).
   An object with a hole (background or another colour enclosed by its core, 4-connected, at least
   HOLE_FRACTION of the area inside its outline) is "hollow" and never matches either: a ring is not
   a circle. The hole test comes first because the row and column sums miss a hole: across a ring
   the largest of them are its chords above and below the hole, so its width shrinks and its fill
   (0.83-0.89 for a ring whose hole is half its diameter) reads as a filled circle's.
5. Size from extent = sqrt(mass / unit area) (unit area pi/4, 1 or 1/2): small is 0.22 S, large
   0.38 S (each +-8%), split at 0.295 S.
6. Centre = the centroid, shifted up by extent/6 for a triangle (its centroid sits 2/3 down from
   the apex). Relations hold between centres with at least RELATION_MARGIN_SCORE * S on the
   relation's axis (half the generator's 0.15 S: room for measurement error, none for ambiguity).
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass, field
from itertools import permutations

import numpy as np
from PIL import Image

from .shapes import (BACKGROUND_NAMES, BACKGROUNDS, COLORS, KIND_TITLES, KINDS, Prompt, _relation_holds, background_rgb,
                     check_backgrounds, parse_caption)

ALPHA_MIN = 0.6
ALPHA_MAX = 1.6
RESIDUAL_MAX = 60.0
BACKGROUND_RADIUS = 60.0
MIN_AREA = 0.005  # of S^2; the smallest object (small triangle) is ~0.02 S^2
SMALL_LARGE_SPLIT = 0.295  # of S
RELATION_MARGIN_SCORE = 0.075  # of S
TRIANGLE_SKEW = -0.2  # apex-up triangle: -0.57 sharp, about -0.45 blurred; circle and square: 0
HOLE_FRACTION = 0.05  # of the area inside an object's outline (core + hole): a ring's hole is 0.25 of it
CIRCLE_SQUARE_FILL = 0.9  # mass / (width * height): circle pi/4 = 0.785 (0.82 blurred), square 1
_UNIT_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}

_COLOR_NAMES = list(COLORS)
_COLOR_ARRAY = np.array([COLORS[c] for c in _COLOR_NAMES], np.float32)  # (6, 3)


@dataclass(frozen=True)
class Detected:
    color: str
    shape: str  # circle | square | triangle | unknown | hollow (a ring: see the module doc)
    size: str  # small | large
    cx: float
    cy: float
    extent: float
    area: int
    fill: float


@dataclass
class Analysis:
    size: int
    background: str
    objects: list[Detected] = field(default_factory=list)


@dataclass(frozen=True)
class ScoreResult:
    passed: bool
    reason: str  # "ok" or why not
    analysis: Analysis


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array.astype(np.float32)


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected component ids of equal non-negative labels (-1 = none), by min-id propagation.

    Iterates to a fixed point; each pass also jumps every id to its id's id, which makes the
    number of passes logarithmic in a component's diameter for the convex shapes here.
    """
    h, w = labels.shape
    ids = np.where(labels >= 0, np.arange(h * w).reshape(h, w), h * w)
    same_down = (labels[1:] == labels[:-1]) & (labels[1:] >= 0)
    same_right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] >= 0)
    flat_pad = np.append(np.arange(h * w), h * w)  # pointer table, h*w = "none"
    while True:
        old = ids
        ids = ids.copy()
        down = np.minimum(ids[1:], ids[:-1])
        ids[1:] = np.where(same_down, down, ids[1:])
        ids[:-1] = np.where(same_down, np.minimum(ids[:-1], ids[1:]), ids[:-1])
        ids[:, 1:] = np.where(same_right, np.minimum(ids[:, 1:], ids[:, :-1]), ids[:, 1:])
        ids[:, :-1] = np.where(same_right, np.minimum(ids[:, :-1], ids[:, 1:]), ids[:, :-1])
        # pointer jumping: a pixel adopts the current id of the pixel its id names
        flat_pad[: h * w] = ids.reshape(-1)
        ids = flat_pad[ids]
        if np.array_equal(ids, old):
            return ids


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation, `steps` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _own_line_weight(mask: np.ndarray, color: int, other_objects: list[tuple[np.ndarray, int]],
                     color_of: np.ndarray, alpha: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """An object's soft coverage on a colour background: its own colour's alpha (`alpha`, `residual`:
    that colour's columns) at every pixel within 3 px of its core `mask` that its line explains,
    whatever colour labelled the pixel, less the other objects' cores (mask, colour) and, near an
    object of another colour, the pixels labelled with that colour (its edges).

    Why not the labels, as on white, gray and black: on a colour background the mixture lines of
    some colours lie close together (red, orange and yellow are nearly collinear: an orange pixel
    on yellow is 19 units off the yellow-to-red line, against a contrast of 76), so noise flips
    scattered pixels inside an orange object to red, and the holes make a square measure as a circle.
    """
    taken = np.zeros_like(mask)
    for other, other_color in other_objects:
        taken |= other
        if other_color != color:
            taken |= _dilate(other, 3) & (color_of == other_color)
    region = _dilate(mask, 3) & ~taken & (residual < RESIDUAL_MAX) & (alpha > 0) & (alpha <= ALPHA_MAX)
    return np.where(region, np.clip(alpha, 0, 1), 0)


def hole_area(mask: np.ndarray) -> int:
    """Pixels enclosed by `mask` (True = the object's core) that are not in it: the 4-connected parts
    of the rest that do not reach the image's border. Labelled within the mask's bounding box only
    (a hole lies inside it, and any other part reaches the box's edge), not the whole image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0
    mask = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    rest = np.pad(~mask, 1, constant_values=True)  # a frame of "rest" joins every part that leaves the box
    ids = _components(np.where(rest, 0, -1))
    return int((rest & (ids != ids[0, 0])).sum())


def classify_shape(fill: float, aspect: float, skew: float) -> str:
    """Shape from fill = mass / (width * height), aspect = width / height, and the mass's vertical skewness."""
    if fill < 0.3 or not 0.6 <= aspect <= 1.6:
        return "unknown"
    if skew < TRIANGLE_SKEW or fill < 0.62:
        return "triangle"
    return "circle" if fill < CIRCLE_SQUARE_FILL else "square"


def background_candidates(prompt: Prompt) -> tuple[str, ...] | None:
    """The backgrounds `analyze` considers for `prompt`: None (the spec's three) unless the caption
    names a colour background, which then joins them."""
    if prompt.background is None or prompt.background in BACKGROUNDS:
        return None
    return (*BACKGROUNDS, prompt.background)


def analyze(image, backgrounds: typing.Sequence[str] | None = None) -> Analysis:
    """Background and objects (colour, shape, size, centre) found in an RGB image. The background is
    one of `backgrounds` (None: the spec's white, gray, black; see `background_candidates`)."""
    x = _as_array(image)
    h, w, _ = x.shape
    S = (h + w) / 2
    flat = x.reshape(-1, 3)
    bg_names = list(check_backgrounds(backgrounds) or BACKGROUNDS)
    bg_colors = np.array([background_rgb(b) for b in bg_names], np.float32)
    near = (np.linalg.norm(flat[:, None, :] - bg_colors[None], axis=2) < BACKGROUND_RADIUS).sum(axis=0)
    background = bg_names[int(np.argmax(near))]
    b = bg_colors[int(np.argmax(near))]

    direction = _COLOR_ARRAY - b  # (6, 3)
    own = np.array([c == background for c in _COLOR_NAMES])  # the background's own colour, if it is one
    d = flat - b  # (N, 3)
    with np.errstate(divide="ignore", invalid="ignore"):  # own colour: a zero direction, masked just below
        alpha = d @ direction.T / (direction**2).sum(axis=1)  # (N, 6)
        residual = np.linalg.norm(d[:, None, :] - alpha[..., None] * direction[None], axis=2)  # (N, 6)
    # Pick the colour whose mixture line explains the pixel best first, and only then ask how far
    # along it the pixel is: a faint red edge must not be claimed by orange, whose line passes
    # near it with a larger alpha.
    residual = np.where((alpha > 0) & (alpha <= ALPHA_MAX) & ~own, residual, np.inf)
    best = residual.argmin(axis=1)
    rows = np.arange(len(flat))
    explained = residual[rows, best] < RESIDUAL_MAX
    color_of = np.where(explained, best, -1).reshape(h, w)  # (H, W) colour index or -1
    coverage = np.where(explained, np.clip(alpha[rows, best], 0, 1), 0).reshape(h, w)  # soft mask

    core = np.where(coverage >= ALPHA_MIN, color_of, -1)
    ids = _components(core)
    analysis = Analysis(size=int(round(S)), background=background)
    components = [cid for cid in np.unique(ids[core >= 0])]
    masks = {cid: ids == cid for cid in components}
    areas = {cid: int(m.sum()) for cid, m in masks.items()}
    cores = [cid for cid in components if areas[cid] >= MIN_AREA * S * S]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for cid in cores:
        mask = masks[cid]
        color = int(core[mask][0])
        others = (core >= 0) & ~mask
        # The 0.6 core only decides what is one object; measurements use the soft coverage
        # around it (blur-invariant quantities, see the module docstring).
        if own.any():
            neighbours = [(masks[c], int(core[masks[c]][0])) for c in cores if c != cid]
            weight = _own_line_weight(mask, color, neighbours, color_of, alpha[:, color].reshape(h, w),
                                      residual[:, color].reshape(h, w))
        else:
            weight = np.where(_dilate(mask, 3) & ~others & (color_of == color), coverage, 0)
        mass = weight.sum()
        # Width and height from the largest row and column sums of coverage: sub-pixel, and a
        # blur leaves the sums through a shape's interior unchanged (it only moves mass along them).
        width, height = weight.sum(axis=1).max(), weight.sum(axis=0).max()
        fill = mass / (width * height)
        mx, my = (weight * xx).sum() / mass, (weight * yy).sum() / mass
        var_y = (weight * (yy - my) ** 2).sum() / mass
        # a one-row sliver has no vertical spread: skewness 0 (a NaN here compared as False: the same shape)
        skew = (weight * (yy - my) ** 3).sum() / mass / var_y**1.5 if var_y > 0 else 0.0
        # the hole test on the core plus what the soft coverage counts as solid (on a colour background,
        # pixels inside the object whose label noise flipped, see `_own_line_weight`)
        solid = mask | (weight >= ALPHA_MIN)
        hole = hole_area(solid)
        shape = "hollow" if hole >= HOLE_FRACTION * (solid.sum() + hole) else classify_shape(fill, width / height, skew)
        # Extent from mass, which blur preserves: side = sqrt(area / (area of the unit-extent shape)).
        extent = float(np.sqrt(mass / _UNIT_AREA.get(shape, 1.0)))
        analysis.objects.append(Detected(
            color=_COLOR_NAMES[color], shape=shape,
            size="large" if extent >= SMALL_LARGE_SPLIT * S else "small",
            # the box centre from the centroid (blur moves neither): a triangle's centroid is
            # 2/3 of the way down from its apex, extent/6 below its box centre
            cx=float(mx), cy=float(my - (extent / 6 if shape == "triangle" else 0)),
            extent=extent, area=int(round(mass)), fill=float(fill)))
    return analysis


def _attribute_matches(prompt: Prompt, found: list[Detected]):
    """Each assignment of found objects to the caption's (a tuple in the caption's order) whose
    colours, shapes and stated sizes agree; the counts must already be equal."""
    for order in permutations(range(len(found))):
        chosen = tuple(found[i] for i in order)
        if all(s.color == d.color and s.shape == d.shape and (s.size is None or s.size == d.size)
               for s, d in zip(prompt.objects, chosen)):
            yield chosen


def _relation_ok(prompt: Prompt, chosen: tuple[Detected, ...], size: int) -> bool:
    """Does the caption's relation (if any) hold between the centres of `chosen`?"""
    if prompt.relation is None:
        return True
    a, b = chosen
    return _relation_holds((a.cx, a.cy), (b.cx, b.cy), prompt.relation, RELATION_MARGIN_SCORE * size)


def match(prompt: Prompt, analysis: Analysis) -> tuple[bool, str]:
    """(passed, reason): the exact-set test described in the module docstring."""
    if prompt.background is not None and analysis.background != prompt.background:
        return False, f"background is {analysis.background}, not {prompt.background}"
    found, wanted = analysis.objects, prompt.objects
    if len(found) != len(wanted):
        return False, f"{len(found)} objects found, {len(wanted)} wanted"
    attributes_matched = False
    for chosen in _attribute_matches(prompt, found):
        attributes_matched = True
        if _relation_ok(prompt, chosen, analysis.size):
            return True, "ok"
    if attributes_matched:
        return False, f"objects match but not '{prompt.relation}'"
    seen = ", ".join(f"{d.size} {d.color} {d.shape}" for d in found)
    return False, f"objects are {seen}"


def assignments(prompt: Prompt, analysis: Analysis) -> list[tuple[Detected, ...]]:
    """Every way the image passes `match`: for each, the detected object standing for each of
    `prompt.objects`, in that order (several for alike objects, e.g. "three red circles"; none if
    the image fails). What an edit's evaluation asks where each object ended up."""
    if not match(prompt, analysis)[0]:
        return []
    return [c for c in _attribute_matches(prompt, analysis.objects) if _relation_ok(prompt, c, analysis.size)]


def centroid(d: Detected) -> tuple[float, float]:
    """The centroid of a detected object's mass (x, y): its centre, less `analyze`'s triangle shift."""
    return d.cx, d.cy + (d.extent / 6 if d.shape == "triangle" else 0)


def score_image(image, caption: str) -> ScoreResult:
    """Does `image` (PIL or (H, W, 3) array) satisfy `caption`? ValueError if the caption is not in the grammar."""
    prompt = parse_caption(caption)
    analysis = analyze(image, background_candidates(prompt))
    passed, reason = match(prompt, analysis)
    return ScoreResult(passed, reason, analysis)


def summarize(results: list[tuple[str, str, ScoreResult]], max_failures: int | None = None) -> dict:
    """Per-kind and overall pass rates from (file, caption, result) triples, and the background kind's
    split by the colour the caption names ("backgrounds": a model can pass gray and fail white; the
    spec's three always, a colour background only where a caption names one).
    "failures" lists every failed image with its reason (the first `max_failures` if given): it is
    what a run's failures are analysed from, per kind, without scoring the folder again."""
    per_kind = {kind: {"title": KIND_TITLES[kind], "n": 0, "passed": 0} for kind in KINDS}
    per_kind["overall"] = {"title": "overall", "n": 0, "passed": 0}
    per_background = {name: {"title": f"  on {name}", "n": 0, "passed": 0} for name in BACKGROUNDS}
    failures = []
    for file_name, text, result in results:
        prompt = parse_caption(text)
        rows = [per_kind[prompt.kind], per_kind["overall"]]
        if prompt.background:
            name = prompt.background
            rows.append(per_background.setdefault(name, {"title": f"  on {name}", "n": 0, "passed": 0}))
        for row in rows:
            row["n"] += 1
            row["passed"] += int(result.passed)
        if not result.passed and (max_failures is None or len(failures) < max_failures):
            failures.append({"file_name": file_name, "text": text, "reason": result.reason})
    per_background = {name: per_background[name] for name in BACKGROUND_NAMES if name in per_background}
    for row in [*per_kind.values(), *per_background.values()]:
        row["accuracy"] = row["passed"] / row["n"] if row["n"] else None
    return {"kinds": per_kind, "backgrounds": per_background, "failures": failures}


def read_metadata(folder: str) -> list[tuple[str, str]]:
    """(file_name, text) rows of a format (b) folder (metadata.jsonl, or .csv)."""
    from .readers import MetadataSource

    source = MetadataSource(folder)
    rows = []
    for raw in source.samples:
        if raw.problem == "bad_metadata_row" or not isinstance(raw.caption, str):
            raise ValueError(f"{source.path}: row {raw.key} has no file_name and text string")
        rows.append((raw.key, raw.caption))
    if not rows:
        raise ValueError(f"{source.path} has no rows")
    return rows


def score_folder(folder: str) -> dict:
    """Score every image of a format (b) folder against its own caption; see `summarize`."""
    from .images import load_image, BadSample

    rows = read_metadata(folder)
    results = []
    for file_name, text in rows:
        try:
            parse_caption(text)
        except ValueError as e:
            raise ValueError(f"{file_name}: {e}") from None
        try:
            image = load_image(os.path.join(folder, file_name), key=file_name)
        except BadSample as e:
            raise ValueError(f"cannot score {folder}: {e}") from None
        results.append((file_name, text, score_image(image, text)))
    report = summarize(results)
    report["folder"] = os.fspath(folder)
    return report


def format_report(report: dict) -> str:
    """The report as a small table: kind, images, passed, accuracy."""
    lines = [f"{'kind':<24}{'images':>8}{'passed':>8}{'accuracy':>10}"]

    def add(row):
        accuracy = f"{100 * row['accuracy']:.1f}%" if row["accuracy"] is not None else "-"
        lines.append(f"{row['title']:<24}{row['n']:>8}{row['passed']:>8}{accuracy:>10}")

    for kind, row in report["kinds"].items():
        if row["n"] == 0 and kind != "overall":
            continue
        add(row)
        if kind == "background":  # then its split by colour
            for split in report.get("backgrounds", {}).values():
                if split["n"]:
                    add(split)
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
