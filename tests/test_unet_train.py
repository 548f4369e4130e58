"""ldm-train-unet end to end with a tiny U-Net: learning, resume, the final folder, the cache, errors."""

import json
import math
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from unet_fixtures import make_shapes_data, make_vae_dir, write_config

from ldm.cli.train_unet import main
from ldm.config import load_config
from ldm.train.unet import CLIP_TOKENIZER, UNetTrainConfig, check_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    return {"vae": make_vae_dir(root / "vae"), "data": make_shapes_data(root / "data", 16), "root": root}


def run_cli(setup, tmp_path, name, *extra, config=None, **sections):
    config = config or write_config(tmp_path / f"{name}.yaml", **sections)
    out = tmp_path / name
    code = main(["--config", str(config), "--vae", str(setup["vae"]), "--data", str(setup["data"]), "--output-dir", str(out), *extra])
    assert code == 0
    return out


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_tiny_run(setup, tmp_path):
    out = run_cli(setup, tmp_path, "fall", "--max-steps", "40", objective={"p_uncond": 0.1}, optim={"lr": 2e-3})
    curve = losses(out)
    assert len(curve) == 40
    first, last = sum(curve[:8]) / 8, sum(curve[-8:]) / 8
    assert last < 0.7 * first, (first, last)


def test_timestep_bias_reaches_the_training_draws(setup, tmp_path, monkeypatch):
    import ldm.train.unet as unet_train

    drawn, draw = [], unet_train.draw_randomness

    def recording_draw(*args, **kwargs):
        draws = draw(*args, **kwargs)
        drawn.append(draws.timesteps)
        return draws

    monkeypatch.setattr(unet_train, "draw_randomness", recording_draw)
    run_cli(setup, tmp_path, "bias", "--max-steps", "3", "objective.timestep_bias_strategy=later",
            "objective.timestep_bias_multiplier=1000", "objective.timestep_bias_portion=0.01")
    t = torch.cat(drawn)
    assert (t >= 990).float().mean() > 0.6, t  # the top 1% holds 10·1000 / (10·1000 + 990) = 91% of the mass (uniform: 1%)


def test_timestep_bias_from_step_keeps_the_earlier_steps_uniform(setup, tmp_path, monkeypatch):
    import ldm.train.unet as unet_train

    drawn, draw = {}, unet_train.draw_randomness

    def recording_draw(seed, step, *args, **kwargs):
        draws = draw(seed, step, *args, **kwargs)
        drawn[step] = (draws.timesteps, kwargs["timestep_weights"] is None)
        return draws

    monkeypatch.setattr(unet_train, "draw_randomness", recording_draw)
    run_cli(setup, tmp_path, "bias-from", "--max-steps", "4", "objective.timestep_bias_strategy=later",
            "objective.timestep_bias_multiplier=1000", "objective.timestep_bias_portion=0.01", "objective.timestep_bias_from_step=2")
    # uniform (so these steps are those of a run without the bias, which can resume into this one), then biased
    assert [drawn[s][1] for s in range(4)] == [True, True, False, False]
    late = torch.cat([drawn[2][0], drawn[3][0]])
    assert (late >= 990).float().mean() > 0.6, late


@pytest.mark.parametrize("grad_accum,optimizer", [(1, "adamw"), (2, "adamw"), (1, "adamw8bit")])
def test_resume_n_plus_n_equals_2n_bit_for_bit(setup, tmp_path, grad_accum, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    args = (f"run.grad_accum={grad_accum}", f"optim.optimizer={optimizer}")
    straight = run_cli(setup, tmp_path, "straight", "--max-steps", "4", *args)
    split = run_cli(setup, tmp_path, "split", "--max-steps", "2", *args)
    split = run_cli(setup, tmp_path, "split", "--max-steps", "4", "--resume", "latest", *args)
    a, b = straight / "checkpoints" / "step-0000004", split / "checkpoints" / "step-0000004"
    for name in ("model-unet", "model-text_encoder", "ema-unet", "optimizer-main"):
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}/{k}"
    assert json.loads((b / "state.json").read_text())["data"] == json.loads((a / "state.json").read_text())["data"]
    assert losses(split)[2:] == losses(straight)[2:]
    moments = {t.dtype for k, t in load_file(a / "optimizer-main.safetensors").items() if k.endswith((".state1", ".exp_avg"))}
    assert moments == ({torch.uint8, torch.float32} if optimizer == "adamw8bit" else {torch.float32})  # small tensors keep 32-bit state


