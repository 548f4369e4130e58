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
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ldm.quiet import diffusers_without_bitsandbytes, library_quiet

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
            "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler",
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
    unet_config: dict
    vae_config: dict
    components: dict[str, "ComponentInfo"]  # each component's checked config and weights

    @property
    def default_size(self) -> int:
        return self.sample_size * self.latent_factor


# Text files a loader parses whole (configs, indexes, tokenizers) are refused above this size:
# the largest real ones (multilingual tokenizer.json) are tens of MB; more is garbage or an attack.
MAX_TEXT_BYTES = 256 * 1024 * 1024
_SPECIAL_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
NOT_REGULAR = "not a regular file; a model folder holds only files and folders"


def file_problem(path: Path) -> str | None:
    """None if `path` is (a link to) a regular file; otherwise what it is. Never opens it: opening a
    FIFO blocks until a writer appears, and reading a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    except OSError as e:  # a link loop, a name too long, a folder we may not enter
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _SPECIAL_FILES if test(mode)), "not a regular file")


def regular_file(path: Path, what: str = "file") -> Path:
    """`path`, or a ValueError saying that it is missing or is not a regular file."""
    problem = file_problem(path)
    if problem == "missing":
        raise ValueError(f"{path}: missing {what}")
    if problem:
        raise ValueError(f"{path}: {problem}, {NOT_REGULAR}")
    return path


def audit_folder(folder: Path) -> None:
    """Refuse a component folder holding anything a loader could open that is not a regular file or
    a folder (FIFOs, devices, sockets, broken or looping links): loaders list folders and open what
    they find, so every entry is checked, not only the names the layout expects."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise ValueError(f"{folder}: cannot list the folder ({e.strerror})") from None
    for entry in entries:
        problem = file_problem(Path(entry.path))
        if problem not in (None, "a folder"):
            raise ValueError(f"{entry.path}: {problem}, {NOT_REGULAR}")


