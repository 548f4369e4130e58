"""OpenCLIP text towers as transformers `CLIPTextModel`s, read from safetensors without open_clip.

OpenCLIP's text transformer (Cherti et al. 2023, "Reproducible scaling laws for contrastive
language-image learning"; open_clip's `TextTransformer`) is CLIP's (Radford et al. 2021): token +
learned position embeddings, pre-norm residual blocks x += attn(ln_1(x)); x += mlp(ln_2(x)) under a
causal mask, then `ln_final`. It differs from transformers' CLIPTextModel only in names, in fusing
the q/k/v projections into one `in_proj_weight`, and (for LAION models) in using exact GELU rather
than OpenAI's QuickGELU. Stable Diffusion 2.x conditions on the *penultimate* block's output
through `ln_final`; a CLIPTextModel with one block fewer computes exactly that, which is how
diffusers stores SD 2.x's encoder.

So a tower converts to a CLIPTextModel (diffusers' `convert_open_clip_checkpoint` does the key
mapping), after which it is an ordinary component: `LatentPipeline` and `save_pretrained` handle it
like any CLIP encoder. Nothing here imports open_clip, which drags in torchvision; the `openclip`
extra is only needed to export weights from open_clip's own model zoo to safetensors, e.g.
    model = open_clip.create_model("ViT-H-14", pretrained="laion2b_s32b_b79k")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "vit-h-14.safetensors")
The tokenizer is CLIP's BPE (same vocabulary as OpenAI CLIP); open_clip pads with token 0 ("!").
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.")


def _find_prefix(keys) -> str:
    for key in keys:
        if key.endswith("token_embedding.weight") and not key.endswith("visual.token_embedding.weight"):
            return key[: -len("token_embedding.weight")]
    raise ValueError("not an OpenCLIP text tower: no token_embedding.weight among the weights")


def open_clip_text_config(state: dict[str, torch.Tensor], prefix: str = "", *, heads: int | None = None, penultimate: bool = True, act: str = "gelu"):
    """The CLIPTextConfig of an OpenCLIP text tower, read from its weight shapes.

    The head count is not in the weights: open_clip's text towers use heads of width 64
    (ViT-B: 512/8, ViT-L: 768/12, ViT-H: 1024/16, ViT-bigG: 1280/20), the default here.
    """
    from transformers import CLIPTextConfig

    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"act must be 'gelu' (LAION OpenCLIP models) or 'quick_gelu' (OpenAI's), got {act!r}")
    vocab_size, width = state[prefix + "token_embedding.weight"].shape
    context = state[prefix + "positional_embedding"].shape[0]
    layers = 1 + max(int(m[1]) for k in state if (m := _LAYER.match(k[len(prefix) :])) and k.startswith(prefix))
    heads = heads or width // 64
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads; pass heads=")
    if penultimate and layers < 2:
        raise ValueError("penultimate=True needs a tower with at least 2 blocks")
    projection = state.get(prefix + "text_projection")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers - 1 if penultimate else layers,
        num_attention_heads=heads,
        max_position_embeddings=context,
        hidden_act=act,
        layer_norm_eps=1e-5,  # torch's LayerNorm default, which open_clip uses
        projection_dim=projection.shape[1] if projection is not None else width,
        bos_token_id=vocab_size - 2,  # CLIP's BPE puts <|startoftext|>, <|endoftext|> last
        eos_token_id=vocab_size - 1,
        pad_token_id=0,
    )


def load_open_clip_text_encoder(path: str | Path, *, heads: int | None = None, penultimate: bool = True, act: str = "gelu"):
    """A CLIPTextModel holding the text tower of an OpenCLIP checkpoint (.safetensors).

    Accepts a whole CLIP model's weights (the visual tower is ignored), a text tower alone, or an
    SD 2.x checkpoint (`cond_stage_model.model.` prefix). `penultimate=True` keeps all blocks but
    the last, as SD 2.x conditions.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP checkpoint not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors file (pickle checkpoints are refused; see ldm.openclip's docstring to export one)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    prefix = _find_prefix(state)
    config = open_clip_text_config(state, prefix, heads=heads, penultimate=penultimate, act=act)
    model = CLIPTextModel(config)
    converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    # diffusers names keys for the `text_model.`-wrapped CLIPTextModel of transformers < 5.6.
    wrapped = hasattr(model, "text_model")
    converted = {(k if wrapped else k.removeprefix("text_model.")): v for k, v in converted.items()}
    if penultimate:  # the last block is not used by SD 2.x-style conditioning
        last = f"encoder.layers.{config.num_hidden_layers}."
        converted = {k: v for k, v in converted.items() if last not in k}
    converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection (the pooled path only)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: the OpenCLIP weights do not fit a CLIP text model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
