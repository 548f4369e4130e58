"""The scorer's accuracy claims: >= 99% on fresh ground truth, clean, blurred (sigma 1.5) and noisy;
<= 5% when every image is scored against another image's caption."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.data.shapes import (BACKGROUNDS, COLORS, EVAL_DOMAIN, KINDS, ObjectSpec, Prompt, Scene, SceneObject,
                             format_prompt, make_scene, render, write_dataset)
from ldm.data.shapes_score import ScoreResult, analyze, format_report, score_folder, score_image, summarize

N = 300
SEED = 2024  # not a seed any other test uses: these scenes are fresh
SCENES = [make_scene(SEED, i) for i in range(N)]
IMAGES = [render(s) for s in SCENES]


def add_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def pass_rate(images, captions) -> float:
    return float(np.mean([score_image(im, c).passed for im, c in zip(images, captions)]))


CAPTIONS = [s.caption for s in SCENES]
rng = np.random.default_rng(0)
VARIANTS = {
    "clean": lambda im: im,
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "noise": lambda im: add_noise(im, 5.0, rng),
    "blur+noise": lambda im: add_noise(im.filter(ImageFilter.GaussianBlur(1.5)), 5.0, rng),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ground_truth_passes(variant):
    images = [VARIANTS[variant](im) for im in IMAGES]
    assert pass_rate(images, CAPTIONS) >= 0.99


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation with no fixed point: nobody gets their own caption."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if (perm != np.arange(n)).all():
            return perm


def test_someone_elses_caption_fails():
    others = [CAPTIONS[j] for j in derangement(N, 0)]
    assert pass_rate(IMAGES, others) <= 0.05
    blurred = [VARIANTS["blur"](im) for im in IMAGES]
    assert pass_rate(blurred, others) <= 0.05
    # the hard case: another caption of the same kind (a few coincide in fact: "a red circle" twice)
    same_kind = []
    for i, scene in enumerate(SCENES):
        j = next(j for j in list(range(i + 1, N)) + list(range(i)) if SCENES[j].kind == scene.kind)
        same_kind.append(CAPTIONS[j])
    assert pass_rate(IMAGES, same_kind) <= 0.05


def test_analysis_recovers_the_scene():
    for scene, image in zip(SCENES[:60], IMAGES[:60]):
        a = analyze(image)
        assert a.background == scene.background
        found = sorted((d.color, d.shape, d.size) for d in a.objects)
        assert found == sorted((o.color, o.shape, o.size) for o in scene.objects)
        for o in scene.objects:  # every object's centre within a pixel
            assert min(abs(d.cx - o.cx) + abs(d.cy - o.cy) for d in a.objects) < 1.5


def test_single_changes_are_caught():
    # A "left of" scene; each caption below differs from the truth in one detail and must fail.
    i = next(i for i, c in enumerate(CAPTIONS) if " to the left of " in c and " background" not in c)
    image, truth = IMAGES[i], CAPTIONS[i]
    a, b = truth.split(" to the left of ")
    assert score_image(image, truth).passed
    assert score_image(image, f"{a} and {b}").passed  # "and" states no relation
    assert not score_image(image, f"{a} to the right of {b}").passed
    assert not score_image(image, f"{b} to the left of {a}").passed
    assert not score_image(image, a).passed  # an object the caption does not name
    wrong_bg = next(bg for bg in ("white", "gray", "black") if bg != SCENES[i].background)
    assert not score_image(image, f"{truth} on a {wrong_bg} background").passed
    assert score_image(image, f"{truth} on a {SCENES[i].background} background").passed


def test_missing_and_extra_objects_fail():
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert not score_image(blank, "a red circle").passed
    result = score_image(blank, "a red circle on a gray background")
    assert not result.passed and "0 objects" in result.reason
    two = render(make_scene(SEED, 1))  # kind "two": two objects
    assert len(analyze(two).objects) == 2


def test_summarize_keeps_every_failure_unless_capped():
    # report.json is what a run's failures are analysed from: all of them, not the first 20
    results = [(f"{i:05d}.png", "a red circle", ScoreResult(i % 3 == 0, "ok" if i % 3 == 0 else f"miss {i}", None)) for i in range(60)]
    report = summarize(results)
    assert report["kinds"]["single"]["passed"] == 20 and len(report["failures"]) == 40
    assert [f["reason"] for f in report["failures"][:2]] == ["miss 1", "miss 2"]
    assert len(summarize(results, max_failures=5)["failures"]) == 5


def test_score_folder_report(tmp_path):
    write_dataset(tmp_path, 36, seed=SEED + 1)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    # spoil two images: a blank one, and one scored against a caption that is not its own
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / rows[0]["file_name"])
    rows[1]["text"] = rows[7]["text"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = score_folder(tmp_path)
    kinds = report["kinds"]
    assert set(kinds) == set(KINDS) | {"overall"}
    assert kinds["overall"]["n"] == 36 and kinds["overall"]["passed"] == 34
    assert kinds["single"]["passed"] == kinds["single"]["n"] - 1  # row 0 is kind "single"
    assert sum(kinds[k]["n"] for k in KINDS) == 36
    assert {f["file_name"] for f in report["failures"]} == {rows[0]["file_name"], rows[1]["file_name"]}
    # the background kind split by the colour its captions name
    named = [r for r in rows if " background" in r["text"]]
    for colour, split in report["backgrounds"].items():
        assert split["n"] == sum(f"on a {colour} background" in r["text"] for r in named)
    assert sum(split["n"] for split in report["backgrounds"].values()) == kinds["background"]["n"] == len(named) > 0
    table = format_report(report)
    assert "overall" in table and "94.4%" in table
    assert [line.split()[1] for line in table.splitlines() if line.startswith("  on ")] == [c for c, s in report["backgrounds"].items() if s["n"]]

    rows[2]["text"] = "a red hexagon"
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="hexagon"):
        score_folder(tmp_path)


def test_score_vae_script_fails_below_its_floor(tmp_path, capsys):
    """scripts/score_vae_shapes.py --min-accuracy: the build script's stop between the stages. A random
    autoencoder reconstructs no scene, so it passes 0% and any floor above that fails."""
    import importlib.util
    from pathlib import Path

    from unet_fixtures import make_vae_dir

    write_dataset(str(tmp_path / "data"), 6, size=64, seed=1)
    vae = make_vae_dir(tmp_path / "vae")
    path = Path(__file__).resolve().parents[1] / "scripts" / "score_vae_shapes.py"
    spec = importlib.util.spec_from_file_location("score_vae_shapes", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(vae), str(tmp_path / "data")]) == 0
    assert "overall" in capsys.readouterr().out
    assert script.main([str(vae), str(tmp_path / "data"), "--min-accuracy", "0.5"]) == 1
    assert "below --min-accuracy 50%" in capsys.readouterr().err


def test_spec_scores_are_those_before_colour_backgrounds():
    """Images of the spec analyse and score as they did before the extension (digest taken then)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):
        image = render(make_scene(11, i))
        blurred = image.filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(blurred, np.float32) + rng.normal(0, 5, (64, 64, 3))
        for im in (image, blurred, np.clip(noisy, 0, 255).round().astype(np.uint8)):
            a = analyze(im)
            found = [f"{d.color} {d.shape} {d.size} {d.cx:.1f} {d.cy:.1f}" for d in a.objects]
            rows.append(";".join([a.background, *found]))
            r = score_image(im, make_scene(11, (i + 1) % 36).caption)
            rows.append(f"{r.passed} {r.reason}")
    assert hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16] == "1db80e0d79e70865"


