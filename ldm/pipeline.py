"""`LatentPipeline`: text → image with a latent diffusion model, in the diffusers layout.

A call reads as its phases (Rombach et al. 2022, §3–4); what it asks for is checked, and what it
returns is built, in `ldm.request`; an edit's pictures are prepared in `prepare_edit` and its
math is `ldm.editing`:
  1. encode the prompts c and the negative/empty prompts c_∅ with the text encoder;
  2. draw the initial latent noise on the CPU, one generator per image, from the image's seed, so
     an image depends only on its seed and settings, never on the device or the batch it is in;
  3. denoise with classifier-free guidance, ε̂ = ε_∅ + w(ε_c − ε_∅), both halves in one U-Net call;
  4. decode ẑ_0 with the VAE decoder, D(ẑ_0 / s), s being the VAE config's own `scaling_factor`;
  5. convert to PIL images.
The keyword names are those of diffusers' StableDiffusionPipeline, so one can swap for the other.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ldm.assets import asset_path
from ldm.budget import check_fits, estimate
from ldm.editing import (
    DEFAULT_JUMP_LENGTH, DEFAULT_JUMP_SAMPLES, DEFAULT_MASKED_PADDING, DEFAULT_STRENGTH, REPAINT_DEFAULT_SAMPLER, Edit,
    Replacement, Resampling, check_inpainting,
    check_mask_options, check_outpaint, check_strength, crop_region, encode_images, fill_masked, gaussian_blur,
    outpaint_canvas, jump_schedule, latent_mask, masked_image_latents, noised_latents, sdedit_timesteps,
    unet_takes_mask,
)
from ldm.guidance import default_guidance_rescale
from ldm.lora import prompt_tags
from ldm.quiet import library_quiet
from ldm.models import HUB_ID, WEIGHTED, check_variant, inspect_pipeline, load_component, resolve_model, stored_dtype
from ldm.sampling import (
    DEFAULT_STEPS, Guidance, GuidedDenoiser, denoise, legacy_fixups, make_scheduler, resolve_sampler, sampler_of,
    set_timesteps, weak_sampler_warning,
)
from ldm.restoration import Operator, Restoration
from ldm.request import (  # noqa: F401 (re-exported: the names callers know from ldm.pipeline)
    MAX_SEED, LatentPipelineOutput, check_generation_args, check_prompts, check_seeds, infotext,
)
from ldm.text import LdmWarning, PromptEncoder
from ldm.train.distill import check_built_in_guidance, check_student, read_card, write_card

# The embedded default model (trained by this project on the shapes world) lives here once shipped.
DEFAULT_MODEL = asset_path("default-model")
# A model folder may list the words its captions used in training, one per line; prompts with
# other words then get one warning (the default model knows only the shapes world's 32 words).
TRAINING_WORDS = "training_words.txt"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
ATTENTION_BACKENDS = ("sdpa", "xformers")
# Above this many pixels an image decodes in tiles (vae_tiling="auto"): an SD VAE decoding a
# 2048×2048 image whole needs tens of GB of activations, in 512-pixel tiles a fixed ~1/16 of that.
VAE_TILING_PIXELS = 1024 * 1024


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None → the first CUDA GPU if there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto"/None → fp32 on the CPU; on a GPU bf16 where supported (fp32's range: no overflow), else fp16."""
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU (slow and inexact there); use fp32 or bf16")
    return resolved


