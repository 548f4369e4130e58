"""What a component's config.json may say before anything is built from it.

diffusers and transformers build whatever a config describes: a negative channel count, a string
where a number belongs, or `layers_per_block: 100000000` end in a traceback deep in torch, or in
an allocation that never finishes. The keys that decide what gets built (widths, depths, sizes,
block lists) are checked here against their types and generous ranges, each error naming the file
and the key; the shapes they build are then compared with the weights' own headers
(`ldm.models.check_component`). The ranges admit every Stable Diffusion 1.x/2.x/XL component and
anything an order of magnitude beyond; they exist to stop absurd values, not to judge designs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

Rule = Callable[[Any], "str | None"]  # a value → None if acceptable, else what is wrong with it


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def integer(lo: int, hi: int) -> Rule:
    return lambda v: None if _is_int(v) and lo <= v <= hi else f"expected a whole number in [{lo}, {hi}]"


def number(lo: float, hi: float, *, open_low: bool = False) -> Rule:
    def rule(v):
        ok = (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (lo < v if open_low else lo <= v)
            and v <= hi
        )
        return None if ok else f"expected a finite number in {'(' if open_low else '['}{lo:g}, {hi:g}]"

    return rule


def integers(lo: int, hi: int, max_len: int = 16) -> Rule:
    """A non-empty list of whole numbers in [lo, hi]."""
    return lambda v: (
        None
        if isinstance(v, list) and 0 < len(v) <= max_len and all(_is_int(x) and lo <= x <= hi for x in v)
        else f"expected a list of 1-{max_len} whole numbers in [{lo}, {hi}]"
    )


def integer_or_list(lo: int, hi: int) -> Rule:
    one, many = integer(lo, hi), integers(lo, hi)
    return lambda v: (
        None if one(v) is None or many(v) is None else f"expected a whole number in [{lo}, {hi}] or a list of them"
    )


def strings(max_len: int = 16) -> Rule:
    return lambda v: (
        None
        if isinstance(v, list) and 0 < len(v) <= max_len and all(isinstance(x, str) for x in v)
        else f"expected a list of 1-{max_len} block names"
    )


def text(v) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def optional(rule: Rule) -> Rule:
    return lambda v: None if v is None else rule(v)


CHANNELS, WIDTH, DEPTH = 16384, 65536, 256

_BLOCKS = {
    "block_out_channels": integers(1, CHANNELS, max_len=8),
    "down_block_types": strings(8),
    "up_block_types": strings(8),
    "norm_num_groups": optional(integer(1, 1024)),
    "in_channels": integer(1, 1024),
    "out_channels": integer(1, 1024),
}

_TRANSFORMER = {  # what CLIP's and BERT's configs share
    "hidden_size": integer(1, WIDTH),
    "intermediate_size": integer(1, 4 * WIDTH),
    "num_hidden_layers": integer(1, DEPTH),
    "num_attention_heads": integer(1, 1024),
    "vocab_size": integer(1, 10**7),
    "max_position_embeddings": integer(1, 10**6),
}

RULES: dict[str, dict[str, Rule]] = {
    "UNet2DConditionModel": {
        **_BLOCKS,
        "sample_size": optional(integer_or_list(1, 4096)),
        "layers_per_block": integer_or_list(1, 64),
        "cross_attention_dim": integer_or_list(1, WIDTH),
        "attention_head_dim": integer_or_list(1, WIDTH),
        "num_attention_heads": optional(integer_or_list(1, 1024)),
        "transformer_layers_per_block": integer_or_list(1, 64),
        "time_cond_proj_dim": optional(integer(1, WIDTH)),
        "mid_block_type": optional(text),
    },
    "AutoencoderKL": {
        **_BLOCKS,
        "latent_channels": integer(1, 1024),
        "layers_per_block": integer(1, 64),
        "sample_size": optional(integer_or_list(1, 65536)),
        "scaling_factor": number(0, 1e6, open_low=True),
        "shift_factor": optional(number(-1e6, 1e6)),
    },
    "CLIPTextModel": {**_TRANSFORMER, "projection_dim": optional(integer(1, WIDTH))},
    "T5EncoderModel": {
        "d_model": integer(1, WIDTH),
        "d_ff": integer(1, 4 * WIDTH),
        "d_kv": integer(1, WIDTH),
        "num_layers": integer(1, DEPTH),
        "num_heads": integer(1, 1024),
        "vocab_size": integer(1, 10**7),
        "relative_attention_num_buckets": optional(integer(1, 4096)),
    },
    "BertModel": {**_TRANSFORMER, "type_vocab_size": optional(integer(1, 1024))},
}

SCHEDULER_RULES: dict[str, Rule] = {
    "num_train_timesteps": integer(2, 100_000),
    "beta_start": number(0, 1, open_low=True),
    "beta_end": number(0, 1, open_low=True),
    "beta_schedule": text,
    "prediction_type": optional(
        lambda v: None if v in ("epsilon", "v_prediction", "sample") else "expected epsilon, v_prediction or sample"
    ),
    "timestep_spacing": optional(
        lambda v: None if v in ("leading", "trailing", "linspace") else "expected leading, trailing or linspace"
    ),
    "steps_offset": optional(integer(0, 1000)),
    "trained_betas": optional(
        lambda v: (
            None
            if isinstance(v, list) and all(number(0, 1, open_low=True)(b) is None for b in v)
            else "expected a list of numbers in (0, 1]"
        )
    ),
    "rescale_betas_zero_snr": optional(lambda v: None if isinstance(v, bool) else "expected true or false"),
}


def check_values(path: Path, config: dict, rules: dict[str, Rule]) -> None:
    """A ValueError naming `path` and the key for the first value its rule refuses."""
    for key, rule in rules.items():
        if key in config and (problem := rule(config[key])):
            shown = repr(config[key])
            raise ValueError(f"{path}: {key} = {shown[:60]}{'…' if len(shown) > 60 else ''}: {problem}")


def check_component_config(path: Path, class_name: str, config: dict) -> None:
    """Types and ranges of the keys that decide what `class_name` builds, and the block lists' agreement."""
    check_values(path, config, RULES.get(class_name, {}))
    blocks = config.get("block_out_channels")
    if isinstance(blocks, list):
        for key in ("down_block_types", "up_block_types"):
            if key in config and len(config[key]) != len(blocks):
                n, m = len(config[key]), len(blocks)
                raise ValueError(f"{path}: {key} has {n} entries but block_out_channels has {m}; one per block")
        for key in (
            "layers_per_block",
            "attention_head_dim",
            "cross_attention_dim",
            "num_attention_heads",
            "transformer_layers_per_block",
        ):
            value = config.get(key)
            if isinstance(value, list) and len(value) != len(blocks):
                raise ValueError(
                    f"{path}: {key} has {len(value)} entries but block_out_channels has {len(blocks)}; one per block"
                )
        groups = config.get("norm_num_groups")
        if _is_int(groups) and any(c % groups for c in blocks):
            raise ValueError(f"{path}: block_out_channels {blocks} must be multiples of norm_num_groups {groups}")


