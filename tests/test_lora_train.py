"""LoRA training in the stage-2 loop (`ldm-train-unet --base PIPELINE` with lora.enabled): only the
adapters train and are checkpointed, resume is exact, the base stays untouched, and the file the run
writes (either format) loads in diffusers to the same images as in ldm."""

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from unet_fixtures import make_shapes_data

from ldm.cli.train_unet import main

pytest.importorskip("peft")
LORA = {"text_encoder": {"mode": "frozen"}, "data": {"num_workers": 0},
        "lora": {"enabled": True, "rank": 4, "alpha": 8, "text_encoder": True},
        "optim": {"lr": 2e-2}, "ema": {"enabled": False},
        "run": {"batch_size": 4, "checkpoint_every": 2, "sample_every": 0, "log_every": 1}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_data(tmp_path_factory.mktemp("lora-data") / "data", 16)


def train(base, data, out, *extra, **sections):
    config = {k: ({**v, **sections.get(k, {})} if isinstance(v, dict) else v) for k, v in LORA.items()}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["--config", str(path), "--base", str(base), "--data", str(data), "--output-dir", str(out), "--quiet",
                 *extra])
    assert code == 0
    return out


def folder_hash(folder):
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def images(pipe, **kw):
    return pipe("a red circle", seed=3, num_inference_steps=4, output_type="np", progress=False, **kw).images


def test_a_trained_lora_loads_in_diffusers_to_the_same_images(tiny_pipeline_dir, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ldm import LatentPipeline

    before = folder_hash(tiny_pipeline_dir)
    out = train(tiny_pipeline_dir, data, tmp_path / "run", "--max-steps", "4")
    assert folder_hash(tiny_pipeline_dir) == before  # the base is never written
    lora = out / "final" / "lora.safetensors"
    state = load_file(lora)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder"}
    # checkpoints hold the adapters and their optimizer state only
    checkpoint = load_file(out / "checkpoints" / "step-0000004" / "model-unet.safetensors")
    assert checkpoint and all("lora_" in k for k in checkpoint)
    assert {k for k in state if k.startswith("unet.")} == {f"unet.{k.replace('.default', '')}" for k in checkpoint}

    ours = LatentPipeline.from_pretrained(tiny_pipeline_dir)
    ref = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    base = images(ours, sampler="euler")
    ours.load_lora_weights(lora, adapter_name="trained")
    ref.load_lora_weights(str(lora), adapter_name="trained")
    from diffusers import EulerDiscreteScheduler

    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    mine = images(ours, sampler="euler")
    theirs = ref("a red circle", generator=torch.Generator().manual_seed(3), num_inference_steps=4,
                 output_type="np").images
    assert np.abs(mine - theirs).max() <= 1e-3
    assert np.abs(mine - base).max() > 0.02  # the adapters learned something
    # the file lists its training captions' words, so the unseen-word warning knows what the adapter taught
    from ldm.lora import caption_words, lora_words

    assert lora_words(lora) == caption_words(data) and {"circle", "square", "triangle"} <= lora_words(lora)
    ours.training_words = frozenset({"a"})
    assert ours.unseen_words(["a red circle"]) == []
    ours.set_adapters(["trained"], [0.0])
    assert ours.unseen_words(["a red circle"]) == ["red", "circle"]


def test_resume_is_exact_and_the_kohya_file_gives_the_same_images(tiny_pipeline_dir, data, tmp_path):
    from ldm import LatentPipeline

    straight = train(tiny_pipeline_dir, data, tmp_path / "straight", "--max-steps", "4")
    split = train(tiny_pipeline_dir, data, tmp_path / "split", "--max-steps", "2")
    split = train(tiny_pipeline_dir, data, tmp_path / "split", "--max-steps", "4", "--resume", "latest",
                  "--lora-format", "kohya")
    a, b = straight / "checkpoints" / "step-0000004", split / "checkpoints" / "step-0000004"
    for name in ("model-unet", "model-text_encoder", "optimizer-main"):
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    kohya = load_file(split / "final" / "lora.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in kohya)  # SD 1.x's names
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # the adapters' alpha, not the rank
    from ldm.lora import caption_words, lora_words

    assert lora_words(split / "final" / "lora.safetensors") == caption_words(data)
    pipes = []
    for run in (straight, split):
        pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir)
        pipe.load_lora_weights(run / "final" / "lora.safetensors", adapter_name="x")
        pipes.append(images(pipe, sampler="euler"))
    assert np.abs(pipes[0] - pipes[1]).max() <= 1e-4


def test_export_of_a_lora_checkpoint_is_its_file(tiny_pipeline_dir, data, tmp_path):
    out = train(tiny_pipeline_dir, data, tmp_path / "run", "--max-steps", "2")
    config = out / "config.yaml"
    code = main(["--config", str(config), "--export", str(out / "checkpoints" / "step-0000002"),
                 str(tmp_path / "export")])
    assert code == 0
    exported, final = load_file(tmp_path / "export" / "lora.safetensors"), load_file(out / "final" / "lora.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_the_base_sets_the_noise_schedule_and_resolution(tiny_v_pipeline_dir, tmp_path):
    from ldm.config import load_config
    from ldm.train.unet import UNetTrainConfig, resolve_base

    config = resolve_base(load_config(UNetTrainConfig, None, ["lora.enabled=true", "text_encoder.mode=frozen",
                                                             f"base={tiny_v_pipeline_dir}"]))
    scheduler = json.loads((tiny_v_pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    assert config.objective.prediction_type == "v_prediction" == scheduler["prediction_type"]
    assert (config.objective.beta_start, config.objective.beta_end) == (scheduler["beta_start"], scheduler["beta_end"])
    unet = json.loads((tiny_v_pipeline_dir / "unet" / "config.json").read_text())
    vae = json.loads((tiny_v_pipeline_dir / "vae" / "config.json").read_text())
    assert config.data.resolution == unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert config.vae == config.model.pretrained == config.text_encoder.path == str(tiny_v_pipeline_dir)


@pytest.mark.parametrize("extra, message", [
    (["objective.beta_end=0.02"], "objective.beta_end is 0.02, but --base"),
    (["lora.rank=0"], "lora.rank must be ≥ 1"),
    (["text_encoder.mode=joint"], "set text_encoder.mode=frozen"),
    (["--base", "NOT_A_FOLDER"], "not a pipeline folder"),
    (["--base", "DEFAULT", "lora.text_encoder=true"], "CLIP text encoders only, and this model's is bert"),
])
def test_bad_lora_configs_are_one_line_errors(tiny_v_pipeline_dir, data, tmp_path, capsys, extra, message):
    from ldm.assets import asset_path

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**LORA, "lora": {"enabled": True}}))
    extra = [str(asset_path("default-model")) if e == "DEFAULT" else str(tmp_path / e) if e == "NOT_A_FOLDER" else e
             for e in extra]
    base = [] if "--base" in extra else ["--base", str(tiny_v_pipeline_dir)]
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config), *base, "--data", str(data), "--output-dir", str(tmp_path / "out"), "--quiet",
              "--max-steps", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_lora_without_a_base_says_how_to_give_one(data, tmp_path, capsys):
    from unet_fixtures import make_vae_dir, write_config

    config = write_config(tmp_path / "c.yaml", lora={"enabled": True}, text_encoder={"mode": "frozen", "path": "x"})
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config), "--vae", str(make_vae_dir(tmp_path / "vae")), "--data", str(data),
              "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and "--base PIPELINE" in capsys.readouterr().err
