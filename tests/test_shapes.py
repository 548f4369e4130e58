"""The shapes world: the fixed spec checked on rendered pixels, the grammar, and determinism."""

from collections import Counter

import numpy as np
import pytest

from ldm.data.shapes import (BACKGROUNDS, COLORS, EVAL_DOMAIN, KINDS, MIN_GAP_PX, RELATION_MARGIN, ObjectSpec, Prompt,
                             caption, eval_prompts, format_prompt, make_scene, parse_caption, render_array, sample_scene)

SCENES = [make_scene(7, i) for i in range(600)]


def test_kinds_are_balanced_and_captions_round_trip():
    assert Counter(s.kind for s in SCENES) == {k: 100 for k in KINDS}
    for s in SCENES:
        assert s.caption == caption(s) == format_prompt(s.prompt)
        assert parse_caption(s.caption) == s.prompt
        assert s.caption == s.caption.lower()
    counts = Counter(len(s.objects) for s in SCENES if s.prompt.form == "count")
    assert set(counts) == {2, 3, 4} and min(counts.values()) >= 20  # crowded scenes are not starved


def test_scene_geometry_follows_the_spec():
    for s in SCENES:
        S = s.size
        assert 1 <= len(s.objects) <= 4
        for o in s.objects:
            frac = o.extent / S / {"small": 0.22, "large": 0.38}[o.size]
            assert 0.92 <= frac <= 1.08
            assert o.cx - o.extent / 2 >= 0 and o.cx + o.extent / 2 <= S
            assert o.cy - o.extent / 2 >= 0 and o.cy + o.extent / 2 <= S
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                reach = (a.extent + b.extent) / 2 + MIN_GAP_PX
                assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach
        if s.prompt.relation:
            a, b = s.objects
            axis = {"to the left of": b.cx - a.cx, "to the right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
            assert axis[s.prompt.relation] >= RELATION_MARGIN * S
            across = abs(a.cy - b.cy) if s.prompt.relation.startswith("to the") else abs(a.cx - b.cx)
            assert axis[s.prompt.relation] >= across  # mostly along the relation's axis
        if s.prompt.form == "count":
            assert len({(o.color, o.shape, o.size) for o in s.objects}) == 1
        if s.prompt.form in ("and", "relation"):
            assert (s.objects[0].color, s.objects[0].shape) != (s.objects[1].color, s.objects[1].shape)
        # the caption states exactly these objects
        for spec, o in zip(s.prompt.objects, s.objects):
            assert (spec.color, spec.shape) == (o.color, o.shape) and spec.size in (None, o.size)
        if s.prompt.background:
            assert s.prompt.background == s.background


def test_unnamed_background_fixes_only_the_unnamed_ones():
    """unnamed_background paints the scenes whose caption names no background; the draws (caption,
    objects, places) and the named backgrounds stay those of the spec's random-background scenes."""
    gray = [make_scene(7, i, unnamed_background="gray") for i in range(len(SCENES))]
    assert {s.background for s in SCENES if not s.prompt.background} == set(BACKGROUNDS)  # random by default
    for a, b in zip(SCENES, gray):
        assert (b.caption, b.objects) == (a.caption, a.objects)
        assert b.background == (a.background if a.prompt.background else "gray")
    image = render_array(gray[0])  # KINDS[0] is "single": no background named
    assert (image[0, 0] == BACKGROUNDS["gray"]).all()
    with pytest.raises(ValueError, match="unnamed_background"):
        make_scene(7, 0, unnamed_background="blue")


def test_rendered_pixels_are_exact():
    for s in SCENES[:120]:
        image = render_array(s).astype(int)
        S = s.size
        outside = np.ones((S, S), bool)
        for o in s.objects:
            # the centre pixel (inside every shape: for a triangle, a bit below the box centre) is the exact colour
            cy = int(o.cy + (o.extent / 6 if o.shape == "triangle" else 0))
            assert tuple(image[cy, int(o.cx)]) == COLORS[o.color]
            x0, x1 = int(np.floor(o.cx - o.extent / 2)), int(np.ceil(o.cx + o.extent / 2))
            y0, y1 = int(np.floor(o.cy - o.extent / 2)), int(np.ceil(o.cy + o.extent / 2))
            outside[y0:y1, x0:x1] = False
        assert (image[outside] == BACKGROUNDS[s.background]).all()
        # coverage matches the shape's area (circle pi/4 d^2, square d^2, triangle d^2/2), antialiasing included
        bg = np.array(BACKGROUNDS[s.background])
        for o in s.objects:
            col = np.array(COLORS[o.color])
            x0, x1 = int(np.floor(o.cx - o.extent / 2)), int(np.ceil(o.cx + o.extent / 2))
            y0, y1 = int(np.floor(o.cy - o.extent / 2)), int(np.ceil(o.cy + o.extent / 2))
            patch = image[y0:y1, x0:x1]
            axis = int(np.argmax(np.abs(col - bg)))
            coverage = ((patch[..., axis] - bg[axis]) / (col[axis] - bg[axis])).sum()
            area = o.extent**2 * {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[o.shape]
            assert abs(coverage - area) / area < 0.04


def test_generation_is_deterministic_and_seeded():
    again = [make_scene(7, i) for i in range(50)]
    assert again == SCENES[:50]
    assert all((render_array(a) == render_array(b)).all() for a, b in zip(again[:10], SCENES[:10]))
    other = [make_scene(8, i) for i in range(50)]
    assert sum(a.caption != b.caption for a, b in zip(other, SCENES)) > 25
    # a scene depends on (seed, index) only: order of generation does not matter
    assert make_scene(7, 33) == SCENES[33]


def test_eval_prompts_come_from_a_separate_stream():
    prompts = eval_prompts(60, seed=7)
    assert prompts == eval_prompts(60, seed=7)
    assert Counter(p.kind for p in prompts) == {k: 10 for k in KINDS}
    train = [make_scene(7, i).prompt for i in range(60)]
    assert sum(p != t for p, t in zip(prompts, train)) > 40
    assert [make_scene(7, i, domain=EVAL_DOMAIN).prompt for i in range(60)] == prompts


def test_articles_and_grammar():
    assert format_prompt(Prompt("single", (ObjectSpec("orange", "circle"),))) == "an orange circle"
    assert format_prompt(Prompt("single", (ObjectSpec("orange", "circle", "large"),))) == "a large orange circle"
    text = "a red square to the left of an orange triangle on a black background"
    p = parse_caption(text)
    assert p == Prompt("relation", (ObjectSpec("red", "square"), ObjectSpec("orange", "triangle")), "to the left of", "black")
    assert p.kind == "background"
    assert parse_caption("three blue circles").objects == (ObjectSpec("blue", "circle"),) * 3
    assert parse_caption("a small green square above a purple circle").kind == "attributes"
    assert parse_caption("a green square and a purple circle").kind == "two"
    for bad in ["a orange circle", "an red circle", "a red hexagon", "five red circles", "a pink circle",
                "a red circle on a blue background", "a red circle near a blue square", "", "A Red Circle!"]:
        with pytest.raises(ValueError, match="not in the shapes grammar"):
            parse_caption(bad)


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        sample_scene(rng, 64, kind="dancing")
    with pytest.raises(ValueError, match="size"):
        sample_scene(rng, 8)
    with pytest.raises(ValueError, match="seed"):
        make_scene(-1, 0)
