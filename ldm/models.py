"""The pipeline's components: which classes may be loaded, and how a folder is checked and read.

A pipeline folder uses the diffusers Stable Diffusion layout:
    model_index.json   {"unet": ["diffusers", "UNet2DConditionModel"], ...}
    unet/ vae/ text_encoder/ tokenizer/ scheduler/   each with its config and safetensors weights

Components come from a fixed registry of classes (below). A `model_index.json` that names any
other library or class is refused rather than imported, and nothing is ever loaded with remote
code. Weights are safetensors; pickle files (`.bin`, `.ckpt`, ...) are refused unless the caller
opts in with `allow_pickle=True`, and even then they are read by torch's weights-only unpickler
(`load_pickle_weights`), never by diffusers or transformers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

# component → {class name: library}. The only classes a pipeline folder may name.
REGISTRY: dict[str, dict[str, str]] = {
    "unet": {"UNet2DConditionModel": "diffusers"},
    "vae": {"AutoencoderKL": "diffusers"},
    "text_encoder": {"CLIPTextModel": "transformers", "T5EncoderModel": "transformers", "BertModel": "transformers"},
    "tokenizer": {"CLIPTokenizer": "transformers", "CLIPTokenizerFast": "transformers", "T5Tokenizer": "transformers", "T5TokenizerFast": "transformers"},
    "scheduler": {
        name: "diffusers"
        for name in (
            "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
            "UniPCMultistepScheduler", "DEISMultistepScheduler",
        )
    },
}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
# Entries diffusers writes (usually [null, null]); we never load them, so they cannot run code.
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class PipelineInfo:
    """What can be known about a pipeline folder from its JSON files alone, before any weights load."""

    path: Path
    classes: dict[str, str]  # component → class name
    latent_factor: int  # pixels per latent cell: 2 ** (number of VAE blocks − 1)
    sample_size: int  # the U-Net's trained latent size; × latent_factor = default image size
    scheduler_config: dict

    @property
    def default_size(self) -> int:
        return self.sample_size * self.latent_factor


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on a header's size


def check_safetensors(path: Path) -> None:
    """Raise ValueError naming `path` unless it looks like a whole safetensors file.

    Reads only the 8-byte length and the JSON header, so a multi-GB file costs nothing: this
    catches git-lfs pointer files (a clone without `git lfs pull`), truncated downloads, garbage,
    and headers claiming absurd sizes, before any loader sees them.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"version "):
                raise ValueError(f"{path}: a git-lfs pointer file, not weights; run `git lfs pull` in the model's repository")
            if len(head) < 8:
                raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"{path}: not a valid safetensors file (header of {n} bytes in a {size}-byte file; truncated or corrupt)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a valid safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: not a valid safetensors file (malformed entry for {str(key)[:40]!r})")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, the header describes {8 + n + end})")


def _pickled_weights(folder: Path) -> list[Path]:
    """The pickle-format weight files of a component folder (none if it has safetensors)."""
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return []
    return [folder / f for f in files if f.endswith(PICKLE_SUFFIXES)]


def _check_weights(folder: Path, component: str, allow_pickle: bool = False) -> None:
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    weights = [f for f in files if f.endswith(".safetensors")]
    if weights or any(f.endswith(".safetensors.index.json") for f in files):
        for name in weights:
            check_safetensors(folder / name)
        return
    pickled = _pickled_weights(folder)
    if pickled and allow_pickle:
        return
    if pickled:
        raise ValueError(
            f"{pickled[0]}: pickle-format weights are refused (loading a pickle can run code); "
            f"convert them to safetensors, e.g. load {component} once with diffusers/transformers and "
            f"save_pretrained(..., safe_serialization=True); or, if you trust the file, pass allow_pickle=True "
            f"(ldm-txt2img --allow-pickle) to read it with torch's weights-only unpickler"
        )
    expected = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    raise ValueError(f"{folder}: missing {expected} (no safetensors weights for the {component})")