COLOUR_SCENES = [make_scene(SEED, i, domain=EVAL_DOMAIN, kinds=["background"], backgrounds=list(COLORS))
                 for i in range(72)]


@pytest.mark.parametrize("variant", ["clean", "blur+noise"])
def test_colour_backgrounds_pass_and_the_background_words_matter(variant):
    """Rendered truth on each of the six colour backgrounds passes; the same image against its caption
    with the background changed to gray fails, and so does the scene drawn on gray against its own."""
    assert {s.background for s in COLOUR_SCENES} == set(COLORS)
    for scene in COLOUR_SCENES:
        image = VARIANTS[variant](render(scene))
        result = score_image(image, scene.caption)
        assert result.passed, (scene.caption, result.reason)
        assert result.analysis.background == scene.background
        assert all(d.color != scene.background for d in result.analysis.objects)  # the background is no object
        gray = format_prompt(dataclasses.replace(scene.prompt, background="gray"))
        assert not score_image(image, gray).passed
        assert not score_image(render(dataclasses.replace(scene, background="gray")), scene.caption).passed


def test_a_colour_background_is_considered_only_when_named():
    """Four large blue squares cover most of a gray canvas: still gray, unless a blue background is asked."""
    squares = tuple(SceneObject("blue", "square", "large", 24.0, cx, cy) for cx in (14, 46) for cy in (14, 46))
    prompt = Prompt("count", (ObjectSpec("blue", "square"),) * 4, background="gray")
    image = render(Scene(64, "gray", squares, prompt))
    assert analyze(image).background == "gray" and score_image(image, format_prompt(prompt)).passed
    assert score_image(image, "four blue squares").passed  # no background named: any is fine
    assert analyze(image, (*BACKGROUNDS, "blue")).background == "blue"  # what a blue candidate would make of it
    assert not score_image(image, "four blue squares on a blue background").passed


