"""Text encoders: CLIP as diffusers reads it, and T5 with its attention mask."""

import json

import numpy as np
import torch

from helpers import make_tiny_t5_pipeline
from ldm import LatentPipeline


def test_clip_embeddings_equal_diffusers_encode_prompt(tiny_pipe):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline(tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer, tiny_pipe.unet, tiny_pipe.scheduler, None, None, requires_safety_checker=False)
    prompts = ["a red circle", "blue", ""]
    theirs, _ = ref.encode_prompt(prompts, "cpu", 1, False)
    ours = tiny_pipe.encode_prompts(prompts)
    assert ours.shape == (3, 16, 32)
    assert torch.equal(ours, theirs)


def test_t5_pipeline_uses_the_attention_mask_and_round_trips(tmp_path):
    path = make_tiny_t5_pipeline(tmp_path / "t5")
    assert json.loads((path / "model_index.json").read_text())["text_encoder"] == ["transformers", "T5EncoderModel"]
    pipe = LatentPipeline.from_pretrained(path, device="cpu")
    tokens = pipe.tokenizer(["a red circle"], padding="max_length", max_length=12, return_tensors="pt")
    expected = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    unmasked = pipe.text_encoder(tokens.input_ids).last_hidden_state
    ours = pipe.encode_prompts(["a red circle"])
    assert torch.allclose(ours, expected, atol=1e-6) and not torch.allclose(ours, unmasked, atol=1e-4)
    a = pipe(["a red circle", "a blue square"], seed=3, num_inference_steps=4, output_type="np", progress=False).images
    again = LatentPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "again"), device="cpu")
    b = again(["a red circle", "a blue square"], seed=3, num_inference_steps=4, output_type="np", progress=False).images
    assert np.array_equal(a, b) and np.abs(a[0] - a[1]).max() > 0.01
