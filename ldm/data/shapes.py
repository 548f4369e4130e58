"""The shapes world: a procedural text-to-image world with an exact grammar (issue 3's fixed spec).

Scenes
------
A square canvas of S x S pixels (default 64) with a background of white (255,255,255), gray
(128,128,128) or black (0,0,0) holds 1-4 flat-coloured objects without outlines. Shapes: circle,
square (axis-aligned), triangle (isosceles, apex up, base = height). Colours, exactly: red
(220,30,30), orange (245,140,20), yellow (235,215,30), green (30,170,60), blue (30,80,220), purple
(140,50,200). An object's extent (diameter or side) is small = 0.22 S or large = 0.38 S, each times
a uniform jitter in [0.92, 1.08]. Objects lie wholly inside the canvas and their bounding boxes are
at least `MIN_GAP_PX` = 2 px apart (so the shapes themselves are too). An object's centre is the
centre of its bounding box; edges are antialiased (4x4 supersampling), interiors exact.

Captions (lower case)
---------------------
    a [small|large] COLOR SHAPE                          single, or attributes with a size word
    a COLOR SHAPE and a COLOR SHAPE                      two objects (distinct colour or shape)
    a [SIZE] COLOR SHAPE REL a [SIZE] COLOR SHAPE        position (attributes with a size word);
        REL in {to the left of, to the right of, above, below}, true between the centres
        with a margin >= 0.15 S on that axis, and mostly along it: the offset on that axis is
        at least the offset on the other (A lies within 45 degrees of REL's direction from B)
    two|three|four COLOR SHAPEs                          counting (all objects alike)
    any of these + " on a white|gray|black background"   background (else the background is random;
                                                         `unnamed_background` fixes it, see below;
                                                         a colour background is an extension, below)
"a"/"an" follow the English rule ("an orange circle"). A caption names every object in the image.

Seeds: scene i of training seed K is drawn from `np.random.default_rng([TRAIN_DOMAIN, K, i])`,
evaluation prompts from `[EVAL_DOMAIN, K, i]`. The first word differs, so no evaluation prompt is
ever drawn from a training seed stream, whatever K. (The grammar is finite, so an evaluation
caption may still occur in training data: what is new is the draw, i.e. the scene.)
Kinds are balanced by index: scene i has kind KINDS[i % 6]. (`kinds=` / `ldm-shapes make --kinds`
changes the cycle, e.g. to weight one kind for a fine-tuning set; the default is the spec's.)

The unnamed background (an addition to the fixed spec, off by default): `unnamed_background="gray"`
(`ldm-shapes make --unnamed-background gray`) paints every scene whose caption names no background
gray; scenes are otherwise the same draws. The captions and the scorer are unchanged, so such data
fits the spec's grammar and its evaluation (which asks for a background only when one is named).
Why it exists: at the high-noise end a diffusion model learns the mean picture per caption from
per-image targets, and a background the caption does not name is the largest variance in them.
It buries the relation words: scripts/probe_binding.py --noisy-target, on the relation captions
of 100,000 scenes, learns no left/right contrast in 600 steps with random unnamed backgrounds, and
a contrast of 0.80 by step 400 (0.88 at 600; 1 = the data's) on the same scenes with them gray.

Colour backgrounds (an extension of the fixed spec, off by default): a background may also be one of
the six object colours, painted in that colour's RGB ("a red circle on a blue background").
`backgrounds=("blue", "green")` (`ldm-shapes make --backgrounds blue,green`) makes the background kind
name one of those instead of white, gray or black (a name listed twice is drawn twice as often);
scenes of the other kinds are the spec's, draw for draw, and `backgrounds=None` is the spec exactly.
No object has its background's colour: such a draw is rejected and the scene redrawn, as a
placement that does not fit is (so a colour background's scenes lean a little towards one object,
which is rejected less often). `parse_caption` always reads the colour names; the scorer looks for
a colour background only where the caption names one. What it is for: a concept the default model,
trained on the spec alone, cannot draw, for a LoRA to learn (docs/data.md).

Counting to five (an extension of the fixed spec, off by default): `counts=(5,)` (`ldm-shapes make
--counts 5`) makes counting scenes show that many objects ("five red circles"); counts=(2, 3, 4, 5)
adds five to the spec's numbers. `counts=None` is the spec's draw exactly. The word "five" is not in
the default model's vocabulary (its tokenizer spells it f-i-v-e), and the shapes VAE draws five
objects as well as four: the concept a LoRA is taught in docs/lora.md. (New colours or shapes are
no such concept: the VAE, trained on this world's palette and three shapes, decodes a red background
as noise and a diamond as a blob.)

The hard mix (`hard=True` / `mix="hard"`, `ldm-shapes make|eval --mix hard`; an addition, the spec's
grammar and scorer unchanged): the cases the default model gets wrong, weighted. Kinds cycle through
HARD_KINDS (two, counting, position, attributes, background twice: a third of the prompts), and each is
drawn harder: two-object prompts (two, position, attributes) name one colour for both objects, which
differ in shape ("a red circle above a red square"), so fused objects and swapped relations are
caught; counting shows three or four; attributes name both objects' sizes; the background kind
names black over one of the other four. `mix="usual,hard"` cycles the two (half each).
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (30, 170, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 200),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
BACKGROUND_NAMES = (*BACKGROUNDS, *COLORS)  # the spec's three, then the colour backgrounds (the extension)
SHAPES = ("circle", "square", "triangle")
SIZE_FRACTIONS = {"small": 0.22, "large": 0.38}  # extent / S
SIZE_JITTER = 0.08
RELATIONS = ("to the left of", "to the right of", "above", "below")
RELATION_MARGIN = 0.15  # of S, between centres on the relation's axis
MIN_GAP_PX = 2
NUMBERS = {2: "two", 3: "three", 4: "four"}
EXTRA_NUMBERS = {5: "five"}  # counting to five: an extension, off by default (`counts=`, see the module doc)
NUMBER_WORDS = {**NUMBERS, **EXTRA_NUMBERS}
KINDS = ("single", "two", "counting", "position", "attributes", "background")
# The hard mix (`hard=True`, `ldm-shapes make/eval --mix hard`; see the module doc): its kind cycle.
HARD_KINDS = ("two", "counting", "position", "attributes", "background", "background")
HARD_COUNTS = (3, 4)
HARD_BACKGROUND = "black"
MIXES = ("usual", "hard")
KIND_TITLES = {
    "single": "single object", "two": "two objects", "counting": "counting", "position": "position",
    "attributes": "colour/size attributes", "background": "background",
}
TRAIN_DOMAIN, EVAL_DOMAIN = 0, 1
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ObjectSpec:
    """An object as a caption states it: size is None when the caption does not say."""

    color: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Prompt:
    """A parsed caption. form: "single" | "and" | "relation" | "count"; relation links objects[0] to objects[1]."""

    form: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    @property
    def kind(self) -> str:
        """The report category: background beats size words beats the caption's form."""
        if self.background is not None:
            return "background"
        if any(o.size for o in self.objects):
            return "attributes"
        return {"single": "single", "and": "two", "relation": "position", "count": "counting"}[self.form]


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str  # "small" | "large"
    extent: float  # diameter or side, px
    cx: float  # bounding-box centre, px (x right, y down; pixel (i, j) covers [j, j+1) x [i, i+1))
    cy: float