def test_summarize_splits_colour_backgrounds_only_when_named():
    ok = ScoreResult(True, "ok", None)
    rows = [(f"{i}.png", f"a red circle on a {bg} background", ok) for i, bg in enumerate(["blue", "gray"])]
    report = summarize(rows)
    assert list(report["backgrounds"]) == [*BACKGROUNDS, "blue"] and report["backgrounds"]["blue"]["n"] == 1
    assert "  on blue" in format_report(report)
    assert list(summarize([("0.png", "a red circle", ok)])["backgrounds"]) == list(BACKGROUNDS)


def test_orange_on_yellow_and_red_survives_noise():
    """Red, orange and yellow are nearly collinear in RGB: on yellow or red, noise flips pixels inside an
    orange object to the red or yellow line. Measured along its own colour's line it keeps its shape
    (labels alone: 86% of such single objects passed at noise sigma 10; all pass now)."""
    rng = np.random.default_rng(1)
    for i in range(40):
        scene = make_scene(SEED, i, kinds=["background"], backgrounds=["yellow", "red"])
        scene = dataclasses.replace(scene, objects=scene.objects[:1])
        o = dataclasses.replace(scene.objects[0], color="orange")
        prompt = Prompt("single", (ObjectSpec("orange", o.shape, o.size),), background=scene.background)
        image = add_noise(render(dataclasses.replace(scene, objects=(o,), prompt=prompt)), 10.0, rng)
        result = score_image(image, format_prompt(prompt))
        assert result.passed, (format_prompt(prompt), result.reason)


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_a_ring_is_not_a_circle(blur):
    """A circle drawn as a ring (hole half its diameter) is "hollow" and fails, sharp or blurred; the same
    scene drawn filled passes. (Before the hole test, 82% of rings passed: scripts/check_scorer_misdrawn.py.)"""
    from ldm.data.shapes_score import hole_area

    scenes = [s for s in (make_scene(SEED, i, domain=EVAL_DOMAIN, kinds=["single"]) for i in range(60))
              if s.objects[0].shape == "circle"][:8]
    assert len(scenes) >= 4
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    for scene in scenes:
        o = scene.objects[0]
        image = np.asarray(render(scene)).copy()
        filled = Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)) if blur else Image.fromarray(image)
        image[(xx - o.cx) ** 2 + (yy - o.cy) ** 2 <= (o.extent / 4) ** 2] = BACKGROUNDS[scene.background]
        ring = Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)) if blur else Image.fromarray(image)
        assert score_image(filled, scene.caption).passed
        result = score_image(ring, scene.caption)
        assert not result.passed and [d.shape for d in result.analysis.objects] == ["hollow"], result.reason
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[3:6, 3:6] = False
    assert hole_area(mask) == 9
    mask[4, 1:4] = False  # a channel to the outside: no longer a hole
    assert hole_area(mask) == 0
