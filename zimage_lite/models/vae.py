"""The FLUX.1 autoencoder's decoder, with parameter names of diffusers' AutoencoderKL (`decoder.*`).

Structure as zimage_spec.md 6. Tiled decoding (for budgets where a whole image's activations do not fit) lives
in `decode_tiled`: tiles overlap and are cross-faded, so seams stay below the 2/255 that the tests hold it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig

GN_EPS = 1e-6


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=GN_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=GN_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all latent positions, with Linear (not 1x1 conv) projections."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=GN_EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # SDPA: never the (HW)^2 score matrix where avoidable
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attn: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([AttnBlock(ch, groups)]) if attn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = list(reversed(cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, g, upsample=i < len(chans) - 1)
            for i in range(len(chans))
        ])
        self.conv_norm_out = nn.GroupNorm(g, chans[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderDecoder(nn.Module):
    """Holds the decoder under the name `decoder`, so keys match the `vae/` checkpoint."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)

    def decode(self, latents: torch.Tensor, tile: int | None = None, overlap: int = 16) -> torch.Tensor:
        """Sampler latents (B, C, h, w) in fp32 → image in [-1, 1] (B, 3, 8h, 8w) in fp32.

        `tile` (latent cells) decodes in overlapping tiles; None decodes the whole latent at once.
        """
        dtype = self.decoder.conv_in.weight.dtype
        z = (latents / self.cfg.scaling_factor + self.cfg.shift_factor).to(dtype)
        if tile is None or (z.shape[2] <= tile and z.shape[3] <= tile):
            return self.decoder(z).float()
        return decode_tiled(self.decoder, z, tile, overlap, self.cfg.scale)


def _ramp(n: int, device: torch.device) -> torch.Tensor:
    """Blend weights rising over n pixels, strictly between 0 and 1."""
    return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n


def decode_tiled(decoder: nn.Module, z: torch.Tensor, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """Decode z in tiles of `tile` latent cells overlapping by `overlap` cells, cross-fading the overlaps.

    Each output pixel is a weighted mean of the tiles covering it, with weights that ramp linearly across each
    overlap, so there is no hard seam. Peak memory is one tile's activations plus the output image.
    """
    b, _, h, w = z.shape
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile {tile} must be larger than overlap {overlap}")
    out = torch.zeros(b, 3, h * scale, w * scale, dtype=torch.float32, device=z.device)
    weight = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float32, device=z.device)

    def starts(n: int) -> list[int]:
        s = list(range(0, max(n - tile, 0) + 1, stride))
        if s[-1] + tile < n:
            s.append(n - tile)
        return s

    ramp_px = overlap * scale
    for y in starts(h):
        for x in starts(w):
            piece = decoder(z[:, :, y:y + tile, x:x + tile]).float()
            ph, pw = piece.shape[2:]
            wy = torch.ones(ph, device=z.device)
            wx = torch.ones(pw, device=z.device)
            if y > 0:
                wy[:ramp_px] = _ramp(ramp_px, z.device)
            if y + tile < h:
                wy[-ramp_px:] = torch.minimum(wy[-ramp_px:], _ramp(ramp_px, z.device).flip(0))
            if x > 0:
                wx[:ramp_px] = _ramp(ramp_px, z.device)
            if x + tile < w:
                wx[-ramp_px:] = torch.minimum(wx[-ramp_px:], _ramp(ramp_px, z.device).flip(0))
            wgt = wy[:, None] * wx[None, :]
            ys, xs = y * scale, x * scale
            out[:, :, ys:ys + ph, xs:xs + pw] += piece * wgt
            weight[:, :, ys:ys + ph, xs:xs + pw] += wgt
    return out / weight
