"""The FLUX.1 autoencoder's decoder, with parameter names of diffusers' AutoencoderKL (`decoder.*`).

Structure as zimage_spec.md 6; the layers the encoder shares (vae_encoder.py) live here too. Tiled decoding (for
budgets where a whole image's activations do not fit) is `decode_tiled`: layer by layer over tiles with a one-pixel
halo and whole-image GroupNorm statistics (vae_tiles.py), so it computes the same image as the untiled decode
instead of cross-fading tiles that each normalised differently. `decode_memory` is what either way allocates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .layers import attention
from .vae_tiles import (
    F32,
    VAEMemory,
    Walk,
    channels_last,
    group_stats,
    map_format,
    map_tiles,
    memory_format,
    norm_silu,
    resnet_tiled,
    window,
)

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
        # Chained, with SiLU in place on each norm's fresh output: every temporary is freed as soon as it is read,
        # so a block holds at most x, one normed map and one convolution output (vae_memory counts exactly that).
        h = self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True)))
        h = self.conv2(F.silu(h, inplace=True))
        return h.add_(self.conv_shortcut(x) if self.conv_shortcut is not None else x)  # = skip + h, bit for bit


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
        out = attention(q, k, v)[:, 0]  # never the (HW)^2 scores: SDPA's kernels, or the CPU bf16 route's chunks
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


# Nearest x2 upsampling then a padded 3x3 convolution, per output phase (row parity py, column parity px): the 3 taps
# along an axis fall on 2 input pixels, the first (py = 0) or last (py = 1) two of them on the same one. PHASE_TAPS[p]
# sums the 3x3 kernel's taps into those 2 (rows: the 2 input pixels, from the upper/left one; columns: the 3 taps).
PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest x2 upsampling of x) without the upsampled map: one 2x2 convolution on x (padded by one pixel)
    with the four phases' kernels as 4 x out_channels outputs, interleaved into the 2h x 2w result. 16 instead of 36
    multiply-adds per input pixel and channel pair; the same sums as the 3x3 on the upsampled map, with the taps
    that read one input pixel added first (in the weights' dtype, accumulated in fp32: einsum is a matmul).
    Zero padding of x is the upsampled map's zero padding, so a tile's window computes what the whole map does."""
    b, _, h, w = x.shape
    cout = conv.out_channels
    taps = torch.tensor(PHASE_TAPS, dtype=conv.weight.dtype, device=x.device)
    kernel = torch.einsum("yak,oikl,xbl->yxoiab", taps, conv.weight, taps).reshape(4 * cout, -1, 2, 2)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, conv.bias.repeat(4))
    del kernel
    # y's channels are (phase row, phase column, channel); both read as (b, row, column, py, px, channel), and the
    # output, in y's layout (NHWC maps stay NHWC: vae_tiles.channels_last), as (b, i, py, j, px, channel)
    phases = y.view(b, 2, 2, cout, h + 1, w + 1).permute(0, 4, 5, 1, 2, 3)
    out = torch.empty(b, cout, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=map_format(y))
    grid = out.permute(0, 2, 3, 1).view(b, h, 2, w, 2, cout)
    for py in range(2):
        for px in range(2):  # phase (py, px) of output pixel (i, j) read input rows i-1+py, i+py: y's row i+py
            grid[:, :, py, :, px] = phases[:, py:py + h, px:px + w, py, px]
    return out


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.conv)


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
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


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
        weight = self.decoder.conv_in.weight
        z = (latents.to(weight.device) / self.cfg.scaling_factor + self.cfg.shift_factor)
        z = z.to(weight.dtype, memory_format=memory_format(channels_last(weight.device.type, weight.element_size())))
        if tile is None or (z.shape[2] <= tile and z.shape[3] <= tile):
            image = self.decoder(z)
        else:
            image = decode_tiled(self.decoder, z, tile, torch.device("cpu"))
        return image.to(torch.float32, memory_format=torch.contiguous_format)


