"""Text conditioning: prompts → token ids → the embeddings c the U-Net cross-attends to.

The encoders are transformers' (CLIPTextModel, T5EncoderModel); this module only fixes how prompts
are tokenized and read out, identically to diffusers' StableDiffusionPipeline so that the same
weights give the same embeddings in both: pad to the tokenizer's maximum length, truncate longer
prompts (with a warning saying how much was lost), take the last hidden state.
"""

from __future__ import annotations

import warnings

import torch


class LdmWarning(UserWarning):
    """Something the user should know about their input, that does not stop the run."""


def max_length(tokenizer) -> int:
    """The tokenizer's context length (77 for CLIP). Tokenizers without one get 77 too."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 100_000 else 77  # transformers' "no limit" is a huge sentinel


class PromptEncoder:
    """A tokenizer and its text encoder, used together: `encode(prompts)` → (B, L, D)."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_length = max_length(tokenizer)
        # CLIP was trained without an attention mask over padding (SD relies on that); T5 with one.
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False)) or text_encoder.config.model_type == "t5"

    def dropped_tokens(self, prompt: str) -> int:
        """How many tokens of `prompt` (specials included) do not fit the context and are cut."""
        # verbose=False: the tokenizer's own "longer than" warning; warn_if_truncated says it better
        n = len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)
        return max(0, n - self.max_length)

    def warn_if_truncated(self, prompts: list[str]) -> None:
        for prompt in dict.fromkeys(prompts):  # once per distinct prompt
            dropped = self.dropped_tokens(prompt)
            if dropped:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(
                    f"prompt {short!r} is longer than the text encoder's {self.max_length} tokens; "
                    f"the last {dropped} token{'s' if dropped > 1 else ''} were dropped",
                    LdmWarning,
                    stacklevel=4,  # warn_if_truncated ← __call__ ← torch.no_grad's wrapper ← the caller
                )

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, L): padded to the full context, truncated beyond it."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden state of tokenized prompts, (B, L, D); with gradients (training a text
        encoder jointly uses this). The mask is passed only to encoders trained with one (T5)."""
        device = self.text_encoder.device
        mask = attention_mask.to(device) if self.use_attention_mask else None
        return self.text_encoder(input_ids.to(device), attention_mask=mask)[0]

    @torch.no_grad()
    def encode(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """The last hidden state for each prompt, padded to the full context: (B, L, D). With
        `clip_skip` k (CLIP encoders only), the hidden state k layers before the last, through the
        final layer norm, as diffusers' `encode_prompt` (and AUTOMATIC1111's "Clip skip" k + 1)."""
        if not clip_skip:
            return self.embed(*self.tokenize(prompts))
        ids, _ = self.tokenize(prompts)
        states = self.text_encoder(ids.to(self.text_encoder.device), output_hidden_states=True).hidden_states
        encoder = self.text_encoder  # transformers 5 has the norm on the model, earlier versions on .text_model
        norm = encoder.final_layer_norm if hasattr(encoder, "final_layer_norm") else encoder.text_model.final_layer_norm
        return norm(states[-(clip_skip + 1)])

    def check_clip_skip(self, clip_skip) -> None:
        """A ValueError unless `clip_skip` is None or a layer count this encoder has (CLIP only)."""
        if clip_skip is None:
            return
        layers = getattr(self.text_encoder.config, "num_hidden_layers", 0)
        if self.text_encoder.config.model_type != "clip_text_model":
            kind = self.text_encoder.config.model_type
            raise ValueError(f"clip_skip applies to CLIP text encoders; this one is {kind}")
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip must be a whole number of layers in [0, {layers - 1}], got {clip_skip!r}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 bytes to printable characters (Radford et al.
    2019), the base symbols of a byte-level BPE. transformers 5 no longer exports it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def prune_clip_bpe(vocab: dict[str, int], merges: list[str], words) -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level BPE cut down to what `words` need: all 512 byte symbols (with and without
    the end-of-word mark, so any text still tokenizes, if in smaller pieces), the merges the words
    use, in their original order, and the two special tokens. Written by hand: neither tokenizers
    nor transformers prunes a BPE vocabulary.

    BPE merges the present pair of lowest rank first (Sennrich et al. 2016), so keeping exactly the
    merges a word uses, in rank order, reproduces its segmentation: each step's winner is still the
    lowest-ranked present pair among the kept ones. A small world (the shapes world has ~40 words)
    then needs ~600 embeddings instead of CLIP's 49,408. Words must be lower-case letters only (one
    pre-token each under CLIP's splitting rule); ids are renumbered in their original order."""
    rank = {tuple(m.split()): i for i, m in enumerate(merges)}
    used: set[tuple[str, str]] = set()
    for word in words:
        if not word or not word.isalpha() or word != word.lower():
            raise ValueError(f"prune_clip_bpe: words must be lower-case letters, got {word!r}")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in rank}
            if not pairs:
                break
            best = min(pairs, key=rank.__getitem__)
            used.add(best)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
    kept_merges = sorted(used, key=rank.__getitem__)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    base = [token for token, _ in by_id[:512]]  # CLIP: ids 0-255 bytes, 256-511 bytes + "</w>"
    specials = [token for token, _ in by_id if token.startswith("<|")]
    keep = set(base) | {a + b for a, b in kept_merges} | set(specials)
    pruned = {token: i for i, token in enumerate(token for token, _ in by_id if token in keep)}
    return pruned, [f"{a} {b}" for a, b in kept_merges]