@dataclass(frozen=True)
class Scene:
    size: int
    background: str
    objects: tuple[SceneObject, ...]
    prompt: Prompt
    caption: str = field(default="")

    @property
    def kind(self) -> str:
        return self.prompt.kind


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(o: ObjectSpec) -> str:
    words = ([o.size] if o.size else []) + [o.color, o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def format_prompt(p: Prompt) -> str:
    """Prompt -> caption text, by the grammar above."""
    if p.form == "single":
        text = _noun_phrase(p.objects[0])
    elif p.form == "and":
        text = f"{_noun_phrase(p.objects[0])} and {_noun_phrase(p.objects[1])}"
    elif p.form == "relation":
        text = f"{_noun_phrase(p.objects[0])} {p.relation} {_noun_phrase(p.objects[1])}"
    elif p.form == "count":
        o = p.objects[0]
        text = f"{NUMBER_WORDS[len(p.objects)]} {o.color} {o.shape}s"
    else:
        raise ValueError(f"unknown prompt form {p.form!r}")
    if p.background:
        text += f" on {_article(p.background)} {p.background} background"
    return text


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_NP = rf"(an?) (?:(small|large) )?({_COLOR}) ({_SHAPE})"
_REL = "|".join(RELATIONS)
_SUFFIX = rf"(?: on (an?) ({'|'.join(BACKGROUND_NAMES)}) background)?"
_PATTERNS = {
    "single": re.compile(rf"{_NP}{_SUFFIX}"),
    "and": re.compile(rf"{_NP} and {_NP}{_SUFFIX}"),
    "relation": re.compile(rf"{_NP} ({_REL}) {_NP}{_SUFFIX}"),
    "count": re.compile(rf"({'|'.join(NUMBER_WORDS.values())}) ({_COLOR}) ({_SHAPE})s{_SUFFIX}"),
}


def world_words() -> list[str]:
    """Every word a caption of the grammar can contain, sorted: the default model's whole vocabulary."""
    words = {"a", "an", "and", "on", "background"} | set(COLORS) | set(BACKGROUNDS) | set(SIZE_FRACTIONS) | set(NUMBERS.values())
    words |= set(SHAPES) | {f"{shape}s" for shape in SHAPES}
    for relation in RELATIONS:
        words |= set(relation.split())
    return sorted(words)


def parse_caption(text: str) -> Prompt:
    """Caption text -> Prompt; ValueError for anything outside the grammar (articles included)."""
    clean = " ".join(text.strip().split())
    for form, pattern in _PATTERNS.items():
        m = pattern.fullmatch(clean)
        if not m:
            continue
        g = m.groups()
        articles, background = [], None
        if g[-1] is not None:
            articles.append((g[-2], g[-1]))
            background = g[-1]
        if form == "count":
            number = {v: k for k, v in NUMBER_WORDS.items()}[g[0]]
            objects = (ObjectSpec(g[1], g[2]),) * number
            relation = None
        else:
            nps = [g[0:4]] if form == "single" else [g[0:4], g[5:9] if form == "relation" else g[4:8]]
            objects = tuple(ObjectSpec(color, shape, size) for _, size, color, shape in nps)
            articles += [(art, size or color) for art, size, color, _ in nps]
            relation = g[4] if form == "relation" else None
        for article, word in articles:
            if article != _article(word):
                raise ValueError(f"caption {text!r} is not in the shapes grammar: {article!r} before {word!r}")
        return Prompt(form, objects, relation, background)
    raise ValueError(f"caption {text!r} is not in the shapes grammar")


# ---------------------------------------------------------------------------------------------
# Sampling scenes


def _pick(rng: np.random.Generator, options):
    """One of `options`, uniformly (rng.choice is ten times slower on small lists)."""
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator, size: int, color=None, shape=None, size_word=None) -> tuple[str, str, str, float]:
    color = color or _pick(rng, COLORS)
    shape = shape or _pick(rng, SHAPES)
    size_word = size_word or _pick(rng, SIZE_FRACTIONS)
    extent = SIZE_FRACTIONS[size_word] * size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    return color, shape, size_word, float(extent)


