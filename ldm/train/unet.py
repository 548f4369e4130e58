"""Stage 2: a text-conditioned U-Net trained to denoise the latents of a frozen stage-1 VAE.

    z_0 = s · (E(x) − shift)                 latents of the frozen AutoencoderKL (s, shift: its config)
    c   = τ(caption), or τ("") w.p. p_uncond  condition dropout: the same net is the unconditional model
    z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε            the forward process (Ho et al. 2020, eq. 4)
    L   = w(t) · ‖f_θ(z_t, t, c) − y‖²        y = ε (Ho et al. eq. 14) or v (Salimans & Ho 2022),
                                              w = 1 or min-SNR-γ (Hang et al. 2023)
(Rombach et al. 2022, eq. 2; classifier-free guidance needs the dropout: Ho & Salimans 2022, §3.)

The config (`UNetTrainConfig`, YAML files in configs/unet/) is at the top; then building the parts;
then the objective; then `train`, the loop, readable top to bottom. Run it with `ldm-train-unet`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ldm import schedule
from ldm.assets import asset_path
from ldm.config import DataConfig, EMAConfig, OptimConfig, RunConfig, check_shared_sections, save_config
from ldm.models import audit_folder, load_component, read_json
from ldm.train.distill import DistillConfig, check_distill
from ldm.text import LdmWarning, PromptEncoder

log = logging.getLogger("ldm.train")
CLIP_TOKENIZER = asset_path("clip-tokenizer")  # vocab.json + merges.txt


# ---- config --------------------------------------------------------------------------------------


@dataclass
class UNetModelConfig:
    """diffusers' UNet2DConditionModel. Its latent channels come from the VAE, its cross-attention
    width from the text encoder and its sample size from data.resolution: they are not set here."""

    pretrained: str | None = None  # a U-Net folder (config.json + safetensors), or a pipeline folder's; replaces the fields below
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    attention_head_dim: int = 8  # diffusers' (historical) name for the number of heads
    norm_num_groups: int = 32


@dataclass
class TextEncoderConfig:
    """frozen: a pretrained CLIPTextModel / T5EncoderModel from `path`, never updated.
    joint: a new text encoder of the size below, trained together with the U-Net (worlds with no
    pretrained encoder at hand, like the shapes world), tokenized with CLIP's BPE. Its
    `architecture` is CLIP's text transformer (causal self-attention, absolute positions, as in Stable
    Diffusion), T5's encoder (bidirectional, relative positions, as in Imagen) or BERT's
    (bidirectional, absolute positions: the LDM paper's own jointly trained text transformer, Rombach
    et al. 2022, Sec. 4.3.1 and Appendix E.2). Under CLIP's causal mask the tokens of the first
    object in "a red circle to the left of a blue square" cannot see the relation that follows them;
    with relative positions only, a small T5 trained from scratch was measured to read captions as a
    bag of words (scripts/probe_roles.py). BERT's tokens see the whole caption and know their place.
    (From clean targets all three learn where a relation puts each object within a few hundred
    steps: scripts/probe_binding.py. What the shapes models lack is not the encoder.)"""

    mode: Literal["frozen", "joint"] = "joint"
    architecture: Literal["clip", "t5", "bert"] = "clip"  # joint: CLIPTextModel, T5EncoderModel (v1.1, gated GELU) or BertModel
    # frozen: a pipeline folder (text_encoder/ + tokenizer/) or a text-encoder folder. joint: optional, the
    # encoder to start from instead of new weights (fine-tuning a jointly trained model; the sizes below are then its own)
    path: str | None = None
    tokenizer: str | None = None  # a tokenizer folder; default: the encoder's own (frozen) or assets/clip-tokenizer (joint)
    max_length: int = 77  # joint: context length in tokens (position embeddings)
    hidden_size: int = 256  # joint: width = the U-Net's cross-attention width
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024


@dataclass
class ObjectiveConfig:
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False  # Lin et al. 2023: rescale β so SNR(T) = 0; needs v_prediction
    p_uncond: float = 0.1  # probability of replacing the caption by "" (classifier-free guidance needs > 0)
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    snr_gamma: float = 5.0  # γ of min-SNR-γ
    offset_noise: float = 0.0  # strength of offset noise (0: off; ~0.1 typical)
    # How t is drawn: uniformly (none), or with the noisiest (later) / least noisy (earlier) `portion`
    # of the timesteps `multiplier` times as likely: diffusers' --timestep_bias_* of its SDXL script
    timestep_bias_strategy: Literal["none", "later", "earlier"] = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_from_step: int = 0  # the bias applies from this optimizer step on; t is uniform before it


@dataclass
class SampleConfig:
    """Grids written to OUTPUT/samples/ every run.sample_every steps, from the EMA weights."""

    prompts: tuple[str, ...] = ("a red circle", "a blue square to the left of a green triangle", "two yellow circles", "a large purple triangle on a black background")
    seed: int = 0  # image i of the grid uses seed + i, the same at every step
    guidance_scale: float = 5.0
    steps: int = 25
    sampler: str = "dpm++2m"


@dataclass
class CacheConfig:
    dir: str | None = None  # where latent caches live; default OUTPUT/cache
    batch_size: int = 32  # images per VAE call while building
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage precision (float16 halves the file)


@dataclass
class LoraTrainConfig:
    """LoRA (Hu et al. 2022): with `enabled`, the base model (`base`, or model.pretrained with a frozen
    text encoder) stays frozen and only low-rank adapters ΔW = (alpha / rank) · B A train, through
    peft. Checkpoints hold the adapters and their optimizer state only; OUTPUT/final/lora.safetensors
    is the adapter file `ldm-txt2img --lora` and diffusers' `load_lora_weights` read."""

    enabled: bool = False
    rank: int = 4
    alpha: float | None = None  # None: the rank (scale 1)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # the U-Net's attention projections
    conv: bool = False  # also the ResNet blocks' 3×3 convolutions (conv1, conv2)
    text_encoder: bool = False  # also the text encoder's attention projections
    dropout: float = 0.0
    format: Literal["diffusers", "kohya"] = "diffusers"  # of final/lora.safetensors; --lora-format overrides