def read_json(path: Path) -> dict:
    if file_problem(path) == "missing":
        raise FileNotFoundError(f"{path}: missing")
    regular_file(path)
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise ValueError(f"{path}: {size >> 20} MB is too large for a JSON config (limit {MAX_TEXT_BYTES >> 20} MB)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = " ".join(str(e).split())[:120]
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on a header's size
# Bits per element of every dtype the safetensors format defines (safetensors/src/tensor.rs).
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file holds ({name: shape}), or a ValueError naming `path`.

    Reads only the 8-byte length and the JSON header, so a multi-GB file costs nothing, and checks
    what the safetensors library itself checks (safetensors/src/tensor.rs, `validate`), so no
    loader meets a file it would fail on: git-lfs pointer files (a clone without `git lfs pull`),
    truncated downloads, garbage, absurd header sizes, unknown dtypes, and entries whose shape ×
    dtype size disagrees with their byte range or whose ranges leave gaps, overlap or overrun.
    """
    regular_file(path, "weights file")
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: not a valid safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    entries = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        name = repr(str(key)[:60])
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: not a valid safetensors file (malformed entry for {name})")
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
            raise ValueError(f"{path}: tensor {name} has an unknown dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and len(shape) <= 16 and all(_is_int(d) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name} has a malformed shape {str(shape)[:60]}")
        nbytes = math.prod(shape) * SAFETENSORS_BITS[dtype]
        if nbytes % 8 or nbytes // 8 != offsets[1] - offsets[0]:
            begin, end = offsets
            raise ValueError(f"{path}: tensor {name} of shape {shape} in {dtype} needs {nbytes / 8:g} bytes, but the "
                             f"header gives it {end - begin} (bytes {begin}-{end}); the header lies")
        entries.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(entries):
        if begin != end:
            raise ValueError(f"{path}: not a valid safetensors file (tensor {name} starts at byte {begin}, "
                             f"expected {end}: a gap or an overlap)")
        end = stop
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, the header describes {8 + n + end})")
    if 8 + n + end < size:
        raise ValueError(f"{path}: not a valid safetensors file ({size - 8 - n - end} bytes after the last tensor)")
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# The file names diffusers and transformers look for (use_safetensors=True); a variant ("fp16")
# names NAME.fp16.safetensors and NAME.safetensors.index.fp16.json.
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
VARIANT = re.compile(r"^[A-Za-z0-9_]+$")


def check_variant(variant: str | None) -> None:
    """A ValueError unless `variant` is None or a plain name such as "fp16" (it becomes part of file names)."""
    if variant is not None and not (isinstance(variant, str) and VARIANT.match(variant)):
        raise ValueError(f"variant must be a name like 'fp16', got {variant!r}")


def weight_names(library: str, variant: str | None = None) -> tuple[str, str]:
    """(single file name, shard index name) of a library's weights, of `variant` if given."""
    stem = WEIGHT_STEMS[library]
    if variant is None:
        return f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"


def weight_files(folder: Path, library: str, variant: str | None = None) -> dict[str, tuple[Path, tuple]] | None:
    """Every weights file the library's loader will open in `folder`, {tensor: (file, shape)}, each one
    checked (`check_safetensors`); None when the folder has neither the file nor a shard index.

    A shard index (`NAME.safetensors.index.json`) is read as the loaders read it, and every shard
    it names must be a safetensors file beside it: an index that names `.bin` shards would make
    diffusers and transformers unpickle them, whatever the folder's other files say."""
    single, index_path = (folder / name for name in weight_names(library, variant))
    found = {p: file_problem(p) for p in (single, index_path)}
    if all(problem == "missing" for problem in found.values()):
        return None
    files: dict[str, tuple[Path, tuple[int, ...]]] = {}
    if found[index_path] != "missing":  # diffusers prefers the index when both exist, transformers the file: check both
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError(f"{index_path}: no usable weight_map (expected {{tensor name: shard file name}})")
        if not isinstance(index.get("metadata"), dict):  # diffusers reads index["metadata"] unguarded
            raise ValueError(f"{index_path}: no metadata object (a shard index holds "
                             '{"metadata": {...}, "weight_map": {...}})')
        shards = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or shard in (".", ".."):
                raise ValueError(f"{index_path}: shard {shard[:80]!r} is not a file name in the component folder")
            if not shard.endswith(".safetensors"):
                raise ValueError(f"{index_path}: names the shard {shard[:80]!r}, which is not a safetensors file; "
                                 "pickle shards are refused (loading a pickle can run code); convert them")
            shards[shard] = check_safetensors(folder / shard)
        for name, shard in weight_map.items():
            if name not in shards[shard]:
                raise ValueError(f"{index_path}: names {shard} for the tensor {str(name)[:60]!r}, "
                                 "which that shard does not hold")
            files[name] = (folder / shard, shards[shard][name])
    if found[single] != "missing":
        files.update({name: (single, shape) for name, shape in check_safetensors(single).items()})
    return files


def _pickled_weights(folder: Path) -> list[Path]:
    """The pickle-format weight files of a component folder (none if it has safetensors)."""
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return []
    return [folder / f for f in files if f.endswith(PICKLE_SUFFIXES)]


def _check_weights(folder: Path, component: str, library: str, allow_pickle: bool = False,
                   variant: str | None = None) -> dict | None:
    """The component's safetensors weights ({tensor: (file, shape)}, checked), None for pickle weights the
    caller allowed, or a ValueError: pickles refused, or no weights at all."""
    files = weight_files(folder, library, variant)
    if files is not None:
        return files
    if variant is not None:
        name = weight_names(library, variant)[0]
        raise ValueError(f"{folder}: missing {name} (no {variant!r} variant of the {component})")
    pickled = _pickled_weights(folder)
    if pickled and allow_pickle:
        return None
    if pickled:
        raise ValueError(
            f"{pickled[0]}: pickle-format weights are refused (loading a pickle can run code); "
            f"convert them to safetensors, e.g. load {component} once with diffusers/transformers and "
            f"save_pretrained(..., safe_serialization=True); or, if you trust the file, pass allow_pickle=True "
            f"(ldm-txt2img --allow-pickle) to read it with torch's weights-only unpickler"
        )
    expected = f"{WEIGHT_STEMS[library]}.safetensors"
    raise ValueError(f"{folder}: missing {expected} (no safetensors weights for the {component})")


def stored_dtype(info: ComponentInfo):
    """The floating dtype a component's weights are stored in (from a header), or None."""
    import torch
    from safetensors import safe_open

    for name, (file, _) in (info.weights or {}).items():
        with safe_open(str(file), framework="pt") as f:
            dtype = f.get_slice(name).get_dtype()
        if dtype in STORED_DTYPES:
            return getattr(torch, STORED_DTYPES[dtype])
    return None


STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def inspect_pipeline(path: str | os.PathLike, allow_pickle: bool = False, variant: str | None = None) -> PipelineInfo:
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
    index = read_json(index_path)

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

    tokenizer_dir = path / "tokenizer"
    if not any(file_problem(tokenizer_dir / f) != "missing" for f in ("tokenizer.json", "vocab.json", "spiece.model")):
        raise ValueError(f"{path} is not a complete pipeline folder: missing tokenizer/tokenizer.json (or vocab.json + merges.txt)")
    check_variant(variant)
    components = {c: check_component(path / c, c, classes[c], allow_pickle, variant) for c in REQUIRED}
    context = components["tokenizer"].config.get("model_max_length")
    positions = components["text_encoder"].config.get("max_position_embeddings")
    if isinstance(context, int) and isinstance(positions, int) and positions < context < 100_000:  # larger: "no limit"
        raise ValueError(f"{path / 'tokenizer' / 'tokenizer_config.json'}: model_max_length {context} exceeds the "
                         f"text encoder's {positions} positions (text_encoder/config.json max_position_embeddings)")
    unet_config, vae_config = components["unet"].config, components["vae"].config
    sample_size = unet_config.get("sample_size", 64) or 64
    if isinstance(sample_size, list):  # non-square U-Nets store [h, w]
        sample_size = sample_size[0]
    return PipelineInfo(
        path=path,
        classes=classes,
        latent_factor=2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1),
        sample_size=int(sample_size),
        scheduler_config=components["scheduler"].config,
        unet_config=unet_config,
        vae_config=vae_config,
        components=components,
    )


