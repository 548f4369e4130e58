"""Tiny random Stable-Diffusion-style components for tests: built in code, no network.

The shapes follow diffusers' own pipeline tests (two-level U-Net and VAE, 32-wide), small enough
that a 64 px generation takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import torch

from ldm.text import bytes_to_unicode


TINY_MERGES = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "b l", "bl u", "blu e</w>", "a</w>"]


def tiny_clip_tokenizer(workdir: Path, model_max_length: int = 16):
    """A real CLIP BPE tokenizer over a tiny vocabulary: every byte, a few merges, the specials."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [m for m in TINY_MERGES if " " in m]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(workdir / "vocab.json"), merges=str(workdir / "merges.txt"), model_max_length=model_max_length)


def tiny_components(seed: int = 0, prediction_type: str = "epsilon", workdir: Path | None = None,
                    model_max_length: int = 16, unet_in_channels: int = 4):
    """(unet, vae, text_encoder, tokenizer, scheduler) with random weights drawn from `seed`;
    `unet_in_channels` 9 makes the U-Net an inpainting one, as SD's inpainting checkpoints."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=unet_in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=0.5,  # deliberately not SD's 0.18215: the pipeline must read it from the config
    )
    text_config = CLIPTextConfig(
        bos_token_id=514,
        eos_token_id=515,
        pad_token_id=515,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=528,
        max_position_embeddings=model_max_length,
    )
    text_encoder = CLIPTextModel(text_config)
    tokenizer = tiny_clip_tokenizer(Path(workdir or tempfile.mkdtemp()) / "tokenizer-src", model_max_length)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    for m in (unet, vae, text_encoder):
        m.eval()
    return unet, vae, text_encoder, tokenizer, scheduler


def make_tiny_pipeline(path: Path, seed: int = 0, prediction_type: str = "epsilon", unet_in_channels: int = 4) -> Path:
    """Write a tiny random SD-style pipeline folder with diffusers itself (the reference layout)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    unet, vae, text_encoder, tokenizer, scheduler = tiny_components(seed, prediction_type, workdir=path.parent,
                                                                    unet_in_channels=unet_in_channels)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_t5_pipeline(path: Path, seed: int = 0) -> Path:
    """A tiny pipeline whose text encoder is a T5 encoder (with a tiny Unigram vocabulary)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from ldm import LatentPipeline

    unet, vae, _, _, scheduler = tiny_components(seed, workdir=Path(path).parent)
    words = ["▁a", "▁red", "▁blue", "▁circle", "▁square", "▁", "a", "b", "c", "d", "e", "l", "q", "r", "s", "u"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -float(i)) for i, w in enumerate(words)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=12)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    return LatentPipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(path)


def to_original_format(pipe) -> dict[str, torch.Tensor]:
    """A pipeline's weights under the original CompVis/LDM names (what SD's single-file checkpoints use).

    Written from the LDM module structure, for tests of single-file loading: each diffusers down
    block i with L resnets is LDM's input_blocks 1 + i(L+1) … ; up blocks have L + 1 resnets; the
    VAE's decoder blocks are numbered in reverse; its mid attention uses 1×1 convolutions.
    """
    unet_cfg, vae_cfg = pipe.unet.config, pipe.vae.config
    L = unet_cfg.layers_per_block
    out: dict[str, torch.Tensor] = {}

    def rename_resnet(k: str) -> str:
        for new, old in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                         ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")):
            k = k.replace(old, new)
        return k

    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in pipe.unet.state_dict().items():
        head = k.partition(".")[0]
        parts = k.split(".")
        if ".".join(parts[:-1]) in fixed:
            name = fixed[".".join(parts[:-1])] + "." + parts[-1]
        elif head == "down_blocks":
            i, kind, j = int(parts[1]), parts[2], int(parts[3])
            tail = ".".join(parts[4:])
            if kind == "resnets":
                name = f"input_blocks.{1 + i * (L + 1) + j}.0.{rename_resnet(tail)}"
            elif kind == "attentions":
                name = f"input_blocks.{1 + i * (L + 1) + j}.1.{tail}"
            else:  # downsamplers.0.conv.*
                name = f"input_blocks.{(i + 1) * (L + 1)}.0.op.{'.'.join(parts[5:])}"
        elif head == "mid_block":
            kind, j, tail = parts[1], int(parts[2]), ".".join(parts[3:])
            name = f"middle_block.{2 * j}.{rename_resnet(tail)}" if kind == "resnets" else f"middle_block.1.{tail}"
        elif head == "up_blocks":
            i, kind, j = int(parts[1]), parts[2], int(parts[3])
            tail = ".".join(parts[4:])
            if kind == "resnets":
                name = f"output_blocks.{i * (L + 1) + j}.0.{rename_resnet(tail)}"
            elif kind == "attentions":
                name = f"output_blocks.{i * (L + 1) + j}.1.{tail}"
            else:  # upsamplers.0.conv.*: after the block's last resnet (and its attention, if any)
                has_attention = "CrossAttn" in unet_cfg.up_block_types[i]
                name = f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}.{'.'.join(parts[4:])}"
        else:
            raise KeyError(k)
        out["model.diffusion_model." + name] = v

    n = len(vae_cfg.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in pipe.vae.state_dict().items():
        parts = k.split(".")
        coder = parts[0]
        if coder in ("quant_conv", "post_quant_conv"):
            name = k
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            idx = i if parts[1] == "down_blocks" else n - 1 - i
            side = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                name = f"{coder}.{side}.{idx}.block.{parts[4]}.{'.'.join(parts[5:])}".replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers/upsamplers.0.conv.*
                name = f"{coder}.{side}.{idx}.{'downsample' if side == 'down' else 'upsample'}.conv.{parts[-1]}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                name = f"{coder}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
            else:
                sub = ".".join(parts[4:-1])
                name = f"{coder}.mid.attn_1.{attn[sub]}.{parts[-1]}"
                if sub != "group_norm" and parts[-1] == "weight":
                    v = v.reshape(*v.shape, 1, 1)  # linear → 1×1 convolution
        else:  # conv_in, conv_out, conv_norm_out
            name = k.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + name] = v

    for k, v in pipe.text_encoder.state_dict().items():
        # SD 1.x checkpoints hold transformers' CLIPTextModel as it was then: under `text_model.`
        # (transformers ≥ 5.6 flattened that level away).
        out["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    return {k: v.contiguous() for k, v in out.items()}


def tiny_sd_topology_pipeline(path: Path, seed: int = 0):
    """A tiny pipeline with SD 1.x's block structure (4 levels, 2 resnets each, attention in the first 3)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldm import LatentPipeline

    _, _, text_encoder, tokenizer, scheduler = tiny_components(seed, workdir=Path(path).parent)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, sample_size=8, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.5,
    ).eval()
    return LatentPipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(path)


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts whatever blocks (an open() of a FIFO included)."""

    def timeout(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def stroke_picture(size: int = 64):
    """A stroke painting for the editing tests: a red and a blue flat block on gray (PIL, RGB)."""
    import numpy as np
    from PIL import Image

    a = np.full((size, size, 3), 128, np.uint8)
    a[8:30, 6:28] = (220, 30, 30)
    a[34:58, 36:60] = (30, 60, 220)
    return Image.fromarray(a)


def right_half(size: int = 64):
    """An inpainting mask for the editing tests: white (repaint) on the right half, black on the left."""
    import numpy as np
    from PIL import Image

    m = np.zeros((size, size), np.uint8)
    m[:, size // 2 :] = 255
    return Image.fromarray(m)


def euler_pipelines(pipeline_dir):
    """(ours, diffusers') on the same folder, both sampling with Euler: for parity tests."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from ldm import LatentPipeline

    ours = LatentPipeline.from_pretrained(pipeline_dir, device="cpu")
    ref = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    ref.set_progress_bar_config(disable=True)
    ours.scheduler = ref.scheduler = EulerDiscreteScheduler.from_config(ours.scheduler.config)
    return ours, ref


def make_lora_file(pipeline_dir, path, seed: int = 0):
    """A LoRA (diffusers/peft keys) on a pipeline's U-Net attention projections, with random (not
    zero) up-projections so that it changes the images, written by diffusers itself."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights="gaussian"))
    torch.manual_seed(seed)
    for name, parameter in ref.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=get_peft_model_state_dict(ref.unet),
                                              weight_name=path.name)
    return path
