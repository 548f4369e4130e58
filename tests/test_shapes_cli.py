"""ldm-shapes make / score / eval, run in-process through their main(argv)."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm.cli.shapes import main
from ldm.data.shapes import EVAL_DOMAIN, eval_prompts, format_prompt, make_scene, render_array
from ldm.data.shapes_score import score_folder


def test_make_is_deterministic_and_scores_perfectly(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["make", "--out", str(a), "--num", "24", "--seed", "5"]) == 0
    assert "wrote 24 images" in capsys.readouterr().out
    assert main(["make", "--out", str(b), "--num", "24", "--seed", "5"]) == 0
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[3]["text"] == make_scene(5, 3).caption
    for row in rows[:6]:
        assert (a / row["file_name"]).read_bytes() == (b / row["file_name"]).read_bytes()
        assert Image.open(a / row["file_name"]).size == (64, 64)
    capsys.readouterr()
    assert main(["score", str(a), "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "100.0%" in table
    assert json.loads((tmp_path / "r.json").read_text())["kinds"]["overall"]["passed"] == 24


def test_make_unnamed_background(tmp_path, capsys):
    assert main(["make", "--out", str(tmp_path / "g"), "--num", "12", "--seed", "5", "--unnamed-background", "gray"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "g" / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        scene = make_scene(5, i, unnamed_background="gray")
        assert (row["text"], row["background"]) == (scene.caption, scene.background)
        assert row["background"] == "gray" or " background" in row["text"]
        assert (np.asarray(Image.open(tmp_path / "g" / row["file_name"]).convert("RGB")) == render_array(scene)).all()


def test_make_kinds_cycles_through_the_given_list(tmp_path):
    kinds = ["position", "background", "background"]
    assert main(["make", "--out", str(tmp_path / "k"), "--num", "9", "--seed", "5", "--kinds", ",".join(kinds)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "k" / "metadata.jsonl").read_text().splitlines()]
    assert [row["kind"] for row in rows] == kinds * 3
    for i, row in enumerate(rows):
        assert row["text"] == make_scene(5, i, kinds=kinds).caption
    # a scene whose kind the list keeps in place is the spec's own scene
    assert rows[0]["text"] != make_scene(5, 0).caption and make_scene(5, 3, kinds=["position"] * 6).caption == make_scene(5, 3).caption


def test_make_colour_backgrounds(tmp_path, capsys):
    """--backgrounds names the background kind's backgrounds; other kinds keep the spec's scenes."""
    out = tmp_path / "c"
    argv = ["make", "--out", str(out), "--num", "8", "--seed", "5", "--unnamed-background", "gray",
            "--kinds", "background,single", "--backgrounds", "blue,green"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        scene = make_scene(5, i, unnamed_background="gray", kinds=["background", "single"],
                           backgrounds=["blue", "green"])
        assert (row["text"], row["background"]) == (scene.caption, scene.background)
        assert row["background"] in ("blue", "green") if i % 2 == 0 else row["background"] == "gray"
        assert (np.asarray(Image.open(out / row["file_name"]).convert("RGB")) == render_array(scene)).all()
    capsys.readouterr()
    assert main(["score", str(out)]) == 0
    table = capsys.readouterr().out
    assert "overall                        8       8    100.0%" in table and "  on blue" in table


@pytest.mark.parametrize("argv, message", [
    (["make", "--out", "{tmp}/x", "--num", "0"], "--num"),
    (["make", "--out", "{tmp}/x", "--num", "3", "--size", "8"], "--size"),
    (["make", "--num", "3"], "--out"),
    (["score", "{tmp}/nothing"], "nothing"),
    (["score", "{tmp}", "--json", "{tmp}/no-such-folder/r.json"], "no-such-folder"),
    (["eval", "--model", "{tmp}/no-model", "--num-prompts", "2"], "no-model"),
    (["frobnicate"], "invalid choice"),
    (["make", "--out", "{tmp}/a_file", "--num", "2"], "exists and is not a folder"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--seed", "-1"], "--seed must be non-negative"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--unnamed-background", "blue"], "invalid choice"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--kinds", "position,sky"], "unknown kind(s) 'sky'"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--kinds", ""], "unknown kind(s) ''"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--backgrounds", "blue,pink"], "unknown background(s) 'pink'"),
    (["eval", "--task", "inpaint", "--backgrounds", "blue", "--num-prompts", "2"], "--backgrounds applies to"),
    (["eval", "--task", "img2img", "--kinds", "two", "--num-prompts", "2"], "--kinds applies to --task txt2img"),
    (["eval", "--task", "inpaint", "--lora", "x.safetensors", "--num-prompts", "2"],
     "--lora applies to --task txt2img"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--counts", "5,7"], "unknown count(s) 7; counts are 2, 3, 4, 5"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--counts", "five"], "expected numbers separated by commas"),
    (["eval", "--task", "img2img", "--counts", "5", "--num-prompts", "2"], "--counts applies to --task txt2img"),
    (["eval", "--task", "inpaint", "--mix", "hard", "--num-prompts", "2"], "--mix applies to --task txt2img"),
    (["make", "--out", "{tmp}/x", "--num", "2", "--mix", "usual,easy"], "unknown mix 'easy'; mixes are usual, hard"),
    (["eval", "--lora", "{tmp}/style.pt", "--num-prompts", "2"], "pickles are refused"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm-shapes") and ": error: " in err and message in err


def test_eval_without_a_model_names_the_missing_default(tmp_path, capsys, monkeypatch):
    import ldm.pipeline

    monkeypatch.setattr(ldm.pipeline, "DEFAULT_MODEL", tmp_path / "none")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--num-prompts", "2", "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "the default model is missing from this installation" in err and "pass --model PATH" in err


def test_make_refuses_to_overwrite(tmp_path, capsys):
    assert main(["make", "--out", str(tmp_path), "--num", "2"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["make", "--out", str(tmp_path), "--num", "2"])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    assert main(["make", "--out", str(tmp_path), "--num", "3", "--overwrite"]) == 0


@pytest.mark.filterwarnings("ignore:prompt")  # the tiny test tokenizer keeps 16 tokens only
def test_eval_plumbing_with_a_tiny_random_model(tmp_path, tiny_pipeline_dir, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_pipeline_dir), "--num-prompts", "7", "--seed", "3", "--steps", "2",
            "--batch-size", "4", "--outdir", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 7
    # prompts come from the evaluation stream, image i generated with seed + i
    assert [r["text"] for r in rows] == [make_scene(3, i, domain=EVAL_DOMAIN).caption for i in range(7)]
    assert [r["seed"] for r in rows] == list(range(3, 10))
    assert all((out / r["file_name"]).is_file() for r in rows)
    report = json.loads((out / "report.json").read_text())
    rescored = score_folder(out)
    assert report["kinds"] == json.loads(json.dumps(rescored["kinds"]))
    assert report["kinds"]["overall"]["n"] == 7 and report["settings"]["steps"] == 2
    assert "overall" in printed
    with pytest.raises(SystemExit):  # a second run into the same folder is refused
        main(argv)


@pytest.mark.filterwarnings("ignore:prompt")
def test_eval_kinds_and_colour_backgrounds(tmp_path, tiny_pipeline_dir):
    """--kinds background --backgrounds blue,green: the held-out prompts of a colour-background concept."""
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_pipeline_dir), "--num-prompts", "4", "--seed", "3", "--steps", "1",
            "--outdir", str(out), "--device", "cpu", "--quiet", "--kinds", "background", "--backgrounds", "blue,green"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [format_prompt(p) for p in eval_prompts(4, 3, backgrounds=["blue", "green"],
                                                                                  kinds=["background"])]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["kinds"] == ["background"] and report["settings"]["backgrounds"] == ["blue", "green"]
    assert report["kinds"]["background"]["n"] == 4
    named = {name: split["n"] for name, split in report["backgrounds"].items() if split["n"]}
    assert set(named) <= {"blue", "green"} and sum(named.values()) == 4


@pytest.mark.filterwarnings("ignore:prompt")
def test_eval_counts_draws_the_counting_concepts_prompts(tmp_path, tiny_pipeline_dir):
    """--kinds counting --counts 5: the held-out prompts of the counting-to-five concept."""
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_pipeline_dir), "--num-prompts", "3", "--seed", "2", "--steps", "1",
            "--outdir", str(out), "--device", "cpu", "--quiet", "--kinds", "counting", "--counts", "5"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [format_prompt(p) for p in eval_prompts(3, 2, kinds=["counting"], counts=[5])]
    assert all(r["text"].startswith("five ") for r in rows)
    assert json.loads((out / "report.json").read_text())["settings"]["counts"] == [5]


@pytest.mark.filterwarnings("ignore:prompt")
def test_eval_mix_hard_draws_the_hard_prompts(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_pipeline_dir), "--num-prompts", "6", "--steps", "1",
            "--outdir", str(out), "--device", "cpu", "--quiet", "--mix", "hard"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [format_prompt(p) for p in eval_prompts(6, 0, mix="hard")]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["mix"] == "hard" and report["kinds"]["background"]["n"] == 2


@pytest.mark.filterwarnings("ignore:prompt")
def test_eval_guidance_rescale_reaches_the_pipeline_and_the_report(tmp_path, tiny_pipeline_dir, tiny_pipe, capsys):
    import numpy as np

    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_pipeline_dir), "--num-prompts", "3", "--seed", "4", "--steps", "3",
            "--guidance-rescale", "0.7", "--outdir", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["guidance_rescale"] for r in rows] == [0.7] * 3
    assert json.loads((out / "report.json").read_text())["settings"]["guidance_rescale"] == 0.7
    written = np.stack([np.asarray(Image.open(out / r["file_name"]), np.float32) / 255 for r in rows])
    kw = dict(seed=4, num_inference_steps=3, output_type="np", progress=False, sampler="euler")  # eval's default
    texts = [r["text"] for r in rows]
    rescaled = tiny_pipe(texts, guidance_rescale=0.7, **kw).images
    plain = tiny_pipe(texts, guidance_rescale=0.0, **kw).images
    assert np.abs(written - rescaled).max() <= 1.5 / 255  # the PNGs are the φ = 0.7 images, to 8-bit rounding
    assert np.abs(plain - rescaled).max() > 0.01  # and φ changes them: the flag is not ignored
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv[:-5] + ["--guidance-rescale", "2", "--outdir", str(tmp_path / "bad"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "guidance_rescale must be in [0, 1]" in err
