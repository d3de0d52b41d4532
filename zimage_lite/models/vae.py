"""The FLUX.1 autoencoder's decoder, with parameter names of diffusers' AutoencoderKL (`decoder.*`).

Structure as zimage_spec.md 6. Tiled decoding (for budgets where a whole image's activations do not fit) lives
in `decode_tiled`: layer by layer over tiles with a one-pixel halo and whole-image GroupNorm statistics, so it
computes the same image as the untiled decode instead of cross-fading tiles that each normalised differently.
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

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Sampler latents (B, C, h, w) in fp32 → image in [-1, 1] (B, 3, 8h, 8w) in fp32.

        `tile` (latent cells) decodes the high-resolution part in tiles, with full feature maps kept in host
        memory; None decodes the whole latent at once.
        """
        dtype = self.decoder.conv_in.weight.dtype
        z = (latents.to(self.decoder.conv_in.weight.device) / self.cfg.scaling_factor + self.cfg.shift_factor)
        z = z.to(dtype)
        if tile is None or (z.shape[2] <= tile and z.shape[3] <= tile):
            return self.decoder(z).float()
        return decode_tiled(self.decoder, z, tile, torch.device("cpu"))


def _group_stats(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm mean and 1/std over the whole feature map (B, groups), in fp32, one group at a time."""
    b, c = x.shape[:2]
    xs = x.view(b, norm.num_groups, c // norm.num_groups, -1)
    stats = [torch.var_mean(xs[:, g].reshape(b, -1).float(), dim=-1, unbiased=False) for g in range(norm.num_groups)]
    var = torch.stack([v for v, _ in stats], dim=1)
    mean = torch.stack([m for _, m in stats], dim=1)
    return mean, (var + norm.eps).rsqrt()


def _group_apply(t: torch.Tensor, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    b, c, h, w = t.shape
    mean, rstd = (s.to(t.device)[:, :, None, None, None] for s in stats)
    y = ((t.float().view(b, norm.num_groups, c // norm.num_groups, h, w) - mean) * rstd).view(b, c, h, w)
    return (y * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]).to(t.dtype)


def _map_tiles(fn, inputs: list[torch.Tensor], tile: int, scale: int, out_channels: int,
               device: torch.device) -> torch.Tensor:
    """out = fn(*inputs) computed tile by tile on `device`, each tile read with a 1-pixel halo.

    A 3x3 convolution needs one neighbouring pixel on each side, so the halo makes every kept output pixel exact;
    the halo's own outputs (where the convolution saw zero padding) are cropped away. `scale` is the output's
    size per input pixel (2 for an upsampling step). Inputs and output stay where `inputs` live (host memory).
    """
    x = inputs[0]
    b, _, h, w = x.shape
    out = torch.empty(b, out_channels, h * scale, w * scale, dtype=x.dtype, device=x.device)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            ya, xa, yb, xb = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 1, h), min(x1 + 1, w)
            piece = fn(*(t[:, :, ya:yb, xa:xb].to(device) for t in inputs))
            oy, ox = (y0 - ya) * scale, (x0 - xa) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                piece[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale].to(out.device)
    return out


def _resnet_tiled(r: ResnetBlock, x: torch.Tensor, tile: int, device: torch.device) -> torch.Tensor:
    s1 = _group_stats(x, r.norm1)
    h = _map_tiles(lambda t: r.conv1(F.silu(_group_apply(t, r.norm1, s1))), [x], tile, 1, r.conv1.out_channels,
                   device)
    s2 = _group_stats(h, r.norm2)

    def second(ht: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        skip = r.conv_shortcut(xt) if r.conv_shortcut is not None else xt
        return skip + r.conv2(F.silu(_group_apply(ht, r.norm2, s2)))

    return _map_tiles(second, [h, x], tile, 1, r.conv2.out_channels, device)


def decode_tiled(decoder: Decoder, z: torch.Tensor, tile: int, store: torch.device) -> torch.Tensor:
    """Decode z with the up path in tiles of `tile` latent cells, keeping full feature maps in `store` memory.

    Exact, unlike independent overlapping tiles: every GroupNorm uses the statistics of the whole feature map and
    the mid-block attention sees every position (it runs at latent resolution, which is small), so the tiles only
    bound the size of the temporaries on the compute device. Seams cannot appear.
    """
    device = z.device
    x = decoder.mid_block(decoder.conv_in(z)).to(store)
    px = tile  # tile side in the current feature map's pixels: the same number of tiles at every level
    for block in decoder.up_blocks:
        for r in block.resnets:
            x = _resnet_tiled(r, x, px, device)
        if block.upsamplers is not None:
            up = block.upsamplers[0]
            x = _map_tiles(lambda t, up=up: up.conv(F.interpolate(t, scale_factor=2.0, mode="nearest")), [x], px,
                           2, up.conv.out_channels, device)
            px *= 2
    stats = _group_stats(x, decoder.conv_norm_out)
    out = _map_tiles(lambda t: decoder.conv_out(F.silu(_group_apply(t, decoder.conv_norm_out, stats))), [x], px, 1,
                     decoder.conv_out.out_channels, device)
    return out.float()
