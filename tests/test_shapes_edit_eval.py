"""ldm-shapes eval --task img2img | inpaint: the inputs it builds, its pass tests, and the command end to end."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from ldm.cli.shapes import main
from ldm.data.shapes import BACKGROUNDS, COLORS, EVAL_DOMAIN, eval_prompts, make_scene, parse_caption, render_array
from ldm.data.shapes_eval import (
    INPAINT_KINDS, PLACEMENT_TOLERANCE, eval_scene, inpaint_case, inpaint_checks, sdedit_checks, stroke_painting,
)
from ldm.data.shapes_score import score_image


def object_pixels(scene, o) -> np.ndarray:
    """(S, S) bool: the pixels object `o` alone changes when rendered."""
    alone = render_array(dataclasses.replace(scene, objects=(o,)))
    return (alone != np.array(BACKGROUNDS[scene.background], np.uint8)).any(axis=-1)


def test_stroke_painting_puts_a_blob_of_each_objects_colour_at_its_position():
    prompts = eval_prompts(12, seed=3)
    for i in range(12):  # two of each kind
        scene, rng = eval_scene(3, i)
        assert scene == make_scene(3, i, domain=EVAL_DOMAIN) and scene.prompt == prompts[i]
        painting, blobs = stroke_painting(scene, rng)
        assert not np.array_equal(painting, render_array(scene))  # blobs, not the rendered shapes
        painted = np.zeros(painting.shape[:2], bool)
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        for o, blob in zip(scene.objects, blobs):
            x0, y0 = int(np.floor(o.cx - o.extent / 2)), int(np.floor(o.cy - o.extent / 2))
            box = np.zeros_like(painted)
            box[max(0, y0):y0 + int(np.ceil(o.extent)) + 1, max(0, x0):x0 + int(np.ceil(o.extent)) + 1] = True
            mine = box & (painting == COLORS[o.color]).all(axis=-1)  # the blob: flat, the object's exact colour
            assert blob.color == o.color
            assert abs(xx[mine].mean() - blob.cx) < 1e-6 and abs(yy[mine].mean() - blob.cy) < 1e-6
            assert np.hypot(blob.cx - o.cx, blob.cy - o.cy) < 1.5  # centred on the object
            assert 0.4 < mine.sum() / o.extent**2 < 0.8  # roughly its extent (a disc of it: 0.785)
            assert np.ptp(xx[mine]) <= o.extent and np.ptp(yy[mine]) <= o.extent
            painted |= mine
        # everything else is the scene's background, exactly
        assert (painting[~painted] == BACKGROUNDS[scene.background]).all()


def test_an_exact_edit_passes_and_a_moved_object_does_not():
    for i in range(12):  # the rendered scene is the ideal output of its own painting
        scene, rng = eval_scene(3, i)
        _, blobs = stroke_painting(scene, rng)
        assert sdedit_checks(render_array(scene), scene.caption, blobs) == {
            "passed": True, "accepted": True, "placed": True, "reason": "ok"}
    scene, rng = eval_scene(3, 0)  # a single object
    _, blobs = stroke_painting(scene, rng)
    o = scene.objects[0]
    step = 1.5 * PLACEMENT_TOLERANCE * 64 * (1 if o.cx < 32 else -1)
    moved = dataclasses.replace(scene, objects=(dataclasses.replace(o, cx=o.cx + step),))
    checks = sdedit_checks(render_array(moved), scene.caption, blobs)
    assert (checks["accepted"], checks["placed"], checks["passed"]) == (True, False, False)
    reported = float(checks["reason"].split("moved ")[1].split(" px")[0])
    assert abs(reported - np.hypot(o.cx + step - blobs[0].cx, o.cy - blobs[0].cy)) < 0.3  # the scorer's centroid


def test_inpaint_cases_mask_the_changed_object_and_change_one_attribute():
    changes = set()
    for i in range(16):
        case = inpaint_case(5, i)
        scene, mask = case.scene, case.mask
        assert scene.kind == INPAINT_KINDS[i % 2] and len(scene.objects) == 2
        changed, other = scene.objects[case.changed], scene.objects[1 - case.changed]
        assert mask[object_pixels(scene, changed)].all() and not mask[object_pixels(scene, other)].any()
        # the box, grown to hold the largest object (0.38 S, +8% jitter) and then by 3 px, and no more
        largest = 0.38 * 1.08 * scene.size
        assert mask.sum() <= (max(changed.extent, largest) + 2 * 3 + 4) ** 2  # (+ pixel rounding)
        for along in np.nonzero(mask):  # each axis spans the largest object, unless the canvas clips it
            assert along.max() + 1 - along.min() >= largest or along.min() == 0 or along.max() == scene.size - 1
        old, new = scene.prompt, parse_caption(case.caption)
        assert (new.form, new.relation, new.background) == (old.form, old.relation, old.background)
        assert new.objects[1 - case.changed] == old.objects[1 - case.changed]
        before, after = old.objects[case.changed], new.objects[case.changed]
        assert dataclasses.replace(after, **{case.attribute: getattr(before, case.attribute)}) == before
        assert getattr(after, case.attribute) == case.new_value
        assert case.new_value not in {getattr(o, case.attribute) for o in scene.objects}
        changes.add((scene.kind, case.attribute, case.changed))
    assert len(changes) == 8  # both kinds, both attributes, both objects


def test_inpaint_pass_needs_the_new_caption_and_every_outside_pixel_kept():
    case = inpaint_case(5, 0)
    given = Image.fromarray(render_array(case.scene))
    o = case.scene.objects[case.changed]
    edited = dataclasses.replace(case.scene, objects=tuple(
        dataclasses.replace(x, **{case.attribute: case.new_value}) if x is o else x for x in case.scene.objects))
    ideal = render_array(edited)
    assert score_image(ideal, case.caption).passed
    assert inpaint_checks(Image.fromarray(ideal), given, case.mask, case.caption)["passed"]
    outside = np.argwhere(~case.mask)[0]
    nudged = ideal.copy()
    nudged[tuple(outside)] ^= 1  # one channel of one pixel outside the mask, off by one
    checks = inpaint_checks(Image.fromarray(nudged), given, case.mask, case.caption)
    assert checks == {"passed": False, "accepted": True, "unchanged": False,
                      "reason": "1 pixels outside the mask changed"}
    unedited = inpaint_checks(given, given, case.mask, case.caption)  # the input itself: kept, but the old caption
    assert (unedited["passed"], unedited["accepted"], unedited["unchanged"]) == (False, False, True)


@pytest.mark.filterwarnings("ignore:prompt")  # the tiny test tokenizer keeps 16 tokens only
def test_img2img_eval_end_to_end(tmp_path, tiny_pipeline_dir, capsys):
    out = tmp_path / "sdedit"
    assert main(["eval", "--task", "img2img", "--model", str(tiny_pipeline_dir), "--num-prompts", "2", "--steps", "2",
                 "--strength", "0.5", "--strength", "1", "--seed", "3", "--outdir", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "strength 0.5:" in printed and "placement" in printed
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["strength"] for row in sweep["sweep"]] == [0.5, 1.0] and sweep["settings"]["steps"] == 2
    for strength in ("0.5", "1"):
        rows = [json.loads(line) for line in (out / f"strength-{strength}" / "metadata.jsonl").read_text().splitlines()]
        assert [r["text"] for r in rows] == [make_scene(3, i, domain=EVAL_DOMAIN).caption for i in (0, 1)]
        assert [r["seed"] for r in rows] == [3, 4]
        for i, row in enumerate(rows):
            scene, rng = eval_scene(3, i, unnamed_background="gray")  # the default: what the model reads
            painting, _ = stroke_painting(scene, rng)
            assert np.array_equal(np.asarray(Image.open(out / f"strength-{strength}" / row["input"])), painting)
            assert Image.open(out / f"strength-{strength}" / row["file_name"]).size == (64, 64)
        report = json.loads((out / f"strength-{strength}" / "report.json").read_text())
        assert report["settings"]["task"] == "img2img" and report["kinds"]["overall"]["n"] == 2
    assert json.loads((out / "report.json").read_text())["settings"]["seconds"] >= 0


@pytest.mark.filterwarnings("ignore:prompt")
def test_inpaint_eval_end_to_end(tmp_path, tiny_pipeline_dir, capsys):
    out = tmp_path / "inpaint"
    assert main(["eval", "--task", "inpaint", "--model", str(tiny_pipeline_dir), "--num-prompts", "2", "--steps", "2",
                 "--outdir", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "outside kept" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        case = inpaint_case(0, i, "gray")
        assert (row["text"], row["original_text"]) == (case.caption, case.scene.caption)
        assert np.array_equal(np.asarray(Image.open(out / row["mask"])) > 127, case.mask)
        given, output = (np.asarray(Image.open(out / row[k])) for k in ("input", "file_name"))
        assert np.array_equal(given, render_array(case.scene))
        assert not np.array_equal(output, given)  # the masked box was repainted
    report = json.loads((out / "report.json").read_text())
    assert report["kinds"]["overall"]["unchanged_rate"] == 1.0  # the pipeline composites the outside back
    assert report["settings"]["inpaint_method"] == "replace" and report["settings"]["seconds_per_image"] > 0
    # RePaint's keywords reach the pipeline (the report names what ran, from the images' infotext)
    assert main(["eval", "--task", "inpaint", "--model", str(tiny_pipeline_dir), "--num-prompts", "1", "--steps", "3",
                 "--inpaint-method", "repaint", "--sampler", "DDIM", "--jump-length", "1", "--jump-samples", "2",
                 "--outdir", str(tmp_path / "repaint"), "--device", "cpu", "--quiet"]) == 0
    settings = json.loads((tmp_path / "repaint" / "report.json").read_text())["settings"]
    ran = {k: settings[k] for k in ("inpaint_method", "sampler", "jump_length", "jump_samples")}
    assert ran == {"inpaint_method": "repaint", "sampler": "ddim", "jump_length": 1, "jump_samples": 2}


@pytest.mark.parametrize("argv, message", [
    (["--task", "img2img", "--strength", "0"], "strength must be a number in (0, 1], got 0.0"),
    (["--task", "img2img", "--strength", "0.5,x"], "--strength takes numbers in (0, 1], got 'x'"),
    (["--task", "img2img", "--strength", "0.5,0.5"], "distinct"),
    (["--task", "bogus"], "invalid choice: 'bogus'"),
    (["--task", "inpaint", "--jump-length", "3"], "--jump-length and --jump-samples apply to --inpaint-method repaint"),
    (["--task", "inpaint", "--inpaint-method", "smudge"], "unknown inpaint_method 'smudge'"),
    (["--task", "inpaint", "--strength", "0.5"], "--strength applies to --task img2img, not inpaint"),
    (["--strength", "0.5"], "--strength applies to --task img2img, not txt2img"),
    (["--task", "img2img", "--size", "32"], "--size applies to --task txt2img, not img2img"),
    (["--task", "img2img", "--jump-samples", "2"], "--jump-samples applies to --task inpaint, not img2img"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, tiny_pipeline_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tiny_pipeline_dir), "--num-prompts", "2", "--outdir", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()
