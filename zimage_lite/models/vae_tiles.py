"""Exact tiled VAE passes, shared by the decoder and the encoder, and the arithmetic of what they hold.

A tiled pass runs the full-resolution layers one at a time over tiles, keeping each layer's whole output map in
`store` memory (host memory on CUDA; the same memory on the CPU). Every GroupNorm uses the statistics of the whole
map, and every tile is read with the halo its layer needs (one pixel for a 3x3 convolution), so the result is the
untiled one up to float rounding: no seams, no cross-fading. Tiles only bound the temporaries on the compute device.

The memory functions here count, in bytes, what these passes and the untiled layers allocate, layer by layer, in
the order the code allocates and frees it (`Peak`); vae.py and vae_encoder.py walk their layers through them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

F32 = 4


@dataclass(frozen=True)
class VAEMemory:
    """Peak bytes of a VAE pass: on the compute device, and of the full maps a tiled pass keeps in host memory while
    it computes on a GPU (0 on the CPU, where `device` counts the maps and the tiles together)."""

    device: int
    host: int = 0


# --- the tiled passes -----------------------------------------------------------------------------------------


def group_stats(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm mean and 1/std over the whole feature map (B, groups), in fp32, one group at a time."""
    b, c = x.shape[:2]
    xs = x.view(b, norm.num_groups, c // norm.num_groups, -1)
    stats = [torch.var_mean(xs[:, g].reshape(b, -1).float(), dim=-1, unbiased=False) for g in range(norm.num_groups)]
    var = torch.stack([v for v, _ in stats], dim=1)
    mean = torch.stack([m for _, m in stats], dim=1)
    return mean, (var + norm.eps).rsqrt()


def norm_silu(t: torch.Tensor, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """SiLU(GroupNorm(t)) of a tile with the whole map's statistics, in fp32, returned in t's dtype.

    Folded into one multiply-add per element, y = t * a + b with a = rstd * weight and b = bias - mean * a, the
    form torch's own GroupNorm kernel uses: one fp32 temporary per tile.
    """
    c = t.shape[1]
    mean, rstd = (s.to(t.device).repeat_interleave(c // norm.num_groups, dim=1) for s in stats)  # (B, C)
    a = rstd * norm.weight.float()
    b = norm.bias.float() - mean * a
    y = torch.addcmul(b[:, :, None, None], t.float(), a[:, :, None, None])
    return F.silu(y, inplace=True).to(t.dtype)


@dataclass(frozen=True)
class Tile:
    """A tile's core [y0, y1) x [x0, x1) and the window read for it: the core plus the halo, clipped to the map."""

    y0: int
    y1: int
    x0: int
    x1: int
    ya: int
    yb: int
    xa: int
    xb: int

    def core(self, scale: float = 1.0) -> tuple[slice, slice, slice, slice]:
        return (slice(None), slice(None), slice(int(self.y0 * scale), int(self.y1 * scale)),
                slice(int(self.x0 * scale), int(self.x1 * scale)))

    def window(self) -> tuple[slice, slice, slice, slice]:
        return slice(None), slice(None), slice(self.ya, self.yb), slice(self.xa, self.xb)

    def crop(self, scale: float = 1.0) -> tuple[slice, slice, slice, slice]:
        """The core inside the output of the window (the halo's own outputs, computed from zero padding, dropped)."""
        oy, ox = int((self.y0 - self.ya) * scale), int((self.x0 - self.xa) * scale)
        return (slice(None), slice(None), slice(oy, oy + int((self.y1 - self.y0) * scale)),
                slice(ox, ox + int((self.x1 - self.x0) * scale)))


def tile_grid(h: int, w: int, tile: int, lo: int = 1, hi: int = 1) -> Iterator[Tile]:
    """Row-major tiles of side `tile` over an h x w map, each read with `lo` pixels of halo before it, `hi` after."""
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            yield Tile(y0, y1, x0, x1, max(y0 - lo, 0), min(y1 + hi, h), max(x0 - lo, 0), min(x1 + hi, w))


def map_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, out_channels: int,
              device: torch.device, scale: float = 1.0, lo: int = 1, hi: int = 1) -> torch.Tensor:
    """out = fn(x), a new map where x lives, computed tile by tile on `device`.

    `scale` is the output's size per input pixel (2 for an upsampling step, 0.5 for a stride-2 one); `lo`/`hi` the
    halo fn needs before/after each tile (a padded 3x3 convolution: 1 and 1).
    """
    b, _, h, w = x.shape
    out = torch.empty(b, out_channels, int(h * scale), int(w * scale), dtype=x.dtype, device=x.device)
    for t in tile_grid(h, w, tile, lo, hi):
        out[t.core(scale)] = fn(x[t.window()].to(device))[t.crop(scale)].to(out.device)
    return out


def resnet_tiled(r: nn.Module, x: torch.Tensor, tile: int, device: torch.device) -> torch.Tensor:
    """A ResnetBlock over tiles. Consumes x: unless the block widens, the output is written into x's own memory
    (its first channels when the block narrows), tile by tile: the skip path reads each pixel of x only for the tile
    that overwrites it, and the halo reads go to the intermediate map, which is not overwritten."""
    s1 = group_stats(x, r.norm1)
    h = map_tiles(lambda t: r.conv1(norm_silu(t, r.norm1, s1)), x, tile, r.conv1.out_channels, device)
    s2 = group_stats(h, r.norm2)
    cout = r.conv2.out_channels
    out = x[:, :cout] if cout <= x.shape[1] else torch.empty_like(h)
    for t in tile_grid(h.shape[2], h.shape[3], tile):
        piece = r.conv2(norm_silu(h[t.window()].to(device), r.norm2, s2))[t.crop()]
        skip = x[t.core()].to(device)
        if r.conv_shortcut is not None:
            out[t.core()] = (r.conv_shortcut(skip) + piece).to(out.device)
        else:
            out[t.core()] = (skip + piece).to(out.device)  # x + h, as the untiled block adds them
    return out


# --- what they hold -------------------------------------------------------------------------------------------


class Peak:
    """Running count of live bytes in allocation order, and the largest it reached."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def alloc(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def free(self, n: int) -> None:
        self.live -= n

    def during(self, n: int) -> None:
        """n bytes that exist only inside one step."""
        self.peak = max(self.peak, self.live + n)
