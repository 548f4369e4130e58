"""bf16 training on the CPU runs the attention core in float32 (ldm.train.common.float_attention_processor):
the same numbers as diffusers' processor where nothing is cast, float32 inside SDPA under autocast,
and only where that rule applies."""

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.overrides import TorchFunctionMode

from ldm.train.common import fit_attention_to_precision, float_attention_processor


class _SDPASpy(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.dtypes.append(tuple(a.dtype for a in args[:3]))
        return func(*args, **(kwargs or {}))


def _attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=8, dim_head=4)  # 4-wide heads, as in the shapes U-Net
    x, context = torch.randn(3, 64, 32), torch.randn(3, 7, 16)
    return attn, x, context


def test_without_autocast_it_is_diffusers_processor():
    attn, x, context = _attention()
    attn.set_processor(AttnProcessor2_0())
    reference = attn(x, context)
    attn.set_processor(float_attention_processor())
    assert torch.equal(attn(x, context), reference)


def test_under_bf16_autocast_the_core_runs_in_float32():
    attn, x, context = _attention()
    reference = attn(x, context)  # float32 throughout
    attn.set_processor(float_attention_processor())
    x.requires_grad_(True)
    with _SDPASpy() as spy, torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, context)
    assert spy.dtypes == [(torch.float32,) * 3]  # the projections ran in bf16, the core in float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)  # bf16 projections: ~3 significant digits
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

    attn.set_processor(AttnProcessor2_0())
    with _SDPASpy() as spy, torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, context)
    assert spy.dtypes == [(torch.bfloat16,) * 3]  # what it replaces: diffusers' core in bf16


def test_only_bf16_on_the_cpu_changes_the_processors():
    from types import SimpleNamespace  # what it reads of an accelerate Accelerator (a process-wide singleton)

    def Accelerator(mixed_precision, device="cpu"):
        return SimpleNamespace(mixed_precision=mixed_precision, device=torch.device(device))

    for precision, device, changed in (("no", "cpu", False), ("bf16", "cpu", True), ("bf16", "cuda", False)):
        attn, _, _ = _attention()
        attn.set_processor(AttnProcessor2_0())
        model = torch.nn.Module()
        model.attn = attn
        model.set_attn_processor = attn.set_processor
        assert fit_attention_to_precision(model, Accelerator(precision, device)) is changed
        assert (type(attn.processor).__name__ == "FloatSDPAProcessor") is changed


def test_a_text_encoder_runs_its_sdpa_in_float32():
    """A transformers encoder has no attention processors: its whole forward runs under the rule."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=16, attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 50, (3, 9))
    reference = model(ids).last_hidden_state
    assert fit_attention_to_precision(model, SimpleNamespace(mixed_precision="bf16", device=torch.device("cpu")))
    assert torch.equal(model(ids).last_hidden_state, reference)  # float32 in: nothing changes
    with _SDPASpy() as spy, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids).last_hidden_state
    assert spy.dtypes == [(torch.float32,) * 3] * 2  # one float32 core per layer
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_vae_attention_keeps_its_arguments(monkeypatch):
    """A VAE's mid-block passes `temb` to its processor; diffusers hands a processor only the
    arguments its signature names and warns on each call about the rest."""
    from diffusers import AutoencoderKL
    from diffusers.models import attention_processor

    warned = []
    monkeypatch.setattr(attention_processor.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        vae.set_attn_processor(AttnProcessor2_0())
        reference = vae(x).sample
        vae.set_attn_processor(float_attention_processor())
        assert torch.equal(vae(x).sample, reference)
    assert warned == []