@dataclass(frozen=True)
class ComponentInfo:
    """A checked component folder: its config, and {tensor name: (file, shape)} of its safetensors
    weights (None for pickle weights the caller allowed, and for tokenizers and schedulers)."""

    folder: Path
    config: dict
    weights: dict[str, tuple[Path, tuple[int, ...]]] | None = None


CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}


def check_component(folder: Path, component: str, class_name: str, allow_pickle: bool = False,
                    variant: str | None = None) -> ComponentInfo:
    """Everything about one component folder that can be known without loading weights, checked.

    Every entry must be a regular file or a folder (`audit_folder`); the config is read with its
    keys' types and ranges checked (`ldm.component_configs`); every weights file the loader will
    open is checked (`weight_files`); and the network the config describes is built on torch's
    meta device (no memory) so that the shape of every parameter can be compared with the weights'
    headers. A ValueError names the file and the key or tensor that disagree."""
    from ldm.component_configs import check_component_config, check_scheduler_config, check_tokenizer_config

    diffusers_without_bitsandbytes()  # see ldm.quiet

    if not folder.is_dir():
        raise ValueError(f"{folder.parent} is not a complete pipeline folder: missing {component}/")
    audit_folder(folder)
    if component == "tokenizer":
        for entry in folder.iterdir():
            if entry.is_file() and entry.stat().st_size > MAX_TEXT_BYTES:
                raise ValueError(f"{entry}: {entry.stat().st_size >> 20} MB is too large for a tokenizer file "
                                 f"(limit {MAX_TEXT_BYTES >> 20} MB)")
        config_path = folder / CONFIG_FILES["tokenizer"]
        config = read_json(config_path) if file_problem(config_path) != "missing" else {}
        check_tokenizer_config(config_path, config)
        return ComponentInfo(folder, config)
    config_path = folder / CONFIG_FILES.get(component, "config.json")
    if file_problem(config_path) == "missing":
        raise ValueError(f"{folder.parent} is not a complete pipeline folder: missing {component}/{config_path.name}")
    config = read_json(config_path)
    if component == "scheduler":
        check_scheduler_config(config_path, config)
        return ComponentInfo(folder, config)
    check_component_config(config_path, class_name, config)
    library = REGISTRY[component][class_name]
    files = _check_weights(folder, component, library, allow_pickle, variant)
    if files is None:  # allowed pickle weights: load_pickle_weights checks them against the model
        return ComponentInfo(folder, config)
    _compare_with_config(config_path, class_name, library, config, files)
    return ComponentInfo(folder, config, files)


