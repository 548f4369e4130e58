"""Typed configs: strict loading, overrides, and a YAML round trip."""

from dataclasses import dataclass, field

import pytest

from ldm.config import EMAConfig, OptimConfig, RunConfig, load_config, save_config


@dataclass
class Example:
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4.5e-6, max_grad_norm=None))  # a stage's own defaults
    ema: EMAConfig = field(default_factory=EMAConfig)
    channels: tuple[int, ...] = (32, 64)
    note: str | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  betas: [0.9, 0.99]\nrun:\n  max_steps: 20\nchannels: [8, 16, 16]\n")
    config = load_config(Example, path, ["run.max_steps=30", "optim.schedule=cosine", "note=hello", "optim.max_grad_norm=none"])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)  # YAML 1.1 reads 1e-4 as text
    assert config.optim.betas == (0.9, 0.99) and config.channels == (8, 16, 16)
    assert config.run.max_steps == 30 and config.optim.schedule == "cosine" and config.note == "hello"
    assert config.optim.max_grad_norm is None and config.run.batch_size == RunConfig().batch_size
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(Example, tmp_path / "saved.yaml") == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], r"unknown config key optim.lrr; valid keys here: optimizer, lr, betas"),
        (["runn.max_steps=1"], r"unknown config key runn"),
        (["run.max_steps=1.5"], r"config key run.max_steps: expected int, got 1.5"),
        (["run.gradient_checkpointing=3"], r"config key run.gradient_checkpointing: expected bool"),
        (["run.mixed_precision=fp8"], r"'fp8' is not one of no, fp16, bf16"),
        (["run.mixed_precision=yes"], r"True is not one of no, fp16, bf16"),  # a boolean matches only its own word
        (["optim.betas=[0.9]"], r"optim.betas: expected 2 values, got 1"),
        (["channels=[8, x]"], r"channels\[1\]: expected int"),
        (["run=3"], r"config key run: expected a mapping"),
        (["max_steps"], r"not of the form key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(Example, None, overrides)


def test_the_documented_word_no_is_not_read_as_a_boolean(tmp_path):
    """YAML 1.1 reads an unquoted `no` as False; `mixed_precision: no` is the documented value."""
    assert load_config(Example, None, ["run.mixed_precision=no"]).run.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  mixed_precision: no\n")
    config = load_config(Example, path, [])
    assert config.run.mixed_precision == "no"
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(Example, tmp_path / "saved.yaml") == config


def test_a_partial_section_keeps_the_stage_defaults_of_the_keys_it_leaves_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  schedule: cosine\n")
    config = load_config(Example, path, ["optim.warmup_steps=5"])
    assert config.optim.schedule == "cosine" and config.optim.warmup_steps == 5
    assert config.optim.lr == 4.5e-6 and config.optim.max_grad_norm is None  # not OptimConfig's class defaults
    assert load_config(Example).optim == OptimConfig(lr=4.5e-6, max_grad_norm=None)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(Example, tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("run: [unclosed\n")
    with pytest.raises(ValueError, match="not a readable YAML file"):
        load_config(Example, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of config keys"):
        load_config(Example, tmp_path / "list.yaml")
