"""The optimizers make_optimizer builds: AdamW, and bitsandbytes' 8-bit AdamW (optim.optimizer=adamw8bit)."""

import sys

import pytest
import torch

from ldm.config import OptimConfig
from ldm.train.common import check_optim, make_optimizer


def fit(optimizer_name: str, steps: int):
    """Least squares with a known answer: W* = A⁺ B, from a fixed start, full batch."""
    g = torch.Generator().manual_seed(0)
    a, w_true = torch.randn(256, 64, generator=g), torch.randn(64, 64, generator=g)
    b = a @ w_true
    w = torch.nn.Parameter(torch.zeros(64, 64))
    opt = make_optimizer([w], OptimConfig(optimizer=optimizer_name, lr=3e-2))
    curve = []
    for _ in range(steps):
        loss = (a @ w - b).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    return w.detach(), opt, curve, w_true


def test_adamw8bit_tracks_adamw_with_a_quarter_of_the_state():
    pytest.importorskip("bitsandbytes")
    w32, opt32, curve32, w_true = fit("adamw", steps=400)
    w8, opt8, curve8, _ = fit("adamw8bit", steps=400)
    assert type(opt8).__name__ == "AdamW8bit"
    # both converge on the analytic solution (measured: max error 0.010 for AdamW, 0.012 for 8-bit)
    assert curve32[-1] < 1e-6 * curve32[0] and curve8[-1] < 1e-6 * curve8[0], (curve32[-1], curve8[-1])
    assert (w8 - w_true).abs().max() < 0.03 and (w32 - w_true).abs().max() < 0.03
    # along the way, 8-bit moments stay close to AdamW's path (measured after 20 steps: mean
    # difference 2.8% of the mean weight)
    w32_20, *_ = fit("adamw", steps=20)
    w8_20, *_ = fit("adamw8bit", steps=20)
    assert (w8_20 - w32_20).abs().mean() < 0.06 * w32_20.abs().mean()
    assert not torch.equal(w8_20, w32_20)  # really a different optimizer
    state8 = opt8.state[next(iter(opt8.state))]
    state32 = opt32.state[next(iter(opt32.state))]
    assert state8["state1"].dtype == state8["state2"].dtype == torch.uint8
    # per-parameter state: uint8 moments plus one float absmax per 256-element block; the two
    # 256-entry quantisation maps (qmap1, qmap2) are one table shared by every parameter
    bytes8 = sum(t.numel() * t.element_size() for k, t in state8.items() if torch.is_tensor(t) and not k.startswith("qmap"))
    bytes32 = sum(t.numel() * t.element_size() for t in state32.values() if torch.is_tensor(t) and t.numel() > 1)
    assert bytes8 < 0.26 * bytes32, (bytes8, bytes32)


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ValueError, match="optim.optimizer=adamw8bit needs bitsandbytes.*pip install bitsandbytes"):
        check_optim(OptimConfig(optimizer="adamw8bit"))
    check_optim(OptimConfig())  # plain AdamW needs nothing


def test_an_unknown_optimizer_is_refused_by_the_config_loader():
    from ldm.config import load_config
    from ldm.train.unet import UNetTrainConfig

    with pytest.raises(ValueError, match="optim.optimizer"):
        load_config(UNetTrainConfig, None, ["optim.optimizer=sgd"])