# Attention weight names of diffusers' VAEs before 0.14, which diffusers still renames on load.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _compare_with_config(config_path: Path, class_name: str, library: str, config: dict, files: dict) -> None:
    """Build `class_name` from `config` on the meta device and compare every parameter's shape with
    the weights' headers: a config that lies about the weights is named before any memory is used."""
    import diffusers
    import torch
    import transformers

    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    try:
        with torch.device("meta"), library_quiet():
            model = cls(cls.config_class.from_dict(config)) if library == "transformers" else cls.from_config(config)
    except Exception as e:  # noqa: BLE001 — the library's own message says what it could not build
        raise ValueError(f"{config_path}: {class_name} cannot be built from this config ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None
    prefix = f"{getattr(cls, 'base_model_prefix', '')}."
    stored = {}
    for name, (file, shape) in files.items():
        for old, new in _LEGACY_ATTENTION.items() if library == "diffusers" else ():
            name = name.replace(old, new)
        stored[name[len(prefix):] if prefix != "." and name.startswith(prefix) else name] = (file, shape)
    aliases: dict[int, list[str]] = {}  # tied parameters (T5's shared embedding) are one parameter under several names
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    missing = []
    for names in aliases.values():
        present = [n for n in names if n in stored]
        if not present:
            missing.append(names[0])
        shape = tuple(model.get_parameter(names[0]).shape)
        for name in present:
            file, stored_shape = stored[name]
            if tuple(d for d in stored_shape if d != 1) != tuple(d for d in shape if d != 1):
                raise ValueError(f"{file}: tensor {name} has shape {list(stored_shape)}, but {config_path} builds "
                                 f"{list(shape)}; the config and the weights disagree")
    if missing:
        raise ValueError(f"{config_path}: describes {len(missing)} parameter(s) the weights do not hold "
                         f"(e.g. {', '.join(missing[:3])}); the config and the weights disagree")


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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit the config
        reason = " ".join(str(e).split())[:200]
        config = folder / "config.json"
        raise ValueError(f"{files[0]}: the weights do not fit {cls.__name__} of {config} ({reason})") from None
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]  # a buffer old transformers saved
    if missing or unexpected:
        raise ValueError(f"{files[0]}: the weights do not fit {cls.__name__} of {folder / 'config.json'} "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def load_component(folder: Path, component: str, class_name: str, dtype=None, allow_pickle: bool = False,
                   checked: ComponentInfo | None = None, variant: str | None = None):
    """Load one registered component from its folder: safetensors, or with `allow_pickle` a
    pickle-format file read by `load_pickle_weights`. The folder is checked first (`check_component`;
    `checked` passes a check already made), and loaded weights must be finite, or a ValueError
    names the tensor: damaged weights are found here, not as a black picture or a NaN loss later."""
    info = checked or check_component(folder, component, class_name, allow_pickle, variant)
    diffusers_without_bitsandbytes()  # see ldm.quiet
    try:
        return _load_checked(folder, component, class_name, dtype, info, variant)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 — a library failing on a folder we checked: the folder's fault
        if isinstance(e, MemoryError):
            raise
        raise ValueError(f"{folder}: {class_name} cannot be loaded from this folder ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None


def _load_checked(folder: Path, component: str, class_name: str, dtype, info: ComponentInfo, variant: str | None):
    library = REGISTRY[component][class_name]
    if component in WEIGHTED and info.weights is None:  # pickle weights the caller allowed
        import diffusers
        import transformers

        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        model = _load_pickled_component(cls, folder, _pickled_weights(folder), dtype)
    elif library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        if component == "scheduler":
            return cls.from_pretrained(folder)
        model = cls.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=True,
                                    variant=variant)
    else:
        import transformers

        cls = getattr(transformers, class_name)
        if component == "tokenizer":
            return cls.from_pretrained(folder, trust_remote_code=False)
        model = cls.from_pretrained(folder, use_safetensors=True, dtype=dtype, trust_remote_code=False, variant=variant)
    check_finite(model, info)
    return model


def check_finite(model, info: ComponentInfo) -> None:
    """A ValueError naming the first parameter or buffer of `model` holding NaN or inf, and its file."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            file = (info.weights or {}).get(name, (info.folder, None))[0]
            raise ValueError(f"{file}: tensor {name} holds non-finite values (NaN or inf); the weights are damaged")
