"""Qwen3, one module run two ways: Z-Image's feature extractor, and the causal LM behind the prompt enhancer.

The image path reads `hidden_states[-2]`, the output of the second-to-last decoder layer without the final norm
(zimage_spec.md 2.3), so `Qwen3Encoder(cfg)` builds and runs layers 0..n-2 and never reads the final norm. The prompt
runs alone, unpadded, with a causal mask: right padding never reaches the real tokens, so this equals the reference's
padded batch. `Qwen3Encoder(cfg, lm=True)` builds every layer and the final norm, and `logits` runs them with a
`KVCache` (the prompt in one pass, then one token at a time) into the output head, which is the embedding table
itself (Qwen3-4B ties them: the checkpoint stores no lm_head). Names match the checkpoint keys with the `model.`
prefix removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from ..quant.formats import dequantize
from ..quant.qlinear import QEmbedding, shared_input
from .layers import Block, Resident, RMSNorm, Runner, attention, schedule_of


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen's RoPE layout: the head vector's first and second halves form the pairs (not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer for one sequence, allocated once for `length` positions: (layers, kv heads,
    length, head_dim) each (runtime/sizes.py kv_cache_bytes counts them). `pos` counts the positions filled; the model
    advances it after each pass."""

    def __init__(self, cfg: TextEncoderConfig, layers: int, length: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (layers, cfg.num_key_value_heads, length, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's (kv heads, S, head_dim) keys and values after the filled positions; all keys and values
        so far, as views."""
        end = self.pos + k.shape[1]
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        s = x.shape[0]
        # q/k norms come before RoPE; everything as (1, heads, S, head_dim) for SDPA.
        with shared_input(x):
            q = self.q_norm(self.q_proj(x).view(s, self.n_heads, self.head_dim)).transpose(0, 1)
            k = self.k_norm(self.k_proj(x).view(s, self.n_kv, self.head_dim)).transpose(0, 1)
            v = self.v_proj(x).view(s, self.n_kv, self.head_dim).transpose(0, 1)
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
        causal = True
        if cache is not None:
            # a pass either fills an empty cache (the prompt: causal) or adds one token, which sees every key
            if cache.pos and s != 1:
                raise ValueError("a KV cache takes the prompt in its first pass, then one token per pass")
            k, v = cache.store(layer, k, v)
            causal = s > 1
        out = attention(q[None], k[None], v[None], causal=causal)[0]
        return self.o_proj(out.transpose(0, 1).reshape(s, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with shared_input(x):
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Encoder(nn.Module):
    # Modules that stay on the host on every device: the 0.4 G-param embedding table, of which only the prompt's
    # rows are read (placement keeps them there; the planner counts them as host memory).
    HOST_ONLY = ("embed_tokens",)

    def __init__(self, cfg: TextEncoderConfig, lm: bool = False) -> None:
        super().__init__()
        self.cfg, self.lm = cfg, lm
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        n = cfg.num_hidden_layers if lm else cfg.layers_used
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg) for _ in range(n)])
        if lm:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.runner: Runner = Resident(self.layers)
        self._head: nn.Module | None = None

    def schedule(self) -> list[Block]:
        """The decoder layers in execution order: what the planner sizes and placement places."""
        return schedule_of(self, ("layers",))

    def _embed(self, ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        return self.embed_tokens(ids.to(self.embed_tokens.weight.device)).to(device=device, dtype=dtype)

    def _rope(self, start: int, length: int, device: torch.device | str,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.cfg.head_dim
        # cos/sin in fp32, then cast to the activation dtype, as the reference does.
        inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        freqs = torch.arange(start, start + length, dtype=torch.float32, device=device)[:, None] * inv[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """ids (L,) → caption features (L, hidden) in `dtype` on `device`.

        The embedding table may stay on the host: only the L rows used are gathered and moved.
        """
        x = self._embed(ids, device, dtype)
        cos, sin = self._rope(0, ids.shape[0], device, dtype)
        with self.runner.run() as layers:
            for layer in layers:
                x = layer(x, cos, sin)
        return x

    def logits(self, ids: torch.Tensor, cache: KVCache | None, device: torch.device | str,
               dtype: torch.dtype) -> torch.Tensor:
        """The causal LM (built with lm=True): ids (S,) at the positions after `cache.pos` → next-token logits
        (vocab,) in fp32 after the last of them. With a cache the keys and values are kept and `cache.pos` advances
        by S; without one, ids is the whole sequence from position 0."""
        if not self.lm:
            raise ValueError("logits needs the model built with lm=True (every layer and the final norm)")
        start = cache.pos if cache is not None else 0
        x = self._embed(ids, device, dtype)
        cos, sin = self._rope(start, ids.shape[0], device, dtype)
        with self.runner.run() as layers:
            for i, layer in enumerate(layers):
                x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += ids.shape[0]
        h = self.norm(x[-1:])  # only the last position's logits are needed
        return self.head(h)[0].float()

    @property
    def head(self) -> nn.Module:
        """The tied output head, a Linear over the embedding table in the compute dtype on the compute device (where
        the final norm is), made at the first call and kept: a view when the host table is stored in that dtype,
        else a copy (dequantized once when the table is packed, not at every token). `set_head` puts another form
        of the same table in its place before that (the enhancer's int8 rows, quant/decode_linear.py)."""
        if self._head is None:
            emb, w = self.embed_tokens, self.norm.weight  # the norm is placed in the compute dtype and device
            if isinstance(emb, QEmbedding):
                weight = dequantize(emb.weight, emb.qtype, emb.shape, w.dtype).to(w.device)
            else:
                weight = emb.weight.to(device=w.device, dtype=w.dtype)
            head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False, device="meta")
            head.weight = nn.Parameter(weight, requires_grad=False)
            self.set_head(head)
        return self._head

    def set_head(self, head: nn.Module) -> None:
        """Use `head` (hidden -> vocab logits) as the output head: a form of the tied embedding table."""
        self._head = head
