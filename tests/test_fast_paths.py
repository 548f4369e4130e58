"""Inference speed levers and tiled VAE decoding: each must leave the images as they were (or,
for tiling, exactly as diffusers' own tiling makes them)."""

import copy

import numpy as np
import pytest
import torch

from ldm import LatentPipeline

KW = dict(num_inference_steps=3, seed=11, output_type="np", progress=False)


def test_tiled_decoding_is_diffusers_tiling(tiny_pipe):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 20, 20)  # 160 px: tiles of 64 px (the VAE's sample_size) overlapping by 16
    ours = tiny_pipe.decode_latents(latents, vae_tiling=True)
    whole = tiny_pipe.decode_latents(latents, vae_tiling=False)
    vae = tiny_pipe.vae
    vae.enable_tiling()
    try:
        with torch.no_grad():
            theirs = vae.decode(latents / vae.config.scaling_factor).sample
    finally:
        vae.disable_tiling()
    assert ours.shape == whole.shape == theirs.shape == (2, 3, 160, 160)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - whole).abs().max() > 1e-3  # tiling did happen (its blended seams differ from a whole decode)
    one_tile = latents[:, :, :8, :8]  # no larger than a tile: decoded whole, as diffusers does
    assert torch.equal(tiny_pipe.decode_latents(one_tile, vae_tiling=True), tiny_pipe.decode_latents(one_tile, vae_tiling=False))


def test_auto_tiling_only_above_a_megapixel(tiny_pipe):
    assert not tiny_pipe.uses_vae_tiling(1024, 1024) and tiny_pipe.uses_vae_tiling(2048, 2048) and tiny_pipe.uses_vae_tiling(1088, 1024)
    assert tiny_pipe.uses_vae_tiling(64, 64, True) and not tiny_pipe.uses_vae_tiling(4096, 4096, False)
    a = tiny_pipe("a red circle", vae_tiling="auto", **KW).images
    b = tiny_pipe("a red circle", vae_tiling=False, **KW).images
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="vae_tiling must be"):
        tiny_pipe("a red circle", vae_tiling="yes", **KW)


def test_channels_last_and_fused_qkv_keep_the_images(tiny_pipeline_dir, tiny_pipe):
    fast = LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu").optimize(channels_last=True, fuse_qkv=True)
    a = tiny_pipe(["a red circle", "a blue square"], **KW).images
    b = fast(["a red circle", "a blue square"], **KW).images
    assert np.abs(a - b).max() < 1e-4


def test_compiled_unet_keeps_the_images(tiny_pipe):
    # A one-level U-Net (cross-attention, no mid block) beside the tiny pipeline's other parts:
    # inductor compiles it in ~30 s on one cold CPU thread, the two-level one in ~45 s.
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32,), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval()
    parts = dict(vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer,
                 scheduler=tiny_pipe.scheduler)
    plain = LatentPipeline(unet=unet, **parts)
    fast = LatentPipeline(unet=copy.deepcopy(unet), **parts).optimize(compile=True)
    a = plain("a red circle", **KW).images
    b = fast("a red circle", **KW).images
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(a - tiny_pipe("a red circle", **KW).images).max() > 1e-2  # its own U-Net drew them
