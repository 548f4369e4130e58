"""Text encoders: CLIP as diffusers reads it, and T5 / BERT with their attention mask."""

import json

import numpy as np
import pytest
import torch

from helpers import make_tiny_t5_pipeline, tiny_components
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


@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_joint_bidirectional_encoder_sees_the_relation_and_diffusers_reads_it_the_same(arch):
    """The joint encoder's `architecture`: CLIP's first tokens cannot see later words (causal mask),
    T5's and BERT's can; diffusers' StableDiffusionPipeline.encode_prompt computes the same
    embeddings (it passes the padding mask because the config says use_attention_mask)."""
    from diffusers import StableDiffusionPipeline

    from ldm.text import PromptEncoder
    from ldm.train.unet import TextEncoderConfig, load_text_encoder

    prompts = ["a red circle to the left of a blue square", "a red circle to the right of a blue square"]
    first = {}
    for name in ("clip", arch):
        torch.manual_seed(0)
        encoder, tokenizer = load_text_encoder(TextEncoderConfig(mode="joint", architecture=name, max_length=16, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
        encoder.eval()
        e = PromptEncoder(encoder, tokenizer).encode(prompts)
        first[name] = (e[0, :4] - e[1, :4]).norm(dim=-1).max().item()  # <start> a red circle: before the relation
    assert first["clip"] < 1e-5 and first[arch] > 1e-3, first  # exactly 0 for CLIP; about 1.5 (T5) and 0.006 (BERT) at initialisation
    assert type(encoder).__name__ == {"t5": "T5EncoderModel", "bert": "BertModel"}[arch]
    assert getattr(encoder.config, "dropout_rate", getattr(encoder.config, "hidden_dropout_prob", None)) == 0.0

    unet, vae, _, _, scheduler = tiny_components()  # cross-attention width 32, as the encoder's
    ref = StableDiffusionPipeline(vae, encoder, tokenizer, unet, scheduler, None, None, requires_safety_checker=False)
    theirs, _ = ref.encode_prompt(prompts + [""], "cpu", 1, False)
    ours = PromptEncoder(encoder, tokenizer).encode(prompts + [""])
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=0)  # unmasked differs by ~0.1


def test_joint_bert_encoder_knows_token_order_and_trains_no_pooler():
    """BERT's absolute positions: swapping subject and object changes the subject's token
    embeddings (a position-free bag of words would not). Its pooler is frozen (never used)."""
    from ldm.text import PromptEncoder
    from ldm.train.unet import TextEncoderConfig, load_text_encoder

    torch.manual_seed(0)
    encoder, tokenizer = load_text_encoder(TextEncoderConfig(mode="joint", architecture="bert", max_length=16, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    encoder.eval()
    e = PromptEncoder(encoder, tokenizer).encode(["a red circle above a blue square", "a blue square above a red circle"])
    # "red" is token 2 of the first caption and token 7 of the second (<start> a blue square above a red)
    assert (e[0, 2] - e[1, 7]).norm() > 0.1 * e[0, 2].norm()
    assert not any(p.requires_grad for p in encoder.pooler.parameters())
    assert all(p.requires_grad for n, p in encoder.named_parameters() if not n.startswith("pooler."))