def vae_dtype_for(dtype: torch.dtype, vae_config) -> torch.dtype:
    """The VAE's dtype beside networks in `dtype`: fp32 instead of fp16 when its config says it
    overflows there (`force_upcast`, true for SD's VAE), so fp16 never decodes to NaN."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype


class LatentPipeline(StableDiffusionLoraLoaderMixin):
    """Text-to-image with a latent diffusion model: U-Net, KL autoencoder, text encoder, scheduler.
    LoRA adapters load, scale and fuse with diffusers' own methods and names (`load_lora_weights`,
    `set_adapters`, `fuse_lora`, `unfuse_lora`, ...; see `ldm.lora`)."""

    hf_device_map = None  # what diffusers' LoRA loader asks of a pipeline: no device map here

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, name_or_path: str = ""):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler  # the training scheduler: samplers are built from its config
        self.name_or_path = str(name_or_path)
        self.weights_files: list[Path] = []  # the U-Net's weights, or the single file: what "Model hash" hashes
        self._model_hash: str | None = None
        self.stored_dtypes: dict[str, torch.dtype | None] = {}  # each network's dtype in the folder it came from
        self._warned: set = set()  # warnings given once per pipeline (a size, a sampler)
        self.prompt_encoder = PromptEncoder(text_encoder, tokenizer)
        self.training_words: frozenset[str] | None = None  # see TRAINING_WORDS; None: unknown, no check
        self.student: dict | None = None  # a distilled student's card (ldm.train.distill.STUDENT_CARD)
        self.lora_dir: Path | None = None  # where <lora:NAME:SCALE> prompt tags are looked up
        self.lora_files: dict[str, Path] = {}  # adapter name -> the file it came from (for "Lora hashes")
        self.lora_words: dict[str, frozenset[str]] = {}  # adapter name -> the words it was trained on (its header)
        self.lora_scales: dict[str, float] = {}  # adapter name -> scale, as set_adapters last set it
        self._scales_before_tags: dict[str, float] | None = None  # restored when the next call starts

    # ---- loading and saving ------------------------------------------------------------------

    @property
    def components(self) -> dict:
        """The five parts by name, as diffusers' pipelines list them."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "scheduler": self.scheduler}

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """diffusers' `load_lora_weights` (diffusers/peft or kohya keys), with a `.safetensors` file
        only (never a pickle), every key checked to map to a module of this model, and the
        adapter made active at scale 1 beside those already active."""
        from ldm.lora import check_lora_keys, lora_words
        from ldm.models import PICKLE_SUFFIXES, check_safetensors

        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            path = Path(source)
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise ValueError(f"{path}: pickled LoRA files are refused (loading a pickle can run code); use its "
                                 ".safetensors release")
            if not path.is_file():
                raise FileNotFoundError(f"LoRA file not found: {path}")
            check_safetensors(path)  # a regular file with an honest header, or a ValueError naming it
        name = adapter_name or (f"default_{len(self.lora_files)}" if isinstance(source, dict) else Path(source).stem)
        if name in self.lora_files:
            raise ValueError(f"an adapter named {name!r} is loaded already; pass another adapter_name")
        with library_quiet():
            state_dict, _ = self.lora_state_dict(source if isinstance(source, dict) else str(source), **kwargs)
        modules = {"unet": {n for n, _ in self.unet.named_modules()},
                   "text_encoder": {n for n, _ in self.text_encoder.named_modules()}}
        check_lora_keys(state_dict, modules, str(source) if not isinstance(source, dict) else "the state dict")
        try:
            with library_quiet():
                # from the file again, not the dict: only the file's header has the adapters' alpha
                super().load_lora_weights(source if isinstance(source, dict) else str(source), adapter_name=name,
                                          **kwargs)
        except (RuntimeError, ValueError, KeyError) as e:
            reason = " ".join(str(e).split())
            raise ValueError(f"{source if not isinstance(source, dict) else 'the LoRA'} does not fit this model: "
                             f"{reason[:300]}") from None
        self.lora_files[name] = None if isinstance(source, dict) else Path(source)
        self.lora_words[name] = frozenset() if isinstance(source, dict) else lora_words(source)
        self.set_adapters(list(self.lora_scales) + [name], list(self.lora_scales.values()) + [1.0])

    def save_lora(self, path: str | os.PathLike, adapter_name: str | None = None,
                  lora_format: str = "diffusers") -> Path:
        """Write one loaded adapter as a `.safetensors` file: diffusers/peft keys (`load_lora_weights`
        in diffusers reads it), or kohya's `lora_unet_…`/`lora_te_…` keys with `alpha` (diffusers'
        own `convert_state_dict_to_kohya`), which AUTOMATIC1111 and ComfyUI read."""
        from ldm.lora import write_lora

        name = adapter_name or (next(iter(self.lora_files)) if len(self.lora_files) == 1 else None)
        if name not in self.lora_files:
            loaded = ", ".join(self.lora_files) or "none"
            raise ValueError(f"name the adapter to save (adapter_name); loaded: {loaded}")
        return write_lora(path, {"unet": self.unet, "text_encoder": self.text_encoder}, name, lora_format)

    def set_adapters(self, adapter_names, adapter_weights=None):
        """diffusers' `set_adapters`, with the scales checked (finite numbers) and remembered for the PNG."""
        from ldm.lora import check_scale

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.lora_files]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(self.lora_files) or 'none'}")
        weights = [1.0] * len(names) if adapter_weights is None else (
            [adapter_weights] * len(names) if not isinstance(adapter_weights, (list, tuple)) else list(adapter_weights))
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} adapter weights for {len(names)} adapters")
        weights = [check_scale(w, f"the scale of adapter {n!r}") for n, w in zip(names, weights)]
        with library_quiet():
            super().set_adapters(names, weights)
        self.lora_scales = dict(zip(names, weights))

    def delete_adapters(self, adapter_names):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().delete_adapters(names)
        for n in names:
            self.lora_files.pop(n, None)
            self.lora_scales.pop(n, None)
            self.lora_words.pop(n, None)

    def unload_lora_weights(self, *args, **kwargs):
        super().unload_lora_weights(*args, **kwargs)
        self.lora_files, self.lora_scales, self.lora_words = {}, {}, {}

    def use_prompt_loras(self, prompts: list[str]) -> list[str]:
        """AUTOMATIC1111's `<lora:NAME:SCALE>` tags: each NAME loaded from `lora_dir` (once), the
        adapters set to the tags' scales for this call; the prompts returned without their tags.
        Every prompt of a call must name the same LoRAs (they share the U-Net's weights). The tags
        apply to their call only: the next call starts from the adapters as they were set before."""
        from ldm.lora import prompt_tags, resolve_tag

        if self._scales_before_tags is not None:  # the last call's tags applied to it alone
            before, self._scales_before_tags = self._scales_before_tags, None
            names = list(before) or list(self.lora_scales)
            self.set_adapters(names, list(before.values()) or [0.0] * len(names))
        cleaned, tag_sets = zip(*(prompt_tags(p) for p in prompts))
        if not any(tag_sets):
            return list(prompts)
        self._scales_before_tags = dict(self.lora_scales)
        if any(sorted(t) != sorted(tag_sets[0]) for t in tag_sets):
            raise ValueError("the prompts of one call name different <lora:...> tags; draw them in separate calls")
        for name, _ in tag_sets[0]:
            if name not in self.lora_files:
                self.load_lora_weights(resolve_tag(name, self.lora_dir), adapter_name=name)
        names = [n for n, _ in tag_sets[0]]
        self.set_adapters(names, [s for _, s in tag_sets[0]])
        return list(cleaned)

    def lora_hashes(self) -> str | None:
        """AUTOMATIC1111's `Lora hashes` field: "name: hash, ..." of the active adapters with a file."""
        from ldm.lora import file_hash

        active = [(n, self.lora_files.get(n)) for n, scale in self.lora_scales.items() if scale]
        return ", ".join(f"{n}: {file_hash(f)}" for n, f in active if f is not None) or None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attention: str = "sdpa",
        allow_pickle: bool = False,
        variant: str | None = None,
    ) -> "LatentPipeline":
        """Load a diffusers-layout pipeline folder (any SD 1.x/2.x folder), or a hub id if reachable or cached.

        With no argument, loads the embedded default model. `device` and `dtype` default to "auto"
        (the GPU in bf16/fp16 if there is one, else the CPU in fp32); `attention` is "sdpa" (torch's
        scaled-dot-product attention) or "xformers". `allow_pickle=True` accepts components whose
        weights are only pickle files (`.bin`, `.ckpt`, ...), read by torch's weights-only unpickler,
        which builds tensors and nothing else; without it they are refused. `variant` ("fp16")
        loads diffusers' variant files (`diffusion_pytorch_model.fp16.safetensors`, ...).
        """
        if pretrained_model_name_or_path is None:
            if not DEFAULT_MODEL.is_dir():
                raise FileNotFoundError(
                    f"the default model is missing from this installation (expected at {DEFAULT_MODEL}); pass a diffusers pipeline folder, e.g. "
                    "LatentPipeline.from_pretrained('path/to/pipeline') or ldm-txt2img --model PATH"
                )
            pretrained_model_name_or_path = DEFAULT_MODEL
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if attention == "xformers":
            _check_xformers(device)
        path = resolve_model(pretrained_model_name_or_path)
        info = inspect_pipeline(path, allow_pickle=allow_pickle, variant=variant)
        parts = {c: load_component(info.path / c, c, info.classes[c], dtype if c in WEIGHTED else None,
                                   allow_pickle=allow_pickle, checked=info.components[c], variant=variant)
                 for c in info.classes}
        parts["scheduler"] = legacy_fixups(parts["scheduler"])  # older SD folders, as diffusers loads them
        pipe = cls(name_or_path=str(pretrained_model_name_or_path), **parts)
        pipe.weights_files = sorted({file for file, _ in (info.components["unet"].weights or {}).values()})
        pipe.stored_dtypes = {c: stored_dtype(info.components[c]) for c in WEIGHTED}
        pipe.training_words = read_training_words(info.path)
        pipe.student = read_card(info.path)
        pipe.to(device, dtype)
        pipe.set_attention(attention)
        return pipe

    @classmethod
    def from_single_file(
        cls,
        checkpoint: str | os.PathLike,
        *,
        config: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attention: str = "sdpa",
    ) -> "LatentPipeline":
        """Load an original-format (CompVis / A1111) single-file `.safetensors` checkpoint.

        The conversion is diffusers' (`from_single_file`), run offline: `config` is a diffusers
        pipeline folder of the same architecture, whose component configs, scheduler and tokenizer
        are used; without one, diffusers looks the architecture up in the local Hugging Face cache.
        Pickle checkpoints (`.ckpt`) are refused. `save_pretrained` then writes the folder layout.
        """
        from ldm.models import PICKLE_SUFFIXES, ComponentInfo, check_finite, check_safetensors, file_problem

        path = Path(checkpoint)
        if file_problem(path) == "missing":
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: pickle checkpoints are refused (loading a pickle can run code); use the .safetensors release of the model")
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors checkpoint")
        keys = list(check_safetensors(path))  # a regular file with an honest header, or a ValueError naming it
        if not any(k.startswith("model.diffusion_model.") for k in keys):
            raise ValueError(f"{path}: not an original-format Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
        if config is not None:
            config = inspect_pipeline(resolve_model(config)).path
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)

        from diffusers import StableDiffusionPipeline

        try:
            with library_quiet():  # its notices (e.g. a scheduler config dumped whole) concern diffusers' own pipeline
                sd = StableDiffusionPipeline.from_single_file(
                    str(path), config=str(config) if config else None, local_files_only=True, torch_dtype=dtype,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                )
        except Exception as e:  # diffusers raises many kinds; all mean "could not convert offline"
            hint = "" if config else "; pass config=<a diffusers pipeline folder of the same architecture> (--config)"
            reason = " ".join(str(e).split())  # diffusers' messages span lines; ours are one
            raise ValueError(f"{path}: diffusers could not convert this checkpoint offline ({type(e).__name__}: {reason}){hint}") from None
        for network in (sd.unet, sd.vae, sd.text_encoder):
            check_finite(network, ComponentInfo(path, {}))
        pipe = cls(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, sd.scheduler, name_or_path=str(path))
        pipe.weights_files = [path]  # A1111's "Model hash" of the same file
        pipe.to(device, dtype)
        pipe.set_attention(attention)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, *, torch_dtype: str | torch.dtype | None = None,
                        variant: str | None = None) -> Path:
        """Write the diffusers Stable Diffusion layout (safetensors), loadable by diffusers too.

        Each network is written in the dtype its weights had in the folder it was loaded from (a
        float16 folder stays float16, whatever it was computed in), or in `torch_dtype` ("fp16",
        torch.float16, ...) when given, or as it is for a pipeline built from objects. `variant`
        ("fp16") names the files as diffusers does (`diffusion_pytorch_model.fp16.safetensors`).
        The folder is assembled beside the target and renamed into place, so an interrupted save
        never leaves a half-written pipeline where a complete one is expected.
        """
        import diffusers

        check_variant(variant)
        wanted = None
        if torch_dtype is not None:
            wanted = torch_dtype if isinstance(torch_dtype, torch.dtype) else DTYPES.get(torch_dtype)
            if wanted is None:
                raise ValueError(f"unknown torch_dtype {torch_dtype!r}; use fp32, fp16, bf16 or a torch.dtype")
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for name in WEIGHTED:
                network = getattr(self, name)
                dtype = wanted or self.stored_dtypes.get(name) or network.dtype
                if dtype != network.dtype:  # a copy: the pipeline keeps computing in its own dtype
                    with library_quiet():  # diffusers' notice about casting with .to() concerns inference, not a save
                        network = copy.deepcopy(network).to(dtype)
                network.save_pretrained(tmp / name, safe_serialization=True, variant=variant)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.scheduler.save_pretrained(tmp / "scheduler")
            index = {
                "_class_name": "StableDiffusionPipeline",  # so diffusers.DiffusionPipeline loads it as SD
                "_diffusers_version": diffusers.__version__,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
            }
            for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae"):
                obj = getattr(self, name)
                index[name] = ["diffusers" if type(obj).__module__.startswith("diffusers") else "transformers", type(obj).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            if self.student is not None:
                write_card(tmp, self.student)
            if self.training_words is not None:
                (tmp / TRAINING_WORDS).write_text("".join(w + "\n" for w in sorted(self.training_words)), encoding="utf-8")
            inspect_pipeline(tmp, variant=variant)  # what we wrote must be what we load
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                os.replace(target, old / "pipeline")
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return target

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LatentPipeline":
        """Move to `device`; cast the networks to `dtype`. In fp16 the VAE stays in fp32 when its
        config says it overflows there (`force_upcast`, true for SD's VAE): no NaN black images."""
        device = resolve_device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        vae_dtype = vae_dtype_for(dtype, self.vae.config)
        for module, module_dtype in ((self.unet, dtype), (self.text_encoder, dtype), (self.vae, vae_dtype)):
            # Cast only when needed: diffusers warns on every dtype cast, even a no-op one.
            module.to(device) if module.dtype == module_dtype else module.to(device, module_dtype)
        return self

    def set_attention(self, backend: str = "sdpa") -> None:
        """Choose the attention kernels: torch's SDPA (default; flash/memory-efficient where the
        device has them) or xformers' memory-efficient attention."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        if backend == "xformers":
            _check_xformers(self.device)
            self.unet.enable_xformers_memory_efficient_attention()
            self.vae.enable_xformers_memory_efficient_attention()
        elif backend == "sdpa":
            self.unet.set_attn_processor(AttnProcessor2_0())
            self.vae.set_attn_processor(AttnProcessor2_0())
        else:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")

    def optimize(self, *, channels_last: bool = False, fuse_qkv: bool = False, compile: bool = False) -> "LatentPipeline":
        """Inference speed levers (same images up to float rounding; for sampling, not training):
        channels_last: NHWC memory layout for the convolutions of the U-Net and VAE (cuDNN's and
          oneDNN's fast path); fuse_qkv: one matrix product for the query/key/value projections of
          every self-attention (diffusers' fuse_qkv_projections); compile: torch.compile the U-Net,
          with CUDA graphs on a GPU ("reduce-overhead"), with weight freezing on the CPU (the
          weights become constants of the compiled graph: re-run optimize after changing them).
          Compiling costs seconds to minutes the first time each batch shape is seen, so it pays
          off over many images (--prompts-file)."""
        if fuse_qkv:
            self.unet.fuse_qkv_projections()
            self.vae.fuse_qkv_projections()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            if self.device.type == "cuda":
                self.unet = torch.compile(self.unet, mode="reduce-overhead", fullgraph=True)
            else:  # inductor's freezing folds the (fixed) weights into the graph: ~1.8× on a small U-Net
                self.unet = torch.compile(self.unet, fullgraph=True, options={"freezing": True})
        return self

    @property
    def model_name(self) -> str:
        """The model's name for PNG metadata: its folder's (or checkpoint's) name, or a hub id; never
        a local path, which would travel with every picture shared."""
        if not self.name_or_path:
            return "unnamed"
        path = Path(self.name_or_path)
        if not path.exists() and HUB_ID.match(self.name_or_path):
            return self.name_or_path
        return path.stem if path.suffix == ".safetensors" else path.name

    @property
    def model_hash(self) -> str | None:
        """AUTOMATIC1111's short model hash: the first 10 hex digits of the SHA-256 of the weights
        (the U-Net's file(s); for a single-file checkpoint, that file, exactly as A1111 hashes it).
        Computed once, at the first image; None for a pipeline built from objects."""
        if self._model_hash is None and self.weights_files:
            digest = hashlib.sha256()
            for file in self.weights_files:
                with open(file, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
            self._model_hash = digest.hexdigest()[:10]
        return self._model_hash

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell: 8 for SD's VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def inpainting_unet(self) -> bool:
        """Whether the U-Net reads a mask and a masked image beside the latents (`ldm.editing.unet_takes_mask`)."""
        return unet_takes_mask(self.unet.config.in_channels, self.vae.config.latent_channels)

    @property
    def default_size(self) -> int:
        sample_size = self.unet.config.sample_size
        return (sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size) * self.latent_factor

    # ---- the phases of a call ----------------------------------------------------------------

    def check_embeddings(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """(prompt_embeds, negative_prompt_embeds or None) as the U-Net's dtype and device, or None when
        prompts are given as text; a ValueError for both or neither, or embeddings of the wrong shape."""
        if prompt_embeds is None:
            if negative_prompt_embeds is not None:
                raise ValueError("negative_prompt_embeds needs prompt_embeds (or pass negative_prompt as text)")
            return None
        if prompt is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        width = self.unet.config.cross_attention_dim
        for name, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if e is None:
                continue
            if not isinstance(e, torch.Tensor) or e.dim() != 3 or e.shape[-1] != width or not len(e):
                shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise ValueError(f"{name} must be a tensor (batch, tokens, {width}) for this U-Net, got {shape}")
        if negative_prompt_embeds is not None:
            if negative_prompt is not None:
                raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                                 f"prompt_embeds {tuple(prompt_embeds.shape)}")
        to = dict(device=self.device, dtype=self.dtype)
        return prompt_embeds.to(**to), None if negative_prompt_embeds is None else negative_prompt_embeds.to(**to)

    def check_callback(self, callback, tensor_inputs):
        """diffusers' `callback_on_step_end(pipe, i, t, {name: tensor})` as (i, t, latents, cond, uncond)
        → latents; None without one; a ValueError for a callback or a tensor name it cannot have."""
        if callback is None:
            return None
        if not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        allowed = ("latents", "prompt_embeds", "negative_prompt_embeds")
        unknown = [name for name in tensor_inputs if name not in allowed]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {', '.join(map(repr, unknown))} not available; "
                             f"choose from {', '.join(allowed)}")

        def step(i, t, latents, cond, uncond):
            tensors = {"latents": latents, "prompt_embeds": cond, "negative_prompt_embeds": uncond}
            returned = callback(self, i, t, {name: tensors[name] for name in tensor_inputs})
            if returned is not None and not isinstance(returned, dict):
                raise ValueError(f"callback_on_step_end must return a dict (or None), got {type(returned).__name__}")
            return (returned or {}).get("latents", latents)

        return step

    def make_scheduler(self, sampler: str | None):
        """A fresh scheduler for `sampler` on the model's noise schedule; None: a copy of the
        pipeline's own scheduler (a class we have no name for, run as its folder configures it)."""
        if sampler is None:
            return type(self.scheduler).from_config(self.scheduler.config)
        return make_scheduler(sampler, self.scheduler.config)

    def encode_prompts(self, prompts: Sequence[str], clip_skip: int | None = None) -> torch.Tensor:
        """Text embeddings (B, L, D), each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        embeds = self.prompt_encoder.encode(unique, clip_skip)  # (U, L, D)
        return embeds[[unique.index(p) for p in prompts]]

    def initial_noise(self, generator, batch: int, height: int, width: int) -> torch.Tensor:
        """Standard normal latents drawn on the CPU (per-image generators), then moved to the device."""
        from diffusers.utils.torch_utils import randn_tensor

        f = self.latent_factor
        shape = (batch, self.vae.config.latent_channels, height // f, width // f)  # (B, C, H/f, W/f)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def initial_latents(self, scheduler, generator, batch: int, height: int, width: int, num_inference_steps: int,
                        images: torch.Tensor | None = None, strength: float = 1.0, masks: torch.Tensor | None = None,
                        inpaint_method: str = "replace", jump_length: int = DEFAULT_JUMP_LENGTH,
                        jump_samples: int = DEFAULT_JUMP_SAMPLES, custom_steps: tuple = (None, None)):
        """(latents, timesteps, constraint, unet_extra): where the reverse process starts, the steps it
        runs, what holds after each step, and what an inpainting U-Net reads beside the latents.

        Without images: N(0, I) noise at the sampler's initial σ, all N steps. With images ((B, 3, H,
        W) in [−1, 1]), SDEdit: their latents noised to where the last ⌊N·s⌋ steps begin. With masks
        too ((B, 1, H, W), 1 = repaint), inpainting: from pure noise at strength 1 (as diffusers);
        an ordinary U-Net has the known region held after each step by replacement, or by RePaint's
        resampling, whose timesteps go back and forth (`ldm.editing`); an inpainting U-Net instead
        reads the mask and the masked image's latents at every step, as diffusers runs it (with no
        mask it gets an all-repaint one: txt2img and SDEdit work with it too, as in AUTOMATIC1111)."""
        set_timesteps(scheduler, num_inference_steps, self.device, *custom_steps)  # custom: (timesteps, sigmas)
        inpainting_unet = self.inpainting_unet
        timesteps = scheduler.timesteps
        if images is not None:
            timesteps = sdedit_timesteps(scheduler, num_inference_steps, strength)
        z0 = None
        if images is not None and not (inpainting_unet and masks is not None and strength == 1):  # diffusers' draws
            z0 = encode_images(self.vae, images.to(self.device, self.vae.dtype), generator).to(self.dtype)
        noise = self.initial_noise(generator, batch, height, width)  # after the posterior sample, as diffusers
        if z0 is None or (masks is not None and strength == 1):  # from pure noise
            start = noise * scheduler.init_noise_sigma
        else:
            start = noised_latents(scheduler, z0, noise, timesteps[:1])
        if inpainting_unet:
            if masks is None:  # all to be drawn: a mid-gray (blanked) picture under an all-white mask
                masks = torch.ones(batch, 1, height, width)
                images = torch.zeros(batch, 3, height, width)
            extra = masked_image_latents(self.vae, images.to(self.device, self.vae.dtype),
                                         masks.to(self.device, self.vae.dtype), generator)
            return start, timesteps, None, extra.to(self.dtype)
        if masks is None:
            return start, timesteps, None, None
        mask = latent_mask(masks.to(self.device), z0.shape[-2:], cover=inpaint_method == "repaint")  # (B, 1, h, w)
        if inpaint_method == "repaint":
            positions = jump_schedule(len(timesteps), jump_length, jump_samples)
            return start, timesteps[positions], Resampling(scheduler, z0, mask, timesteps, positions, generator), None
        return start, timesteps, Replacement(scheduler, z0, noise, mask, timesteps), None

    def prepare_edit(self, image, mask_image, count: int, height: int | None, width: int | None, *, mask_blur=0,
                     mask_invert=False, masked_content="original", inpaint_area="whole",
                     masked_padding=DEFAULT_MASKED_PADDING, outpaint=None) -> Edit:
        """The picture(s) to edit as an `ldm.editing.Edit` of `count` rows (one per prompt).

        Outpainting grows the canvas by `outpaint` (left, top, right, bottom) pixels, the right and
        bottom rounded up to the latent factor, and masks the new border. `mask_invert` swaps what is
        kept and repainted; `mask_blur` softens the edge the result is composited through;
        `masked_content` "fill" paints the masked part from its surroundings before encoding; with
        `inpaint_area` "masked" the box around each mask (grown by `masked_padding`) is drawn at
        height × width (default: the model's size) and pasted back (AUTOMATIC1111's "only masked")."""
        crops = inpaint_area == "masked"
        canvas = self.prepare_images(image, count, None if crops or outpaint else height,
                                     None if crops or outpaint else width)  # (count, 3, H, W)
        masks = None
        if outpaint is not None:
            if height is not None or width is not None:
                raise ValueError("outpaint sets the size (the picture plus its new border); leave height/width unset")
            f, (left, top, right, bottom) = self.latent_factor, check_outpaint(outpaint)
            H, W = canvas.shape[-2:]
            right, bottom = right + -(W + left + right) % f, bottom + -(H + top + bottom) % f
            canvas, masks = outpaint_canvas(canvas, (left, top, right, bottom))
        elif mask_image is not None:
            masks = self.prepare_masks(mask_image, count, *canvas.shape[-2:], invert=mask_invert)  # (count, 1, H, W)
        if masks is None:
            return Edit(canvas, canvas)
        source = fill_masked(canvas, masks) if masked_content == "fill" else canvas
        overlay = gaussian_blur(masks, mask_blur)
        if not crops:
            return Edit(canvas, source, masks, overlay)
        size = (height or self.default_size, width or self.default_size)
        regions = [crop_region(m[0], masked_padding, size[1], size[0]) for m in masks]
        resize = lambda x, box: torch.nn.functional.interpolate(  # noqa: E731
            x[None, :, box[1]:box[3], box[0]:box[2]], size=size, mode="bicubic", antialias=True)[0]
        crops_source = torch.stack([resize(x, box) for x, box in zip(source, regions)])
        crops_masks = torch.stack([(resize(m, box) >= 0.5).to(m.dtype) for m, box in zip(masks, regions)])
        return Edit(canvas, crops_source, crops_masks, overlay, regions)

    def prepare_masks(self, mask_image, count: int, height: int, width: int, invert: bool = False) -> torch.Tensor:
        """`mask_image` (white = repaint, black = keep; one, or one per prompt) as (count, 1, H, W)
        in {0, 1}, resized to the image's size (diffusers' mask processor: grayscale, binarized)."""
        for mask in mask_image if isinstance(mask_image, list) else [mask_image]:
            if hasattr(mask, "size") and not callable(mask.size) and tuple(mask.size) != (width, height):
                warnings.warn(f"mask_image is {mask.size[0]}x{mask.size[1]} but the image is {width}x{height}; "
                              "resizing the mask", LdmWarning, stacklevel=4)
        masks = self._preprocess("mask_image", "mask", mask_image, count, height, width, do_normalize=False,
                                 do_binarize=True, do_convert_grayscale=True)  # (count, 1, H, W)
        if invert:
            masks = 1 - masks
        if not masks.any():
            if invert:
                raise ValueError("mask_image selects nothing to repaint: with mask_invert, black (or 0) marks what to "
                                 "repaint, white what to keep")
            raise ValueError("mask_image selects nothing: white (or 1) marks what to repaint, black what to keep")
        return masks

    def prepare_images(self, image, count: int, height: int | None, width: int | None) -> torch.Tensor:
        """`image` (a PIL image, array or tensor, or a list of them, one per prompt) as a (count, 3,
        H, W) tensor in [−1, 1], resized to height × width; by default the first image's size rounded
        down to the latent factor (diffusers' VaeImageProcessor, so the pixels match diffusers')."""
        return self._preprocess("image", "image", image, count, height, width)  # (count, 3, H, W)

    def _preprocess(self, argument: str, noun: str, value, count: int, height: int | None, width: int | None,
                    **options) -> torch.Tensor:
        """`value` (one picture, or a list with one per prompt) through diffusers' VaeImageProcessor
        with `options`, as (count, C, H, W); a ValueError naming `argument` otherwise."""
        from diffusers.image_processor import VaeImageProcessor

        values = value if isinstance(value, list) else [value]
        if len(values) not in (1, count):
            raise ValueError(f"got {len(values)} {noun}s for {count} prompts; pass one {noun}, or one per prompt")
        try:
            tensor = VaeImageProcessor(vae_scale_factor=self.latent_factor, **options).preprocess(values, height=height,
                                                                                                  width=width)
        except (ValueError, TypeError, AttributeError) as e:
            reason = " ".join(str(e).split())[:160]
            what = "mask" if noun == "mask" else "picture"
            raise ValueError(f"{argument}: not a {what} diffusers' image processor can read ({reason})") from None
        return tensor.repeat(count, 1, 1, 1) if len(values) == 1 else tensor

    def uses_vae_tiling(self, height: int, width: int, vae_tiling: bool | str = "auto") -> bool:
        """Whether images of this size decode tile by tile: "auto" tiles above VAE_TILING_PIXELS."""
        if vae_tiling == "auto":
            return height * width > VAE_TILING_PIXELS
        if isinstance(vae_tiling, bool):
            return vae_tiling
        raise ValueError(f"vae_tiling must be 'auto', True or False, got {vae_tiling!r}")

    def _vae_decode(self, z: torch.Tensor, tiled: bool) -> torch.Tensor:
        vae = self.vae
        if not tiled or (z.shape[-1] <= vae.tile_latent_min_size and z.shape[-2] <= vae.tile_latent_min_size):
            return vae.decode(z, return_dict=False)[0]  # one tile or less: diffusers decodes it whole too
        # One image at a time, each in overlapping tiles of the VAE's own sample size blended
        # across the overlap: diffusers' AutoencoderKL.tiled_decode, so the seams are exactly
        # diffusers' and the decoder's working memory is that of one tile whatever the image size.
        return torch.cat([vae.tiled_decode(z[i:i + 1], return_dict=False)[0] for i in range(len(z))])

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z / s + shift) in one piece, keeping autograd's graph: reconstruction guidance
        differentiates the decoded image with respect to the latents (`ldm.restoration`)."""
        config = self.vae.config
        z = latents.to(self.vae.dtype) / config.scaling_factor
        if config.get("shift_factor") is not None:
            z = z + config.shift_factor
        return self.vae.decode(z, return_dict=False)[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, vae_tiling: bool | str = "auto") -> torch.Tensor:
        """x = D(z / s + shift): images in [−1, 1], (B, 3, H, W). s and shift from the VAE config.
        Large images decode tile by tile (see `uses_vae_tiling`)."""
        config = self.vae.config
        f = self.latent_factor
        tiled = self.uses_vae_tiling(latents.shape[-2] * f, latents.shape[-1] * f, vae_tiling)
        z = latents.to(self.vae.dtype) / config.scaling_factor
        if config.get("shift_factor") is not None:
            z = z + config.shift_factor
        image = self._vae_decode(z, tiled)
        if not torch.isfinite(image).all() and self.vae.dtype != torch.float32:
            previous = self.vae.dtype
            warnings.warn(f"the VAE overflowed in {previous}; decoding this batch in fp32 instead", LdmWarning, stacklevel=2)
            self.vae.to(torch.float32)
            try:
                image = self._vae_decode(z.float(), tiled)
            finally:
                self.vae.to(previous)
        if not torch.isfinite(image).all():
            raise FloatingPointError("the VAE decoder returned NaN/inf even in fp32; the latents are not finite (diverged sampling?)")
        return image

    def warn_once(self, key, condition: bool, message: str | None) -> None:
        """Warn (LdmWarning, attributed to the caller) the first time `condition` holds for `key`."""
        if condition and key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, LdmWarning, stacklevel=4)  # warn_once, __call__, torch.no_grad's wrapper, caller

    def unseen_words(self, prompts: Sequence[str]) -> list[str]:
        """The words of `prompts` (lower-cased runs of letters and digits) that are not in the
        model's training vocabulary (and that of the LoRAs active at a scale other than 0), in order
        of first use; [] when the model lists none."""
        if self.training_words is None:
            return []
        known = self.training_words.union(*(self.lora_words.get(n, ()) for n, s in self.lora_scales.items() if s))
        words = (w for p in prompts for w in _WORD.findall(p.lower()))
        return [w for w in dict.fromkeys(words) if w not in known]

    def warn_unseen_words(self, prompts: Sequence[str]) -> None:
        """One warning naming the prompt words the model never saw in training: it still draws a
        picture, but those words mean nothing to it."""
        unseen = self.unseen_words(prompts)
        if not unseen:
            return
        shown = ", ".join(repr(w) for w in unseen[:8]) + (f" and {len(unseen) - 8} more" if len(unseen) > 8 else "")
        is_default = Path(self.name_or_path).resolve() == DEFAULT_MODEL.resolve() if self.name_or_path else False
        model = "the default model (the shapes world: coloured circles, squares and triangles)" if is_default else f"the model {self.name_or_path or '(unnamed)'}"
        warnings.warn(
            f"{model} never saw {'this word' if len(unseen) == 1 else 'these words'} in training: {shown}; "
            "the picture ignores them. For a general-purpose model pass --model PATH "
            "(ldm-txt2img) or LatentPipeline.from_pretrained(PATH), e.g. a Stable Diffusion 1.x/2.x pipeline folder",
            LdmWarning,
            stacklevel=4,  # warn_unseen_words ← __call__ ← torch.no_grad's wrapper ← the caller
        )

    @staticmethod
    def to_images(image: torch.Tensor, output_type: str):
        """[−1, 1] tensors → PIL images, a float array in [0, 1] (B, H, W, 3), or a tensor in [0, 1]."""
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        from PIL import Image

        return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        sampler: str | None = None,
        guidance_rescale: float | None = None,
        eta: float = 0.0,
        dynamic_threshold: float | None = None,
        threshold_bound: float = 1.0,
        batch_size: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
        vae_tiling: bool | str = "auto",
        image=None,
        strength: float | None = None,
        mask_image=None,
        inpaint_method: str | None = None,
        jump_length: int | None = None,
        jump_samples: int | None = None,
        mask_blur: float = 0,
        mask_invert: bool = False,
        masked_content: str = "original",
        inpaint_area: str = "whole",
        masked_padding: int = DEFAULT_MASKED_PADDING,
        outpaint: tuple[int, int, int, int] | None = None,
        composite: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        cross_attention_kwargs: dict | None = None,
        restoration: Restoration | None = None,
    ) -> LatentPipelineOutput:
        """Generate images. Keyword names follow diffusers' StableDiffusionPipeline.

        seed: an int s gives image i the seed s + i (images are numbered prompt by prompt); a list
        gives each image its own; None draws one. Image i equals a run of that image alone with its
        seed. `generator` (diffusers' way) is the alternative: one torch.Generator, or one per image.
        guidance_scale: w in ε̂ = ε_∅ + w(ε_c − ε_∅); 0 samples the unconditional model, 1 the
        conditional one without guidance (unlike diffusers, which skips guidance for any w ≤ 1).
        A distilled student (`ldm-distill`) learnt the guided output: w goes in as an embedding and
        one U-Net call per step does it (no negative prompt, no rescale).
        num_inference_steps: None is DEFAULT_STEPS, or a distilled student's own count (its card's).
        guidance_rescale: φ of Lin et al. (2023); None: the model's default (0.7 for a model trained
        with zero terminal SNR, as Lin et al. prescribe, else 0; `ldm.guidance.default_guidance_rescale`).
        dynamic_threshold / threshold_bound: Imagen's dynamic thresholding of ẑ_0 (off by default).
        batch_size: images per U-Net batch (default: all at once); does not change the images.
        vae_tiling: decode in overlapping tiles ("auto": above VAE_TILING_PIXELS pixels), so any
        size decodes in a fixed memory budget; tiles are blended as in diffusers' VAE tiling.
        restoration: a measurement each step is corrected toward (`ldm.restoration.Restoration`);
        `restore` builds it and is the way to call it.
        """
        embeds = self.check_embeddings(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        written, negatives = check_prompts(prompt if embeds is None else [EMBEDDED] * len(embeds[0]), negative_prompt)
        prompts = self.use_prompt_loras(written)  # <lora:NAME:SCALE> tags: adapters set, tags removed
        self.prompt_encoder.check_clip_skip(clip_skip)
        if clip_skip is not None and embeds is not None and negative_prompt_embeds is not None:
            raise ValueError("clip_skip changes how prompts are encoded; with prompt_embeds and "
                             "negative_prompt_embeds given, nothing is encoded")
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass timesteps or sigmas, not both")
        if timesteps is not None or sigmas is not None:
            num_inference_steps = len(timesteps if timesteps is not None else sigmas)  # diffusers' rule
        if num_inference_steps is None:
            num_inference_steps = self.student["steps"] if self.student else DEFAULT_STEPS
        step_callback = self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise ValueError(f"cross_attention_kwargs must be a dict, got {type(cross_attention_kwargs).__name__}")
        if sampler is None:  # the scheduler the folder names (or pipe.scheduler), as diffusers; RePaint's own
            sampler = REPAINT_DEFAULT_SAMPLER if inpaint_method == "repaint" else sampler_of(self.scheduler)
        else:
            sampler = resolve_sampler(sampler)  # any name people type: "DDIM", "Euler a", "DPM++ 2M Karras"
        check_student(self.student, sampler, num_inference_steps)
        embedded = self.unet.config.get("time_cond_proj_dim") is not None  # a guidance-distilled student
        check_built_in_guidance(embedded, negatives, guidance_rescale)
        inpainting_unet = self.inpainting_unet  # also checks the U-Net is one of the two kinds
        inpainting = mask_image is not None or outpaint is not None
        if not inpainting and inpaint_method is not None:
            raise ValueError("inpaint_method applies to inpainting: pass mask_image (white = repaint)")
        if not inpainting and (jump_length is not None or jump_samples is not None):
            raise ValueError("jump_length and jump_samples apply to inpainting (mask_image with "
                             "inpaint_method='repaint')")
        check_mask_options(inpainting, mask_blur=mask_blur, mask_invert=mask_invert, masked_content=masked_content,
                           inpaint_area=inpaint_area, masked_padding=masked_padding, outpaint=outpaint)
        if image is None and inpainting:
            what, part = ("mask_image", "masked part") if mask_image is not None else ("outpaint", "border")
            raise ValueError(f"{what} needs image: the picture whose {part} is painted")
        if image is None and strength is not None:
            raise ValueError("strength applies to img2img and inpainting: pass image (strength would change nothing)")
        if outpaint is not None and mask_image is not None:
            raise ValueError("outpaint makes its own mask (the new border); pass mask_image or outpaint, not both")
        edit = None
        if image is not None:  # img2img (SDEdit) or inpainting: check the settings, then read and size the pictures
            if strength is None:  # diffusers' defaults
                strength = 1.0 if inpainting else DEFAULT_STRENGTH
            steps = num_inference_steps if isinstance(num_inference_steps, int) else 1  # checked below
            check_strength(strength, steps)
            if inpainting:
                inpaint_method = check_inpainting(inpaint_method, inpainting_unet, sampler, jump_length, jump_samples,
                                                  int(steps * strength))
            edit = self.prepare_edit(image, mask_image, len(prompts), height, width, mask_blur=mask_blur,
                                     mask_invert=mask_invert, masked_content=masked_content, inpaint_area=inpaint_area,
                                     masked_padding=masked_padding, outpaint=outpaint)
            height, width = edit.source.shape[-2:]  # the size drawn at
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        if guidance_rescale is None:
            guidance_rescale = 0.0 if embedded else default_guidance_rescale(self.scheduler.config)
        check_generation_args(
            latent_factor=self.latent_factor, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, sampler=sampler, guidance_rescale=guidance_rescale, eta=eta,
            num_images_per_prompt=num_images_per_prompt, batch_size=batch_size, dynamic_threshold=dynamic_threshold,
            threshold_bound=threshold_bound, scheduler_config=self.scheduler.config,
        )
        tiled = self.uses_vae_tiling(height, width, vae_tiling)  # checks the value before any work
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if edit is not None:
            edit = edit.repeat(num_images_per_prompt)
        if embeds is not None:
            embeds = tuple(e.repeat_interleave(num_images_per_prompt, dim=0) if e is not None else None for e in embeds)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]  # image order: prompt by prompt
        written = [p for p in written for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        n = len(prompts)
        if generator is not None and seed is not None:
            raise ValueError("pass seed or generator, not both")
        if generator is None:
            seeds: list[int | None] = check_seeds(seed, n)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        elif isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images; pass one, or one per image")
            seeds, generators = [None] * n, generator
        else:
            seeds, generators = [None] * n, None  # one shared generator: images depend on the batch

        rows = min(batch_size or n, n)
        need = estimate(self.unet.config, self.vae.config, height, width, rows, self.unet.dtype.itemsize,
                        self.vae.dtype.itemsize, tiled)
        what = f"a batch of {rows} image(s) of {width}x{height} (VAE tiling {'on' if tiled else 'off'})"
        hint = "use a smaller height/width" + (" or batch_size" if rows > 1 else "")
        hint += "" if tiled else ", or vae_tiling=True"
        check_fits(need, self.device, what, hint, include_weights=False)

        if embeds is None:
            self.prompt_encoder.warn_if_truncated(prompts)
            self.warn_unseen_words(prompts + negatives)
        self.warn_once(("size", height, width), (height, width) != (self.default_size, self.default_size),
                       f"the model was trained at {self.default_size}x{self.default_size} pixels; at {width}x{height} "
                       "it may repeat, stretch or break objects (the default model at 128x128 draws three circles for "
                       "'a red circle')")
        weak = weak_sampler_warning(sampler, self.scheduler.config, guidance_scale)
        self.warn_once(("sampler", sampler), weak is not None, weak)
        if self.student is not None:
            low, high = self.student["guidance_scale"]
            self.warn_once(("guidance", guidance_scale), not low <= guidance_scale <= high,
                           f"this student learnt CFG scales {_number(low)} to {_number(high)}; at {guidance_scale} "
                           "it extrapolates")
        guidance = Guidance(guidance_scale, guidance_rescale, dynamic_threshold, threshold_bound, embedded)
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        batch_size = batch_size or n
        outputs = []
        for start in range(0, n, batch_size):
            chunk = slice(start, start + batch_size)
            chunk_generator = generators[chunk] if generators is not None else generator
            cond = uncond = None
            if guidance.needs_cond:
                cond = self.encode_prompts(prompts[chunk], clip_skip) if embeds is None else embeds[0][chunk]
            if guidance.needs_uncond:
                given = embeds is not None and embeds[1] is not None
                uncond = embeds[1][chunk] if given else self.encode_prompts(negatives[chunk], clip_skip)
            scheduler = self.make_scheduler(sampler)
            pictures = (None, None)
            if edit is not None:
                pictures = (edit.source[chunk], None if edit.masks is None else edit.masks[chunk])
            latents, steps_run, constraint, unet_extra = self.initial_latents(
                scheduler, chunk_generator, len(prompts[chunk]), height, width, num_inference_steps, pictures[0],
                strength, pictures[1], inpaint_method, jump_length or DEFAULT_JUMP_LENGTH,
                jump_samples or DEFAULT_JUMP_SAMPLES, custom_steps=(timesteps, sigmas),
            )
            denoiser = GuidedDenoiser(self.unet, cond, uncond, guidance, prediction_type, scheduler.alphas_cumprod,
                                      unet_extra, cross_attention_kwargs)
            if restoration is not None:  # the measurement's correction: around the denoiser and after each step
                denoiser, constraint = restoration.attach(self, denoiser, scheduler, steps_run, chunk, chunk_generator)
            step_eta = eta if sampler == "ddim" else None
            callback = step_callback and (lambda i, t, z, c=cond, u=uncond: step_callback(i, t, z, c, u))
            latents = denoise(denoiser, scheduler, latents, steps_run, chunk_generator, step_eta, progress, constraint,
                              callback)
            outputs.append(latents if output_type == "latent" else self.decode_latents(latents, vae_tiling))
        result = torch.cat(outputs)
        if edit is not None and output_type != "latent":
            # crops pasted back; outside the mask, the input's own pixels: bit-identical after the 8-bit round trip
            result = edit.finish(result, composite)
            height, width = result.shape[-2:]
        images = result if output_type == "latent" else self.to_images(result, output_type)

        settings = {"Steps": num_inference_steps, "Sampler": sampler or type(self.scheduler).__name__,
                    "CFG scale": guidance_scale}
        if strength is not None:
            settings["Denoising strength"] = strength  # A1111's name
        if inpainting:  # A1111's names where it has the setting
            settings["Inpaint method"] = inpaint_method
            if inpaint_method == "repaint":
                settings["Jump length"] = jump_length or DEFAULT_JUMP_LENGTH
                settings["Jump samples"] = jump_samples or DEFAULT_JUMP_SAMPLES
            settings["Mask blur"] = mask_blur
            if mask_invert:
                settings["Mask mode"] = "Inpaint not masked"
            if masked_content != "original":
                settings["Masked content"] = masked_content
            if inpaint_area == "masked":
                settings["Inpaint area"] = "Only masked"
                settings["Masked area padding"] = masked_padding
            if outpaint is not None:
                settings["Outpaint"] = ",".join(map(str, outpaint))
        if clip_skip:
            settings["Clip skip"] = clip_skip + 1  # A1111's count: 1 is the last layer
        if guidance_rescale:
            settings["Guidance rescale"] = guidance_rescale
        if eta:
            settings["Eta"] = eta
        if dynamic_threshold is not None:
            settings["Dynamic threshold"] = f"{dynamic_threshold}/{threshold_bound}"
        settings["Lora hashes"] = self.lora_hashes()
        tagged = {name for p in written for name, _ in prompt_tags(p)[1]}
        untagged = "".join(f" <lora:{n}:{_number(w)}>" for n, w in self.lora_scales.items()
                           if w and n not in tagged)  # adapters set in Python: written as tags, to remake it
        parameters = [
            infotext(p + untagged, neg, {**settings, "Seed": s if s is not None else "generator",
                                         "Size": f"{width}x{height}", "Model hash": self.model_hash,
                                         "Model": self.model_name})
            for p, neg, s in zip(written, negatives, seeds)
        ]
        return LatentPipelineOutput(images, seeds, prompts, negatives, parameters)

    def restore(
        self,
        measurement,
        prompt: str | list[str],
        *,
        degradation: str | Operator,
        method: str | None = None,
        sigma_y: float = 0.0,
        mask_image=None,
        step_size: float | None = None,
        iterations: int | None = None,
        particles: int | None = None,
        restarts: int | None = None,
        strength: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | list[int] | None = None,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> LatentPipelineOutput:
        """Restore the image(s) behind `measurement` y = A(x) + noise, guided by `prompt` (one per image;
        `ldm.restoration` has the math). `degradation`: "downsample:F", "blur:SIGMA", "gray", "mask"
        (with `mask_image`, white = the pixels to fill), or an `ldm.restoration.Operator` (e.g. a
        `CustomOperator` around any differentiable function of images in [−1, 1]). `measurement`: PIL
        images, or arrays/tensors in [0, 1]; the image drawn is the size it measures (height/width for
        a custom operator; default the model's). `sigma_y`: the measurement's noise in [0, 1] units.

        method "consistency" (the default; sampler ddim): at each step the clean estimate ẑ_0 is fitted
        to y by `iterations` (DEFAULT_ITERATIONS) Adam steps of learning rate `step_size` through the
        decoder, and the step moves with it; with `particles` K > 1 (default 1) K samplers per image,
        resampled by how well they explain y, the best returned (`DataConsistency`; K times the cost);
        with `restarts` R, R more passes, each from the last output moved onto {A x = y} (`Operator.project`)
        and noised to strength RESTART_STRENGTH. Gray defaults to K = 4 and R = 1, the rest to 1 and 0.
        method "guidance" (DPS; samplers ddim or ddpm): each step is followed by
        −ζ ∇_{z_t}‖y − A(D(ẑ_0(z_t)))‖, ζ = `step_size`; defaults DEFAULT_STEP_SIZE.
        method "smc" (SMC-Diff, masks only, sampler ddpm): `particles` K (default DEFAULT_PARTICLES)
        replacement samplers per image, resampled every step; the image returned is the first particle.
        method "exemplar" (gray only; gray's default, else "consistency"): K (default 1) txt2img samples of
        the prompt lend y their colours by luma (`colour_transfer`), the best-covering one kept; any sampler.
        `strength` < 1 starts from the non-generative estimate (bicubic, Wiener, fill; CCDF) noised to
        that level, as img2img does; default 0.3 for consistency on downsampling, blur and masks, else 1.
        Each image's parameters (and `residuals`, its RMS in [0, 1] units) give ‖y − A(x̂)‖.
        """
        from ldm.restoration import (
            DEFAULT_ITERATIONS, DEFAULT_STEP_SIZE, RESTART_STRENGTH, CustomOperator, check_restoration,
            default_method, default_particles, default_restarts, default_strength, initial_estimate,
            known_cells, measurement_tensor, parse_degradation, particle_seed, residual_rms,
        )

        written, _ = check_prompts(prompt, negative_prompt)
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be one of pil, np, pt for restore, got {output_type!r}")
        if isinstance(degradation, Operator) or callable(degradation):
            if mask_image is not None:
                raise ValueError("mask_image applies to degradation 'mask'; an Operator carries its own")
            operator = degradation if isinstance(degradation, Operator) else CustomOperator(degradation)
        else:
            masks = None if mask_image is None else measurement_tensor(mask_image, 1).gt(0).float()  # 1 = fill
            operator = parse_degradation(degradation, masks)
        sampler = resolve_sampler(sampler) if sampler is not None else None
        method = method or default_method(operator)
        sampler = check_restoration(method, sampler, sigma_y, operator, step_size=step_size, iterations=iterations,
                                    particles=particles, restarts=restarts, strength=strength)
        y = measurement_tensor(measurement, operator.channels)  # (1 or B, C, h, w) in [−1, 1]
        if len(y) not in (1, len(written)):
            raise ValueError(f"got {len(y)} measurements for {len(written)} prompts; pass one, or one per prompt")
        h, w = y.shape[-2:]
        if (height is None) != (width is None):
            raise ValueError("pass both height and width, or neither")
        if height is None:
            height, width = operator.image_size(h, w) if not isinstance(operator, CustomOperator) else (
                self.default_size, self.default_size)
        f = self.latent_factor
        if height % f or width % f:
            raise ValueError(f"a {w}x{h} measurement of {operator.name} is of a {width}x{height} image, not a multiple "
                             f"of the model's latent factor {f}; crop or pad the measurement")
        mask = getattr(operator, "mask", None)
        if mask is not None and tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} px; a mask degradation needs it at the "
                             f"measurement's size, {w}x{h}")
        with torch.no_grad():
            probe = operator(torch.zeros(1, 3, height, width))
        if tuple(probe.shape[1:]) != tuple(y.shape[1:]):
            want = "x".join(map(str, probe.shape[1:][::-1][:2])) + f" with {probe.shape[1]} channel(s)"
            raise ValueError(f"{operator.name} of a {width}x{height} image measures {want}; the measurement is "
                             f"{w}x{h} with {y.shape[1]}")
        if method == "smc" and not known_cells(operator.mask, (height // f, width // f)).flatten(1).any(1).all():
            raise ValueError(f"method smc replaces whole latent cells ({f}x{f} px); this mask leaves no cell wholly "
                             "known (a scattered pixel mask?): use method consistency or guidance")
        K = particles or default_particles(method, operator)
        if method == "exemplar":
            return self._restore_by_exemplar(y, written, operator, sigma_y, K, check_seeds(seed, len(written)),
                                             negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                             num_inference_steps=num_inference_steps, height=height, width=width,
                                             sampler=sampler, batch_size=batch_size, output_type=output_type,
                                             progress=progress)
        restarts = default_restarts(method, operator) if restarts is None else restarts
        step = float(DEFAULT_STEP_SIZE.get(method, 0.0) if step_size is None else step_size)
        iterations = iterations or DEFAULT_ITERATIONS
        steps = num_inference_steps or DEFAULT_STEPS
        if strength is None:  # the method's, and at least one step of few
            strength = max(default_strength(method, operator), 1 / steps) if isinstance(steps, int) else 1.0
        check_strength(strength, steps)
        if restarts and isinstance(steps, int) and int(steps * RESTART_STRENGTH) < 1:
            raise ValueError(f"a restart runs the last {RESTART_STRENGTH:g} of the steps, none of {steps}: raise "
                             "num_inference_steps or set restarts to 0")
        start = {}
        if strength < 1:  # CCDF: from the first estimate, noised to strength's level
            estimate = initial_estimate(operator, y, sigma_y)
            start = {"image": list(((estimate + 1) / 2).clamp(0, 1)), "strength": strength}
        measured = y.expand(len(written), -1, -1, -1)
        y = measured.repeat_interleave(K, dim=0)  # one row per image drawn
        seeds = check_seeds(seed, len(written))
        particle_seeds = [particle_seed(s, k) for s in seeds for k in range(K)]  # k = 0: the seed
        images = texts = None
        for restart in range(1 + restarts):
            if restart:  # from the last output moved onto {A x = y}, noised to RESTART_STRENGTH
                with torch.no_grad():
                    moved = operator.project(images.float().cpu() * 2 - 1, measured)
                start = {"image": list(((moved + 1) / 2).clamp(0, 1)), "strength": RESTART_STRENGTH}
            out = self(written, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, height=height, width=width, num_images_per_prompt=K,
                       seed=particle_seeds, sampler=sampler, batch_size=batch_size and batch_size * K,
                       output_type="pt", progress=progress,
                       restoration=Restoration(operator, y, method, step, iterations, K, sigma_y), **start)
            images = out.images[::K]  # (B, 3, H, W) in [0, 1]: each image's first particle
            texts = texts if restart else out.parameters[::K]  # the first pass's settings; Restarts says the rest
        with torch.no_grad():
            residuals = residual_rms(y[::K], operator(images.float().cpu() * 2 - 1), operator).tolist()
        settings = {"Restoration": method, "Degradation": operator.name, "Sigma y": sigma_y}
        settings |= {"smc": {"Particles": K}, "guidance": {"Step size": step},
                     "consistency": {"Step size": step, "Iterations": iterations} | ({"Particles": K} if K > 1 else {})
                     | ({"Restarts": restarts} if restarts else {})}[method]
        parameters = _with_restoration(texts, settings, residuals)
        images = images if output_type == "pt" else self.to_images(images * 2 - 1, output_type)
        return LatentPipelineOutput(images, seeds, written, out.negative_prompts[::K], parameters, residuals)

    def _restore_by_exemplar(self, y, written, operator, sigma_y, K, seeds, *, output_type, **sampling):
        """`restore`'s method exemplar: K txt2img exemplars per prompt, y coloured from each, the one whose
        lumas cover y's best kept (`ldm.restoration.colour_transfer`)."""
        from ldm.restoration import colour_transfer, particle_seed, residual_rms

        measured = y.expand(len(written), -1, -1, -1)
        batch_size = sampling.pop("batch_size")
        out = self(written, num_images_per_prompt=K, seed=[particle_seed(s, k) for s in seeds for k in range(K)],
                   batch_size=batch_size and batch_size * K, output_type="pt", **sampling)
        with torch.no_grad():
            candidates, coverage = colour_transfer(measured.repeat_interleave(K, 0), out.images.float().cpu() * 2 - 1,
                                                   sigma_y)
            rows = coverage.view(-1, K).argmax(1) + torch.arange(len(written)) * K
            images = (candidates[rows] + 1) / 2  # (B, 3, H, W) in [0, 1]
            residuals = residual_rms(measured, operator(images * 2 - 1), operator).tolist()
        settings = {"Restoration": "exemplar", "Degradation": operator.name, "Sigma y": sigma_y} | (
            {"Particles": K} if K > 1 else {})
        parameters = _with_restoration(out.parameters[::K], settings, residuals)
        images = images if output_type == "pt" else self.to_images(images * 2 - 1, output_type)
        return LatentPipelineOutput(images, seeds, written, out.negative_prompts[::K], parameters, residuals)


_WORD = re.compile(r"[^\W_]+")
def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _with_restoration(texts: Sequence[str], settings: dict, residuals: Sequence[float]) -> list[str]:
    """Each image's PNG parameters with the restoration's settings and its measurement residual appended."""
    parameters = []
    for text, r in zip(texts, residuals):
        lines = text.split("\n")
        lines[-1] += "".join(f", {k}: {_number(v) if isinstance(v, float) else v}" for k, v in settings.items())
        parameters.append("\n".join(lines) + f", Measurement residual: {r:.4f}")
    return parameters


EMBEDDED = "(prompt_embeds)"  # the prompt's text in the PNG parameters when only its embeddings were given


def read_training_words(folder: str | os.PathLike) -> frozenset[str] | None:
    """The training vocabulary a model folder lists in TRAINING_WORDS, or None if it has none."""
    path = Path(folder) / TRAINING_WORDS
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the training vocabulary ({e})") from None
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip())


def _check_xformers(device: torch.device) -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise ValueError("the xformers attention backend needs xformers: pip install 'ldm[xformers]' (GPU machines only)") from None
    if device.type != "cuda":
        raise ValueError("the xformers attention backend needs a CUDA device; use attention='sdpa' on the CPU")