def inspect_pipeline(path: str | os.PathLike, allow_pickle: bool = False) -> PipelineInfo:
    """Check that `path` is a loadable pipeline folder and read its shape, without loading weights.

    Raises FileNotFoundError for a missing folder and ValueError naming the first problem
    otherwise (a missing file, an unreadable config, a class outside the registry, pickle weights).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; --model takes a diffusers pipeline folder (model_index.json, unet/, vae/, ...)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"model folder {path} is not readable")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{path} is not a pipeline folder: missing model_index.json")
    index = _read_json(index_path)

    classes = {}
    for component in REQUIRED:
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise ValueError(f"{index_path}: no usable entry for {component!r} (expected [library, class])")
        library, name = entry
        if REGISTRY[component].get(name) != library:
            allowed = ", ".join(f"{lib}.{cls}" for cls, lib in REGISTRY[component].items())
            raise ValueError(f"{index_path}: {component} is {library}.{name}, which ldm does not load; allowed: {allowed}")
        if not (path / component).is_dir():
            raise ValueError(f"{path} is not a complete pipeline folder: missing {component}/")
        classes[component] = name
    extra = sorted(k for k in index if not k.startswith("_") and k not in REQUIRED + IGNORED and k != "requires_safety_checker")
    if extra:
        raise ValueError(f"{index_path}: unexpected component(s) {', '.join(extra)}; ldm loads a Stable Diffusion layout ({', '.join(REQUIRED)})")

    for component in WEIGHTED:
        if not (path / component / "config.json").is_file():
            raise ValueError(f"{path} is not a complete pipeline folder: missing {component}/config.json")
        _check_weights(path / component, component, allow_pickle)
    tokenizer_dir = path / "tokenizer"
    if not any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model")):
        raise ValueError(f"{path} is not a complete pipeline folder: missing tokenizer/tokenizer.json (or vocab.json + merges.txt)")
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise ValueError(f"{path} is not a complete pipeline folder: missing scheduler/scheduler_config.json")

    vae_config = _read_json(path / "vae" / "config.json")
    unet_config = _read_json(path / "unet" / "config.json")
    blocks = vae_config.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{path / 'vae' / 'config.json'}: missing block_out_channels")
    sample_size = unet_config.get("sample_size", 64)
    if isinstance(sample_size, list):  # non-square U-Nets store [h, w]
        sample_size = sample_size[0]
    return PipelineInfo(
        path=path,
        classes=classes,
        latent_factor=2 ** (len(blocks) - 1),
        sample_size=int(sample_size),
        scheduler_config=_read_json(scheduler_path),
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id ("org/name") from the hub or the local HF cache.

    Only the files the layout needs are fetched (JSON, tokenizer files, safetensors): never pickles.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or not HUB_ID.match(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    for local_only in (False, True):
        try:
            return Path(snapshot_download(str(name_or_path), allow_patterns=patterns, local_files_only=local_only))
        except Exception:  # offline, unknown repo, or not cached: try the cache, then give up
            continue
    raise FileNotFoundError(f"model folder not found: {name_or_path} (not a local folder, and no hub copy is reachable or cached)")


def load_pickle_weights(path: Path) -> dict:
    """A state dict from a pickle-format file, through torch's weights-only unpickler only.

    `weights_only=True` is passed explicitly: torch 2.13's `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`
    overrides only calls that leave weights_only unset (torch/serialization.py, `load`), and
    `TORCH_FORCE_WEIGHTS_ONLY_LOAD` can only force it on, so neither can make this call run code.
    The unpickler builds tensors and plain containers and refuses every other global.
    """
    import pickle

    import torch

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = load(mmap=False)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused by torch's weights-only unpickler: it holds more than tensors ({first})") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch weights file ({' '.join(str(e).split())[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise ValueError(f"{path}: not a state dict of named tensors")
    return state


def _load_pickled_component(cls, folder: Path, files: list[Path], dtype):
    """Build `cls` from the folder's config and load the pickled state dict into it ourselves, so
    diffusers/transformers never call torch.load."""
    import torch

    if hasattr(cls, "config_class") and cls.config_class is not None:  # transformers
        model = cls(cls.config_class.from_pretrained(folder))
    else:  # diffusers
        model = cls.from_config(cls.load_config(folder))
    state = {}
    for file in files:
        state.update(load_pickle_weights(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]  # a buffer old transformers saved
    if missing or unexpected:
        raise ValueError(f"{files[0]}: the weights do not fit {cls.__name__} of {folder / 'config.json'} "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def load_component(path: Path, component: str, class_name: str, dtype=None, allow_pickle: bool = False):
    """Load one registered component from its subfolder: safetensors, or with `allow_pickle` a
    pickle-format file read by `load_pickle_weights`."""
    library = REGISTRY[component][class_name]  # KeyError impossible after inspect_pipeline
    folder = path / component
    pickled = _pickled_weights(folder) if component in WEIGHTED else []
    if pickled:
        if not allow_pickle:
            _check_weights(folder, component)  # raises the refusal
        import diffusers
        import transformers

        return _load_pickled_component(getattr(diffusers if library == "diffusers" else transformers, class_name), folder, pickled, dtype)
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        if component == "scheduler":
            return cls.from_pretrained(folder)
        return cls.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=True)
    import transformers

    cls = getattr(transformers, class_name)
    if component == "tokenizer":
        return cls.from_pretrained(folder, trust_remote_code=False)
    return cls.from_pretrained(folder, use_safetensors=True, dtype=dtype, trust_remote_code=False)
