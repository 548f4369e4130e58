"""diffusers' keywords on LatentPipeline.__call__, each against diffusers' StableDiffusionPipeline on
the same tiny weights: prompt_embeds, clip_skip, callback_on_step_end, custom timesteps / sigmas,
cross_attention_kwargs; and the scheduler fix-ups diffusers applies to older SD folders on load."""

import json
import shutil

import numpy as np
from helpers import euler_pipelines
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from ldm import LatentPipeline
from ldm.text import LdmWarning

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [7, 8]
KW = dict(num_inference_steps=4, guidance_scale=6.0, output_type="np")


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_dir):
    return euler_pipelines(tiny_pipeline_dir)


def generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def same(ours, theirs):
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-3


def test_prompt_embeds_are_the_prompts_own(pipes):
    ours, ref = pipes
    embeds, negative = ours.encode_prompts(PROMPTS), ours.encode_prompts(["", ""])
    by_text = ours(PROMPTS, seed=SEEDS, progress=False, **KW)
    by_embeds = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, seed=SEEDS, progress=False, **KW)
    assert np.array_equal(by_text.images, by_embeds.images)
    theirs = ref(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generators(), **KW).images
    same(by_embeds.images, theirs)
    assert by_embeds.parameters[0].startswith("(prompt_embeds)\n")


def test_clip_skip_is_diffusers_definition_on_both_halves(pipes):
    # diffusers takes hidden state −(k + 1) through the final layer norm, but for the prompt only (its
    # negative path ignores clip_skip: fixed for SDXL in diffusers PR 13973); we skip on both halves,
    # as AUTOMATIC1111 does, so guidance compares like with like. Its definition, by hand, is the reference.
    ours, ref = pipes
    encoder = ours.text_encoder

    def skipped_embeds(texts):
        ids = ours.tokenizer(texts, padding="max_length", max_length=ours.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])

    skipped = ours(PROMPTS, seed=SEEDS, clip_skip=1, progress=False, **KW)
    theirs = ref(prompt_embeds=skipped_embeds(PROMPTS), negative_prompt_embeds=skipped_embeds(["", ""]),
                 generator=generators(), **KW).images
    same(skipped.images, theirs)
    assert np.abs(skipped.images - ours(PROMPTS, seed=SEEDS, progress=False, **KW).images).max() > 1e-3
    assert "Clip skip: 2" in skipped.parameters[0]  # A1111 counts the last layer as 1


def test_callback_on_step_end_sees_and_changes_the_latents(pipes):
    ours, ref = pipes
    seen = []

    def damp(pipe, i, t, tensors):
        seen.append((i, float(t), tuple(tensors["latents"].shape), tensors["prompt_embeds"].shape[0]))
        return {"latents": tensors["latents"] * 0.9} if i == 1 else tensors

    inputs = ["latents", "prompt_embeds"]
    changed = ours(PROMPTS, seed=SEEDS, callback_on_step_end=damp, callback_on_step_end_tensor_inputs=inputs,
                   progress=False, **KW).images
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][2] == (2, 4, 8, 8)
    theirs = ref(PROMPTS, generator=generators(), callback_on_step_end=lambda p, i, t, k: (
        {"latents": k["latents"] * 0.9} if i == 1 else k), **KW).images
    same(changed, theirs)


@pytest.mark.parametrize("custom", [dict(timesteps=[999, 700, 400, 100]), dict(sigmas=[14.6, 4.0, 1.0, 0.2])])
def test_custom_timesteps_and_sigmas_are_diffusers(pipes, custom):
    ours, ref = pipes
    kw = {**KW, "num_inference_steps": None}
    out = ours(PROMPTS, seed=SEEDS, progress=False, **kw, **custom)
    same(out.images, ref(PROMPTS, generator=generators(), **kw, **custom).images)
    assert "Steps: 4," in out.parameters[0]


class Gain(AttnProcessor2_0):
    """An attention processor with a keyword of its own, to see cross_attention_kwargs arrive."""

    def __call__(self, attn, hidden_states, *args, gain: float = 1.0, **kwargs):
        return super().__call__(attn, hidden_states, *args, **kwargs) * gain