def _distinct_pair(rng: np.random.Generator, size: int):
    a = _random_object(rng, size)
    while True:
        b = _random_object(rng, size)
        if (b[0], b[1]) != (a[0], a[1]):
            return a, b


def _same_colour_pair(rng: np.random.Generator, size: int):
    """Two objects of one colour and different shapes (the hard mix's pairs)."""
    a = _random_object(rng, size)
    return a, _random_object(rng, size, color=a[0], shape=_pick(rng, [s for s in SHAPES if s != a[1]]))


def _separated(x: tuple[float, float, float], y: tuple[float, float, float]) -> bool:
    """Bounding boxes (cx, cy, extent) at least MIN_GAP_PX apart on some axis."""
    reach = (x[2] + y[2]) / 2 + MIN_GAP_PX
    return abs(x[0] - y[0]) >= reach or abs(x[1] - y[1]) >= reach


def _relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float) -> bool:
    """`a REL b` between centres (x right, y down) with at least `margin` px on the relation's axis."""
    if relation == "to the left of":
        return b[0] - a[0] >= margin
    if relation == "to the right of":
        return a[0] - b[0] >= margin
    if relation == "above":
        return b[1] - a[1] >= margin
    if relation == "below":
        return a[1] - b[1] >= margin
    raise ValueError(f"unknown relation {relation!r}")