def decode_tiled(decoder: Decoder, z: torch.Tensor, tile: int, store: torch.device) -> torch.Tensor:
    """Decode z with the up path in tiles of `tile` latent cells, keeping full feature maps in `store` memory.

    Exact (vae_tiles.py): every GroupNorm uses the statistics of the whole feature map and the mid-block attention
    sees every position (it runs whole, at latent resolution, which is small), so seams cannot appear. The tile side
    doubles with each upsampling: every level has the same tiles.
    """
    device = z.device
    x = decoder.mid_block(decoder.conv_in(z)).to(store)
    px = tile  # tile side in the current feature map's pixels
    for block in decoder.up_blocks:
        for r in block.resnets:
            x = resnet_tiled(r, x, px, device)
        if block.upsamplers is not None:
            up = block.upsamplers[0]
            x = map_tiles(up, x, px, up.conv.out_channels, device, scale=2.0)
            px *= 2
    stats = group_stats(x, decoder.conv_norm_out)
    return map_tiles(lambda t: decoder.conv_out(norm_silu(t, decoder.conv_norm_out, stats)), x, px,
                     decoder.conv_out.out_channels, device)


def decode_memory(cfg: VAEConfig, h: int, w: int, tile: int | None, elem: int, device: str = "cpu") -> VAEMemory:
    """Peak bytes `AutoencoderDecoder.decode` allocates for an h x w-cell latent, `tile` as decode takes it, in a
    compute dtype of `elem` bytes on `device` ("cpu" or "cuda"): every map, temporary and the fp32 image it
    returns; not the weights nor the latent passed in. Follows the code step by step (vae_tiles.Walk)."""
    widths = list(reversed(cfg.block_out_channels))
    tiled = tile is not None and (h > tile or w > tile)
    nhwc = channels_last(device, elem)
    walk = Walk(elem, cfg.norm_num_groups, separate=tiled and device != "cpu", cpu=device == "cpu", nhwc=nhwc)
    d, n = walk.device, h * w
    # z, unscaled; in the compute dtype and layout (a copy unless both are the scaled z's)
    d.alloc(cfg.latent_channels * n * (F32 + (elem if elem != F32 or nhwc else 0)))
    # conv_in and the mid block run whole, at latent resolution, on the device (tiled or not)
    x = walk.conv(cfg.latent_channels, widths[0], n)
    x = walk.then(x, walk.mid(widths[0], n, cfg.mid_block_add_attention))
    if tiled and walk.separate:
        x = walk.then(x, walk.store.alloc(x))  # .to(host)
    c, px = widths[0], tile
    for level, width in enumerate(widths):
        block_input = x  # untiled, Decoder.forward holds an up block's input until the block returns
        for i in range(cfg.layers_per_block + 1):
            if not tiled:
                x = walk.then(x if i else 0, walk.resnet(c, width, n))
            elif width > c:
                x = walk.then(x, walk.resnet_tiled(c, width, h, w, px), walk.store)
            else:
                walk.resnet_tiled(c, width, h, w, px)  # written into x's own memory
            c = width
        if level < len(widths) - 1:
            if tiled:
                wh, ww = window(h, px), window(w, px)
                up = walk.map_tiles(c, c, 4 * n, wh * ww, 4 * min(px, h) * min(px, w),
                                    lambda c=c, wh=wh, ww=ww: walk.upsample(c, wh, ww))
                x = walk.then(x, up, walk.store)
                px *= 2
            else:
                x = walk.then(x, walk.upsample(c, h, w))
            h, w, n = 2 * h, 2 * w, 4 * n
        if not tiled:
            walk.device.free(block_input)
    out = cfg.out_channels
    if tiled:
        win = window(h, px) * window(w, px)

        def head() -> int:
            normed = walk.norm_silu(c, win)
            return walk.then(normed, walk.conv(c, out, win))

        walk.stats(c, n)
        x = walk.then(x, walk.map_tiles(c, out, n, win, min(px, h) * min(px, w), head), walk.store)
    else:
        x = walk.then(x, walk.head(c, out, n))
    if elem != F32 or nhwc:
        walk.then(x, walk.store.alloc(out * n * F32), walk.store)  # the fp32 image, contiguous
    return VAEMemory(d.peak, walk.store.peak if walk.separate else 0)
