"""What both training stages share: the accelerator, seeding, data order, optimizer and LR schedule,
EMA, metric logging, image grids. Each stage's loop (`ldm.train.vae`, `ldm.train.unet`) reads top to
bottom and calls these; nothing here owns a loop.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import sys
import time
import types
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ldm.config import EMAConfig, OptimConfig, RunConfig

log = logging.getLogger("ldm.train")


def make_accelerator(run: RunConfig, cpu: bool | None = None):
    """An accelerate Accelerator for this run: devices, processes, mixed precision, accumulation.

    `accelerate launch --num_processes K ...` (or torchrun) makes it multi-process; plain
    `python`/console-script starts make it one process. The data loader and the LR scheduler are
    deliberately not passed to `accelerator.prepare`: the loader is split by `ResumableSampler`
    (exact resume, and the same samples whatever the process count) and the scheduler is stepped
    once per optimizer update (accelerate would step it once per process).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if cpu is None:
        # Without CUDA, accelerate forms the process group of a torchrun / `accelerate launch` start
        # (over gloo) only when told it runs on the CPU; otherwise every process trains alone.
        cpu = not torch.cuda.is_available()

    if run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    return Accelerator(
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.grad_accum,
        cpu=cpu,
        dataloader_config=DataLoaderConfiguration(split_batches=False),
    )


class _FloatSDPA(torch.overrides.TorchFunctionMode):
    """Runs torch's scaled_dot_product_attention in float32 when given bf16/fp16 tensors, and
    casts its output back; every other call passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].dtype in (torch.bfloat16, torch.float16):
            dtype = args[0].dtype
            with torch.autocast(args[0].device.type, enabled=False):
                out = func(*(a.float() for a in args[:3]), *args[3:], **kwargs)
            return out.to(dtype)
        return func(*args, **kwargs)


def float_attention_processor():
    """diffusers' AttnProcessor2_0 with the attention core (softmax(QKᵀ/√d)·V) in float32; the
    projections around it stay in the autocast dtype.

    Why: under bf16 autocast on the CPU, torch's flash-attention *backward* for bf16 is ~10× slower
    than for float32 at the small head widths of a small U-Net (torch 2.13, AMX Xeon: 983 against
    103 ms for a 64 × 48-head × 64-token × 4-wide self-attention), and it ate the whole bf16 gain.
    diffusers has no processor that upcasts only the SDPA call; this one subclasses theirs and
    intercepts that one call (a TorchFunctionMode), so it follows their processor as it changes.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    class FloatSDPAProcessor(AttnProcessor2_0):
        # The parent's named arguments, spelled out: diffusers' Attention passes a processor only
        # the keyword arguments its signature names (it would drop `temb`, with a warning per call).
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
            with _FloatSDPA():
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    return FloatSDPAProcessor()


def fit_attention_to_precision(model: torch.nn.Module, accelerator) -> bool:
    """Under bf16 autocast on the CPU, run `model`'s attention cores in float32; elsewhere leave it
    alone. True if changed. A diffusers model gets float_attention_processor; any other module (a
    transformers text encoder, whose SDPA backward is 5× slower in bf16 at 64-wide heads) has its
    forward run under the same float32-SDPA rule."""
    if accelerator.mixed_precision != "bf16" or accelerator.device.type != "cpu":
        return False
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(float_attention_processor())
        return True
    forward = type(model).forward

    def float_sdpa_forward(self, *args, **kwargs):
        with _FloatSDPA():
            return forward(self, *args, **kwargs)

    model.forward = types.MethodType(functools.wraps(forward)(float_sdpa_forward), model)  # a bound method, as accelerate expects
    return True


