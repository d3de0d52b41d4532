"""What the VAE's stages hold at each tiling, for the memory planner: pure arithmetic on the models' own counts
(models/vae.py `decode_memory`, models/vae_encoder.py `encode_memory`), which follow the code allocation by
allocation. plan.py takes the first pass that fits its budget: the largest tiles, so the fewest (the fastest).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..config import VAEConfig
from ..models.vae import AutoencoderDecoder, decode_memory
from ..models.vae_encoder import AutoencoderEncoder, encode_memory

F32 = 4
MIN_VAE_TILE = 8  # latent cells (64 px): demo model at 1024², one thread: 8 cells 1.3x the untiled time, 4 cells 2x


@dataclass(frozen=True)
class VAEPass:
    """A VAE stage at one tiling."""

    tile: int | None  # latent cells per tile side; None: the whole latent at once
    weights: int  # the decoder's (or encoder's) weights, in the dtype the VAE computes in
    beside: int  # what the stage keeps beside the pass: the sampler's latent, or the image to encode
    activations: int  # the pass's peak on the device
    host: int  # cuda, tiled: the full feature maps kept in host memory


def vae_tiles(h: int, w: int) -> list[int | None]:
    """Tile sides to try, largest first: None (the whole latent), then the sides that split an h x w-cell latent into
    2, 3, ... tiles per side evenly (the fewest tiles for their size), down to MIN_VAE_TILE."""
    side, out = max(h, w), [None]
    for k in range(2, side + 1):
        tile = -(-side // k)
        if tile < MIN_VAE_TILE:
            break
        if tile != out[-1]:
            out.append(tile)
    return out


def vae_elem(dtype: str) -> int:
    """Bytes per element the VAE computes in: never plain fp16, which overflows to black images."""
    return 2 if dtype == "bf16" else 4


@functools.lru_cache(maxsize=16)
def params(cls: type[nn.Module], cfg: VAEConfig) -> int:
    """Parameters of a VAE half as the model builds it (on `meta`: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cfg).parameters())


def vae_passes(cfg: VAEConfig, width: int, height: int, dtype: str, device: str,
               encode: bool = False) -> Iterator[VAEPass]:
    """Decoding a width x height image (or, with `encode`, encoding one) at each tiling, largest tiles first.

    Decoding keeps the sampler's fp32 latent beside the decoder, and the image it returns is converted to 8 bits
    with two temporaries of its size (image.to_pil) after the decoder's own peak. Encoding reads an fp32 image in
    [-1, 1] held in RAM (device memory only on the CPU).
    """
    elem, h, w = vae_elem(dtype), height // cfg.scale, width // cfg.scale
    image = cfg.out_channels * height * width * F32
    if encode:
        weights, beside = params(AutoencoderEncoder, cfg) * elem, image if device == "cpu" else 0
    else:
        weights, beside = params(AutoencoderDecoder, cfg) * elem, cfg.latent_channels * h * w * F32
    for tile in vae_tiles(h, w):
        if encode:
            mem = encode_memory(cfg, h, w, tile, elem, device)
            peak = mem.device
        else:
            mem = decode_memory(cfg, h, w, tile, elem, device)
            peak = max(mem.device, 3 * image)
        yield VAEPass(tile, weights, beside, peak, mem.host)