@dataclass
class UNetTrainConfig:
    # a pipeline folder to start from: its VAE, text encoder, U-Net and noise schedule (--base); see resolve_base
    base: str | None = None
    vae: str | None = None  # an AutoencoderKL folder (or a pipeline folder with vae/); --vae overrides
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=True))
    run: RunConfig = field(default_factory=RunConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # a few-step student of `base` (ldm-distill)


def check_config(config: UNetTrainConfig) -> None:
    """Cross-field checks, before anything loads; a ValueError names the key. Warns when p_uncond is 0."""
    obj, run = config.objective, config.run
    if config.vae is None:
        raise ValueError("no VAE given: pass --vae DIR (an AutoencoderKL folder), or --base PIPELINE, "
                         "or set vae in the config")
    lora = config.lora
    if lora.enabled:
        if not config.model.pretrained:
            raise ValueError("lora.enabled trains adapters on a trained model: "
                             "pass --base PIPELINE (or set model.pretrained)")
        if config.text_encoder.mode != "frozen":
            raise ValueError("lora.enabled keeps the text encoder frozen (adapters on it: lora.text_encoder=true); "
                             "set text_encoder.mode=frozen")
        if lora.rank < 1 or (lora.alpha is not None and lora.alpha <= 0) or not 0 <= lora.dropout < 1:
            raise ValueError(f"lora.rank must be ≥ 1, lora.alpha > 0 and lora.dropout in [0, 1), "
                             f"got {lora.rank}, {lora.alpha} and {lora.dropout}")
        if not lora.target_modules and not lora.conv:
            raise ValueError("lora.target_modules is empty: name the U-Net modules to adapt (or set lora.conv=true)")
    if not 0 <= obj.p_uncond < 1:
        raise ValueError(f"objective.p_uncond must be in [0, 1), got {obj.p_uncond}")
    check_distill(config.distill, obj.num_train_timesteps, config.text_encoder.mode, lora.enabled, config.base)
    if obj.p_uncond == 0 and config.distill.method == "none":  # a distilled student learns guidance from its teacher
        warnings.warn("objective.p_uncond is 0: the model never learns the unconditional prediction, so classifier-free guidance will not work", LdmWarning, stacklevel=2)
    if obj.zero_terminal_snr and obj.loss_weighting == "min_snr":
        warnings.warn("objective.loss_weighting=min_snr with zero_terminal_snr: min-SNR-γ weights a timestep by about its SNR at the noisy end, "
                      "so the steps where sampling starts (SNR 0) are barely trained and colours and layout ignore the prompt; "
                      "use loss_weighting=uniform (Lin et al. 2023 train plain v-MSE)", LdmWarning, stacklevel=2)
    if obj.zero_terminal_snr and obj.prediction_type != "v_prediction":
        raise ValueError("objective.zero_terminal_snr needs objective.prediction_type=v_prediction (at SNR 0 an ε prediction says nothing about z_0)")
    if obj.num_train_timesteps < 2:
        raise ValueError(f"objective.num_train_timesteps must be ≥ 2, got {obj.num_train_timesteps}")
    if not 0 < obj.beta_start < obj.beta_end < 1:
        raise ValueError(f"objective.beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1, got {obj.beta_start}, {obj.beta_end}")
    if obj.snr_gamma <= 0 or obj.offset_noise < 0:
        raise ValueError("objective.snr_gamma must be > 0 and objective.offset_noise ≥ 0")
    if not (obj.timestep_bias_multiplier > 0 and 0 < obj.timestep_bias_portion <= 1):
        raise ValueError(f"objective.timestep_bias_multiplier must be > 0 and timestep_bias_portion in (0, 1], "
                         f"got {obj.timestep_bias_multiplier} and {obj.timestep_bias_portion}")
    if obj.timestep_bias_from_step < 0:
        raise ValueError(f"objective.timestep_bias_from_step must be ≥ 0, got {obj.timestep_bias_from_step}")
    check_shared_sections(config.data, config.optim, config.ema, run)
    te = config.text_encoder
    if te.mode == "frozen" and not te.path:
        raise ValueError("text_encoder.mode=frozen needs text_encoder.path (a pipeline or text-encoder folder)")
    if te.mode == "joint" and (te.hidden_size % te.num_heads or te.max_length < 2):
        raise ValueError(f"text_encoder.hidden_size {te.hidden_size} must be a multiple of num_heads {te.num_heads}, and max_length ≥ 2")
    m = config.model
    if m.pretrained is None and (len(m.down_block_types) != len(m.block_out_channels) or len(m.up_block_types) != len(m.block_out_channels)):
        raise ValueError("model.down_block_types and model.up_block_types need one entry per model.block_out_channels")
    if m.pretrained is None and any(c % m.norm_num_groups for c in m.block_out_channels):
        raise ValueError(f"model.block_out_channels {list(m.block_out_channels)} must be multiples of model.norm_num_groups {m.norm_num_groups}")
    if config.samples.steps < 1 or config.samples.guidance_scale < 0 or not config.samples.prompts:
        raise ValueError("samples: steps must be ≥ 1, guidance_scale ≥ 0, and prompts not empty")
    from ldm.sampling import check_sampler
    from ldm.train.common import check_optim

    check_sampler(config.samples.sampler)
    check_optim(config.optim)


def resolve_base(config: UNetTrainConfig) -> UNetTrainConfig:
    """`base` (a pipeline folder) spelled out: vae, text_encoder.path and model.pretrained become the
    base's folder, and the objective's noise schedule (β, T, prediction type, zero terminal SNR)
    the one its scheduler was trained with: a LoRA or a fine-tune trained on another schedule
    would learn to undo the base instead of adding to it. A key the config sets to something else
    is a ValueError naming both values. text_encoder.mode stays the config's (frozen for a LoRA,
    joint to fine-tune the encoder too); data.resolution, when left at its default, becomes the base's."""
    import dataclasses

    if config.base is None:
        return config
    base = Path(config.base)
    if not (base / "model_index.json").is_file() or not (base / "unet" / "config.json").is_file():
        raise ValueError(f"--base {base}: not a pipeline folder "
                         "(model_index.json, unet/, vae/, text_encoder/, scheduler/)")
    scheduler_file = base / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise ValueError(f"--base {base}: no scheduler/scheduler_config.json, so its noise schedule is unknown")
    sched = read_json(scheduler_file)
    names = {v: k for k, v in schedule.DIFFUSERS_BETA_SCHEDULES.items()}
    if sched.get("beta_schedule") not in names:
        raise ValueError(f"--base {base}: beta_schedule {sched.get('beta_schedule')!r} is not one ldm trains "
                         f"({', '.join(names)})")
    wanted = {
        "objective.prediction_type": sched.get("prediction_type", "epsilon"),
        "objective.beta_schedule": names[sched["beta_schedule"]],
        "objective.beta_start": sched.get("beta_start", 0.0001), "objective.beta_end": sched.get("beta_end", 0.02),
        "objective.num_train_timesteps": sched.get("num_train_timesteps", 1000),
        "objective.zero_terminal_snr": bool(sched.get("rescale_betas_zero_snr", False)),
        "vae": str(base), "text_encoder.path": str(base), "model.pretrained": str(base),
    }
    # each key may also name the base's own subfolder
    folders = {"vae": "vae", "text_encoder.path": "text_encoder", "model.pretrained": "unet"}
    defaults = UNetTrainConfig()
    for key, value in wanted.items():
        section, _, name = key.rpartition(".")
        now = getattr(getattr(config, section) if section else config, name)
        default = getattr(getattr(defaults, section) if section else defaults, name)
        if key in folders:
            same = now is not None and Path(now).resolve() in (base.resolve(), (base / folders[key]).resolve())
        else:
            same = now == value
        if now != default and not same:
            raise ValueError(f"config key {key} is {now!r}, but --base {base} has {value!r}; drop one of them")
    objective = {key.partition(".")[2]: value for key, value in wanted.items() if key.startswith("objective.")}
    data = config.data
    if data.resolution == defaults.data.resolution:
        unet = read_json(base / "unet" / "config.json")
        vae = read_json(base / "vae" / "config.json") if (base / "vae" / "config.json").is_file() else {}
        factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        data = dataclasses.replace(data, resolution=int(unet.get("sample_size", 32)) * factor)
    return dataclasses.replace(
        config, vae=str(base), data=data, objective=dataclasses.replace(config.objective, **objective),
        text_encoder=dataclasses.replace(config.text_encoder, path=str(base)),
        model=dataclasses.replace(config.model, pretrained=str(base)))


# ---- building the parts --------------------------------------------------------------------------


def load_vae(path: str | Path):
    """The frozen AutoencoderKL of `path` (or `path/vae`), in eval mode. Its config must carry a
    `scaling_factor` (stage 1 writes it): the latent scale is the model's, never a literal here."""
    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder not found or without config.json: {path}")
    raw = read_json(path / "config.json")
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{path}: expected an AutoencoderKL, found {raw.get('_class_name')}")
    if "scaling_factor" not in raw:
        raise ValueError(f"{path}/config.json has no scaling_factor (the latent scale s); stage 1 (ldm-train-vae) writes it")
    try:
        vae = load_component(path, "vae", "AutoencoderKL")
    except OSError as e:
        raise ValueError(f"{path}: cannot load the VAE ({' '.join(str(e).split())[:200]})") from None
    return vae.eval().requires_grad_(False)


def load_text_encoder(config: TextEncoderConfig):
    """(text_encoder, tokenizer). Frozen: loaded from config.path, eval mode, no gradients.
    Joint: a new CLIPTextModel, T5EncoderModel or BertModel over CLIP's BPE vocabulary, in train mode;
    or, with config.path, the one there (and its tokenizer), in train mode."""
    import transformers
    from transformers import (
        BertConfig,
        BertModel,
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
    )

    from ldm.models import REGISTRY

    if config.mode == "joint" and not config.path:
        tokenizer = _load_tokenizer(_tokenizer_dir(config.tokenizer) if config.tokenizer else CLIP_TOKENIZER, config.max_length)
        if config.architecture == "t5":
            # T5 v1.1's encoder (Raffel et al. 2020, with Shazeer 2020's gated GELU), no dropout at this size. It is trained with the
            # padding masked, and use_attention_mask=True makes diffusers' StableDiffusionPipeline pass
            # the mask too (PromptEncoder always does for T5), so both compute the same embeddings.
            t5_config = T5Config(
                vocab_size=len(tokenizer), d_model=config.hidden_size, d_kv=config.hidden_size // config.num_heads,
                d_ff=config.intermediate_size, num_layers=config.num_layers, num_heads=config.num_heads,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, use_attention_mask=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
            )
            return T5EncoderModel(t5_config).train(), tokenizer
        if config.architecture == "bert":
            # BERT's encoder (Devlin et al. 2019): learned absolute positions, bidirectional attention over
            # the unpadded tokens (use_attention_mask, as for T5), no dropout, one token type. Its pooler is
            # kept, frozen at its initialisation, so that diffusers' BertModel loads the folder without a
            # "newly initialized" warning and no weight goes untrained under DDP.
            bert_config = BertConfig(
                vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
                max_position_embeddings=config.max_length, type_vocab_size=1, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id, use_attention_mask=True,
            )
            encoder = BertModel(bert_config).train()
            encoder.pooler.requires_grad_(False)
            return encoder, tokenizer
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, max_position_embeddings=config.max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModel(text_config).train(), tokenizer

    path = Path(config.path)
    if not path.is_dir():
        raise FileNotFoundError(f"text_encoder.path not found: {path}")
    encoder_dir, tokenizer_dir = (path / "text_encoder", path / "tokenizer") if (path / "text_encoder").is_dir() else (path, path)
    if config.tokenizer:
        tokenizer_dir = _tokenizer_dir(config.tokenizer)
    raw = read_json(encoder_dir / "config.json") if (encoder_dir / "config.json").is_file() else {}
    class_name = {"clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel", "bert": "BertModel"}.get(raw.get("model_type"))
    if class_name is None:
        raise ValueError(f"{encoder_dir}: expected a CLIPTextModel, T5EncoderModel or BertModel config.json (model_type clip_text_model, t5 or bert)")
    try:
        # float32 whatever the folder stores (pipelines are often saved in float16; transformers would
        # keep that): training runs in float32, or autocasts from it
        encoder = load_component(encoder_dir, "text_encoder", class_name, dtype=torch.float32)
        audit_folder(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer_config.json").is_file() and (tokenizer_dir / "merges.txt").is_file():
            # a bare CLIP BPE folder (vocab.json + merges.txt, like the shapes preset's), which AutoTokenizer cannot read
            tokenizer = _load_tokenizer(tokenizer_dir, config.max_length)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except (OSError, EnvironmentError, ValueError) as e:
        raise ValueError(f"cannot load the text encoder from {path} ({' '.join(str(e).split())[:200]})") from None
    if type(tokenizer).__name__ not in REGISTRY["tokenizer"]:
        raise ValueError(f"{tokenizer_dir}: tokenizer {type(tokenizer).__name__} is not one ldm loads ({', '.join(REGISTRY['tokenizer'])})")
    if config.mode == "joint":  # fine-tuning a jointly trained encoder: trained on, as when it was new
        encoder.train().requires_grad_(True)
        if class_name == "BertModel":
            encoder.pooler.requires_grad_(False)
        return encoder, tokenizer
    return encoder.eval().requires_grad_(False), tokenizer


def _tokenizer_dir(value: str) -> Path:
    """text_encoder.tokenizer as a folder. A relative assets/NAME that is not there (a run started
    outside the checkout, or from a wheel) is the shipped asset, as presets mean it; a folder that
    does not exist is an error now, not a model id looked up on the Hub."""
    path = Path(value)
    if not path.is_dir() and not path.is_absolute() and path.parts[:1] == ("assets",) and len(path.parts) > 1:
        path = asset_path(str(Path(*path.parts[1:])))
    if not path.is_dir():
        raise ValueError(f"text_encoder.tokenizer: no such folder: {value}")
    return path


def _load_tokenizer(folder: Path, max_length: int):
    from transformers import CLIPTokenizer

    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise FileNotFoundError(f"CLIP tokenizer files (vocab.json, merges.txt) not found in {folder}")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length)


def build_unet(config: UNetModelConfig, *, latent_channels: int, cross_attention_dim: int, sample_size: int):
    """A new UNet2DConditionModel from the preset fields, or the one in `config.pretrained`;
    either way its channels and cross-attention width must fit the VAE and the text encoder."""
    from diffusers import UNet2DConditionModel

    if config.pretrained:
        path = Path(config.pretrained)
        if (path / "unet" / "config.json").is_file():
            path = path / "unet"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.pretrained: no U-Net config.json in {path}")
        unet = load_component(path, "unet", "UNet2DConditionModel")
    else:
        try:
            unet = UNet2DConditionModel(
                sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
                block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                down_block_types=config.down_block_types, up_block_types=config.up_block_types,
                cross_attention_dim=cross_attention_dim, attention_head_dim=config.attention_head_dim,
                norm_num_groups=config.norm_num_groups,
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"model: diffusers cannot build this U-Net ({' '.join(str(e).split())[:200]})") from None
    c = unet.config
    if c.in_channels != latent_channels or c.out_channels != latent_channels:
        raise ValueError(f"the U-Net has {c.in_channels}→{c.out_channels} channels but the VAE's latents have {latent_channels}")
    if c.cross_attention_dim != cross_attention_dim:
        raise ValueError(f"the U-Net's cross_attention_dim {c.cross_attention_dim} differs from the text encoder's width {cross_attention_dim}")
    return unet.train()


def make_training_scheduler(obj: ObjectiveConfig):
    """The diffusers DDPMScheduler that describes this training run's noise schedule; saved with the
    pipeline, so every sampler of `ldm-txt2img` is built from the same β, prediction type and
    spacing ("trailing" with zero terminal SNR, so sampling starts at t = T: Lin et al. 2023, §3.3)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=obj.num_train_timesteps, beta_start=obj.beta_start, beta_end=obj.beta_end,
        beta_schedule=schedule.DIFFUSERS_BETA_SCHEDULES[obj.beta_schedule], prediction_type=obj.prediction_type,
        rescale_betas_zero_snr=obj.zero_terminal_snr, timestep_spacing="trailing" if obj.zero_terminal_snr else "leading",
        steps_offset=0 if obj.zero_terminal_snr else 1, clip_sample=False,
    )


def training_alphas_cumprod(obj: ObjectiveConfig) -> torch.Tensor:
    """ᾱ_t (float64) of the objective's schedule, from `ldm.schedule` (tested equal to diffusers')."""
    betas = schedule.make_betas(obj.beta_schedule, obj.num_train_timesteps, obj.beta_start, obj.beta_end)
    if obj.zero_terminal_snr:
        betas = schedule.rescale_zero_terminal_snr(betas)
    return schedule.alphas_cumprod_from_betas(betas)


# ---- the objective -------------------------------------------------------------------------------


@dataclass
class Draws:
    """The random choices of one micro-batch, one row per sample."""

    uncond: torch.Tensor  # (B,) bool: caption replaced by ""
    timesteps: torch.Tensor  # (B,) int64 in [0, T)
    noise: torch.Tensor  # (B, C, h, w) ε
    offset: torch.Tensor  # (B, C, 1, 1) offset-noise δ
    posterior: torch.Tensor  # (B, C, h, w) ξ of z = mean + std · ξ, the VAE posterior draw
    spare: torch.Tensor  # (B,) uniform in [0, 1): distillation's guidance scale


def timestep_weights(obj: ObjectiveConfig) -> torch.Tensor | None:
    """The probabilities of t = 0 … T−1 under objective.timestep_bias_*, or None for uniform.

    As diffusers' `generate_timestep_weights` (examples/text_to_image/train_text_to_image_sdxl.py):
    the last (later: the noisiest) or first (earlier) int(portion · T) timesteps get `multiplier`
    times the weight of the others. Why "later" exists here: at the noisiest timesteps a
    zero-terminal-SNR model learns the layout a caption asks for, from targets whose variance
    hides it (scripts/probe_binding.py); drawing those timesteps more often gives it more samples.
    """
    T = obj.num_train_timesteps
    if obj.timestep_bias_strategy == "none" or obj.timestep_bias_multiplier == 1:
        return None
    weights = torch.ones(T, dtype=torch.float64)
    n = max(1, int(obj.timestep_bias_portion * T))
    if obj.timestep_bias_strategy == "later":
        weights[T - n:] *= obj.timestep_bias_multiplier
    else:
        weights[:n] *= obj.timestep_bias_multiplier
    return weights / weights.sum()


def draw_randomness(seed: int, step: int, global_indices: list[int], *, p_uncond: float, num_train_timesteps: int,
                    latent_shape: tuple[int, int, int], timestep_weights: torch.Tensor | None = None) -> Draws:
    """Every random choice of the objective, per sample, from a generator seeded by
    (seed, step, global sample index). t is uniform, or drawn from `timestep_weights` (T probabilities).

    Why not the processes' global RNG streams: with K processes each would draw its own stream, so
    a 2-process run with batch B would drop different captions and add different noise than a
    1-process run with batch 2B on the same samples, and the two could never agree. Keyed by the
    sample's position in the run's global sample stream, the draws depend only on which sample it
    is and when, not on how the batch is split, nor on resuming (the key is known at any step).
    Drawn on the CPU, so the device does not change them either.
    """
    C, h, w = latent_shape
    rows = []
    for g in global_indices:
        key = np.random.SeedSequence([seed, step, g]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
        rows.append((
            torch.rand((), generator=gen) < p_uncond,
            torch.randint(num_train_timesteps, (), generator=gen) if timestep_weights is None
            else torch.multinomial(timestep_weights, 1, generator=gen)[0],
            torch.randn((C, h, w), generator=gen),
            torch.randn((C, 1, 1), generator=gen),
            torch.randn((C, h, w), generator=gen),
            torch.rand((), generator=gen),  # drawn last: the draws above are what they were before it existed
        ))
    return Draws(*(torch.stack(column) for column in zip(*rows)))


def encode_latents(batch: dict, vae, posterior_noise: torch.Tensor) -> torch.Tensor:
    """z_0 = s · (z − shift), z = mean + std · ξ drawn from the VAE posterior q(z | x) (Kingma & Welling
    2014; Rombach et al. 2022, §3), from the cache's stored posterior or by running the encoder."""
    config = vae.config
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        with torch.no_grad():
            posterior = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()  # (B, C, h, w)
    z = mean + std * posterior_noise.to(mean.device)
    if config.get("shift_factor") is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def text_conditioning(batch: dict, uncond: torch.Tensor, prompt_encoder: PromptEncoder, empty_embed: torch.Tensor | None, trainable: bool) -> torch.Tensor:
    """c for each sample, (B, L, D): the caption's embedding, or the empty prompt's where `uncond`
    (condition dropout, Ho & Salimans 2022, §3.2). Token ids and embeddings are computed exactly as
    `PromptEncoder.encode` computes them at sampling time."""
    if "text_embeds" in batch:  # frozen encoder, cached embeddings
        embeds = batch["text_embeds"].clone()
        embeds[uncond] = empty_embed.to(embeds.dtype)
        return embeds
    if "input_ids" in batch:  # cached token ids
        empty_ids, empty_mask = prompt_encoder.tokenize([""])
        input_ids = torch.where(uncond[:, None], empty_ids, batch["input_ids"])
        attention_mask = torch.where(uncond[:, None], empty_mask, batch["attention_mask"])
    else:
        input_ids, attention_mask = prompt_encoder.tokenize(["" if drop else caption for caption, drop in zip(batch["caption"], uncond.tolist())])
    with torch.set_grad_enabled(trainable):
        return prompt_encoder.embed(input_ids, attention_mask)