def test_cross_attention_kwargs_reach_the_attention_processors(pipes):
    ours, ref = pipes
    ours.unet.set_attn_processor(Gain())
    try:
        half = ours(PROMPTS, seed=SEEDS, cross_attention_kwargs={"gain": 0.5}, progress=False, **KW).images
        plain = ours(PROMPTS, seed=SEEDS, progress=False, **KW).images
    finally:
        ours.set_attention("sdpa")
    assert np.abs(half - plain).max() > 1e-3
    ref.unet.set_attn_processor(Gain())
    same(half, ref(PROMPTS, generator=generators(), cross_attention_kwargs={"gain": 0.5}, **KW).images)


def test_an_outdated_scheduler_config_is_fixed_as_diffusers_fixes_it(tiny_pipeline_dir, tmp_path):
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "old")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(steps_offset=0, clip_sample=True, timestep_spacing="leading")  # as SD 1.x first shipped it
    config_file.write_text(json.dumps(config))
    with pytest.warns(LdmWarning, match=r"outdated \(steps_offset 0, clip_sample True\); using steps_offset 1, "
                                        r"clip_sample False, as diffusers does"):
        ours = LatentPipeline.from_pretrained(folder, device="cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' own deprecation notice about the same fix-up
        ref = StableDiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    assert (ours.scheduler.config.steps_offset, ours.scheduler.config.clip_sample) == (1, False)
    same(ours(PROMPTS, seed=SEEDS, progress=False, **KW).images, ref(PROMPTS, generator=generators(), **KW).images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 31)),
         r"prompt_embeds must be a tensor \(batch, tokens, 32\)"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 32), negative_prompt_embeds=torch.zeros(2, 16, 32)),
         "must have the shape of prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 16, 32)), "pass prompt or prompt_embeds, not both"),
        (dict(negative_prompt_embeds=torch.zeros(1, 16, 32)), "negative_prompt_embeds needs prompt_embeds"),
        (dict(clip_skip=2), r"clip_skip must be a whole number of layers in \[0, 1\], got 2"),
        (dict(callback_on_step_end=lambda *a: None, callback_on_step_end_tensor_inputs=["noise"]),
         "'noise' not available"),
        (dict(callback_on_step_end=lambda *a: 3), "must return a dict"),
        (dict(timesteps=[999, 500], sigmas=[1.0, 0.5]), "pass timesteps or sigmas, not both"),
        (dict(timesteps=[999, 500], sampler="ddim"), "DDIMScheduler.* does not take custom timesteps"),
        (dict(cross_attention_kwargs=[("scale", 1)]), "cross_attention_kwargs must be a dict"),
    ],
)
def test_bad_keywords_are_value_errors_naming_them(pipes, kwargs, message):
    ours, _ = pipes
    kwargs = {"prompt": "a red circle", "num_inference_steps": 2, **kwargs}
    if kwargs.get("prompt") is None:
        kwargs.pop("prompt")
    with pytest.raises(ValueError, match=message):
        ours(progress=False, **kwargs)


def test_the_cli_takes_a1111s_clip_skip(tiny_pipeline_dir, tmp_path, capsys):
    from PIL import Image

    from ldm.cli.txt2img import main

    base = ["a red circle", "--model", str(tiny_pipeline_dir), "--steps", "2", "--seed", "1", "--quiet",
            "--sampler", "euler", "--outdir", str(tmp_path / "o")]
    assert main([*base, "--clip-skip", "2"]) == 0
    written = Image.open(capsys.readouterr().out.split()[0])
    assert "Clip skip: 2" in written.info["parameters"]
    ours = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    expected = ours("a red circle", seed=1, num_inference_steps=2, sampler="euler", clip_skip=1, progress=False)
    assert np.abs(np.asarray(written, int) - np.asarray(expected.images[0], int)).max() <= 1
    with pytest.raises(SystemExit) as e:
        main([*base, "--clip-skip", "3"])
    assert e.value.code == 2 and "--clip-skip must be in [1, 2] for this text encoder, got 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the default model's encoder is BERT
        main(["a red circle", "--clip-skip", "2", "--steps", "1", "--outdir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--clip-skip applies to CLIP text encoders; this model's is bert" in err
