"""Prompt → token ids: `tokenizer/tokenizer.json` through the `tokenizers` library and Qwen's chat template.

The template renders as the official pipeline's `apply_chat_template(..., add_generation_prompt=True,
enable_thinking=True)` does (zimage_spec.md 3): no `<think>` block, the prompt verbatim. The whole rendered string
is tokenized at once, never pre-tokenized pieces glued together, because the BPE split rules look across them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

from .config import MAX_TEXT_TOKENS
from .errors import CheckpointError

CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
# Qwen2's pre-tokenizer split rule (as in its tokenizer.json).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def qwen_byte_level(tok: Tokenizer) -> Tokenizer:
    """Give a BPE tokenizer Qwen2's text pipeline: NFC, Qwen's split rule, byte-level pre-tokenizer and decoder."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


@dataclass(frozen=True)
class Tokens:
    ids: torch.Tensor  # (L,) int64
    truncated_from: int | None  # the untruncated length when the prompt was cut


class PromptTokenizer:
    def __init__(self, path: Path, max_tokens: int = MAX_TEXT_TOKENS) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a tokenizers JSON file ({e})") from None
        # Right truncation like the reference: no special tokens are added by the post-processor either way.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_tokens = max_tokens

    def encode(self, prompt: str) -> Tokens:
        # Special tokens added as the reference's post-processor adds them (Qwen's adds none).
        ids = self.tokenizer.encode(CHAT_TEMPLATE.format(prompt=prompt)).ids
        cut = len(ids) if len(ids) > self.max_tokens else None
        return Tokens(torch.tensor(ids[:self.max_tokens], dtype=torch.long), cut)