def check_scheduler_config(path: Path, config: dict) -> None:
    check_values(path, config, SCHEDULER_RULES)
    start, end = config.get("beta_start"), config.get("beta_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and not start < end:
        raise ValueError(f"{path}: beta_start {start} must be below beta_end {end}")
    betas = config.get("trained_betas")
    if isinstance(betas, list) and len(betas) != config.get("num_train_timesteps", 1000):
        raise ValueError(
            f"{path}: trained_betas has {len(betas)} values for {config.get('num_train_timesteps', 1000)} timesteps"
        )


def _token(v) -> str | None:
    ok = v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))
    return None if ok else "expected a token string"


TOKENIZER_RULES: dict[str, Rule] = {
    **{
        key: _token
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
    },
    "model_max_length": lambda v: (
        None if (_is_int(v) and v >= 1) or (isinstance(v, float) and v >= 1) else "expected a whole number ≥ 1"
    ),
    "tokenizer_class": optional(text),
    "padding_side": optional(lambda v: None if v in ("left", "right") else "expected left or right"),
    "truncation_side": optional(lambda v: None if v in ("left", "right") else "expected left or right"),
    "do_lower_case": optional(lambda v: None if isinstance(v, bool) else "expected true or false"),
    "add_prefix_space": optional(lambda v: None if isinstance(v, bool) else "expected true or false"),
    "extra_ids": optional(integer(0, 100_000)),
    "additional_special_tokens": optional(
        lambda v: None if isinstance(v, list) and all(_token(t) is None for t in v) else "expected a list of tokens"
    ),
}


def check_tokenizer_config(path: Path, config: dict) -> None:
    check_values(path, config, TOKENIZER_RULES)
