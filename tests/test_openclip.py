"""OpenCLIP text towers converted to CLIPTextModel, against open_clip's architecture written out in torch."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.openclip import load_open_clip_text_encoder

V, D, L, N, HEADS = 60, 128, 12, 3, 2  # vocab, width, context, blocks; width/64 = 2 heads


def _random_tower(prefix="", seed=0):
    """Random weights in open_clip's key layout for a text tower (plus a visual key to ignore)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.05: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"token_embedding.weight": r(V, D, s=0.5), "positional_embedding": r(L, D, s=0.5), "text_projection": r(D, 64),
          "ln_final.weight": 1 + r(D), "ln_final.bias": r(D), "visual.proj": r(D, 64)}
    for i in range(N):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(D), p + "ln_1.bias": r(D), p + "attn.in_proj_weight": r(3 * D, D), p + "attn.in_proj_bias": r(3 * D),
                   p + "attn.out_proj.weight": r(D, D), p + "attn.out_proj.bias": r(D), p + "ln_2.weight": 1 + r(D), p + "ln_2.bias": r(D),
                   p + "mlp.c_fc.weight": r(4 * D, D), p + "mlp.c_fc.bias": r(4 * D), p + "mlp.c_proj.weight": r(D, 4 * D), p + "mlp.c_proj.bias": r(D)})
    return {prefix + k: v for k, v in sd.items()}


def _open_clip_forward(sd, ids, blocks):
    """open_clip's TextTransformer, spelled out: pre-norm blocks under a causal mask, then ln_final."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (D,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
        att = (split(q) @ split(k).transpose(-1, -2)) / math.sqrt(D // HEADS) + mask
        out = (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(out, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (D,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (D,), sd["ln_final.weight"], sd["ln_final.bias"])


@pytest.mark.parametrize("prefix", ["", "cond_stage_model.model."])
@pytest.mark.parametrize("penultimate", [True, False])
def test_converted_tower_computes_what_open_clip_computes(tmp_path, prefix, penultimate):
    sd = _random_tower(prefix)
    save_file(sd, tmp_path / "tower.safetensors")
    model = load_open_clip_text_encoder(tmp_path / "tower.safetensors", penultimate=penultimate)
    assert model.config.num_hidden_layers == (N - 1 if penultimate else N) and model.config.num_attention_heads == HEADS
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))
    bare = {k.removeprefix(prefix): v for k, v in sd.items()}
    expected = _open_clip_forward(bare, ids, N - 1 if penultimate else N)
    with torch.no_grad():
        got = model(ids).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, _open_clip_forward(bare, ids, N if penultimate else N - 1), atol=1e-3)  # depth matters


def test_bad_openclip_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_open_clip_text_encoder(tmp_path / "none.safetensors")
    (tmp_path / "tower.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        load_open_clip_text_encoder(tmp_path / "tower.bin")
    save_file({"visual.proj": torch.zeros(2, 2)}, tmp_path / "visual.safetensors")
    with pytest.raises(ValueError, match="not an OpenCLIP text tower"):
        load_open_clip_text_encoder(tmp_path / "visual.safetensors")
    save_file(_random_tower(), tmp_path / "tower.safetensors")
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        load_open_clip_text_encoder(tmp_path / "tower.safetensors", heads=3)