def _relation_layout(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float) -> bool:
    """How the generator places `a REL b`: the relation holds with `margin`, and the offset is
    mostly along REL's axis (|on axis| >= |across|). The scorer asks only the first part, with half
    the margin. The second keeps the picture close to what the words say: with the margin alone,
    "a red circle to the left of a blue square" fits a red circle far above the square and a little
    to its left. Measured over 100,000 scenes: A's offset from B along the axis averages 21 px (std
    8) with the margin alone and 27.5 px (std 6) with both rules; across it, std 24 px and 14 px."""
    dx, dy = abs(a[0] - b[0]), abs(a[1] - b[1])
    along, across = (dx, dy) if relation in ("to the left of", "to the right of") else (dy, dx)
    return _relation_holds(a, b, relation, margin) and along >= across


def _place(rng: np.random.Generator, size: int, extents: list[float], relation: str | None, tries: int = 200):
    """Centres for objects of `extents`, inside the canvas, pairwise separated; None if no luck."""
    placed: list[tuple[float, float, float]] = []
    for extent in extents:
        for _ in range(tries):
            c = (rng.uniform(extent / 2, size - extent / 2), rng.uniform(extent / 2, size - extent / 2), extent)
            if not all(_separated(c, p) for p in placed):
                continue
            if relation and len(placed) == 1 and not _relation_layout(placed[0], c, relation, RELATION_MARGIN * size):
                continue
            placed.append(c)
            break
        else:
            return None
    return placed


def background_rgb(name: str) -> tuple[int, int, int]:
    """The colour of a background name: one of BACKGROUNDS, or (the extension) one of the object COLORS."""
    if name in BACKGROUNDS:
        return BACKGROUNDS[name]
    if name in COLORS:
        return COLORS[name]
    raise ValueError(f"unknown background {name!r}; backgrounds are {', '.join(BACKGROUND_NAMES)}")


def check_backgrounds(backgrounds: typing.Sequence[str] | None) -> tuple[str, ...] | None:
    """`backgrounds` as a tuple (None stays None: the spec's three), or a ValueError naming what is wrong."""
    if backgrounds is None:
        return None
    if isinstance(backgrounds, str) or not backgrounds:
        raise ValueError(f"backgrounds must be None or a non-empty list of {BACKGROUND_NAMES}, got {backgrounds!r}")
    bad = [b for b in backgrounds if b not in BACKGROUND_NAMES]
    if bad:
        raise ValueError(f"unknown background(s) {', '.join(map(repr, bad))}; "
                         f"backgrounds are {', '.join(BACKGROUND_NAMES)}")
    return tuple(backgrounds)


def _check_unnamed_background(unnamed_background: str | None) -> None:
    if unnamed_background is not None and unnamed_background not in BACKGROUNDS:
        raise ValueError(f"unnamed_background must be one of {tuple(BACKGROUNDS)} or None, got {unnamed_background!r}")


