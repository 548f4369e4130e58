"""V1: every flag of ldm-train-unet and ldm-txt2img with a bad value is one line on stderr and exit
status 2, before any weights load."""

import pytest
from unet_fixtures import make_shapes_data, make_vae_dir, write_config

import ldm.train.unet as unet_module
from ldm import LatentPipeline
from ldm.cli.train_unet import main as train_unet
from ldm.cli.txt2img import main as txt2img


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    (root / "a_file").write_text("")
    (root / "broken.yaml").write_text("run: [unclosed\n")
    return {"root": root, "vae": make_vae_dir(root / "vae"), "data": make_shapes_data(root / "data", 8), "config": write_config(root / "c.yaml")}


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(unet_module, "load_vae", refuse)
    monkeypatch.setattr(LatentPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(LatentPipeline, "from_single_file", refuse)


def one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


TRAIN_CASES = {
    "config missing": (["--config", "{root}/nope.yaml"], "config file not found"),
    "config broken": (["--config", "{root}/broken.yaml"], "not a readable YAML file"),
    "config a folder": (["--config", "{root}"], "config file not found"),
    "vae missing": (["--vae", "{root}/novae"], "vae: folder not found"),
    "data missing": (["--data", "{root}/nodata"], "training data not found"),
    "output-dir a file": (["--output-dir", "{root}/a_file"], "exists and is not a folder"),
    "max-steps zero": (["--max-steps", "0"], "--max-steps must be at least 1"),
    "max-steps text": (["--max-steps", "many"], "invalid int value: 'many'"),
    "resume missing": (["--resume", "{root}/nockpt"], "--resume: checkpoint folder not found"),
    "resume not a checkpoint": (["--resume", "{root}/data"], "not a usable checkpoint"),
    "unknown flag": (["--bogus"], "unrecognized arguments: --bogus"),
    "override unknown key": (["run.max_stepz=3"], "unknown config key run.max_stepz"),
    "override bad type": (["run.batch_size=four"], "config key run.batch_size: expected int"),
    "override not key=value": (["run.batch_size"], "is not of the form key=value"),
    "max_bad_steps": (["run.max_bad_steps=0"], "run.max_bad_steps must be ≥ 1"),
    "frozen encoder missing": (["text_encoder.mode=frozen", "text_encoder.path={root}/noenc"], "text_encoder.path: folder not found"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_unet_bad_flags(setup, no_weights, capsys, case):
    extra, message = TRAIN_CASES[case]
    base = {"--config": str(setup["config"]), "--vae": str(setup["vae"]), "--data": str(setup["data"]), "--output-dir": str(setup["root"] / "out")}
    extra = [a.format(root=setup["root"]) for a in extra]
    for flag in [a for a in extra if a in base]:
        base.pop(flag)
    argv = [x for kv in base.items() for x in kv] + extra
    assert message in one_line_error(train_unet, argv, capsys)


TXT2IMG_CASES = {
    "num-images": (["--num-images", "0"], "num_images_per_prompt"),
    "batch-size": (["--batch-size", "0"], "batch_size"),
    "seed": (["--seed", "-1"], "--seed must be in"),
    "guidance-rescale": (["--guidance-rescale", "2"], "guidance_rescale"),
    "dynamic-threshold": (["--dynamic-threshold", "1.5"], "dynamic_threshold"),
    "threshold-bound": (["--dynamic-threshold", "0.9", "--threshold-bound", "0"], "threshold_bound"),
    "attention": (["--attention", "flash"], "invalid choice: 'flash'"),
    "dtype": (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    "config without single file": (["--config", "{model}"], "--config applies only to a single-file"),
    "pickle single file": (["--model", "{root}/m.ckpt"], "pickle checkpoints are refused"),
    "single file missing": (["--model", "{root}/m.safetensors", "--config", "{model}"], "checkpoint not found"),
    "steps text": (["--steps", "x"], "invalid int value: 'x'"),
    "cfg text": (["--cfg", "high"], "invalid float value: 'high'"),
}


@pytest.mark.parametrize("case", sorted(TXT2IMG_CASES))
def test_txt2img_bad_flags(setup, tiny_pipeline_dir, no_weights, capsys, case):
    extra, message = TXT2IMG_CASES[case]
    extra = [a.format(root=setup["root"], model=tiny_pipeline_dir) for a in extra]
    model = [] if "--model" in extra else ["--model", str(tiny_pipeline_dir)]
    assert message in one_line_error(txt2img, ["a red circle", *model, "--outdir", str(setup["root"] / "png"), *extra], capsys)


VAE_CASES = {
    "config missing": (["--config", "{root}/nope.yaml"], "config file not found"),
    "config broken": (["--config", "{root}/broken.yaml"], "not a readable YAML file"),
    "data missing": (["--data", "{root}/nodata"], "{root}/nodata"),
    "output-dir a file": (["--output-dir", "{root}/a_file"], "a_file"),
    "max-steps zero": (["--max-steps", "0"], "--max-steps must be at least 1"),
    "max-steps text": (["--max-steps", "many"], "invalid int value: 'many'"),
    "resume missing": (["--resume", "{root}/nockpt"], "--resume: checkpoint folder not found"),
    "resume not a checkpoint": (["--resume", "{root}/data"], "not a usable checkpoint"),
    "unknown flag": (["--bogus"], "unrecognized arguments: --bogus"),
    "override unknown key": (["loss.kl_weigth=1"], "unknown config key loss.kl_weigth"),
    "override bad type": (["run.batch_size=four"], "config key run.batch_size: expected int"),
    "pretrained missing": (["model.pretrained={root}/novae"], "novae"),
    "validation data missing": (["data.validation_path={root}/noval"], "noval"),
}


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_train_vae_bad_flags(setup, capsys, case, monkeypatch):
    import ldm.train.vae as vae_module
    from ldm.cli.train_vae import main as train_vae

    def refuse(*a, **k):
        raise AssertionError("the run started before the input was checked")

    monkeypatch.setattr(vae_module, "make_accelerator", refuse)
    extra, message = VAE_CASES[case]
    vae_config = setup["root"] / "vae.yaml"
    vae_config.write_text("model: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 4}\ndata: {resolution: 32, num_workers: 0}\n")
    base = {"--config": str(vae_config), "--data": str(setup["data"]), "--output-dir": str(setup["root"] / "vae-out")}
    extra = [a.format(root=setup["root"]) for a in extra]
    for flag in [a for a in extra if a in base]:
        base.pop(flag)
    argv = [x for kv in base.items() for x in kv] + extra
    assert message.format(root=setup["root"]) in one_line_error(train_vae, argv, capsys)


SHAPES_EVAL_CASES = {
    "num-prompts": (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    "seed": (["--seed", "-1"], "seed must be non-negative"),
    "sampler": (["--sampler", "bogus"], "unknown sampler 'bogus'"),
    "steps zero": (["--steps", "0"], "num_inference_steps must be an integer ≥ 1"),  # was silently the default
    "cfg": (["--cfg", "-1"], "guidance scale (cfg) must be a number ≥ 0"),
    "batch-size": (["--batch-size", "0"], "batch_size must be an integer ≥ 1"),
    "size": (["--size", "50"], "height 50 is not a multiple of 8"),
    "device": (["--device", "bogus"], "unknown device 'bogus'"),
    "outdir a file": (["--outdir", "{root}/a_file"], "exists and is not a folder"),
    "model missing": (["--model", "{root}/nomodel"], "model folder not found"),
}


@pytest.mark.parametrize("case", sorted(SHAPES_EVAL_CASES))
def test_shapes_eval_bad_flags(setup, tiny_pipeline_dir, no_weights, capsys, case):
    from ldm.cli.shapes import main as shapes

    extra, message = SHAPES_EVAL_CASES[case]
    base = {"--model": str(tiny_pipeline_dir), "--num-prompts": "2", "--outdir": str(setup["root"] / "eval")}
    extra = [a.format(root=setup["root"]) for a in extra]
    for flag in [a for a in extra if a in base]:
        base.pop(flag)
    argv = ["eval", *[x for kv in base.items() for x in kv], *extra]
    assert message in one_line_error(shapes, argv, capsys)
