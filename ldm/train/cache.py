"""The latent cache: the VAE's posterior (and a frozen text encoder's embeddings) computed once.

Encoding every image with the VAE at every step is most of a small U-Net's training cost; the
VAE is frozen, so its output for a given image never changes. `build_cache` runs it once over the
dataset and writes one safetensors file:

    latent_mean, latent_std   (N, C, h, w)  the diagonal Gaussian posterior q(z | x) per image:
                                            the loop draws z = mean + std · ξ itself, exactly as it
                                            does from `vae.encode(x).latent_dist` without a cache
    text_embeds               (N, L, D)     frozen encoder only: the caption embeddings
    empty_embed               (1, L, D)     frozen encoder only: the embedding of "" (condition dropout)
    input_ids, attention_mask (N, L)        jointly trained encoder only: the caption's token ids

The file's name is a hash (`cache_key`) of everything that decides its contents: the VAE weights,
the frozen encoder's weights, the tokenizer and its context length, and the preprocessing (data
path, sample count, resolution, crop). Change any of them and the key changes, so a stale cache is
never used: training looks for the file of the current key and uses it when present, never running
the VAE encoder then. Random crops and flips cannot be cached (every epoch differs): such configs
are refused. Captions are those of epoch 0 (a dataset offering several captions per image picks
one per epoch; a cached run keeps the first). Edits to image files in place are not detected:
delete the cache folder after changing a dataset's images.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset

CACHE_FORMAT = 1
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_hash(tokenizer, max_length: int) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{type(tokenizer).__name__}:{max_length}:{vocab}".encode()).hexdigest()


def cache_key(*, vae, tokenizer, max_length: int, text_encoder=None, data: dict) -> str:
    """The hash naming a cache: VAE weights, frozen encoder weights (None: trained jointly, only
    token ids are cached), tokenizer, and the preprocessing described by `data`."""
    parts = {
        "format": CACHE_FORMAT,
        "vae": weights_hash(vae),
        "text_encoder": weights_hash(text_encoder) if text_encoder is not None else None,
        "tokenizer": tokenizer_hash(tokenizer, max_length),
        "data": data,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_file(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"latents-{key[:20]}.safetensors"


def find_cache(cache_dir: str | Path, key: str) -> Path | None:
    """The cache file for `key` if it exists and really carries that key, else None."""
    path = cache_file(cache_dir, key)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return path if meta.get("key") == key else None


def check_cacheable(dataset, crop: str, random_flip: bool) -> None:
    if isinstance(dataset, IterableDataset):
        raise ValueError("the latent cache needs a map-style dataset (a folder, metadata.jsonl/csv or datasets rows); tar shards are streamed, not cached")
    if crop != "center" or random_flip:
        raise ValueError("the latent cache stores one view per image: set data.crop=center and data.random_flip=false to use it")


@torch.no_grad()
def build_cache(path: str | Path, key: str, dataset: Dataset, *, vae, prompt_encoder, frozen_text: bool,
                batch_size: int = 32, num_workers: int = 0, dtype: str = "float32", progress: bool = True) -> Path:
    """Encode every sample of `dataset` (in index order, so cache row i is dataset item i) and
    write the cache file atomically. `prompt_encoder` is an `ldm.text.PromptEncoder`; with
    `frozen_text` its embeddings are stored, otherwise only the token ids."""
    from tqdm.auto import tqdm

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    store = CACHE_DTYPES[dtype]
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = next(vae.parameters()).device
    columns: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc="latent cache", unit="batch", disable=not progress):
        pixels = batch["pixel_values"].to(device, vae.dtype)
        posterior = vae.encode(pixels).latent_dist  # (B, C, h, w) mean and std
        columns.setdefault("latent_mean", []).append(posterior.mean.float().cpu().to(store))
        columns.setdefault("latent_std", []).append(posterior.std.float().cpu().to(store))
        input_ids, attention_mask = prompt_encoder.tokenize(list(batch["caption"]))
        if frozen_text:
            columns.setdefault("text_embeds", []).append(prompt_encoder.embed(input_ids, attention_mask).float().cpu().to(store))
        else:
            columns.setdefault("input_ids", []).append(input_ids.to(torch.int64))
            columns.setdefault("attention_mask", []).append(attention_mask.to(torch.int64))
    tensors = {name: torch.cat(parts).contiguous() for name, parts in columns.items()}
    if frozen_text:
        tensors["empty_embed"] = prompt_encoder.encode([""]).float().cpu().to(store).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"key": key, "format": str(CACHE_FORMAT), "num_samples": str(len(dataset)), "dtype": dtype})
    os.replace(tmp, path)
    return path


class LatentCache(Dataset):
    """A cache file as a map-style dataset: item i is dataset item i's posterior and text.

    Rows are read lazily through safetensors' memory map (opened once per process / worker), so a
    cache larger than memory still works. Items: "latent_mean", "latent_std" and either
    "text_embeds" (frozen encoder) or "input_ids" + "attention_mask" (joint encoder), all float32
    / int64.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self.columns = [k for k in f.keys() if k != "empty_embed"]
            self.num_samples = f.get_slice("latent_mean").get_shape()[0]
            self.empty_embed = f.get_tensor("empty_embed").float() if "empty_embed" in f.keys() else None
        self._file = None

    @property
    def frozen_text(self) -> bool:
        return self.empty_embed is not None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if self._file is None:
            self._file = safe_open(self.path, framework="pt")
        item = {}
        for name in self.columns:
            row = self._file.get_slice(name)[i : i + 1][0]
            item[name] = row if row.dtype == torch.int64 else row.float()
        return item

    def __getstate__(self):  # the memory map is reopened in each data-loader worker
        return {**self.__dict__, "_file": None}
