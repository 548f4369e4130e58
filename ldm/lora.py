"""LoRA (Hu et al. 2022) adapters on a pipeline: loading them, and AUTOMATIC1111's way of naming them.

Loading, scaling, fusing and the two file formats (diffusers/peft keys, and kohya's `lora_unet_…` /
`lora_te_…` keys with `alpha`, which AUTOMATIC1111 and ComfyUI trade) are diffusers' own
(`StableDiffusionLoraLoaderMixin`, over peft), so a file gives the same images here as in diffusers.
What this module adds: nothing pickled is read, keys that map to no module of this model are an
error naming them (diffusers only logs them), each adapter's file hash for the PNG's `Lora hashes`,
and the prompt tags `<lora:NAME:SCALE>`, resolved by name inside a folder, never as a path. For
training (`ldm-train-unet` with `lora.enabled`): the adapters a config asks for (`add_adapters`)
and the one writer of LoRA files in both formats (`write_lora`), with each adapter's own alpha.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
WORDS_KEY = "ldm.training_words"  # header entry: the words of the captions a LoRA was trained on (space-separated)


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


def apply_loras(pipe, loras: list[tuple[Path, float]]) -> None:
    """Load each (file, scale) into `pipe` as an adapter named by the file's stem, all active at their scales."""
    for path, _ in loras:
        pipe.load_lora_weights(path, adapter_name=Path(path).stem)
    if loras:
        pipe.set_adapters([Path(path).stem for path, _ in loras], [scale for _, scale in loras])


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
        if prefix == "text_encoder" and rest.startswith("text_model.") and "text_model" not in modules.get(prefix, ()):
            rest = rest[len("text_model."):]  # transformers 5's CLIPTextModel has no such level; its loader maps it
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


# A CLIP text encoder's attention projections: the only text encoder whose adapters diffusers' loader
# reads (a BERT or T5 one fails there with "Could not automatically infer state dict type").
CLIP_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_CONV_TARGETS = ("conv1", "conv2")  # the ResNet blocks' two 3×3 convolutions


def add_adapters(unet, text_encoder, *, rank: int, alpha: float, target_modules, conv: bool, on_text_encoder: bool,
                 dropout: float = 0.0, adapter_name: str = "default") -> dict:
    """New LoRA adapters (peft's `LoraConfig`, diffusers' `add_adapter`) on a frozen U-Net, and on
    the text encoder's attention with `on_text_encoder`: ΔW = (alpha / rank) · B A with A Gaussian
    and B = 0, so training starts from the base model's own function (Hu et al. 2022, §4.1).
    Every base weight is frozen; only A and B train. Returns {network: module} of the adapted ones."""
    from peft import LoraConfig

    targets = list(target_modules) + (list(UNET_CONV_TARGETS) if conv else [])
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                init_lora_weights="gaussian"), adapter_name=adapter_name)
    adapted = {"unet": unet}
    if on_text_encoder:
        from peft import inject_adapter_in_model

        kind = text_encoder.config.model_type
        if kind != "clip_text_model":
            raise ValueError(f"lora.text_encoder: diffusers' LoRA loader reads text-encoder adapters of CLIP text "
                             f"encoders only, and this model's is {kind}; train the U-Net's adapters alone")
        # peft's own injection: transformers' add_adapter asks for a newer peft than PyPI has
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(CLIP_TEXT_TARGETS),
                            init_lora_weights="gaussian")
        inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
        adapted["text_encoder"] = text_encoder
    return adapted


def write_lora(path, networks: dict, adapter_name: str, lora_format: str = "diffusers", words=None) -> Path:
    """Write adapter `adapter_name` of `networks` ({"unet": ..., "text_encoder": ...}; those
    without it are skipped) as one `.safetensors` file.

    diffusers: peft's keys under `unet.` / `text_encoder.`, with each network's LoRA config in the
    header (diffusers' `lora_adapter_metadata`), so an alpha other than the rank loads right.
    kohya: diffusers' own `convert_state_dict_to_kohya`, with two corrections: its `.alpha` entries
    (it writes the rank) are the adapter's alpha, as kohya's scale is alpha / rank; and a CLIP text
    encoder's keys are SD 1.x's `lora_te_text_model_…`, as AUTOMATIC1111 reads them (diffusers writes
    SDXL's `lora_te1_`, without the `text_model` level that transformers 5 no longer has).
    `words`: the training captions' vocabulary, kept in the header (WORDS_KEY), so that a pipeline
    with the adapter active does not warn about the words it taught."""
    import torch
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    if lora_format not in ("diffusers", "kohya"):
        raise ValueError(f"unknown LoRA format {lora_format!r}; choose diffusers or kohya")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA file is written as .safetensors")
    layers, configs = {}, {}
    for network, module in networks.items():
        if adapter_name in (getattr(module, "peft_config", None) or {}):
            layers[network] = get_peft_model_state_dict(module, adapter_name=adapter_name)
            configs[network] = module.peft_config[adapter_name]
    if not layers:
        raise ValueError(f"no adapter named {adapter_name!r} to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    if lora_format == "diffusers":
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            path.parent, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
            weight_name=path.name, **{f"{network}_lora_adapter_metadata": config.to_dict()
                                      for network, config in configs.items()})
        if words:  # diffusers' writer takes no header entries of ours: add them to the file it wrote
            with safe_open(path, "pt") as f:
                tensors, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
            save_file(tensors, path, metadata={**header, WORDS_KEY: " ".join(sorted(words))})
        return path
    peft = {f"{network}.{k}": v for network, part in layers.items() for k, v in part.items()}
    kohya = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        if key.startswith("lora_te1_"):  # diffusers writes SDXL's first-encoder prefix; SD 1.x's is lora_te_text_model_
            rest = key[len("lora_te1_"):]
            key = "lora_te_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)
        if key.endswith(".alpha"):
            value = torch.tensor(float(configs["text_encoder" if key.startswith("lora_te") else "unet"].lora_alpha))
        kohya[key] = value
    header = {WORDS_KEY: " ".join(sorted(words))} if words else None
    save_file({k: v.contiguous() for k, v in kohya.items()}, path, metadata=header)
    return path


def lora_words(path) -> frozenset[str]:
    """The training vocabulary a LoRA file's header lists (WORDS_KEY); empty when it lists none."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return frozenset((f.metadata() or {}).get(WORDS_KEY, "").split())


def caption_words(path) -> frozenset[str]:
    """Every word (lower-cased runs of letters and digits, as the pipeline's unseen-word check reads
    prompts) of every caption in a dataset, read from its metadata without decoding an image."""
    from ldm.data.datasets import iter_raw_samples

    words: set[str] = set()
    _, samples, _ = iter_raw_samples(path)
    for sample in samples:
        for caption in sample.captions()[0]:
            words.update(re.findall(r"[^\W_]+", caption.lower()))  # ldm.pipeline._WORD's runs
    return frozenset(words)

