"""The Z-Image S3-DiT (single-stream diffusion transformer).

Module and parameter names are the official checkpoint keys (zimage_spec.md 4.1), so `strict` loading is the name
check. The order of operations follows zimage_spec.md 4.3 exactly. Items of a batch (the positive and negative
prompt under CFG) may differ in caption length: their tokens run back to back through every projection and FFN
(one pass over each weight, and one dequantization of it, for all items), while attention stays within each item.
At batch 1 the reference uses no attention mask, and its masked batch equals items run alone (zimage_spec.md 4.3),
so this matches it without padding or masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FREQUENCY_EMBEDDING_SIZE, SEQ_MULTI_OF, T_EMBED_MID, DiTConfig
from ..quant.qlinear import shared_input
from .layers import Block, Resident, RMSNorm, Runner, attention, schedule_of

MAX_PERIOD = 10000.0
BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")  # execution order, zimage_spec.md 4.3


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) into (N, p*p*C) tokens, channel fastest, row-major, padded to a multiple of 32 by repeating the
    last token (the pads are overwritten with a pad token once embedded)."""
    c, h, w = latent.shape
    n = (h // p) * (w // p)
    tokens = latent.view(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(n, p * p * c)
    pad = (-n) % SEQ_MULTI_OF
    return torch.cat([tokens, tokens[-1:].expand(pad, -1)]) if pad else tokens


def rope_freqs(pos: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """The 3-axis RoPE table for integer positions pos (S, 3): (S, head_dim/2) complex64, cos + i sin.

    Angles in float64 then cast to float32, then `torch.polar`, as the reference table is built.
    """
    angles = []
    for axis, d in enumerate(axes_dims):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
        angles.append((pos[:, axis].double()[:, None] * inv[None]).float())
    a = torch.cat(angles, dim=-1)
    return torch.polar(torch.ones_like(a), a)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair (complex) RoPE on x (S, H, D), computed in fp32: pair (x[2k], x[2k+1]) as a complex number
    times freqs[:, k]. One complex multiply: ten times faster on CPU than the same in real cos/sin arithmetic."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs[:, None]).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.to_q = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.to_k = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)])
        self.norm_q = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.norm_k = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.chunk: int | None = None  # query chunk for attention, set by the memory plan

    def forward(self, x: torch.Tensor, rope: torch.Tensor, spans: list[int]) -> torch.Tensor:
        """x: (S, dim), the tokens of one or more items back to back (`spans`: their lengths). Projections run on
        all tokens at once; attention runs within each item."""
        s = x.shape[0]
        with shared_input(x):
            q = apply_rope(self.norm_q(self.to_q(x).view(s, self.n_heads, self.head_dim)), rope)
            k = apply_rope(self.norm_k(self.to_k(x).view(s, self.n_kv_heads, self.head_dim)), rope)
            v = self.to_v(x).view(s, self.n_kv_heads, self.head_dim)
        out = joined([
            attention(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],
                      chunk=self.chunk)[0].transpose(0, 1)
            for qi, ki, vi in zip(q.split(spans), k.split(spans), v.split(spans), strict=True)])
        return fp16_guard(self.to_out[0](out.reshape(s, -1)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with shared_input(x):
            h = F.silu(self.w1(x), inplace=True).mul_(self.w3(x))
        return fp16_guard(self.w2(fp16_guard(h)))


FP16_MAX = 65504.0


def fp16_guard(t: torch.Tensor) -> torch.Tensor:
    """In fp16, clamp overflowed values back into range. The FFN of the real model exceeds fp16's range (NaN
    latents and black images on cards without bf16, Tongyi-MAI/Z-Image issues 14-15); the post-norm that follows
    each clamp makes the clipping harmless. A no-op in bf16 and fp32."""
    if t.dtype != torch.float16:
        return t
    return torch.nan_to_num(t, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


class TransformerBlock(nn.Module):
    """Sandwich-norm block; with `modulation`, tanh-gated adaLN scales from the timestep embedding (no shifts)."""

    def __init__(self, cfg: DiTConfig, modulation: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            # A list, not Sequential(SiLU, Linear): the block adaLN has no SiLU before it (zimage_spec.md 4.4).
            self.adaLN_modulation = nn.ModuleList([nn.Linear(cfg.adaln_dim, 4 * cfg.dim, bias=True)])

    def forward(self, x: torch.Tensor, rope: torch.Tensor, spans: list[int],
                adaln: torch.Tensor | None = None) -> torch.Tensor:
        """x: (S, dim) tokens of len(spans) items back to back; adaln: (1, adaln_dim) shared by all items, or one
        row per item."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, spans))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        mod = self.adaLN_modulation[0](adaln)
        if mod.shape[0] > 1:  # items at different times: one modulation row per token
            mod = mod.repeat_interleave(torch.tensor(spans, device=mod.device), dim=0)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
        # the norms' outputs are fresh tensors: scaled and gated in place
        h = self.attention(self.attention_norm1(x).mul_(1 + scale_msa), rope, spans)
        x = x + self.attention_norm2(h).mul_(gate_msa.tanh())
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x).mul_(1 + scale_mlp))).mul_(gate_mlp.tanh())


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, T_EMBED_MID), nn.SiLU(),
                                 nn.Linear(T_EMBED_MID, out_dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = FREQUENCY_EMBEDDING_SIZE // 2
        freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as the reference
        return self.mlp(emb.to(dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim, bias=True))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + self.adaLN_modulation(adaln))
        return self.linear(x)


@dataclass
class _Item:
    """One image's token streams inside a forward."""

    n_img: int  # real image tokens N (pads follow them)
    img: torch.Tensor
    cap: torch.Tensor
    img_rope: torch.Tensor
    cap_rope: torch.Tensor


@dataclass
class DiTState:
    """What the blocks of one forward read and write: every item's tokens back to back (CFG's pair is two items).

    `embed` fills the image and caption streams; `blocks` runs the refiners on them, joins them into the unified
    sequence `x` and runs the main layers on it; `final` reads `x`. Token order of `x` (and of a hint): item after
    item, each item's padded image tokens (`img_spans[i]`: its N real tokens, then pads to a multiple of 32) followed
    by its padded caption tokens (`cap_spans[i]`).
    """

    img: torch.Tensor  # (sum(img_spans), dim) image tokens
    cap: torch.Tensor  # (sum(cap_spans), dim) caption tokens
    img_rope: torch.Tensor  # RoPE tables of the image and caption streams, complex64
    cap_rope: torch.Tensor
    rope: torch.Tensor  # the unified sequence's table: per item its image rows, then its caption rows
    img_spans: list[int]
    cap_spans: list[int]
    n_img: list[int]  # real image tokens per item
    adaln: torch.Tensor  # (1, adaln_dim) when all items share the time, else one row per item
    shape: tuple[int, int, int]  # latent (C, H, W) of each item
    x: torch.Tensor | None = None  # (sum(spans), dim) unified sequence, set by `blocks`

    @property
    def spans(self) -> list[int]:
        """Tokens of each item in the unified sequence."""
        return [i + c for i, c in zip(self.img_spans, self.cap_spans, strict=True)]


class Control(Protocol):
    """A ControlNet's pass through one DiT forward (models/controlnet.py): `refined` after noise-refiner block i
    has run on the image stream (the block is ready to compute: the control stream may run it too), `hints` once
    the refiners are done (the refined image and caption streams), giving the hints by main layer index."""

    def refined(self, i: int, block: nn.Module, state: DiTState) -> None: ...

    def hints(self, img: torch.Tensor, cap: torch.Tensor, state: DiTState) -> Mapping[int, torch.Tensor]: ...


class ZImageDiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        key = cfg.embedder_key
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(cfg.patch_dim, cfg.dim, bias=True)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(cfg)})
        self.noise_refiner = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps),
                                          nn.Linear(cfg.cap_feat_dim, cfg.dim, bias=True))
        self.x_pad_token = nn.Parameter(torch.empty(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.empty(1, cfg.dim))
        self.layers = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_layers)])
        self.runner: Runner = Resident([*self.noise_refiner, *self.context_refiner, *self.layers])

    def schedule(self) -> list[Block]:
        """The 34 blocks in execution order: what the planner sizes and placement places; the rest stays resident."""
        return schedule_of(self, BLOCK_LISTS)

    def set_attention_chunk(self, chunk: int | None) -> None:
        for block in self.schedule():
            block.module.attention.chunk = chunk

    def _embed(self, latent: torch.Tensor, cap_feats: torch.Tensor) -> _Item:
        cfg, p = self.cfg, self.cfg.patch_size
        dev, dtype = latent.device, latent.dtype
        # Caption: pad to a multiple of 32 by repeating the last row, embed, then overwrite the pads.
        n_cap = cap_feats.shape[0]
        n_cap_pad = (-n_cap) % SEQ_MULTI_OF
        cap = torch.cat([cap_feats, cap_feats[-1:].expand(n_cap_pad, -1)]) if n_cap_pad else cap_feats
        cap = self.cap_embedder(cap.to(dtype))
        cap[n_cap:] = self.cap_pad_token.to(dtype)
        lp = n_cap + n_cap_pad
        cap_pos = torch.zeros(lp, 3, dtype=torch.long, device=dev)
        cap_pos[:, 0] = torch.arange(1, lp + 1, device=dev)
        c, h, w = latent.shape
        ht, wt = h // p, w // p
        n = ht * wt
        img = patchify(latent, p)
        n_img_pad = img.shape[0] - n
        img = self.all_x_embedder[cfg.embedder_key](img)
        img[n:] = self.x_pad_token.to(dtype)
        img_pos = torch.zeros(n + n_img_pad, 3, dtype=torch.long, device=dev)  # pads sit at (0, 0, 0)
        img_pos[:n, 0] = lp + 1
        img_pos[:n, 1] = torch.arange(ht, device=dev).repeat_interleave(wt)
        img_pos[:n, 2] = torch.arange(wt, device=dev).repeat(ht)
        return _Item(n, img, cap, rope_freqs(img_pos, cfg.axes_dims, cfg.rope_theta),
                     rope_freqs(cap_pos, cfg.axes_dims, cfg.rope_theta))

    def embed(self, latents: torch.Tensor, t: torch.Tensor, cap_feats: list[torch.Tensor]) -> DiTState:
        """Patchify and embed the latents and captions, build the RoPE tables and the adaLN input.

        latents (B, C, H, W) in the compute dtype; t (B,) = 1 - sigma; cap_feats: B tensors (L_i, cap_feat_dim).
        """
        # One adaLN input for all items when they share the time (CFG's pair always does).
        shared = bool((t == t[0]).all())
        adaln = self.t_embedder((t[:1] if shared else t) * self.cfg.t_scale, latents.dtype)
        items = [self._embed(latents[i], cap_feats[i]) for i in range(latents.shape[0])]
        # The items' tokens run back to back through each block: one pass over (one dequantization of) each
        # weight for all of them; attention stays within each item, so this equals running them one by one.
        return DiTState(
            img=joined([it.img for it in items]), cap=joined([it.cap for it in items]),
            img_rope=joined([it.img_rope for it in items]), cap_rope=joined([it.cap_rope for it in items]),
            rope=joined([torch.cat([it.img_rope, it.cap_rope]) for it in items]),
            img_spans=[it.img.shape[0] for it in items], cap_spans=[it.cap.shape[0] for it in items],
            n_img=[it.n_img for it in items], adaln=adaln, shape=tuple(latents.shape[1:]))

    def blocks(self, state: DiTState, hints: Mapping[int, torch.Tensor] | Control | None = None) -> DiTState:
        """Run the block schedule through `self.runner`: refiners, then the unified sequence through `layers`.

        `hints[i]` (main layer index i, 0-based in `layers`) is added to the unified sequence `x` right after
        `layers.i` has run, before `layers.i+1`: a (sum(state.spans), dim) tensor in the compute dtype, in the token
        order of `x` (see DiTState), as ControlNet adds its block samples. When the runner is stopped mid-pass
        (`runner.stop()`), the remaining blocks are skipped and the state is returned as the blocks that ran left it;
        the unified sequence is built even if no main layer ran, so `final` always gets a well-formed state.
        A `Control` (a ControlNet's pass) instead computes the hints during the pass: it sees each noise-refiner
        block as it runs and gives the hints once the refiners are done.
        """
        control = None if hints is None or isinstance(hints, Mapping) else hints
        n_ref, hints = self.cfg.n_refiner_layers, ({} if control is not None else hints or {})
        img, cap, x = state.img, state.cap, None
        with self.runner.run() as blocks:
            for i, block in enumerate(blocks):
                if i < n_ref:
                    img = block(img, state.img_rope, state.img_spans, state.adaln)
                    if control is not None:
                        control.refined(i, block, state)
                elif i < 2 * n_ref:
                    cap = block(cap, state.cap_rope, state.cap_spans)
                else:
                    if x is None:
                        x = self.unified(img, cap, state)
                        hints = control.hints(img, cap, state) if control is not None else hints
                    x = block(x, state.rope, state.spans, state.adaln)
                    if i - 2 * n_ref in hints:
                        x = x + hints[i - 2 * n_ref]
        return replace(state, img=img, cap=cap, x=self.unified(img, cap, state) if x is None else x)

    @staticmethod
    def unified(img: torch.Tensor, cap: torch.Tensor, state: DiTState) -> torch.Tensor:
        """Each item's image tokens, then its caption tokens; items back to back."""
        pairs = zip(img.split(state.img_spans), cap.split(state.cap_spans), strict=True)
        return joined([torch.cat(pair) for pair in pairs])

    def final(self, state: DiTState) -> torch.Tensor:
        """Final layer on each item's real image tokens, then unpatchify: (B, C, H, W) in the compute dtype."""
        final = self.all_final_layer[self.cfg.embedder_key]
        c, h, w = state.shape
        p = self.cfg.patch_size
        out = []
        for i, (xi, n) in enumerate(zip(state.x.split(state.spans), state.n_img, strict=True)):
            y = final(xi[:n], state.adaln[i:i + 1] if state.adaln.shape[0] > 1 else state.adaln)
            out.append(y.view(h // p, w // p, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h, w))
        return torch.stack(out)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, cap_feats: list[torch.Tensor]) -> torch.Tensor:
        """latents (B, C, H, W) in the compute dtype; t (B,) = 1 - sigma; cap_feats: B tensors (L_i, cap_feat_dim).

        Returns the model output (B, C, H, W): the negative flow velocity, in the compute dtype.
        """
        return self.final(self.blocks(self.embed(latents, t, cap_feats)))


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts back to back; a single part as it is (no copy: batch 1 is the common case)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)