def test_final_folder_is_a_pipeline_that_ldm_txt2img_samples(setup, tmp_path, capsys):
    out = run_cli(setup, tmp_path, "final", "--max-steps", "2", run={"sample_every": 2},
                  objective={"prediction_type": "v_prediction", "zero_terminal_snr": True, "loss_weighting": "min_snr"})
    final = out / "final"
    assert (out / "samples" / "step-0000002.png").is_file()
    scheduler = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["beta_schedule"] == "scaled_linear"
    # the EMA weights, not the raw ones, are in final/
    raw = load_file(out / "checkpoints" / "step-0000002" / "model-unet.safetensors")
    saved = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    name = sorted(raw)[0]
    from ldm import LatentPipeline

    pipe = LatentPipeline.from_pretrained(final, device="cpu")
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # CLIP's BPE, shipped
    assert pipe.vae.config.scaling_factor == 0.5
    params = dict(pipe.unet.named_parameters())
    assert torch.equal(params[name], saved[name]) and not torch.equal(saved[name], raw[name])
    from ldm.cli.txt2img import main as txt2img

    capsys.readouterr()
    assert txt2img(["a red circle", "--model", str(final), "--steps", "2", "--seed", "1", "--outdir", str(tmp_path / "png"), "--quiet"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1 and printed[0].endswith("-1.png")


def test_fine_tuning_a_joint_model_starts_from_its_unet_and_text_encoder(setup, tmp_path):
    """model.pretrained + text_encoder.path with mode joint: both networks start from the given
    pipeline and both keep training (a fine-tuning phase of a jointly trained model)."""
    source = run_cli(setup, tmp_path, "source", "--max-steps", "2", "run.seed=1") / "final"  # other seed, other initial weights
    # the tokenizer given as a bare BPE folder (vocab.json + merges.txt), as the shapes preset gives its own
    tuned = run_cli(setup, tmp_path, "tuned", "--max-steps", "1", f"model.pretrained={source}", f"text_encoder.path={source}",
                    f"text_encoder.tokenizer={CLIP_TOKENIZER}")
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        before = load_file(source / part / f"{name}.safetensors")
        after = load_file(tuned / "final" / part / f"{name}.safetensors")  # EMA, at most one Adam step (lr 1e-3) away
        raw = load_file(tuned / "checkpoints" / "step-0000001" / f"model-{part}.safetensors")
        assert max((after[k] - before[k]).abs().max().item() for k in before) < 1.1e-3, part
        assert max((raw[k] - before[k]).abs().max().item() for k in before) > 1e-5, part  # it trained
    fresh = load_file(run_cli(setup, tmp_path, "fresh", "--max-steps", "1") / "final" / "text_encoder" / "model.safetensors")
    assert max((fresh[k] - before[k]).abs().max().item() for k in before) > 1e-2  # without text_encoder.path: new weights


def test_export_writes_a_checkpoint_as_the_final_folder_would(setup, tmp_path, capsys):
    """--export of the last checkpoint is final/ again (EMA weights, every file); of an earlier one,
    its own EMA; from the run's saved config.yaml alone. Bad targets are one-line errors."""
    out = run_cli(setup, tmp_path, "run", "--max-steps", "3", run={"checkpoint_every": 1, "keep_last": 5})
    saved_config = str(out / "config.yaml")

    def export(*args):
        capsys.readouterr()
        code = main(["--config", saved_config, "--export", *args])
        return code, capsys.readouterr()

    code, printed = export("latest", str(tmp_path / "last"))
    assert code == 0 and printed.out.split() == [str(tmp_path / "last")]
    for part, name in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")]:
        ours, final = load_file(tmp_path / "last" / part / name), load_file(out / "final" / part / name)
        assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in ours), part
    from ldm import LatentPipeline

    images = [LatentPipeline.from_pretrained(folder, device="cpu")(["a red circle", "two blue squares"], num_inference_steps=2, seed=3,
                                                                     output_type="np", progress=False).images
              for folder in (tmp_path / "last", out / "final")]
    assert np.array_equal(*images)  # the same tokenizer, scheduler and weights
    assert json.loads((tmp_path / "last" / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())

    code, _ = export(str(out / "checkpoints" / "step-0000001"), str(tmp_path / "first"))
    first = load_file(tmp_path / "first" / "unet" / "diffusion_pytorch_model.safetensors")
    last = load_file(tmp_path / "last" / "unet" / "diffusion_pytorch_model.safetensors")
    assert code == 0 and any(not torch.equal(first[k], last[k]) for k in first)

    for args, message in [(("latest", str(tmp_path / "last")), "already exists"),
                          ((str(tmp_path / "nowhere"), str(tmp_path / "x")), "checkpoint folder not found"),
                          (("latest", str(tmp_path / "y"), "--output-dir", str(tmp_path / "empty-run")), "no checkpoint in")]:
        with pytest.raises(SystemExit) as e:
            export(*args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and message in err, err


def test_cache_is_used_and_invalidated_by_new_vae_weights(setup, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    config = write_config(tmp_path / "c.yaml")
    cache_dir = tmp_path / "cache"
    out = run_cli(setup, tmp_path, "build", "--build-cache", f"cache.dir={cache_dir}", config=config)
    files = list(cache_dir.glob("latents-*.safetensors"))
    assert len(files) == 1 and not (out / "final").exists()
    uncached = run_cli(setup, tmp_path, "uncached", "--max-steps", "2", f"cache.dir={tmp_path / 'empty'}", config=config)

    calls = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    cached = run_cli(setup, tmp_path, "cached", "--max-steps", "2", f"cache.dir={cache_dir}", config=config)
    assert calls == []  # the VAE encoder never ran
    # the cache stores the posterior, so the run matches the uncached one on the same samples and draws
    assert losses(cached) == pytest.approx(losses(uncached), rel=1e-4, abs=1e-5)

    # new VAE weights: a different key, so the old cache is not used
    other_vae = make_vae_dir(tmp_path / "vae2", seed=1)
    main(["--config", str(config), "--vae", str(other_vae), "--data", str(setup["data"]), "--output-dir", str(tmp_path / "v2"), "--max-steps", "1", f"cache.dir={cache_dir}"])
    assert calls, "the stale cache was used"


def test_frozen_text_encoder_with_cached_embeddings(setup, tmp_path, tiny_pipeline_dir, monkeypatch):
    """A frozen pretrained CLIP (the tiny pipeline's) with its own tokenizer: embeddings cached once."""
    config = write_config(tmp_path / "f.yaml", text_encoder={"mode": "frozen", "path": str(tiny_pipeline_dir)}, run={"max_steps": 2})
    cache_dir = tmp_path / "cache"
    run_cli(setup, tmp_path, "b", "--build-cache", f"cache.dir={cache_dir}", config=config)
    from ldm.train.cache import LatentCache

    cache = LatentCache(next(cache_dir.glob("*.safetensors")))
    assert cache.frozen_text and cache[0]["text_embeds"].shape == (16, 32)  # tiny CLIP: 16 tokens × 32 wide
    from transformers import CLIPTextModel

    monkeypatch.setattr(CLIPTextModel, "forward", lambda *a, **k: pytest.fail("the frozen encoder ran despite the cache"))
    out = run_cli(setup, tmp_path, "t", f"cache.dir={cache_dir}", config=config)
    assert len(losses(out)) == 2
    before = load_file(tiny_pipeline_dir / "text_encoder" / "model.safetensors")
    after = load_file(out / "final" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen means frozen


def test_a_frozen_encoder_saved_in_float16_trains_without_a_cache(setup, tmp_path, tiny_pipeline_dir):
    """Pipelines are often saved in float16 (SD's are); transformers keeps a folder's dtype, so the
    frozen encoder used to hand float16 embeddings to the float32 U-Net and the first step failed."""
    from transformers import CLIPTextModel

    half = tmp_path / "half"
    shutil.copytree(tiny_pipeline_dir / "tokenizer", half / "tokenizer")
    CLIPTextModel.from_pretrained(tiny_pipeline_dir / "text_encoder").half().save_pretrained(half / "text_encoder")
    config = write_config(tmp_path / "h.yaml", text_encoder={"mode": "frozen", "path": str(half)}, run={"max_steps": 2})
    out = run_cli(setup, tmp_path, "h", f"cache.dir={tmp_path / 'no-cache'}", config=config)
    assert len(losses(out)) == 2 and all(math.isfinite(x) for x in losses(out))
    before = load_file(half / "text_encoder" / "model.safetensors")
    after = load_file(out / "final" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)  # the same weights, frozen


def test_config_errors_are_one_line_exit_2(setup, tmp_path, capsys):
    def fails(*args, config=None, **sections):
        config = config or write_config(tmp_path / "e.yaml", **sections)
        with pytest.raises(SystemExit) as e:
            main(["--config", str(config), "--vae", str(setup["vae"]), "--data", str(setup["data"]), "--output-dir", str(tmp_path / "e"), *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and err.startswith("ldm-train-unet: error:")
        return err

    assert "unknown config key objective.p_uncnd" in fails("objective.p_uncnd=0.2")
    assert "needs objective.prediction_type=v_prediction" in fails(objective={"zero_terminal_snr": True})
    assert "p_uncond must be in [0, 1)" in fails("objective.p_uncond=1.5")
    assert "is not one of epsilon, v_prediction" in fails("objective.prediction_type=x0")
    assert "--max-steps must be at least 1" in fails("--max-steps", "0")
    assert "config file not found" in fails(config=tmp_path / "missing.yaml")
    assert "not a multiple of the VAE's latent factor 8" in fails("data.resolution=36")
    bad_vae = tmp_path / "novae"
    make_vae_dir(bad_vae)
    raw = json.loads((bad_vae / "config.json").read_text())
    del raw["scaling_factor"]
    (bad_vae / "config.json").write_text(json.dumps(raw))
    assert "has no scaling_factor" in fails("vae=" + str(bad_vae), "--vae", str(bad_vae))
    assert "--resume" in fails("--resume", str(tmp_path / "nowhere"))


def test_p_uncond_zero_warns(setup):
    config = load_config(UNetTrainConfig, None, ["objective.p_uncond=0", f"vae={setup['vae']}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_config(config)
    assert any("classifier-free guidance will not work" in str(w.message) for w in caught)


@pytest.mark.parametrize("arch,class_name", [("t5", "T5EncoderModel"), ("bert", "BertModel")])
def test_joint_bidirectional_text_encoder_trains_and_its_pipeline_samples_as_diffusers_does(setup, tmp_path, arch, class_name):
    """text_encoder.architecture=t5|bert: the encoder is trained with the U-Net, saved in final/, and
    diffusers' StableDiffusionPipeline reads that folder to the same image (it passes the padding mask)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm import LatentPipeline

    out = run_cli(setup, tmp_path, arch, f"text_encoder.architecture={arch}", "--max-steps", "3")
    final = out / "final"
    assert json.loads((final / "model_index.json").read_text())["text_encoder"] == ["transformers", class_name]
    ours = LatentPipeline.from_pretrained(final, device="cpu")
    ref = StableDiffusionPipeline.from_pretrained(final, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    # with guidance rescale (φ = 0.7) on both sides, as the shipped zero-SNR model samples by default
    a = ours(["a red circle", "two blue squares"], sampler="ddim", num_inference_steps=3, seed=5, height=32, width=32, output_type="np",
             guidance_rescale=0.7, progress=False).images
    b = ref(["a red circle", "two blue squares"], num_inference_steps=3, height=32, width=32, output_type="np", guidance_rescale=0.7,
            generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]).images
    assert np.abs(a - b).max() <= 1e-3 and np.abs(a[0] - a[1]).max() > 0.01


def test_bf16_on_the_cpu_trains_like_float32(setup, tmp_path):
    """run.mixed_precision=bf16 on the CPU (autocast, float32 attention cores): the loss falls as in
    float32 and starts at the same value. In a child process: accelerate's state is per process,
    and the other tests here run in float32."""
    import os
    import subprocess
    import sys

    config = write_config(tmp_path / "c.yaml", objective={"p_uncond": 0.1}, optim={"lr": 2e-3})
    common = ["--config", str(config), "--vae", str(setup["vae"]), "--data", str(setup["data"]), "--max-steps", "40"]
    result = subprocess.run([sys.executable, "-m", "ldm.cli.train_unet", *common, "--output-dir", str(tmp_path / "bf16"),
                             "run.mixed_precision=bf16"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main([*common, "--output-dir", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert len(bf16) == len(fp32) == 40
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05)  # same draws, same weights: only rounding differs
    first, last = sum(bf16[:8]) / 8, sum(bf16[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    assert last == pytest.approx(sum(fp32[-8:]) / 8, rel=0.25)


def test_the_presets_tokenizer_path_works_from_any_directory_and_a_missing_one_is_named(tmp_path, monkeypatch):
    from ldm.train.unet import TextEncoderConfig, load_text_encoder

    monkeypatch.chdir(tmp_path)  # outside the checkout: assets/shapes-tokenizer is not under the working directory
    _, tokenizer = load_text_encoder(TextEncoderConfig(mode="joint", tokenizer="assets/shapes-tokenizer", architecture="bert"))
    assert len(tokenizer) == 608  # the shipped shapes tokenizer, not CLIP's 49,408
    start = time.monotonic()
    with pytest.raises(ValueError, match="text_encoder.tokenizer: no such folder: no/such/tokenizer"):
        load_text_encoder(TextEncoderConfig(mode="joint", tokenizer="no/such/tokenizer"))
    assert time.monotonic() - start < 5  # named at once, not looked up on the Hub with retries
