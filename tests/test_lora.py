"""LoRA adapters (ldm.lora, diffusers' loader over peft): a file loads to the same images here as in
diffusers, in diffusers/peft keys and in kohya's (written by diffusers' own converter); scales,
fusing and AUTOMATIC1111's prompt tags; and every bad file or name is one clear error."""

import shutil

import numpy as np
from helpers import euler_pipelines
import pytest
import torch
from safetensors.torch import load_file, save_file


pytest.importorskip("peft")
KW = dict(num_inference_steps=4, output_type="np")


@pytest.fixture(scope="module")
def lora_file(tiny_pipeline_dir, tmp_path_factory):
    """A LoRA on the tiny U-Net's attention projections, with random (not zero) up-projections."""
    from helpers import make_lora_file

    return make_lora_file(tiny_pipeline_dir, tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture
def pipes(tiny_pipeline_dir):
    return euler_pipelines(tiny_pipeline_dir)


def draw(ours, prompt="a red circle", **kw):
    return ours(prompt, seed=3, progress=False, **KW, **kw)


def theirs(ref, prompt="a red circle"):
    return ref(prompt, generator=torch.Generator().manual_seed(3), **KW).images


def test_a_lora_gives_diffusers_images_at_every_scale_and_fused(pipes, lora_file):
    ours, ref = pipes
    base = draw(ours).images
    ours.load_lora_weights(lora_file, adapter_name="style")
    ref.load_lora_weights(str(lora_file), adapter_name="style")
    out = draw(ours)
    assert np.abs(out.images - theirs(ref)).max() <= 1e-3
    assert np.abs(out.images - base).max() > 0.05  # the LoRA changes the picture
    for scale in (0.0, 0.5):
        ours.set_adapters(["style"], [scale])
        ref.set_adapters(["style"], [scale])
        assert np.abs(draw(ours).images - theirs(ref)).max() <= 1e-3
    half = draw(ours).images
    ours.fuse_lora()
    assert np.abs(draw(ours).images - half).max() <= 1e-4
    ours.unfuse_lora()
    from ldm.lora import file_hash

    ours.set_adapters("style", 0.8)
    text = draw(ours).parameters[0]
    assert text.startswith("a red circle <lora:style:0.8>\n")
    assert f'Lora hashes: "style: {file_hash(lora_file)}"' in text


def test_a_kohya_file_written_by_diffusers_loads_to_the_same_images(pipes, lora_file, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    ours, ref = pipes
    state = {k.removeprefix("unet."): v for k, v in load_file(lora_file).items()}
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(state).items()})
    assert all(k.startswith("lora_unet_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    save_file(kohya, tmp_path / "kohya.safetensors")
    ours.load_lora_weights(tmp_path / "kohya.safetensors", adapter_name="k")
    ref.load_lora_weights(str(lora_file), adapter_name="style")
    assert np.abs(draw(ours).images - theirs(ref)).max() <= 1e-3


def test_prompt_tags_apply_to_their_call_only(pipes, lora_file, tmp_path):
    ours, ref = pipes
    base = draw(ours).images
    shutil.copy(lora_file, tmp_path / "ink.safetensors")
    ours.lora_dir = tmp_path
    tagged = draw(ours, "a red circle <lora:ink:0.5>")
    ref.load_lora_weights(str(lora_file), adapter_name="ink")
    ref.set_adapters(["ink"], [0.5])
    assert np.abs(tagged.images - theirs(ref)).max() <= 1e-3
    assert tagged.parameters[0].startswith("a red circle <lora:ink:0.5>\n")
    assert np.abs(draw(ours).images - base).max() <= 1e-6  # the next call, untagged: no LoRA


@pytest.mark.parametrize(
    "case, message",
    [
        ("pickle", "pickled LoRA files are refused"),
        ("missing", "LoRA file not found"),
        ("foreign", "map to no module of this model"),
        ("shape", "does not fit this model"),
        ("scale", "must be a finite number, got nan"),
        ("adapter", "no adapter named 'nope'; loaded: style"),
        ("tag", r"<lora:absent>: no absent.safetensors in"),
        ("path", "named by its file name in the LoRA folder, not by a path"),
        ("mixed", "name different <lora:...> tags"),
    ],
)
def test_bad_loras_are_value_errors_naming_the_problem(pipes, lora_file, tmp_path, case, message):
    ours, _ = pipes
    ours.lora_dir = tmp_path
    state = load_file(lora_file)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        if case == "pickle":
            torch.save(state, tmp_path / "old.ckpt")
            ours.load_lora_weights(tmp_path / "old.ckpt")
        elif case == "missing":
            ours.load_lora_weights(tmp_path / "none.safetensors")
        elif case == "foreign":
            moved = {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in state.items()}
            save_file(moved, tmp_path / "x.safetensors")
            ours.load_lora_weights(tmp_path / "x.safetensors")
        elif case == "shape":
            save_file({k: torch.zeros(v.shape[0] + 3, v.shape[1]) if "lora_B" in k else v for k, v in state.items()},
                      tmp_path / "y.safetensors")
            ours.load_lora_weights(tmp_path / "y.safetensors")
        elif case in ("scale", "adapter"):
            ours.load_lora_weights(lora_file, adapter_name="style")
            ours.set_adapters(["style"] if case == "scale" else ["nope"], [float("nan")] if case == "scale" else None)
        elif case == "tag":
            draw(ours, "a red circle <lora:absent>")
        elif case == "path":
            draw(ours, "a red circle <lora:../style:1>")
        else:
            shutil.copy(lora_file, tmp_path / "ink.safetensors")
            ours(["a <lora:ink:1>", "a red circle"], progress=False, num_inference_steps=1)


def test_the_cli_applies_lora_files_and_tags(tiny_pipeline_dir, lora_file, tmp_path, capsys):
    from PIL import Image

    from ldm.cli.txt2img import main

    base = ["--model", str(tiny_pipeline_dir), "--steps", "2", "--seed", "1", "--quiet",
            "--outdir", str(tmp_path / "o")]
    assert main(["a red circle", "--lora", f"{lora_file}:0.7", *base]) == 0
    written = Image.open(capsys.readouterr().out.split()[0]).info["parameters"]
    assert written.startswith("a red circle <lora:style:0.7>") and "Lora hashes" in written
    for extra, message in ((["--lora", str(tmp_path / "none.safetensors")], "LoRA file not found"),
                           (["--lora", f"{lora_file}:inf"], "must be a finite number"),
                           (["<lora:style:1> a red circle"], "no LoRA folder is set"),
                           (["<lora:gone:1> a red circle", "--lora-dir", str(lora_file.parent)],
                            "no gone.safetensors")):
        with pytest.raises(SystemExit) as e:
            main([*(["a red circle"] if extra[0].startswith("--") else []), *extra, *base])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "\n" not in err.strip(), err


@pytest.mark.parametrize("lora_format", ["diffusers", "kohya"])
def test_a_lora_saved_in_either_format_loads_in_diffusers_with_the_same_images(pipes, lora_file, tmp_path,
                                                                               lora_format):
    ours, ref = pipes
    ours.load_lora_weights(lora_file, adapter_name="style")
    expected = draw(ours).images
    saved = ours.save_lora(tmp_path / f"out-{lora_format}.safetensors", lora_format=lora_format)
    keys = list(load_file(saved))
    assert all(k.startswith("lora_unet_") for k in keys) if lora_format == "kohya" else all(
        k.startswith("unet.") for k in keys)
    ref.load_lora_weights(str(saved), adapter_name="saved")
    assert np.abs(theirs(ref) - expected).max() <= 1e-3
    with pytest.raises(ValueError, match="unknown LoRA format 'ckpt'"):
        ours.save_lora(tmp_path / "x.safetensors", lora_format="ckpt")


@pytest.mark.filterwarnings("ignore:prompt")  # the tiny test tokenizer keeps 16 tokens only
def test_shapes_eval_scores_the_model_with_its_lora(tiny_pipeline_dir, lora_file, tmp_path):
    import json

    from PIL import Image

    from ldm import LatentPipeline
    from ldm.cli.shapes import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_pipeline_dir), "--lora", f"{lora_file}:0.5", "--num-prompts", "2",
                 "--steps", "2", "--outdir", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["loras"] == [[str(lora_file), 0.5]]
    row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir)
    saved = np.asarray(Image.open(out / row["file_name"])).astype(int)

    def again():
        image = pipe(row["text"], seed=row["seed"], num_inference_steps=2, sampler=row["sampler"],
                     progress=False).images[0]
        return np.abs(np.asarray(image).astype(int) - saved).max()

    assert again() > 20  # the base model alone draws another picture
    pipe.load_lora_weights(lora_file)
    pipe.set_adapters([lora_file.stem], [0.5])
    assert again() <= 2  # within rounding: the eval drew its prompts in a batch, this one alone
