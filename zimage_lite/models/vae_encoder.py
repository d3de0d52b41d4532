"""The FLUX.1 autoencoder's encoder, with parameter names of diffusers' AutoencoderKL (`encoder.*`).

Every official `vae/` folder (and FLUX's `ae.safetensors`) stores it next to the decoder; img2img, inpainting and
control images go through it. Structure (diffusers' Encoder for this config): conv_in, one down block per width
(resnets, then a stride-2 downsampler except on the last), the mid block with attention, GroupNorm + SiLU, conv_out
to 2 x latent channels: the posterior's mean and log-variance. Tiled encoding is exact, as tiled decoding is
(vae_tiles.py): the full-resolution layers run over tiles with whole-map GroupNorm statistics; the mid block runs
whole at latent resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from ..errors import ShapeError
from .vae import GN_EPS, MidBlock, ResnetBlock
from .vae_tiles import F32, VAEMemory, Walk, channels_last, map_tiles, memory_format, resnet_tiled, window

LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clamped before use, as diffusers does


class Downsample(nn.Module):
    """3x3 stride-2 convolution without padding, on the map padded by one zero row and column at the bottom and
    right only: each output pixel (i, j) sees input rows and columns 2i..2i+2 (the asymmetric padding of the
    original autoencoder, which diffusers keeps)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        # The image has the decoder's output channels (RGB): VAEConfig keeps one count for both ends.
        self.conv_in = nn.Conv2d(cfg.out_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, g, downsample=i < len(chans) - 1)
            for i in range(len(chans))
        ])
        self.mid_block = MidBlock(chans[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, chans[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(image)
        for block in self.down_blocks:
            x = block(x)
        return self.head(self.mid_block(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm, SiLU and conv_out: the posterior's moments (B, 2 x latent channels, h, w)."""
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class AutoencoderEncoder(nn.Module):
    """Holds the encoder under the name `encoder`, so keys match the `vae/` checkpoint."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)

    def encode(self, image: torch.Tensor, tile: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] (B, 3, H, W), H and W multiples of the VAE scale → sampler latents (B, C, H/8, W/8) in
        fp32: (z - shift_factor) * scaling_factor, the inverse of `decode`'s input transform.

        z is the posterior mean (diffusers' sample_mode "argmax"); with a `generator`, a sample from the posterior,
        mean + std * noise with the noise drawn from it on the CPU (diffusers' default sample_mode "sample").
        `tile` (latent cells) encodes the full-resolution layers in tiles, with their maps in host memory.
        """
        scale = self.cfg.scale
        if image.ndim != 4 or image.shape[2] % scale or image.shape[3] % scale:
            raise ShapeError(f"VAE encoder input of shape {list(image.shape)}: expected (batch, 3, H, W) with H "
                             f"and W multiples of {scale}")
        weight = self.encoder.conv_in.weight
        h, w = image.shape[2] // scale, image.shape[3] // scale
        layout = memory_format(channels_last(weight.device.type, weight.element_size()))
        if tile is None or (h <= tile and w <= tile):
            moments = self.encoder(image.to(weight.device, weight.dtype, memory_format=layout))
        else:
            moments = encode_tiled(self.encoder, image.to(weight.dtype, memory_format=layout), tile, weight.device)
        mean, logvar = moments.float().chunk(2, dim=1)
        z = mean
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
            z = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
        return ((z - self.cfg.shift_factor) * self.cfg.scaling_factor).contiguous()


def encode_tiled(encoder: Encoder, image: torch.Tensor, tile: int, device: torch.device) -> torch.Tensor:
    """The posterior's moments, with the down path in tiles of `tile` latent cells computed on `device` and its
    full maps kept where `image` lives (host memory). Exact, as `decode_tiled` is; the tile side halves with each
    downsampling, so every level has the same tiles."""
    px = tile * 2 ** (len(encoder.down_blocks) - 1)  # tile side in full-resolution pixels
    x = map_tiles(encoder.conv_in, image, px, encoder.conv_in.out_channels, device)
    for block in encoder.down_blocks:
        for r in block.resnets:
            x = resnet_tiled(r, x, px, device)
        if block.downsamplers is not None:
            down = block.downsamplers[0]
            # output tile [y0/2, y1/2) reads input rows y0 .. y1 (one row after the tile; none before)
            x = map_tiles(down, x, px, down.conv.out_channels, device, scale=0.5, lo=0, hi=1)
            px //= 2
    return encoder.head(encoder.mid_block(x.to(device)))


def encode_memory(cfg: VAEConfig, h: int, w: int, tile: int | None, elem: int, device: str = "cpu") -> VAEMemory:
    """Peak bytes `AutoencoderEncoder.encode` allocates for an image of h x w latent cells (8h x 8w pixels), `tile`
    as encode takes it, in a compute dtype of `elem` bytes on `device` ("cpu" or "cuda"): every map, temporary and
    the latents it returns (sampled or not); not the weights nor the image passed in. Follows the code step by step
    (vae_tiles.Walk)."""
    chans, scale = cfg.block_out_channels, cfg.scale
    tiled = tile is not None and (h > tile or w > tile)
    nhwc = channels_last(device, elem)
    walk = Walk(elem, cfg.norm_num_groups, separate=tiled and device != "cpu", cpu=device == "cpu", nhwc=nhwc)
    hh, ww = h * scale, w * scale
    image = cfg.out_channels * hh * ww * elem
    # the image in the compute dtype and layout where the pass reads it (host memory when tiled): a copy unless it
    # already is
    if elem != F32 or nhwc or (device != "cpu" and not tiled):
        (walk.store if tiled else walk.device).alloc(image)
    px = tile * scale if tiled else None
    if tiled:
        x = walk.map_tiles(cfg.out_channels, chans[0], hh * ww, window(hh, px) * window(ww, px), px * px,
                           lambda: walk.conv(cfg.out_channels, chans[0], window(hh, px) * window(ww, px),
                                             contiguous=walk.separate))
    else:
        x = walk.conv(cfg.out_channels, chans[0], hh * ww)
    c = chans[0]
    for level, width in enumerate(chans):
        block_input = x  # untiled, Encoder.forward holds a down block's input until the block returns
        for i in range(cfg.layers_per_block):
            if not tiled:
                x = walk.then(x if i else 0, walk.resnet(c, width, hh * ww))
            elif width > c:
                x = walk.then(x, walk.resnet_tiled(c, width, hh, ww, px), walk.store)
            else:
                walk.resnet_tiled(c, width, hh, ww, px)  # written into x's own memory
            c = width
        if level < len(chans) - 1:
            if tiled:
                wy, wx = window(hh, px, 0, 1), window(ww, px, 0, 1)
                down = walk.map_tiles(c, c, hh * ww // 4, wy * wx, min(px, hh) * min(px, ww) // 4,
                                      lambda c=c, wy=wy, wx=wx: walk.downsample(c, wy, wx))
                x = walk.then(x, down, walk.store)
                px //= 2
            else:
                x = walk.then(x, walk.downsample(c, hh, ww))
            hh, ww = hh // 2, ww // 2
        if not tiled:
            walk.device.free(block_input)
    n = h * w
    if tiled:  # the last map stays referenced until the pass ends; on a GPU the mid block reads a copy
        x = walk.device.alloc(x) if walk.separate else 0
    x = walk.then(x, walk.mid(c, n, cfg.mid_block_add_attention))
    x = walk.then(x, walk.head(c, 2 * cfg.latent_channels, n))
    # moments in fp32, then the latents: a sample's clamp, exp, noise and sums, the scaling and (channels-last maps)
    # the contiguous copy, at most six at once
    latent = cfg.latent_channels * n * F32
    walk.device.during((2 * latent if elem != F32 else 0) + 6 * latent)
    walk.device.alloc(latent)
    return VAEMemory(walk.device.peak, walk.store.peak if walk.separate else 0)
