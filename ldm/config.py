"""Typed configs: dataclasses filled from YAML files and `key=value` overrides.

A config is a tree of dataclasses; a YAML file under `configs/` holds values only, with the same
nesting. Loading is strict, because a typo in a training config otherwise costs a run: an unknown
key, or a value of the wrong type, is a ValueError naming the dotted key. Overrides on the command
line use dotted keys too (`optim.lr=3e-4 run.max_steps=2000`), their values parsed as YAML.

The pieces every training stage shares are defined here (`DataConfig`, `OptimConfig`,
`EMAConfig`, `RunConfig`); each stage's top-level dataclass, composed of them, sits at the top of
its own training module (`ldm.train.vae`, `ldm.train.unet`) beside the code that reads it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared (see `ldm.data.open_dataset`)."""

    path: str | None = None  # a folder, metadata.jsonl/csv, or tar shards; --data overrides
    resolution: int = 256  # images are resized and cropped to resolution × resolution
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False  # off by default: a flip turns "left of" into "right of"
    num_workers: int = 2  # data-loader worker processes per training process
    validation_path: str | None = None  # held-out images for validation; None: no validation pass
    validation_samples: int = 64  # how many held-out images one validation pass reads


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with linear warm-up, then a constant or cosine LR.

    `optimizer: adamw8bit` keeps AdamW's two moment estimates in 8 bits, quantised block-wise with
    dynamic (non-linear) 8-bit codes (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization", §2): bitsandbytes' `AdamW8bit`, on CPU and GPU. The state per parameter drops from
    8 bytes to about 2; tensors under 4,096 elements keep 32-bit state, as bitsandbytes decides.
    """

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to lr × min_lr_ratio at the last step
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (diffusers' EMAModel), used for sampling."""

    enabled: bool = False
    decay: float = 0.9999  # the ceiling of the decay
    warmup: bool = True  # decay = 1 − (1 + step / inv_gamma)^(−power), capped at `decay`
    inv_gamma: float = 1.0
    power: float = 0.75
    update_after_step: int = 0


@dataclass
class RunConfig:
    """How long, how big, how often: everything about a run that is not the model or the data."""

    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer updates
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer update
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500  # optimizer updates between checkpoints (0: only the final one)
    keep_last: int = 3  # checkpoints kept; older ones are deleted once a newer one is complete
    log_every: int = 10
    sample_every: int = 500  # image grids (reconstructions / samples) every N updates; 0: never
    max_bad_steps: int = 10  # non-finite losses/gradients in a row (each update skipped) before the run stops


def check_shared_sections(data: DataConfig, optim: OptimConfig, ema: EMAConfig, run: RunConfig) -> None:
    """The ranges of the sections every stage shares, checked before anything is built; a
    ValueError names the dotted key. (Types, and finiteness, are checked when the config loads.)"""
    rules = [
        ("data.resolution", data.resolution, data.resolution >= 1, "≥ 1"),
        ("data.num_workers", data.num_workers, data.num_workers >= 0, "≥ 0"),
        ("data.validation_samples", data.validation_samples, data.validation_samples >= 1, "≥ 1"),
        ("optim.lr", optim.lr, optim.lr > 0, "> 0"),
        ("optim.betas", list(optim.betas), all(0 <= b < 1 for b in optim.betas), "two numbers in [0, 1)"),
        ("optim.weight_decay", optim.weight_decay, optim.weight_decay >= 0, "≥ 0"),
        ("optim.eps", optim.eps, optim.eps > 0, "> 0"),
        ("optim.warmup_steps", optim.warmup_steps, optim.warmup_steps >= 0, "≥ 0"),
        ("optim.min_lr_ratio", optim.min_lr_ratio, 0 <= optim.min_lr_ratio <= 1, "in [0, 1]"),
        ("optim.max_grad_norm", optim.max_grad_norm, optim.max_grad_norm is None or optim.max_grad_norm > 0,
         "> 0, or null for no clipping"),
        ("ema.decay", ema.decay, 0 < ema.decay <= 1, "in (0, 1]"),
        ("ema.inv_gamma", ema.inv_gamma, ema.inv_gamma > 0, "> 0"),
        ("ema.power", ema.power, ema.power > 0, "> 0"),
        ("ema.update_after_step", ema.update_after_step, ema.update_after_step >= 0, "≥ 0"),
    ]
    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "max_bad_steps"):
        rules.append((f"run.{key}", getattr(run, key), getattr(run, key) >= 1, "≥ 1"))
    for key in ("checkpoint_every", "sample_every", "keep_last"):
        rules.append((f"run.{key}", getattr(run, key), getattr(run, key) >= 0, "≥ 0"))
    for key, value, ok, expected in rules:
        if not ok:
            raise ValueError(f"config key {key} must be {expected}, got {value}")


# ---- loading -------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """An instance of dataclass `cls` from a YAML file (optional) and `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level")
        data = loaded or {}
    for item in overrides:
        _apply_override(data, item)
    return from_dict(cls, data)


def from_dict(cls: type[T], data: Any, prefix: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from nested dicts, strictly: unknown keys and wrong types are errors.

    Keys the data leaves out keep the values of `base` (default: `cls()`), so a section that a
    stage's config gives its own defaults (`field(default_factory=lambda: OptimConfig(lr=4.5e-6))`)
    keeps them when a YAML file sets only some of that section's keys.
    """
    if not isinstance(data, dict):
        raise ValueError(f"config key {prefix.rstrip('.') or '(top level)'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ValueError(f"unknown config key {prefix}{key!s}; valid keys here: {', '.join(fields)}")
    base = base if base is not None else cls()
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):  # a section: merge into the default section, not into a bare one
            kwargs[name] = from_dict(hints[name], value, f"{prefix}{name}.", base=getattr(base, name))
        else:
            kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return dataclasses.replace(base, **kwargs)


_YAML_BOOL_WORDS = {False: ("no", "n", "off", "false"), True: ("yes", "y", "on", "true")}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"config key {key}: {value!r} fits none of {_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted `no` / `off` / `yes` / `on` as a boolean
            words = [a for a in args if isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS[value]]
            if len(words) == 1:
                return words[0]
        elif value in args:
            return value
        raise ValueError(f"config key {key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"config key {key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting of ours means anything at nan or inf
                raise ValueError(f"config key {key}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"config type {tp!r} of {key} is not supported")  # a bug in a dataclass, not user input
    raise ValueError(f"config key {key}: expected {_name(tp)}, got {value!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in nested dicts; the value is parsed as YAML (so 3, 3e-4, true, [1, 2])."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: take the text as a string
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a group of keys")
    node[parts[-1]] = value


# ---- saving --------------------------------------------------------------------------------------


def config_to_dict(config: Any) -> dict:
    """A plain dict of a config tree (tuples as lists), as YAML and JSON write it."""

    def plain(x):
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML that `load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


__all__ = [
    "DataConfig", "OptimConfig", "EMAConfig", "RunConfig", "check_shared_sections",
    "load_config", "from_dict", "config_to_dict", "save_config", "field",
]