def sample_scene(rng: np.random.Generator, size: int = 64, kind: str | None = None,
                 unnamed_background: str | None = None, backgrounds: typing.Sequence[str] | None = None,
                 counts: typing.Sequence[int] | None = None, hard: bool = False) -> Scene:
    """A random scene of `kind` (one of KINDS; random if None) with its caption. A caption without a
    background phrase gets a random background, or `unnamed_background` if given; the background
    kind names one of `backgrounds` (None: the spec's white, gray, black), and counting draws its
    number from `counts` (None: the spec's 2-4), see the module doc. `hard` draws the hard mix's
    version of the kind (the module doc); False is the spec's draw exactly."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    _check_unnamed_background(unnamed_background)
    backgrounds, counts = check_backgrounds(backgrounds), check_counts(counts)
    kind = kind or _pick(rng, HARD_KINDS if hard else KINDS)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if hard:
        backgrounds = backgrounds or (HARD_BACKGROUND,)
        counts = counts or HARD_COUNTS
    while True:  # rejection: a placement that does not fit redraws the whole scene
        base = kind
        if kind == "background":  # the background kind names a background over one of the others
            base = _pick(rng, HARD_KINDS[:4]) if hard else _pick(rng, KINDS[:-1])
        # drawn for every kind, so the other draws stay the same; `backgrounds` only replaces the
        # options of the background kind (None: the spec's three, the spec's draw exactly)
        if kind == "background" and backgrounds is not None:
            background = _pick(rng, backgrounds)
        else:
            background = _pick(rng, BACKGROUNDS)
        if kind != "background" and unnamed_background is not None:
            background = unnamed_background
        relation, show_size = None, [False, False]
        if base in ("single", "attributes") and (base == "single" or (not hard and rng.random() < 0.5)):
            objects = [_random_object(rng, size)]
            form, show_size = "single", [base == "attributes", False]
        elif base in ("two", "position", "attributes"):
            objects = list((_same_colour_pair if hard else _distinct_pair)(rng, size))
            form = "and" if base == "two" else "relation"
            if form == "relation":
                relation = _pick(rng, RELATIONS)
            if base == "attributes":
                show_size = [True, True] if hard else [[True, False], [False, True], [True, True]][int(rng.integers(3))]
        else:  # counting: 2-4 objects alike in colour, shape and size class (or one of `counts`)
            n = int(rng.integers(2, 5)) if counts is None else _pick(rng, counts)
            color, shape, size_word, _ = _random_object(rng, size)
            objects = [_random_object(rng, size, color, shape, size_word) for _ in range(n)]
            form = "count"
        if any(o[0] == background for o in objects):  # an object on its own colour: redraw the scene
            continue
        # Retry the placement of the same objects before redrawing them, so that crowded scenes
        # (four large objects) are not under-represented among the counts.
        centres = next((c for c in (_place(rng, size, [o[3] for o in objects], relation) for _ in range(20)) if c), None)
        if centres is None:
            continue
        scene_objects = tuple(SceneObject(c, s, w, e, cx, cy) for (c, s, w, e), (cx, cy, _) in zip(objects, centres))
        specs = tuple(ObjectSpec(o.color, o.shape, o.size if show else None)
                      for o, show in zip(scene_objects, show_size + [False] * 4))
        prompt = Prompt(form, specs, relation, background if kind == "background" else None)
        return Scene(size, background, scene_objects, prompt, format_prompt(prompt))


def scene_rng(seed: int, index: int, domain: int = TRAIN_DOMAIN) -> np.random.Generator:
    """The random stream of scene `index` for `seed`: training (TRAIN_DOMAIN) or evaluation (EVAL_DOMAIN)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([domain, seed, index])


def check_kinds(kinds: typing.Sequence[str]) -> tuple[str, ...]:
    """`kinds` as a tuple, or a ValueError naming what is wrong with it."""
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty list of {KINDS}, got {kinds!r}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {', '.join(map(repr, bad))}; kinds are {', '.join(KINDS)}")
    return tuple(kinds)


def check_counts(counts: typing.Sequence[int] | None) -> tuple[int, ...] | None:
    """`counts` as a tuple (None stays None), or a ValueError naming the number that is not one of NUMBER_WORDS."""
    if counts is None:
        return None
    if isinstance(counts, (str, int)) or not counts:
        raise ValueError(f"counts must be a non-empty list of {tuple(NUMBER_WORDS)}, got {counts!r}")
    bad = [c for c in counts if isinstance(c, bool) or c not in NUMBER_WORDS]
    if bad:
        raise ValueError(f"unknown count(s) {', '.join(map(repr, bad))}; "
                         f"counts are {', '.join(map(str, NUMBER_WORDS))}")
    return tuple(int(c) for c in counts)


