"""The shapes world: the fixed spec checked on rendered pixels, the grammar, and determinism."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from ldm.data.shapes import (BACKGROUND_NAMES, BACKGROUNDS, COLORS, EVAL_DOMAIN, KINDS, MIN_GAP_PX, RELATION_MARGIN,
                             ObjectSpec, Prompt, background_rgb, caption, eval_prompts, format_prompt, make_scene,
                             object_box, parse_caption, render_array, sample_scene, world_words, write_dataset)

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
    for bad in ["a orange circle", "an red circle", "a red hexagon", "six red circles", "a pink circle",
                "a red circle on a pink background", "a red circle on an blue background",
                "an orange circle on a orange background", "a red circle near a blue square", "", "A Red Circle!"]:
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


def digest(items) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def test_default_streams_are_those_before_colour_backgrounds():
    """The colour-background extension is off by default: these digests were taken before it existed."""
    assert digest(make_scene(0, i).caption for i in range(60)) == "3e46c9231b428c17"
    renders = hashlib.sha256(b"".join(render_array(make_scene(0, i)).tobytes() for i in range(60))).hexdigest()[:16]
    assert renders == "a7005a35d2266d7c"
    assert digest(format_prompt(p) for p in eval_prompts(60, 0)) == "0f84a34824c02863"
    assert digest([" ".join(world_words())]) == "8e063ef1443a6cd5"  # the colour words were already in it
    # the spec's three named explicitly are the default draw; other backgrounds leave the other kinds alone
    assert [make_scene(7, i, backgrounds=list(BACKGROUNDS)) for i in range(60)] == SCENES[:60]
    blue_green = [make_scene(7, i, backgrounds=["blue", "green"]) for i in range(60)]
    assert [s for s in blue_green if s.kind != "background"] == [s for s in SCENES[:60] if s.kind != "background"]
    assert {s.background for s in blue_green if s.kind == "background"} == {"blue", "green"}


def test_colour_backgrounds():
    scenes = [make_scene(3, i, kinds=["background"], backgrounds=list(COLORS)) for i in range(240)]
    assert {s.background for s in scenes} == set(COLORS)
    for s in scenes:
        assert all(o.color != s.background for o in s.objects)  # never an object on its own colour
        assert s.prompt.background == s.background and parse_caption(s.caption) == s.prompt
        assert s.caption.endswith(f" on {'an' if s.background == 'orange' else 'a'} {s.background} background")
    for s in scenes[:20]:  # painted in the colour's RGB outside the objects' boxes
        image, outside = render_array(s), np.ones((s.size, s.size), bool)
        for o in s.objects:
            x0, y0, x1, y1 = object_box(o, s.size)
            outside[y0:y1, x0:x1] = False
        assert (image[outside] == COLORS[s.background]).all()
    twice = Counter(make_scene(3, i, kinds=["background"], backgrounds=["blue", "blue", "green"]).background
                    for i in range(300))
    assert set(twice) == {"blue", "green"} and 160 < twice["blue"] < 240  # listed twice: drawn twice as often
    prompts = eval_prompts(40, 0, backgrounds=["blue", "green"], kinds=["background"])
    assert {p.kind for p in prompts} == {"background"} and {p.background for p in prompts} == {"blue", "green"}
    assert [p.kind for p in eval_prompts(6, 0, kinds=["two", "position"])] == ["two", "position"] * 3
    assert parse_caption("a red circle on an orange background").background == "orange"
    assert background_rgb("gray") == BACKGROUNDS["gray"] and background_rgb("blue") == COLORS["blue"]
    assert BACKGROUND_NAMES == ("white", "gray", "black", *COLORS)


@pytest.mark.parametrize("backgrounds, message", [
    (["blue", "pink"], "unknown background(s) 'pink'; backgrounds are white, gray, black, red"),
    ("blue", "non-empty list"), ([], "non-empty list"),
])
def test_bad_backgrounds(tmp_path, backgrounds, message):
    with pytest.raises(ValueError) as e:
        make_scene(0, 5, backgrounds=backgrounds)
    assert message in str(e.value)
    with pytest.raises(ValueError, match="background"):
        eval_prompts(3, 0, backgrounds=backgrounds)
    with pytest.raises(ValueError, match="background"):
        write_dataset(str(tmp_path / "d"), 3, backgrounds=backgrounds)
    assert not (tmp_path / "d").exists()  # checked before anything is written
    with pytest.raises(ValueError, match="unknown background 'pink'"):
        background_rgb("pink")


def test_counting_to_five_is_opt_in_and_scored_on_rendered_truth():
    from ldm.data.shapes import EVAL_DOMAIN, check_counts, make_scene, parse_caption, render_array, world_words
    from ldm.data.shapes_score import score_image

    assert [make_scene(0, i, counts=None).caption for i in range(12)] == [make_scene(0, i).caption for i in range(12)]
    assert "five" not in world_words()  # the spec's vocabulary (the default model's) is unchanged
    scenes = [make_scene(0, i, domain=EVAL_DOMAIN, kinds=["counting"], counts=(5,)) for i in range(24)]
    for scene in scenes:
        assert len(scene.objects) == 5 and scene.caption.startswith("five ")
        assert parse_caption(scene.caption) == scene.prompt
        image = render_array(scene)
        assert score_image(image, scene.caption).passed
        assert not score_image(image, scene.caption.replace("five", "four", 1)).passed
    mixed = {len(make_scene(1, i, kinds=["counting"], counts=(2, 5)).objects) for i in range(40)}
    assert mixed == {2, 5}
    for bad in ((7,), (), "5", (True,)):
        with pytest.raises(ValueError, match="count"):
            check_counts(bad)


def test_the_hard_mix_draws_its_cases_and_leaves_the_usual_draw_alone():
    """--mix hard: a third on black, pairs of one colour, counts of three and four, both sizes named;
    every scene passes the scorer on rendered truth; the usual draw is unchanged, and a list cycles."""
    from ldm.data.shapes import HARD_KINDS, check_mix
    from ldm.data.shapes_score import score_image

    assert [make_scene(0, i, mix="usual").caption for i in range(12)] == [make_scene(0, i).caption for i in range(12)]
    scenes = [make_scene(0, i, domain=EVAL_DOMAIN, mix="hard") for i in range(120)]
    assert Counter(s.kind for s in scenes) == {"background": 40, "two": 20, "counting": 20, "position": 20,
                                               "attributes": 20}
    assert [s.kind for s in scenes[:6]] == list(HARD_KINDS)
    for s in scenes:
        assert parse_caption(s.caption) == s.prompt
        assert score_image(render_array(s), s.caption).passed
        if s.kind == "background":
            assert s.background == "black" and s.caption.endswith(" on a black background")
        if s.prompt.form == "count":
            assert len(s.objects) in (3, 4)
        else:  # two objects of one colour and two shapes: fused or swapped objects are caught
            assert len(s.objects) == 2
            assert s.objects[0].color == s.objects[1].color and s.objects[0].shape != s.objects[1].shape
        if s.kind == "attributes":
            assert all(o.size for o in s.prompt.objects)
    half = [make_scene(5, i, mix="usual,hard") for i in range(24)]  # scene i: mix i % 2, kind index i // 2
    assert [s.kind for s in half[0::2]] == list(KINDS) * 2
    assert all(len(s.objects) >= 2 for s in half[1::2])
    assert eval_prompts(6, 0, mix="hard") == [s.prompt for s in scenes[:6]]
    for bad in ("easy", "", ["usual", "x"]):
        with pytest.raises(ValueError, match="unknown mix"):
            check_mix(bad)
