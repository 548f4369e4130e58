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
        n = len(self.tokenizer(prompt, truncation=False).input_ids)
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
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The last hidden state for each prompt, padded to the full context: (B, L, D)."""
        return self.embed(*self.tokenize(prompts))