def diffusion_loss(unet, z0: torch.Tensor, cond: torch.Tensor, draws: Draws, alphas_cumprod: torch.Tensor, obj: ObjectiveConfig) -> torch.Tensor:
    """The weighted denoising loss of one micro-batch (Ho et al. 2020, eq. 14; Salimans & Ho 2022, §4;
    Hang et al. 2023, eq. 7), averaged over samples."""
    device = z0.device
    t = draws.timesteps.to(device)
    alpha_cumprod = alphas_cumprod[draws.timesteps].to(device)  # (B,) float64
    noise = schedule.offset_noise(draws.noise, draws.offset, obj.offset_noise).to(device)
    z_t = schedule.q_sample(z0, noise, alpha_cumprod)
    target = schedule.training_target(z0, noise, alpha_cumprod, obj.prediction_type)
    prediction = unet(z_t, t, encoder_hidden_states=cond).sample
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B,)
    if obj.loss_weighting == "min_snr":
        per_sample = per_sample * schedule.min_snr_weights(schedule.snr(alpha_cumprod), obj.snr_gamma, obj.prediction_type).float()
    return per_sample.mean()


def check_paths(config: UNetTrainConfig) -> None:
    """Every path the run reads or writes, checked before any weights load (one-line errors)."""
    from ldm.train.common import check_run_paths

    check_run_paths({"data.path": config.data.path}, config.run.output_dir,
                    {"vae": config.vae, "text_encoder.path": config.text_encoder.path, "model.pretrained": config.model.pretrained})


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trained_networks(config: UNetTrainConfig, unet, text_encoder) -> dict:
    """{name: network} of the networks that train: the U-Net, and the text encoder when joint; with
    lora.enabled, the adapters the config asks for are added first and only they train."""
    from ldm.lora import add_adapters

    trained = {"unet": unet}
    if config.lora.enabled:
        c = config.lora
        trained = add_adapters(unet, text_encoder, rank=c.rank, alpha=c.alpha or c.rank,
                               target_modules=c.target_modules, conv=c.conv, on_text_encoder=c.text_encoder,
                               dropout=c.dropout)
    if config.text_encoder.mode == "joint":
        trained["text_encoder"] = text_encoder
    return trained


