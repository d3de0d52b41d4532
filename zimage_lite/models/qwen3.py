"""Qwen3 as Z-Image uses it: a feature extractor, not a language model.

Z-Image reads `hidden_states[-2]`, the output of the second-to-last decoder layer without the final norm
(zimage_spec.md 2.3), so only layers 0..n-2 are built and run, and the final norm and lm_head are never read.
The prompt runs alone, unpadded, with a causal mask: right padding never reaches the real tokens, so this equals the
reference's padded batch. Names match the checkpoint keys with the `model.` prefix removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from .layers import Block, Resident, RMSNorm, Runner, attention, schedule_of


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen's RoPE layout: the head vector's first and second halves form the pairs (not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = x.shape[0]
        # q/k norms come before RoPE; everything as (1, heads, S, head_dim) for SDPA.
        q = self.q_norm(self.q_proj(x).view(s, self.n_heads, self.head_dim)).transpose(0, 1)
        k = self.k_norm(self.k_proj(x).view(s, self.n_kv, self.head_dim)).transpose(0, 1)
        v = self.v_proj(x).view(s, self.n_kv, self.head_dim).transpose(0, 1)
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
        out = attention(q[None], k[None], v[None], causal=True)[0]
        return self.o_proj(out.transpose(0, 1).reshape(s, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Encoder(nn.Module):
    # Modules that stay on the host on every device: the 0.4 G-param embedding table, of which only the prompt's
    # rows are read (placement keeps them there; the planner counts them as host memory).
    HOST_ONLY = ("embed_tokens",)

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg) for _ in range(cfg.layers_used)])
        self.runner: Runner = Resident(self.layers)

    def schedule(self) -> list[Block]:
        """The decoder layers in execution order: what the planner sizes and placement places."""
        return schedule_of(self, ("layers",))

    def forward(self, ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """ids (L,) → caption features (L, hidden) in `dtype` on `device`.

        The embedding table may stay on the host: only the L rows used are gathered and moved.
        """
        x = self.embed_tokens(ids.to(self.embed_tokens.weight.device)).to(device=device, dtype=dtype)
        hd = self.cfg.head_dim
        # cos/sin in fp32, then cast to the activation dtype, as the reference does.
        inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        freqs = torch.arange(ids.shape[0], dtype=torch.float32, device=device)[:, None] * inv[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        with self.runner.run() as layers:
            for layer in layers:
                x = layer(x, cos, sin)
        return x