def check_run_paths(data: dict[str, str | None], output_dir: str, folders: dict[str, str | None]) -> None:
    """Every path a run reads or writes, checked before anything starts (one-line errors).

    `data`: config key → a dataset path (a folder or file; brace ranges and globs of tar shards
    are checked when opened); `folders`: config key → a folder that must exist (None: unused).
    """
    for key, path in data.items():
        if path is not None and "{" not in path and "*" not in path and not Path(path).exists():
            raise FileNotFoundError(f"training data not found: {path}" if key == "data.path" else f"{key} not found: {path}")
    for key, path in folders.items():
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{key}: folder not found: {path}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run.output_dir {out} exists and is not a folder")


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each process gets its own stream (seed + rank)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class ResumableSampler(Sampler[int]):
    """Indices of a map-style dataset for one process: a seeded permutation per epoch, split by rank.

    Epoch e shuffles with seed + e; the permutation is cut to a whole number of global batches
    (batch_size × world_size), and process r takes positions r, r + W, r + 2W, … so that one
    optimizer step of W processes with batch B sees exactly the samples a single process with batch
    W·B would. `start` skips the first `start` indices of this process's epoch: resuming mid-epoch
    needs no replaying of the data.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        per_step = batch_size * world_size
        if dataset_len < per_step:
            raise ValueError(f"the dataset has {dataset_len} samples, fewer than one global batch ({batch_size} × {world_size} processes)")
        self.dataset_len, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start = 0, 0
        self.per_process = dataset_len // per_step * batch_size  # indices per process per epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_process - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.dataset_len)
        mine = order[: self.per_process * self.world_size][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())


def make_loader(dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int) -> DataLoader:
    """A DataLoader over this process's share; map-style datasets get a `ResumableSampler`.

    Iterable datasets (tar shards) split themselves across processes and workers (see
    `ldm.data.ShardDataset`).
    """
    from ldm.train.guards import ignore_stop_signals_in_worker

    common = dict(batch_size=batch_size, num_workers=num_workers, drop_last=True, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                  worker_init_fn=ignore_stop_signals_in_worker if num_workers else None)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **common)
    sampler = ResumableSampler(len(dataset), batch_size, seed, rank, world_size)
    return DataLoader(dataset, sampler=sampler, **common)


class DataPosition:
    """Where the loop is in the data: (epoch, batches into the epoch), saved with checkpoints.

    `batches()` yields batches forever, moving to the next epoch (a fresh permutation) when one
    ends; after `load(state)` it continues from the same batch. For iterable datasets the
    position is restored by skipping that many batches of the epoch (they are read, not trained on).
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.epoch = 0
        self.batch = 0  # batches already taken from the current epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def batches(self) -> Iterator[dict]:
        """Batches forever. Close the generator when the loop ends, however it ends (the loops use
        `contextlib.closing`): that ends the loader's worker processes at once. Left alive by an
        exception's traceback, they would hang the process at exit, since workers ignore the
        SIGTERM that multiprocessing's exit handler sends them (`ignore_stop_signals_in_worker`)."""
        while True:
            sampler, dataset = self.loader.sampler, self.loader.dataset
            if hasattr(dataset, "set_epoch"):  # per-epoch random crops/flips/captions
                dataset.set_epoch(self.epoch)
            skip = 0
            if isinstance(sampler, ResumableSampler):
                sampler.set_epoch(self.epoch, start=self.batch * self.loader.batch_size)
            else:
                skip = self.batch
            iterator = iter(self.loader)
            try:
                for i, batch in enumerate(iterator):
                    if i < skip:
                        continue
                    self.batch += 1
                    yield batch
            finally:
                # torch's multi-process iterator (idempotent; also run by its __del__, but a traceback
                # from a worker's error can keep the iterator referenced)
                shutdown = getattr(iterator, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                del iterator
            self.epoch, self.batch = self.epoch + 1, 0


def _bitsandbytes():
    """bitsandbytes, or a ValueError saying how to get it."""
    from ldm.quiet import import_bitsandbytes_offline

    import_bitsandbytes_offline()  # without its import-time Hub lookup (see ldm.quiet)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError(f"optim.optimizer=adamw8bit needs bitsandbytes, which is not installed ({e}): pip install bitsandbytes") from None
    return bitsandbytes


def check_optim(optim: OptimConfig) -> None:
    """Fail before anything loads when the configured optimizer cannot be built."""
    if optim.optimizer == "adamw8bit":
        _bitsandbytes()


def make_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' block-wise 8-bit AdamW for `optim.optimizer=adamw8bit` (see OptimConfig).

    The 8-bit optimizer's state (uint8 moments, their per-block absmax and the quantisation maps) is
    plain tensors, so checkpoints store it in safetensors like AdamW's, and a resumed run continues
    bit for bit."""
    kwargs = dict(lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps)
    if optim.optimizer == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The LR multiplier at optimizer step `step`: linear warm-up to 1, then constant or a cosine
    decay (Loshchilov & Hutter 2017, eq. 5, without restarts) down to `min_lr_ratio` at the end."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ConfiguredLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR whose peak LR comes from the config even across a resume.

    torch's LambdaLR saves its `base_lrs` and restores them on load, so a run resumed with a new
    `optim.lr` would keep the old one without a word, while a new `run.max_steps` or schedule
    (the lambda, rebuilt from the config) does take effect. Here the config wins for both: the
    loaded state keeps only the step count, and the optimizer's LR is set for the next step."""

    def load_state_dict(self, state_dict: dict) -> None:
        configured = list(self.base_lrs)
        super().load_state_dict(state_dict)
        if self.base_lrs != configured:
            log.info("optim.lr differs from the checkpoint's (%s → %s): using the config's", self.base_lrs, configured)
        self.base_lrs = configured
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def make_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    """A LambdaLR following `lr_factor`; step it once per optimizer update."""
    return ConfiguredLR(optimizer, lambda step: lr_factor(step, optim, max_steps))


def make_ema(parameters, ema: EMAConfig, foreach: bool = False):
    """diffusers' EMAModel over `parameters` (a model's, or its adapters'), or None when EMA is off.

    With warm-up the decay at update k is 1 − (1 + k / inv_gamma)^(−power), capped at `decay`, so
    early weights (mostly noise) are forgotten fast.

    `foreach=True` updates all shadow tensors with two multi-tensor kernels instead of a Python loop
    over parameters (three kernel launches and two library checks each): the same numbers, and
    what a GPU wants, where a step of a small model is bound by launches. On the CPU the loop is
    as fast (15 against 18 ms for the shapes U-Net), so the trainers ask for it on CUDA only.
    """
    if not ema.enabled:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(
        list(parameters), decay=ema.decay, update_after_step=ema.update_after_step, use_ema_warmup=ema.warmup,
        inv_gamma=ema.inv_gamma, power=ema.power, foreach=foreach,
    )


class MetricsLog:
    """Scalars to `OUTPUT/metrics.jsonl` always, and to TensorBoard when the `tensorboard` package
    is installed (`pip install tensorboard`; `tensorboard --logdir OUTPUT/tensorboard`)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            pass

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Save a (B, 3, H, W) batch in [−1, 1] as one PNG grid (2 px white gutters)."""
    from PIL import Image

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, c, h, w = images.shape
    nrow = min(nrow, b)
    rows = math.ceil(b / nrow)
    grid = torch.full((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def progress_bar(total: int, initial: int, enabled: bool):
    """tqdm on stderr, for the main process only."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, dynamic_ncols=True, unit="step")