def check_mix(mix: str | typing.Sequence[str]) -> tuple[str, ...]:
    """`mix` ("usual", "hard", "usual,hard" or a list of those) as a tuple, or a ValueError naming what is wrong."""
    names = mix.split(",") if isinstance(mix, str) else list(mix)
    names = [m.strip() for m in names]
    bad = [m for m in names if m not in MIXES]
    if not names or bad:
        raise ValueError(f"unknown mix {', '.join(map(repr, bad or [mix]))}; mixes are {', '.join(MIXES)} "
                         "(a comma list cycles through them)")
    return tuple(names)


def make_scene(seed: int, index: int, size: int = 64, domain: int = TRAIN_DOMAIN, unnamed_background: str | None = None,
               kinds: typing.Sequence[str] | None = None, backgrounds: typing.Sequence[str] | None = None,
               counts: typing.Sequence[int] | None = None, mix: str | typing.Sequence[str] = "usual") -> Scene:
    """Scene `index` of a dataset with `seed`: kind kinds[index % len(kinds)] (None: the spec's balanced
    KINDS; a kind listed twice is drawn twice as often), independent of other indices.
    `backgrounds`: the names the background kind draws from (None: the spec's three; see the module doc).
    `mix`: "hard" draws the hard mix (its own kind cycle HARD_KINDS unless `kinds` is given); a list
    cycles, scene i drawing mix[i % n] with kind index i // n, so each part keeps its kinds balanced."""
    mixes = check_mix(mix)
    which, k = mixes[index % len(mixes)], index // len(mixes)
    hard = which == "hard"
    kinds = kinds or (HARD_KINDS if hard else KINDS)
    rng = scene_rng(seed, index, domain)
    return sample_scene(rng, size, kinds[k % len(kinds)], unnamed_background, backgrounds, counts, hard)


def eval_prompts(num: int, seed: int, size: int = 64, backgrounds: typing.Sequence[str] | None = None,
                 kinds: typing.Sequence[str] | None = None, counts: typing.Sequence[int] | None = None,
                 mix: str | typing.Sequence[str] = "usual") -> list[Prompt]:
    """`num` evaluation prompts from the EVAL_DOMAIN stream (never training's), balanced over KINDS
    (HARD_KINDS for the hard mix), or cycling through `kinds`; the background kind names one of
    `backgrounds` (None: the spec's three, black in the hard mix)."""
    kinds = None if kinds is None else check_kinds(kinds)
    backgrounds, counts, mix = check_backgrounds(backgrounds), check_counts(counts), check_mix(mix)
    return [make_scene(seed, i, size, EVAL_DOMAIN, kinds=kinds, backgrounds=backgrounds, counts=counts, mix=mix).prompt
            for i in range(num)]


# ---------------------------------------------------------------------------------------------
# Rendering


def _coverage(o: SceneObject, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Fraction of each pixel in the window [x0, x0+w) x [y0, y0+h) covered by the object (supersampled)."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (x0 + np.arange(w)[:, None] + offsets[None, :]).reshape(-1)  # (w * ss,) sample x
    ys = (y0 + np.arange(h)[:, None] + offsets[None, :]).reshape(-1)
    X, Y = xs[None, :], ys[:, None]
    half = o.extent / 2
    if o.shape == "circle":
        inside = (X - o.cx) ** 2 + (Y - o.cy) ** 2 <= half * half
    elif o.shape == "square":
        inside = (np.abs(X - o.cx) <= half) & (np.abs(Y - o.cy) <= half)
    else:  # triangle, apex up at (cx, cy - half), base = height = extent on y = cy + half
        top = o.cy - half
        inside = (Y >= top) & (Y <= o.cy + half) & (np.abs(X - o.cx) <= (Y - top) / 2)
    return inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))  # (h, w)


