"""ldm-train-vae end to end with a tiny AutoencoderKL on a handful of 32 px shapes images: the loss
falls, a resumed run equals an uninterrupted one bit for bit, OUTPUT/final loads in diffusers with
its scaling factor, and bad configs are one-line errors naming the key."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.cli.train_vae import main
from ldm.config import load_config
from ldm.train.vae import VAETrainConfig, latent_scaling_factor, train

TINY = """\
model: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 4, latent_channels: 4}
loss: {disc_start: 2, disc_channels: 8, disc_layers: 2}
data: {resolution: 32, num_workers: 0, validation_samples: 4}
optim: {lr: 2.0e-3, betas: [0.5, 0.9], warmup_steps: 2, max_grad_norm: null}
ema: {enabled: true, decay: 0.99}
run: {max_steps: 4, batch_size: 4, checkpoint_every: 2, keep_last: 5, log_every: 1, sample_every: 2}
validate_every: 2
scale_samples: 12
"""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from ldm.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("vae-data")
    write_dataset(root / "train", 12, size=32, seed=0)  # 3 batches of 4 per epoch: runs cross epochs
    write_dataset(root / "val", 4, size=32, seed=1)
    (root / "tiny.yaml").write_text(TINY)
    return root


def tiny_config(shapes: Path, out: Path, *overrides: str) -> VAETrainConfig:
    return load_config(VAETrainConfig, shapes / "tiny.yaml",
                       [f"data.path={shapes / 'train'}", f"data.validation_path={shapes / 'val'}", f"run.output_dir={out}", *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    """30 steps of L1 + KL only (the GAN is tested in the resume test)."""
    out = tmp_path_factory.mktemp("vae-run")
    train(tiny_config(shapes, out, "run.max_steps=30", "loss.disc_weight=0", "run.checkpoint_every=0", "validate_every=0",
                      "run.sample_every=15"), progress=False)
    return out


def test_the_loss_falls(trained):
    rows = [r for r in metrics(trained) if "loss/rec" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(r["loss/rec"] for r in rows[:5]) / 5, sum(r["loss/rec"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    for key in ("loss/kl", "loss/nll", "lr", "grad_norm", "latent/mean", "latent/std", "images_per_s"):
        assert key in rows[-1]
    # Warm-up: LR factor (step + 1) / 2 for the first two updates, then the constant LR.
    assert [r["lr"] for r in rows[:3]] == pytest.approx([1e-3, 2e-3, 2e-3])
    assert (trained / "samples" / "step-0000015.png").is_file() and (trained / "samples" / "step-0000030.png").is_file()
    scores = json.loads((trained / "validation.json").read_text())
    assert scores["step"] == 30 and 0 < scores["val/ssim"] <= 1 and scores["val/psnr"] > 8


def test_final_folder_loads_in_diffusers_with_its_scaling_factor(trained, shapes):
    from diffusers import AutoencoderKL

    from ldm.data import open_dataset

    final = trained / "final"
    assert (final / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(final.glob("*.bin"))
    vae = AutoencoderKL.from_pretrained(final)
    scale = vae.config.scaling_factor
    assert scale == json.loads((final / "config.json").read_text())["scaling_factor"]
    assert scale == [r for r in metrics(trained) if "scaling_factor" in r][0]["scaling_factor"]
    assert tuple(vae.config.block_out_channels) == (8, 16) and vae.config.latent_channels == 4
    # The factor makes the latents of these images unit-variance: recompute the std directly.
    ds = open_dataset(shapes / "train", resolution=32, seed=0)
    x = torch.stack([ds[i]["pixel_values"] for i in range(12)])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert (z * scale).std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert latent_scaling_factor(vae, ds, 12, 5, seed=0) == pytest.approx(scale, rel=1e-9)  # batch size does not matter


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_exact(shapes, tmp_path, grad_accum):
    """4 steps straight through equal 2 steps + `--resume latest` for 2 more, bit for bit: weights,
    EMA, both optimizers, the discriminator (it starts at step 2, after the resume) and the data order."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--config", str(shapes / "tiny.yaml"), "--data", str(shapes / "train"), "--quiet", f"data.validation_path={shapes / 'val'}",
              f"run.grad_accum={grad_accum}"]
    assert main([*common, "--output-dir", str(straight)]) == 0
    assert main([*common, "--output-dir", str(resumed), "--max-steps", "2"]) == 0
    assert main([*common, "--output-dir", str(resumed), "--resume", "latest"]) == 0

    a, b = straight / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004"
    for name in ("model-vae", "model-loss", "optimizer-vae", "optimizer-disc", "ema-vae"):
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}: {key} differs"
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())
    assert json.loads((a / "state.json").read_text())["data"] == ({"epoch": 1, "batch": 1} if grad_accum == 1 else {"epoch": 2, "batch": 2})
    fa, fb = load_file(straight / "final" / "diffusion_pytorch_model.safetensors"), load_file(resumed / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    # The discriminator trained from step 2 on: its loss was logged, and it is not at its initialisation.
    rows = [r for r in metrics(straight) if "loss/rec" in r]
    assert "loss/d" not in rows[1] and "loss/d" in rows[2] and "d_weight" in rows[3]
    first = load_file(straight / "checkpoints" / "step-0000002" / "model-loss.safetensors")
    assert not torch.equal(first["discriminator.main.0.weight"], load_file(a / "model-loss.safetensors")["discriminator.main.0.weight"])


def test_fine_tuning_starts_from_an_existing_autoencoder(trained, shapes, tmp_path):
    cfg = tiny_config(shapes, tmp_path / "ft", f"model.pretrained={trained / 'final'}", "run.max_steps=1", "loss.disc_weight=0",
                      "run.checkpoint_every=0")
    cfg.model.block_out_channels = (999,)  # ignored: the architecture comes from the folder
    final = train(cfg, progress=False)
    config = json.loads((final / "config.json").read_text())
    assert config["block_out_channels"] == [8, 16]


def test_a_fine_tune_that_moves_the_latent_scale_far_says_so(trained, shapes, tmp_path):
    import shutil
    import warnings

    from ldm.text import LdmWarning

    start = shutil.copytree(trained / "final", tmp_path / "start")
    config = json.loads((start / "config.json").read_text())
    config["scaling_factor"] *= 50  # as if the latents had been 50x tighter before
    (start / "config.json").write_text(json.dumps(config))
    for folder, moved in ((start, True), (trained / "final", False)):
        cfg = tiny_config(shapes, tmp_path / f"ft-{moved}", f"model.pretrained={folder}", "run.max_steps=1",
                          "loss.disc_weight=0", "run.checkpoint_every=0", "validate_every=0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(cfg, progress=False)
        said = [str(w.message) for w in caught if w.category is LdmWarning and "scaling_factor moved" in str(w.message)]
        assert len(said) == (1 if moved else 0), said
        if moved:
            assert "will not fit this one; retrain stage 2" in said[0]


def test_validate_every_without_a_validation_set_warns(shapes, tmp_path):
    from ldm.text import LdmWarning
    from ldm.train.vae import check_config

    cfg = tiny_config(shapes, tmp_path / "v", "validate_every=5", "data.validation_path=null")
    with pytest.warns(LdmWarning, match=r"validate_every=5 but data.validation_path is not set, so no validation"):
        check_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("loss.dsic_start=5", "unknown config key loss.dsic_start"),
    ("run.batch_size=four", "config key run.batch_size: expected int"),
    ("model.norm_num_groups=3", "model.block_out_channels: 8 is not a positive multiple of model.norm_num_groups (3)"),
    ("data.resolution=31", "data.resolution 31 is not a multiple of the downsampling factor 2"),
    ("loss.kl_weight=-1", "loss.kl_weight must be non-negative"),
])
def test_config_errors_are_one_line_naming_the_key(shapes, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as e:
        main(["--config", str(shapes / "tiny.yaml"), "--data", str(shapes / "train"), "--output-dir", str(tmp_path), override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm-train-vae: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_cli_usage_errors(shapes, tmp_path, capsys):
    for argv, message in [
        (["--config", str(shapes / "tiny.yaml"), "--output-dir", str(tmp_path)], "no training data"),
        (["--config", str(tmp_path / "nope.yaml"), "--data", str(shapes / "train")], "config file not found"),
        (["--config", str(shapes / "tiny.yaml"), "--data", str(shapes / "train"), "--resume", str(tmp_path / "nope")], "checkpoint folder not found"),
        (["--config", str(shapes / "tiny.yaml"), "--data", str(shapes / "train"), "model.pretrained=" + str(tmp_path)], "no AutoencoderKL folder"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--quiet"])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sd-kl-f8", "shapes-f8"])
def test_presets_load_and_describe_an_f8_autoencoder(name):
    from ldm.train.vae import build_vae

    cfg = load_config(VAETrainConfig, Path(__file__).parents[1] / "configs" / "vae" / f"{name}.yaml", ["data.path=x"])
    channels = {"sd-kl-f8": 4, "shapes-f8": 8}[name]  # the shapes world's 64 px need 8 (docs/train-vae.md)
    assert 2 ** (len(cfg.model.block_out_channels) - 1) == 8 and cfg.model.latent_channels == channels
    if name == "shapes-f8":
        vae = build_vae(cfg.model, cfg.data.resolution)
        with torch.no_grad():
            z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
        assert z.shape == (1, 8, 8, 8)
