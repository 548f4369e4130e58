"""Seeds, batching, saving and loading, and the Python API's errors."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm import LatentPipeline
from ldm.text import LdmWarning

PROMPTS = ["a red circle", "a blue square", "a red circle to the left of a blue square"]


@pytest.mark.parametrize("sampler", ["dpm++2m", "euler_a"])  # deterministic, and one drawing noise every step
def test_image_i_of_a_batch_equals_a_single_run_with_its_seed(tiny_pipe, sampler):
    batch = tiny_pipe(PROMPTS, seed=100, sampler=sampler, num_inference_steps=6, output_type="np", progress=False)
    assert batch.seeds == [100, 101, 102]
    for i, prompt in enumerate(PROMPTS):
        single = tiny_pipe(prompt, seed=100 + i, sampler=sampler, num_inference_steps=6, output_type="np", progress=False)
        assert single.seeds == [100 + i]
        assert np.abs(batch.images[i] - single.images[0]).max() <= 1e-4
    chunked = tiny_pipe(PROMPTS, seed=100, sampler=sampler, num_inference_steps=6, output_type="np", progress=False, batch_size=2)
    assert np.abs(chunked.images - batch.images).max() <= 1e-4


def test_num_images_per_prompt_orders_prompt_by_prompt(tiny_pipe):
    out = tiny_pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=5, num_inference_steps=3, progress=False)
    assert out.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert out.seeds == [5, 6, 7, 8]
    assert len(out.images) == 4 and out.images[0].size == (64, 64)
    assert "Seed: 7" in out.parameters[2] and out.parameters[2].startswith("a blue square\n")


def test_generator_list_equals_seeds(tiny_pipe):
    by_seed = tiny_pipe(PROMPTS[:2], seed=[3, 9], num_inference_steps=4, output_type="np", progress=False)
    by_gen = tiny_pipe(PROMPTS[:2], generator=[torch.Generator().manual_seed(s) for s in (3, 9)], num_inference_steps=4, output_type="np", progress=False)
    assert np.array_equal(by_seed.images, by_gen.images)


def test_different_seeds_give_different_images_and_no_seed_reports_one(tiny_pipe):
    out = tiny_pipe(["a red circle"] * 2, num_inference_steps=3, output_type="np", progress=False)
    assert all(isinstance(s, int) for s in out.seeds) and out.seeds[1] == out.seeds[0] + 1
    assert np.abs(out.images[0] - out.images[1]).max() > 0.05


def test_guidance_scale_one_and_zero_are_the_conditional_and_unconditional_models(tiny_pipe):
    kw = dict(seed=1, num_inference_steps=4, output_type="np", progress=False)
    cond = tiny_pipe("a red circle", guidance_scale=1.0, **kw).images
    uncond = tiny_pipe("", guidance_scale=1.0, **kw).images  # the empty prompt, conditionally
    assert np.abs(tiny_pipe("a red circle", guidance_scale=0.0, **kw).images - uncond).max() <= 1e-5
    assert np.abs(cond - uncond).max() > 1e-3
    neg = tiny_pipe("a red circle", guidance_scale=0.0, negative_prompt="a blue square", **kw).images
    assert np.abs(neg - tiny_pipe("a blue square", guidance_scale=1.0, **kw).images).max() <= 1e-5


def test_dynamic_threshold_with_a_bound_above_every_value_changes_nothing(tiny_pipe):
    kw = dict(seed=2, num_inference_steps=4, output_type="np", progress=False)
    plain = tiny_pipe("a red circle", **kw).images
    loose = tiny_pipe("a red circle", dynamic_threshold=0.99, threshold_bound=1e6, **kw).images
    tight = tiny_pipe("a red circle", dynamic_threshold=0.9, threshold_bound=0.5, **kw).images
    assert np.abs(loose - plain).max() <= 1e-5
    assert np.abs(tight - plain).max() > 1e-3


def test_save_load_round_trip_and_diffusers_loads_our_folder(tiny_pipe, tmp_path):
    kw = dict(seed=11, num_inference_steps=5, output_type="np", progress=False)
    before = tiny_pipe(PROMPTS[:2], **kw).images
    saved = tiny_pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert not [p for p in saved.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    again = LatentPipeline.from_pretrained(saved, device="cpu")
    assert np.array_equal(again(PROMPTS[:2], **kw).images, before)

    ref = StableDiffusionPipeline.from_pretrained(saved)
    ref.set_progress_bar_config(disable=True)  # both run the scheduler the folder names (PNDM here)
    theirs = ref(PROMPTS[:2], num_inference_steps=5, generator=[torch.Generator().manual_seed(s) for s in (11, 12)], output_type="np").images
    assert np.abs(theirs - before).max() <= 1e-3

    # Saving over an existing folder replaces it whole.
    (saved / "stale.txt").write_text("old")
    tiny_pipe.save_pretrained(saved)
    assert not (saved / "stale.txt").exists() and (saved / "model_index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_long_prompt_warns_with_the_number_of_dropped_tokens(tiny_pipe):
    long_prompt = " ".join(["red"] * 20)  # 20 words + BOS + EOS = 22 tokens, context 16
    with pytest.warns(LdmWarning, match=r"the last 6 tokens were dropped") as record:
        tiny_pipe(long_prompt, num_inference_steps=1, progress=False)
    assert record[0].filename == __file__  # attributed to the caller's line, not to ldm's internals


def test_output_save_writes_parameters_and_never_overwrites(tiny_pipe, tmp_path):
    from PIL import Image

    out = tiny_pipe(["a red circle"], negative_prompt="blue", seed=4, num_inference_steps=2, guidance_scale=3.0, progress=False)
    first = out.save(tmp_path)
    second = out.save(tmp_path)
    assert [p.name for p in first + second] == ["00000-4.png", "00001-4.png"]
    text = Image.open(first[0]).info["parameters"]
    assert text.splitlines()[0] == "a red circle" and text.splitlines()[1] == "Negative prompt: blue"
    for part in ("Steps: 2", "Sampler: plms", "CFG scale: 3,", "Seed: 4", "Size: 64x64", "Model: "):
        assert part in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=100), r"height 100 is not a multiple of 8 .* use 96 or 104"),
        (dict(width=60), r"width 60 is not a multiple of 8 .* use 56 or 64"),
        (dict(num_inference_steps=0), r"num_inference_steps must be an integer ≥ 1"),
        (dict(num_inference_steps=5000), r"exceeds the model's 1000 training timesteps"),
        (dict(guidance_scale=-1.0), r"guidance scale \(cfg\) must be a number ≥ 0"),
        (dict(guidance_scale=float("nan")), r"guidance scale"),
        (dict(sampler="k_lmz_x"), r"unknown sampler 'k_lmz_x'; did you mean lms\? choose one of: ddpm, ddim"),
        (dict(eta=0.5), r"eta applies to the ddim sampler only"),
        (dict(guidance_rescale=2.0), r"guidance_rescale must be in \[0, 1\]"),
        (dict(seed=-1), r"seed must be an integer"),
        (dict(seed=[1, 2]), r"got 2 seeds for 1 images"),
        (dict(seed=1, generator=torch.Generator()), r"pass seed or generator, not both"),
        (dict(negative_prompt=["a", "b"]), r"got 2 negative prompts for 1 prompts"),
        (dict(output_type="jpeg"), r"output_type must be one of"),
        (dict(dynamic_threshold=1.5), r"dynamic_threshold is a percentile"),
        (dict(num_images_per_prompt=0), r"num_images_per_prompt must be an integer ≥ 1"),
    ],
)
def test_bad_call_arguments_raise_value_error(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe("a red circle", progress=False, **kwargs)


def test_empty_prompt_list_is_an_error(tiny_pipe):
    with pytest.raises(ValueError, match="the prompt list is empty"):
        tiny_pipe([])


def test_bad_folders(tiny_pipeline_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        LatentPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing model_index.json"):
        LatentPipeline.from_pretrained(tmp_path / "empty")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"unet: missing diffusion_pytorch_model.safetensors"):
        LatentPipeline.from_pretrained(broken)
    (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(ValueError, match=r"pickle-format weights are refused"):
        LatentPipeline.from_pretrained(broken)

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_pipeline_dir, foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    index["unet"] = ["my_module", "EvilUNet"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"unet is my_module.EvilUNet, which ldm does not load"):
        LatentPipeline.from_pretrained(foreign)
    (foreign / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index.json: not a readable JSON file"):
        LatentPipeline.from_pretrained(foreign)


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    import ldm.pipeline

    monkeypatch.setattr(ldm.pipeline, "DEFAULT_MODEL", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="the default model is missing from this installation"):
        LatentPipeline.from_pretrained()


def test_dtype_and_device_errors(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="unknown dtype"):
        LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu", dtype="fp8")
    with pytest.raises(ValueError, match="unknown attention backend"):
        LatentPipeline.from_pretrained(tiny_pipeline_dir, attention="flash")


def test_hub_id_loads_from_the_local_cache_and_fails_cleanly_when_absent(tiny_pipeline_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from ldm.models import resolve_model

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-sd"
    shutil.copytree(tiny_pipeline_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("someorg/tiny-sd") == repo / "snapshots" / ("0" * 40)
    pipe = LatentPipeline.from_pretrained("someorg/tiny-sd", device="cpu")
    assert pipe.name_or_path == "someorg/tiny-sd"
    with pytest.raises(FileNotFoundError, match="not a local folder, and no hub copy is reachable or cached"):
        LatentPipeline.from_pretrained("someorg/absent")


def test_a_vae_that_overflows_in_half_precision_is_decoded_in_fp32_with_a_warning(tiny_pipeline_dir):
    """SD's VAE overflows fp16 (values > 65504 inside the decoder): the pipeline must never return
    NaN/black images silently. Here a weight is scaled so that fp16 really overflows."""
    pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(100)  # still representable in fp16 (|w| < 65504) ...
    z = 1000 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # ... but activations ~1e6 are not
    reference = pipe.decode_latents(z)
    assert torch.isfinite(reference).all()
    pipe.vae.to(torch.float16)
    with pytest.warns(LdmWarning, match="the VAE overflowed in torch.float16; decoding this batch in fp32"):
        image = pipe.decode_latents(z)
    assert torch.isfinite(image).all() and torch.allclose(image, reference, atol=2e-3)  # weights went through fp16
    assert pipe.vae.dtype == torch.float16  # the fallback was for this batch only


def test_a_zero_terminal_snr_model_rescales_guidance_by_default(tiny_pipeline_dir):
    """guidance_rescale=None (the default) is φ = 0.7 on a zero-terminal-SNR model, as Lin et al.
    (2023, §3.4) prescribe, and plain guidance (φ = 0) on any other; an explicit φ always wins."""
    from diffusers import DDPMScheduler

    from ldm import LatentPipeline
    from ldm.guidance import default_guidance_rescale

    pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    kw = dict(seed=3, num_inference_steps=4, guidance_scale=9.0, output_type="np", progress=False)
    assert default_guidance_rescale(pipe.scheduler.config) == 0.0
    assert np.array_equal(pipe("a red circle", **kw).images, pipe("a red circle", guidance_rescale=0.0, **kw).images)
    zsnr = dict(pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    pipe.scheduler = DDPMScheduler.from_config(zsnr)
    assert default_guidance_rescale(pipe.scheduler.config) == 0.7
    default = pipe("a red circle", **kw)
    assert np.array_equal(default.images, pipe("a red circle", guidance_rescale=0.7, **kw).images)
    assert np.abs(default.images - pipe("a red circle", guidance_rescale=0.0, **kw).images).max() > 0.01
    assert "Guidance rescale: 0.7" in default.parameters[0]  # the infotext says what was used


def test_karras_spacing_is_refused_on_a_zero_terminal_snr_schedule(tiny_pipe):
    """Zero terminal SNR makes σ_max infinite (4096 in diffusers): Karras spacing then repeats
    timesteps and DPM-Solver++ indexes past its σ table mid-sampling. We refuse before any work,
    naming the sampler that does work; on an ordinary schedule the Karras sampler still runs."""
    from diffusers import DPMSolverMultistepScheduler

    from ldm.pipeline import check_generation_args
    from ldm.sampling import make_scheduler

    zsnr = dict(tiny_pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    raw = DPMSolverMultistepScheduler.from_config(zsnr, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    raw.set_timesteps(25)
    assert len(set(raw.timesteps.tolist())) < 25  # the reason: repeated timesteps (lift the refusal if diffusers changes this)
    with pytest.raises(ValueError, match=r"dpm\+\+2m_karras .*zero terminal SNR.*use dpm\+\+2m,"):
        make_scheduler("dpm++2m_karras", zsnr)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        check_generation_args(latent_factor=8, height=64, width=64, num_inference_steps=25, guidance_scale=7.5,
                              sampler="dpm++2m_karras", scheduler_config=zsnr)
    plain = make_scheduler("dpm++2m", zsnr)
    plain.set_timesteps(25)
    assert (plain.timesteps[1:] < plain.timesteps[:-1]).all()  # the suggested sampler steps down strictly
    out = tiny_pipe("a red circle", sampler="dpm++2m_karras", seed=0, num_inference_steps=4, output_type="np", progress=False)
    assert np.isfinite(out.images).all()


class StaticOutputUNet(torch.nn.Module):
    """The U-Net as CUDA graphs run it (optimize(compile=True) on a GPU): every call writes its
    output into one static buffer, so a tensor kept from an earlier step changes under its holder."""

    def __init__(self, unet):
        super().__init__()
        self.inner, self.buffer = unet, None

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)[0]
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = torch.empty_like(out)
        self.buffer.copy_(out)
        return (self.buffer,)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@pytest.mark.parametrize("cfg", [1.0, 0.0])
def test_a_unet_with_static_outputs_samples_the_same_images_with_plms(tiny_pipeline_dir, cfg):
    # plms keeps its last four model outputs; unguided (w = 1) and unconditional (w = 0) steps hand
    # the U-Net's output to it directly, so it must be a copy, or the history is overwritten
    pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    kw = dict(guidance_scale=cfg, sampler="plms", num_inference_steps=6, seed=3, output_type="np", progress=False)
    reference = pipe("a red circle", **kw).images
    pipe.unet = StaticOutputUNet(pipe.unet)
    assert np.abs(pipe("a red circle", **kw).images - reference).max() == 0


def test_a_size_the_model_was_not_trained_at_warns_once(tiny_pipeline_dir):
    pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")  # its own: warnings are once per pipeline
    with pytest.warns(LdmWarning, match=r"the model was trained at 64x64 pixels; at 128x96 it may repeat") as record:
        pipe("a red circle", height=96, width=128, num_inference_steps=1, progress=False)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", LdmWarning)
        pipe("a red circle", height=96, width=128, num_inference_steps=1, progress=False)  # said once
        pipe("a red circle", num_inference_steps=1, progress=False)  # the trained size: nothing to say


def test_a_sampler_known_to_fail_on_zero_snr_models_warns(tiny_pipeline_dir, tmp_path):
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "zsnr")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = LatentPipeline.from_pretrained(folder, device="cpu")
    with pytest.warns(LdmWarning, match=r"sampler plms is known to fail on zero-terminal-SNR models .* 11.7%"):
        pipe("a red circle", sampler="PLMS", guidance_scale=7.5, num_inference_steps=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LdmWarning)
        pipe("a red circle", sampler="unipc", guidance_scale=3, num_inference_steps=2, progress=False)  # CFG 3: fine
        pipe("a red circle", sampler="euler", guidance_scale=7.5, num_inference_steps=2, progress=False)


def test_with_no_sampler_the_folders_scheduler_runs_as_in_diffusers(tiny_pipeline_dir):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipe = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    ref = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="np")
    for scheduler, name in ((DDIMScheduler, "ddim"), (EulerDiscreteScheduler, "EulerDiscreteScheduler")):
        # diffusers' habit: swap the scheduler in; one with Karras σ has no name here and runs as configured
        extra = {"use_karras_sigmas": True} if name != "ddim" else {}
        pipe.scheduler = ref.scheduler = scheduler.from_config(pipe.scheduler.config, **extra)
        ours = pipe(PROMPTS[:2], seed=[3, 4], progress=False, **kw)
        theirs = ref(PROMPTS[:2], generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw).images
        assert np.abs(ours.images - theirs).max() <= 1e-3
        assert f"Sampler: {name}," in ours.parameters[0]


def test_models_trained_here_name_euler_in_their_folder():
    from ldm.sampling import DEFAULT_SAMPLER, sampler_of, sampling_scheduler
    from ldm.train.unet import ObjectiveConfig, make_training_scheduler

    training = make_training_scheduler(ObjectiveConfig(zero_terminal_snr=True, prediction_type="v_prediction"))
    folder = sampling_scheduler(training)
    assert sampler_of(folder) == DEFAULT_SAMPLER == "euler"
    assert torch.equal(folder.alphas_cumprod[:-1], training.alphas_cumprod[:-1])  # Euler floors ᾱ_T = 0 at 2^-24
    assert folder.config.rescale_betas_zero_snr
    assert folder.config.timestep_spacing == "trailing" and folder.config.prediction_type == "v_prediction"