def trained_weights(module: torch.nn.Module, lora: bool) -> list[torch.nn.Parameter]:
    """The parameters the optimizer and the EMA see: a LoRA's adapters, or every parameter (those
    frozen, like a BERT encoder's pooler, get no gradient and stay as they are)."""
    return [p for p in module.parameters() if p.requires_grad or not lora]


# ---- the loop ------------------------------------------------------------------------------------


def build_models(config: UNetTrainConfig):
    """(vae, text_encoder, tokenizer, unet, latent_shape) for `config`, on the CPU: the frozen VAE,
    the text encoder (frozen, or new for joint training) and a new U-Net (or `model.pretrained`)
    that fits both. New weights come from the global RNG, in this order."""
    vae = load_vae(config.vae)
    text_encoder, tokenizer = load_text_encoder(config.text_encoder)
    latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if config.data.resolution % latent_factor:
        raise ValueError(f"data.resolution {config.data.resolution} is not a multiple of the VAE's latent factor {latent_factor}")
    latent_shape = (vae.config.latent_channels, config.data.resolution // latent_factor, config.data.resolution // latent_factor)
    width = text_encoder.config.hidden_size if hasattr(text_encoder.config, "hidden_size") else text_encoder.config.d_model
    unet = build_unet(config.model, latent_channels=latent_shape[0], cross_attention_dim=width, sample_size=latent_shape[1])
    if config.distill.method != "none":
        from ldm.train.distill import student_unet

        unet = student_unet(unet, config.distill.embedding_dim)
    return vae, text_encoder, tokenizer, unet, latent_shape


def pipeline_scheduler(config: UNetTrainConfig, training_scheduler) -> tuple[object, dict | None]:
    """The scheduler OUTPUT/final names, and its student card (None unless distilled): DEFAULT_SAMPLER's
    on the training noise schedule, or the student's own sampler (`ldm.train.distill`)."""
    from ldm.sampling import sampling_scheduler

    if config.distill.method == "none":
        return sampling_scheduler(training_scheduler), None
    from ldm.train.distill import scheduler_and_card

    return scheduler_and_card(config.distill, training_scheduler, config.base)


def make_pipeline(config: UNetTrainConfig, vae, text_encoder, tokenizer, unet, training_scheduler):
    """A LatentPipeline over these networks, with the scheduler and card OUTPUT/final gets; a student
    keeps its teacher's list of training words."""
    from ldm.pipeline import LatentPipeline, read_training_words

    scheduler, card = pipeline_scheduler(config, training_scheduler)
    pipe = LatentPipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.student = card
    if card is not None:
        pipe.training_words = read_training_words(config.base)
    return pipe


def export_checkpoint(config: UNetTrainConfig, checkpoint: str, out: str | Path) -> Path:
    """Write a training checkpoint as a pipeline folder, like OUTPUT/final (a LoRA run's: OUT/lora.safetensors):
    the EMA weights when the run keeps an EMA (config.ema.enabled), else the raw ones. `checkpoint` is "latest" (of
    run.output_dir) or a checkpoint folder; `out` must not exist yet (or be empty). Works for a
    checkpoint of any process count, on the CPU, without touching the run."""
    from ldm.lora import caption_words, write_lora
    from ldm.train.checkpoint import load_model_weights, load_state, resolve_resume
    from ldm.train.common import make_ema

    config = resolve_base(config)
    check_config(config)
    folder = resolve_resume(checkpoint, config.run.output_dir, flag="--export")
    if folder is None:
        raise FileNotFoundError(f"--export latest: no checkpoint in {config.run.output_dir} (pass --output-dir, or a checkpoint folder)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose a new one")
    vae, text_encoder, tokenizer, unet, _ = build_models(config)
    lora = config.lora.enabled
    trained = trained_networks(config, unet, text_encoder)
    for name, model in trained.items():
        load_model_weights(folder, name, model, trained_only=lora)
        weights = trained_weights(model, lora)
        ema = make_ema(weights, config.ema)
        if ema is not None:
            if not (folder / f"ema-{name}.safetensors").is_file():
                raise ValueError(f"checkpoint {folder} has no EMA of {name}; export the raw weights with ema.enabled=false")
            ema.load_state_dict(load_state(folder, f"ema-{name}"))
            ema.copy_to(weights)
    kind = "EMA" if config.ema.enabled else "raw"
    if lora:
        words = caption_words(config.data.path) if config.data.path and Path(config.data.path).exists() else None
        path = write_lora(out / "lora.safetensors", {"unet": unet, "text_encoder": text_encoder}, "default",
                          config.lora.format, words=words)
        log.info("wrote %s from %s (%s weights)", path, folder, kind)
        return path
    pipe = make_pipeline(config, vae, text_encoder.eval(), tokenizer, unet.eval(),
                         make_training_scheduler(config.objective))
    pipe.save_pretrained(out)
    log.info("wrote %s from %s (%s weights)", out, folder, kind)
    return out


def make_objective(config: UNetTrainConfig, unet, latent_shape, empty_embed, alphas_cumprod, training_scheduler, emas,
                   accelerator):
    """`objective(unet, z0, cond, draws) → loss` of the run: `diffusion_loss`, or a distillation
    objective (`ldm.train.distill.Objective`) with its frozen teacher (base's U-Net) and, for LCM, the
    target network θ⁻ that the run's EMA of the student (emas["unet"]) fills before each use."""
    import copy

    from ldm.train.common import fit_attention_to_precision

    obj = config.objective
    if config.distill.method == "none":
        return lambda net, z0, cond, draws: diffusion_loss(net, z0, cond, draws, alphas_cumprod, obj)
    from ldm.train.distill import Objective

    if empty_embed is None:
        raise ValueError("distillation needs the empty prompt's embedding: set text_encoder.mode=frozen")
    teacher = build_unet(config.model, latent_channels=latent_shape[0], cross_attention_dim=empty_embed.shape[-1],
                         sample_size=latent_shape[1]).eval().requires_grad_(False).to(accelerator.device)
    fit_attention_to_precision(teacher, accelerator)
    target = None
    if config.distill.method == "lcm":
        if "unet" not in emas:
            raise ValueError("distill.method=lcm keeps its target network as the EMA: set ema.enabled=true "
                             "(configs/distill/lcm.yaml: ema.decay=0.95, ema.warmup=false)")
        target = copy.deepcopy(unet).eval().requires_grad_(False).to(accelerator.device)
    return Objective(config.distill, teacher, empty_embed.to(accelerator.device), alphas_cumprod, obj.prediction_type,
                     training_scheduler.config, target, emas.get("unet"))


def train(config: UNetTrainConfig, resume: str | None = None, build_cache_only: bool = False,
          progress: bool = True) -> Path:
    """Train per `config`; returns OUTPUT/final (or, with `build_cache_only`, the cache file)."""
    from ldm.data import open_dataset
    from ldm.lora import caption_words, write_lora
    from ldm.train import cache as latent_cache
    from ldm.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, step_dir
    from ldm.train.common import (DataPosition, MetricsLog, fit_attention_to_precision, make_accelerator, make_ema, make_loader,
                                  make_lr_scheduler, make_optimizer, progress_bar, save_grid, seed_everything)
    from ldm.train.guards import StepGuard

    config = resolve_base(config)
    check_config(config)
    run, obj = config.run, config.objective
    if config.distill.method == "progressive" and len(config.distill.rounds) != 1:
        raise ValueError("a training run distills one progressive round (distill.rounds=[N]); "
                         "ldm-distill runs them all")
    if config.data.path is None:
        raise ValueError("no training data: pass --data PATH or set data.path in the config")
    output_dir = Path(run.output_dir)
    check_paths(config)
    resume_from = resolve_resume(resume, output_dir)  # checked before any weights load
    accelerator = make_accelerator(run)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    seed_everything(run.seed, rank)

    # -- the parts: frozen VAE, text encoder (frozen or joint), U-Net, training scheduler
    vae, text_encoder, tokenizer, unet, latent_shape = build_models(config)
    lora = config.lora.enabled
    trained = trained_networks(config, unet, text_encoder)
    text_trained = "text_encoder" in trained  # its embeddings change during the run: never cached
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    prompt_encoder = PromptEncoder(text_encoder, tokenizer)
    fit_attention_to_precision(unet, accelerator)  # bf16 on the CPU: float32 attention cores (their backward is 5-10× faster)
    if text_trained:
        fit_attention_to_precision(text_encoder, accelerator)
    if run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_trained:
            text_encoder.gradient_checkpointing_enable()
    noise_scheduler = make_training_scheduler(obj)
    alphas_cumprod = training_alphas_cumprod(obj)  # (T,) float64, on the CPU
    t_weights = timestep_weights(obj)  # None: t uniform
    if is_main:
        log.info("U-Net %.2fM parameters, text encoder %.2fM (%s)", count_parameters(unet) / 1e6, count_parameters(text_encoder) / 1e6, config.text_encoder.mode)
        if lora:
            log.info("LoRA rank %d: %.3fM trained parameters", config.lora.rank,
                     sum(p.numel() for m in trained.values() for p in m.parameters() if p.requires_grad) / 1e6)

    # -- the data: the latent cache when one exists for these weights and this preprocessing
    dataset = open_dataset(config.data.path, resolution=config.data.resolution, crop=config.data.crop,
                           random_flip=config.data.random_flip, seed=run.seed, rank=rank, world_size=world)
    cache_dir = Path(config.cache.dir) if config.cache.dir else output_dir / "cache"
    key = cache = None
    if not isinstance(dataset, torch.utils.data.IterableDataset) and config.data.crop == "center" and not config.data.random_flip:
        key = latent_cache.cache_key(vae=vae, tokenizer=tokenizer, max_length=prompt_encoder.max_length,
                                     text_encoder=None if text_trained else text_encoder,
                                     data={"path": str(Path(config.data.path).resolve()), "num_samples": len(dataset), "resolution": config.data.resolution, "crop": "center"})
        cache = latent_cache.find_cache(cache_dir, key)
    if build_cache_only:
        latent_cache.check_cacheable(dataset, config.data.crop, config.data.random_flip)
        if cache is None and is_main:
            cache = latent_cache.build_cache(latent_cache.cache_file(cache_dir, key), key, dataset, vae=vae,
                                             prompt_encoder=prompt_encoder, frozen_text=not text_trained,
                                             batch_size=config.cache.batch_size, num_workers=config.data.num_workers,
                                             dtype=config.cache.dtype, progress=progress)
        accelerator.wait_for_everyone()
        return latent_cache.cache_file(cache_dir, key)
    empty_embed = None
    if cache is not None:
        dataset = latent_cache.LatentCache(cache)  # row i = dataset item i: the same samples, the VAE encoder never runs
        empty_embed = dataset.empty_embed
        if is_main:
            log.info("using the latent cache %s", cache)
    elif not text_trained:
        empty_embed = prompt_encoder.encode([""]).cpu()
    loader = make_loader(dataset, run.batch_size, run.seed, rank, world, config.data.num_workers)
    position = DataPosition(loader)

    # -- optimisation: AdamW over the U-Net (and a joint text encoder), or over their LoRA adapters;
    # an EMA of each; under accelerate
    weights = {name: trained_weights(m, lora) for name, m in trained.items()}
    params = [p for group in weights.values() for p in group]
    optimizer = make_optimizer(params, config.optim)
    lr_scheduler = make_lr_scheduler(optimizer, config.optim, run.max_steps)
    emas = {name: ema for name, group in weights.items()
            if (ema := make_ema(group, config.ema, foreach=accelerator.device.type == "cuda")) is not None}
    for ema in emas.values():
        ema.to(accelerator.device)
    objective = make_objective(config, unet, latent_shape, empty_embed, alphas_cumprod, noise_scheduler, emas,
                               accelerator)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    trained, optimizer = dict(zip(trained, prepared[:-1])), prepared[-1]
    unet = trained["unet"]
    prompt_encoder.text_encoder = trained.get("text_encoder", text_encoder)

    # signals stop the run after a step with a checkpoint; non-finite updates are skipped (ldm.train.guards)
    guard = StepGuard(accelerator, max_bad_steps=run.max_bad_steps)
    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, models=trained, optimizers={"main": optimizer}, schedulers={"lr": lr_scheduler}, emas=emas,
                                scaler=accelerator.scaler, accelerator=accelerator, trained_only=lora)
        step = state["step"]
        position.load(state["data"])
        guard.load(state.get("guard", {}))
        guard.last_good_checkpoint = resume_from
        if is_main:
            log.info("resumed from %s at step %d", resume_from, step)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    metrics = MetricsLog(output_dir, enabled=is_main)

    def save(step_now: int) -> Path:
        folder = save_checkpoint(output_dir, step_now, models=trained, optimizers={"main": optimizer}, schedulers={"lr": lr_scheduler}, emas=emas,
                                 scaler=accelerator.scaler, state={"data": position.state(), "guard": guard.state()}, accelerator=accelerator,
                                 keep_last=run.keep_last, protect=resume_from, trained_only=lora)
        guard.last_good_checkpoint = folder
        return folder

    def ema_pipeline():
        """A LatentPipeline over the EMA weights (copied into the networks; call restore_weights after)."""
        for name, ema in emas.items():
            ema.store(weights[name])
            ema.copy_to(weights[name])
        models = {name: accelerator.unwrap_model(m).eval() for name, m in trained.items()}
        return make_pipeline(config, vae, models.get("text_encoder", text_encoder), tokenizer, models["unet"],
                             noise_scheduler)

    def restore_weights() -> None:
        for name, ema in emas.items():
            ema.restore(weights[name])
        for m in trained.values():
            m.train()

    def sample_grid(step_now: int) -> None:
        if is_main:
            s = config.samples
            images = ema_pipeline()(list(s.prompts), seed=s.seed, guidance_scale=s.guidance_scale, num_inference_steps=s.steps,
                                    sampler=s.sampler, output_type="pt", progress=False).images  # (N, 3, H, W) in [0, 1]
            restore_weights()
            save_grid(images * 2 - 1, output_dir / "samples" / f"step-{step_now:07d}.png", nrow=len(s.prompts))
        accelerator.wait_for_everyone()

    # -- the loop: one optimizer update per iteration, run.grad_accum micro-batches each
    batches = position.batches()
    global_batch = run.batch_size * world
    bar = progress_bar(run.max_steps, step, is_main and progress)
    t0, images_seen = time.time(), 0
    with guard, bar, contextlib.closing(batches):  # the bar closes however the loop ends, before any one-line message
        while step < run.max_steps:
            micro_losses = []
            for micro in range(run.grad_accum):
                batch = next(batches)
                # sample i of this process is at position i·W + rank of the global batch (ResumableSampler's split)
                first = micro * global_batch
                draws = draw_randomness(run.seed, step, [first + i * world + rank for i in range(run.batch_size)],
                                        p_uncond=obj.p_uncond, num_train_timesteps=obj.num_train_timesteps, latent_shape=latent_shape,
                                        timestep_weights=t_weights if step >= obj.timestep_bias_from_step else None)
                with accelerator.accumulate(*trained.values()):
                    z0 = encode_latents(batch, vae, draws.posterior).to(accelerator.device)  # (B, C, h, w)
                    with accelerator.autocast():
                        cond = text_conditioning(batch, draws.uncond, prompt_encoder, empty_embed,
                                                 trainable=text_trained).to(accelerator.device)  # (B, L, D)
                        loss = objective(unet, z0, cond, draws)
                    accelerator.backward(loss)
                    micro_losses.append(loss.detach())
                    grad_norm = None
                    # the last micro-step: gradients are complete (and all-reduced); a non-finite loss
                    # or gradient on any process skips this update on every process
                    if accelerator.sync_gradients and guard.check(micro_losses, params):
                        if config.optim.max_grad_norm is not None:
                            grad_norm = accelerator.clip_grad_norm_(params, config.optim.max_grad_norm)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if guard.end_step(step):
                lr_scheduler.step()
                for name, ema in emas.items():
                    ema.step(weights[name])
            step += 1
            images_seen += global_batch * run.grad_accum
            bar.update(1)

            if step % run.log_every == 0 or step == run.max_steps:
                mean_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
                rate = images_seen / (time.time() - t0)
                values = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": rate, "bad_steps": guard.bad_total}
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                metrics.log(step, values)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.1f}")
            if run.checkpoint_every and step % run.checkpoint_every == 0 and step < run.max_steps:
                save(step)
            if run.sample_every and step % run.sample_every == 0:
                sample_grid(step)
            if guard.stop_requested and step < run.max_steps:  # agreed on by every process in guard.check
                folder = step_dir(output_dir, step)
                if not (run.checkpoint_every and step % run.checkpoint_every == 0):
                    folder = save(step)
                metrics.close()
                raise guard.preempted(step, folder)
    bar.close()

    # -- the end: a last checkpoint, and OUTPUT/final: the pipeline with the EMA weights (a LoRA: its file)
    save(step)
    final = output_dir / "final"
    if is_main:
        pipe = ema_pipeline()
        if lora:
            write_lora(final / "lora.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "default",
                       config.lora.format, words=caption_words(config.data.path))
        else:
            pipe.save_pretrained(final)
        restore_weights()
        log.info("wrote %s (%d steps, %.1f images/s)", final, step, images_seen / max(time.time() - t0, 1e-9))
    accelerator.wait_for_everyone()
    metrics.close()
    accelerator.end_training()
    return final


__all__ = [
    "UNetTrainConfig", "UNetModelConfig", "LoraTrainConfig", "resolve_base", "trained_networks", "trained_weights",
    "TextEncoderConfig", "ObjectiveConfig", "SampleConfig", "CacheConfig", "check_config",
    "load_vae", "load_text_encoder", "build_unet", "make_training_scheduler", "training_alphas_cumprod", "Draws", "draw_randomness", "timestep_weights",
    "encode_latents", "text_conditioning", "diffusion_loss", "build_models", "export_checkpoint", "train",
]