def object_box(o: SceneObject, size: int, grow: int = 0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the pixels [x0, x1) x [y0, y1) of a `size` px canvas that object `o` touches
    (every pixel it covers lies inside), grown by `grow` px on each side and clipped to the canvas."""
    x0, y0 = int(np.floor(o.cx - o.extent / 2)) - grow, int(np.floor(o.cy - o.extent / 2)) - grow
    x1, y1 = int(np.ceil(o.cx + o.extent / 2)) + grow, int(np.ceil(o.cy + o.extent / 2)) + grow
    return max(0, x0), max(0, y0), min(size, x1), min(size, y1)


def render_array(scene: Scene) -> np.ndarray:
    """Scene -> (S, S, 3) uint8. Each object blends over the background only: boxes never overlap."""
    S = scene.size
    bg = np.array(background_rgb(scene.background), np.float32)
    image = np.empty((S, S, 3), np.float32)
    image[:] = bg
    for o in scene.objects:
        x0, y0, x1, y1 = object_box(o, S)
        cover = _coverage(o, x0, y0, x1 - x0, y1 - y0)[..., None]
        image[y0:y1, x0:x1] = bg + cover * (np.array(COLORS[o.color], np.float32) - bg)
    return np.rint(image).astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    """Scene -> RGB PIL image."""
    return Image.fromarray(render_array(scene))


def caption(scene: Scene) -> str:
    """The scene's caption (the grammar's text of `scene.prompt`)."""
    return format_prompt(scene.prompt)


# ---------------------------------------------------------------------------------------------
# Writing a dataset (format (b): PNGs + metadata.jsonl)


def scene_record(scene: Scene) -> dict:
    """The ground truth of a scene as a JSON-able dict (extra metadata.jsonl columns)."""
    return {
        "kind": scene.kind,
        "background": scene.background,
        "objects": [{"color": o.color, "shape": o.shape, "size": o.size, "extent": round(o.extent, 3),
                     "cx": round(o.cx, 3), "cy": round(o.cy, 3)} for o in scene.objects],
    }


def write_dataset(out: str, num: int, *, size: int = 64, seed: int = 0, overwrite: bool = False,
                  unnamed_background: str | None = None, kinds: typing.Sequence[str] | None = None,
                  backgrounds: typing.Sequence[str] | None = None, counts: typing.Sequence[int] | None = None,
                  mix: str | typing.Sequence[str] = "usual") -> int:
    """Write `num` scenes of training seed `seed` as `out/0000000.png`... + `out/metadata.jsonl`.

    Rows are {"file_name", "text", "seed", "index", "kind", "background", "objects"}; image i is
    `make_scene(seed, i, size, unnamed_background=..., kinds=..., backgrounds=..., counts=..., mix=...)`, so a
    dataset is reproducible from those settings and can be extended.
    Refuses to overwrite an existing metadata.jsonl unless `overwrite`. Returns bytes of PNG written.
    """
    import json
    import os

    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    _check_unnamed_background(unnamed_background)
    kinds = None if kinds is None else check_kinds(kinds)
    backgrounds, counts, mix = check_backgrounds(backgrounds), check_counts(counts), check_mix(mix)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "metadata.jsonl")
    if os.path.exists(meta_path) and not overwrite:
        raise ValueError(f"{meta_path} exists; choose an empty folder (or overwrite=True / --overwrite)")
    width = max(7, len(str(num - 1)))
    written = 0
    with open(meta_path + ".partial", "w") as meta:
        for i in range(num):
            scene = make_scene(seed, i, size, unnamed_background=unnamed_background, kinds=kinds,
                               backgrounds=backgrounds, counts=counts, mix=mix)
            name = f"{i:0{width}d}.png"
            path = os.path.join(out, name)
            # compress_level 1: these flat images compress almost as well, several times faster
            render(scene).save(path, compress_level=1)
            written += os.path.getsize(path)
            row = {"file_name": name, "text": scene.caption, "seed": seed, "index": i, **scene_record(scene)}
            meta.write(json.dumps(row) + "\n")
    os.replace(meta_path + ".partial", meta_path)  # a metadata.jsonl exists only when complete
    return written
