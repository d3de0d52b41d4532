"""The one fixture module: tiny random checkpoints in the exact official file layout.

Everything is written by `zimage_lite.demo.write_checkpoint` (the same code that makes the demo model), with a
config small enough for fp32 CPU parity runs in a fraction of a second but with every mechanism of the real model:
two refiner blocks of each kind, GQA in the text encoder, a 3-axis RoPE, caption and image padding, four VAE levels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zimage_lite.config import DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig
from zimage_lite.demo import write_checkpoint

TINY = ModelConfig(
    dit=DiTConfig(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=48,
                  axes_dims=(8, 12, 12)),
    text_encoder=TextEncoderConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16),
    vae=VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
)

PROMPTS = {
    "en": "a red fox in the snow, soft morning light",
    "cjk": "一只小狐狸在雪地里，柔和的晨光",
}


def make_checkpoint(folder: Path, cfg: ModelConfig = TINY, seed: int = 0, **kwargs) -> Path:
    """The official layout: transformer F32 sharded, text encoder BF16 sharded, VAE BF16, tokenizer, scheduler."""
    return write_checkpoint(folder, cfg, seed=seed, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: the figure the parity tolerances are stated in."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# TINY with a 256-wide DiT, so the K-quants apply: every Linear row of the main blocks is 256 long (qkv, out, w1,
# w3, adaLN), except w2's 682 (int(256 / 3 * 8)), which falls back as llama.cpp does. TINY's 64-wide rows all fall
# back. Used by the quantize and interop tests.
KQUANT = ModelConfig(
    dit=DiTConfig(dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=48,
                  axes_dims=(32, 48, 48)),
    text_encoder=TINY.text_encoder,
    vae=TINY.vae,
)
