"""LoRA (Hu et al. 2022) adapters on a pipeline: loading them, and AUTOMATIC1111's way of naming them.

Loading, scaling, fusing and the two file formats (diffusers/peft keys, and kohya's `lora_unet_…` /
`lora_te_…` keys with `alpha`, which AUTOMATIC1111 and ComfyUI trade) are diffusers' own
(`StableDiffusionLoraLoaderMixin`, over peft), so a file gives the same images here as in diffusers.
What this module adds: nothing pickled is read, keys that map to no module of this model are an
error naming them (diffusers only logs them), each adapter's file hash for the PNG's `Lora hashes`,
and the prompt tags `<lora:NAME:SCALE>`, resolved by name inside a folder, never as a path.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def check_scale(scale, what: str = "LoRA scale") -> float:
    """A finite number, or a ValueError."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{what} must be a finite number, got {scale!r}")
    return float(scale)


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`--lora FILE[:SCALE]` → (file, scale); the scale defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(path), check_scale(float(tail), f"--lora {text}: the scale")
        except ValueError as e:
            if "finite" in str(e):
                raise
    return Path(text), 1.0


def prompt_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A prompt without its `<lora:NAME:SCALE>` tags, and the tags (scale 1 when not given)."""
    tags = []
    for name, scale in TAG.findall(prompt):
        try:
            value = float(scale) if scale else 1.0
        except ValueError:
            raise ValueError(f"<lora:{name}:{scale}>: the scale must be a number") from None
        tags.append((name.strip(), check_scale(value, f"<lora:{name}:{scale}>: the scale")))
    return " ".join(TAG.sub(" ", prompt).split()), tags


def resolve_tag(name: str, lora_dir: str | Path | None) -> Path:
    """The file `<lora:NAME>` names: NAME.safetensors directly inside `lora_dir` (no paths, no links out)."""
    if lora_dir is None:
        raise ValueError(f"<lora:{name}>: no LoRA folder is set (--lora-dir, or pipe.lora_dir)")
    if not name or any(c in name for c in "/\\") or name.startswith(".") or ".." in name:
        raise ValueError(f"<lora:{name}>: a LoRA is named by its file name in the LoRA folder, not by a path")
    folder = Path(lora_dir).resolve()
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"<lora:{name}>: no {name}.safetensors in {folder}")
    if path.resolve().parent != folder:
        raise ValueError(f"<lora:{name}>: {path} links outside {folder}")
    return path


def file_hash(path: Path) -> str:
    """AUTOMATIC1111's short LoRA hash: the first 12 hex digits of the SHA-256 of the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def check_lora_keys(state_dict: dict, modules: dict[str, set[str]], source: str) -> None:
    """A ValueError naming the keys of a (diffusers-format) LoRA state dict that map to no module
    here: `modules` is {"unet": names, "text_encoder": names} of the pipeline's networks."""
    unknown = []
    for key in peft_keys(state_dict):
        prefix, _, rest = key.partition(".")
        module = re.split(r"\.lora(?:_[AB]|\.(?:up|down))?\.|\.lora_magnitude_vector|\.alpha$", rest)[0]
        if prefix not in modules or module not in modules[prefix]:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ValueError(f"{source}: {len(unknown)} LoRA key(s) map to no module of this model ({shown}); "
                         "it was made for another architecture")


def peft_keys(state_dict: dict) -> list[str]:
    """The keys of a diffusers-format LoRA state dict as peft spells them (`<network>.<module>.lora_A...`),
    converted by diffusers' own functions from its older spellings (the attention-processor keys
    its kohya conversion still writes); `.alpha` entries left out."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    keys = [k for k in state_dict if not k.startswith(("unet.", "text_encoder.")) and not k.endswith(".alpha")]
    for network in ("unet", "text_encoder"):
        part = {k[len(network) + 1:]: v for k, v in state_dict.items()
                if k.startswith(network + ".") and not k.endswith(".alpha")}
        if part and not any(".lora_A." in k or ".lora_B." in k for k in part):
            part = convert_unet_state_dict_to_peft(part) if network == "unet" else convert_state_dict_to_peft(part)
        keys += [f"{network}.{k}" for k in part]
    return keys
