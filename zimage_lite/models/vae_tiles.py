"""Exact tiled VAE passes, shared by the decoder and the encoder, and the arithmetic of what they hold.

A tiled pass runs the full-resolution layers one at a time over tiles, keeping each layer's whole output map in
`store` memory (host memory on CUDA; the same memory on the CPU). Every GroupNorm uses the statistics of the whole
map, and every tile is read with the halo its layer needs (one pixel for a 3x3 convolution), so the result is the
untiled one up to float rounding: no seams, no cross-fading. Tiles only bound the temporaries on the compute device.

The memory functions here count, in bytes, what these passes and the untiled layers allocate, layer by layer, in
the order the code allocates and frees it (`Peak`); vae.py and vae_encoder.py walk their layers through them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import cpu_bf16_route, cpu_bf16_route_bytes

F32 = 4
ONEDNN_MIN_NUMEL = 20480  # fp32 convolution inputs (batch 1) at or below this size run on torch's own kernel
# oneDNN's scratchpad beside an NHWC convolution's reordered weights: measured 10-81 KiB at 2 threads (3 to 512
# channels) and about 4 KiB + 4 KiB a thread up to 64 threads
NHWC_SCRATCH, NHWC_SCRATCH_PER_THREAD = 96 << 10, 8 << 10


@dataclass(frozen=True)
class VAEMemory:
    """Peak bytes of a VAE pass: on the compute device, and of the full maps a tiled pass keeps in host memory while
    it computes on a GPU (0 on the CPU, where `device` counts the maps and the tiles together)."""

    device: int
    host: int = 0


# --- the tiled passes -----------------------------------------------------------------------------------------


def channels_last(device_type: str, elem: int) -> bool:
    """Whether the VAE (decoder and encoder) keeps its maps channels-last (NHWC): on a CPU whose oneDNN runs bf16
    (`_bf16_on_onednn`: AVX512), in fp32 and bf16. oneDNN computes NHWC maps without reordering them into its channel
    blocks and back: the full-size decode on 2 Zen 5 cores measured 3.9 -> 3.0 s in bf16 and 7.2 -> 5.9 s in fp32 at
    512x512, 19.6 -> 14.9 s and 37.8 -> 28.4 s at 1024x1024; the encode 2.11 -> 1.61 s and 4.29 -> 3.37 s at
    512x512, 10.37 -> 7.58 s and 20.54 -> 15.33 s at 1024x1024 (benchmarks/vae_speed.py [--encode]). AVX2-only
    CPUs keep NCHW maps: their kernels' speed and temporaries in NHWC are unmeasured."""
    return device_type == "cpu" and _bf16_on_onednn()


def memory_format(nhwc: bool) -> torch.memory_format:
    """The torch layout of channels-last (NHWC) maps, or of NCHW ones."""
    return torch.channels_last if nhwc else torch.contiguous_format


def map_format(x: torch.Tensor) -> torch.memory_format:
    """The layout a new map made from x keeps: channels-last when x is laid out so (a window of such a map too)."""
    return memory_format(x.dim() == 4 and x.stride(1) == 1 < x.stride(3))


def group_stats(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm mean and 1/std over the whole feature map (B, groups), in fp32, one group at a time (reduced where
    it lies: a channels-last map's group is not copied first)."""
    b, c = x.shape[:2]
    xs = x.view(b, norm.num_groups, c // norm.num_groups, -1)
    stats = [torch.var_mean(xs[:, g].float(), dim=(1, 2), unbiased=False) for g in range(norm.num_groups)]
    var = torch.stack([v for v, _ in stats], dim=1)
    mean = torch.stack([m for _, m in stats], dim=1)
    return mean, (var + norm.eps).rsqrt()


def norm_silu(t: torch.Tensor, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """SiLU(GroupNorm(t)) of a tile with the whole map's statistics, in fp32, returned in t's dtype.

    Folded into a multiply and an add per element, y = t * a + b with a = rstd * weight and b = bias - mean * a, the
    form torch's own GroupNorm kernel uses, on one fp32 copy of the tile in its layout (a window of a channels-last
    map too: its copy is dense channels-last, as the convolution after it reads it).
    """
    c = t.shape[1]
    mean, rstd = (s.to(t.device).repeat_interleave(c // norm.num_groups, dim=1) for s in stats)  # (B, C)
    a = rstd * norm.weight.float()
    b = norm.bias.float() - mean * a
    y = t.to(torch.float32, copy=True).mul_(a[:, :, None, None]).add_(b[:, :, None, None])
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
    out = torch.empty(b, out_channels, int(h * scale), int(w * scale), dtype=x.dtype, device=x.device,
                      memory_format=map_format(x))
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
        del piece, skip  # before the next tile's temporaries exist
    return out


# --- what they hold -------------------------------------------------------------------------------------------


def _pad16(c: int) -> int:
    return -(-c // 16) * 16


@functools.cache
def _bf16_on_onednn() -> bool:
    """Whether torch runs bf16 convolutions through oneDNN on this CPU (it needs AVX512 or AMX); else through its own
    kernel, which unfolds the input of a k > 1 convolution and holds nothing more for a 1x1 (measured on an AVX2-only
    Zen 3, torch 2.13)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def conv_temp(cin: int, cout: int, n_in: int, n_out: int, k: int, elem: int, contiguous: bool = True,
              cpu: bool = True, nhwc: bool = False) -> int:
    """Bytes a convolution allocates besides its output on the CPU, as measured with torch 2.13 (an upper bound of
    every case measured, 3 to 512 channels) and used for CUDA too, where cuDNN's workspace is of the same order or
    less. torch picks the kernel (ConvParams::use_mkldnn): oneDNN for bf16 where the CPU has it (`_bf16_on_onednn`),
    and for fp32 inputs above ONEDNN_MIN_NUMEL elements, except 1x1 convolutions on one thread; else its own kernel,
    which unfolds the input (k > 1). oneDNN reorders input and output into blocks of 16 channels (narrower maps
    padded up; without AVX512 it blocks by 8: counted as 16, an overcount) and the weights, and a bf16 1x1
    convolution also makes an fp32 copy of its input (and of its output when that is padded). A strided input is
    made contiguous first. `cpu` False (a GPU's count): this CPU's kernels do not decide. `nhwc`: channels-last maps
    (`channels_last`), which oneDNN reads and writes as they are: it holds the weights reordered (twice for k > 1)
    and a scratchpad; torch's own kernel (small fp32 inputs) unfolds the input and copies the weights."""
    weights = cin * cout * k * k * elem
    if nhwc:
        t = (2 if k > 1 else 1) * weights + NHWC_SCRATCH + NHWC_SCRATCH_PER_THREAD * torch.get_num_threads()
        if elem == F32:  # a tiled pass's smaller windows may fall under the threshold: the largest such counts
            own = cin * k * k * min(n_out, ONEDNN_MIN_NUMEL // cin) * elem + weights
            t = own if cin * n_in <= ONEDNN_MIN_NUMEL else max(t, own)
        return t + (0 if contiguous else cin * n_in * elem)
    onednn = _pad16(cin) * n_in * elem + _pad16(cout) * n_out * elem + weights
    if k == 1 and elem == 2:
        onednn += (_pad16(cin) * n_in + (_pad16(cout) * n_out if cout % 16 else 0)) * F32
    unfolded = cin * k * k * n_out * elem
    if elem != F32:
        t = onednn if not cpu or _bf16_on_onednn() else (unfolded if k > 1 else 0)
    elif cin * n_in <= ONEDNN_MIN_NUMEL:
        t = unfolded
    else:
        t = max(onednn, unfolded) if k == 1 else onednn  # 1x1: the thread count decides; either
    return t + (0 if contiguous else cin * n_in * elem)


def sdpa_cpu_buffers(s: int, d: int, elem: int) -> int:
    """Bytes torch's CPU flash attention (SDPA, one head of d channels over s positions) allocates besides its output:
    per thread a block of qs x kvs fp32 scores, their row maxima and sums, a qs x d fp32 accumulator (and the block
    again in a 2-byte type), and one fp32 log-sum-exp per query; qs and kvs as torch 2.13 splits the work (measured
    exact: 1 and 2 threads, 100 to 4096 positions, 8 to 512 channels, fp32 and bf16)."""
    qs = 256 if s >= 768 else 64 if s >= 192 else 32
    kvs = min(512, s)
    block = (qs * kvs + 2 * qs + qs * d) * F32 + (qs * kvs * elem if elem != F32 else 0)
    return torch.get_num_threads() * block + s * F32


class Peak:
    """Running count of live bytes in allocation order, and the largest it reached."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def alloc(self, n: int) -> int:
        self.live += n
        self.peak = max(self.peak, self.live)
        return n

    def free(self, n: int) -> None:
        self.live -= n

    def during(self, n: int) -> None:
        """n bytes that exist only inside one step."""
        self.peak = max(self.peak, self.live + n)


class Walk:
    """The live bytes of a VAE pass, step by step in the order the layers (vae.py, vae_encoder.py) and the tiled
    passes above allocate and free them. `device` is the compute device's memory; `store` holds the full maps of a
    tiled pass (the same memory on the CPU, host memory when computing on a GPU).

    Untiled steps run on the device with their input x live (the caller holds it and frees it after) and return the
    bytes of the output they allocated. Sizes: c channels, n pixels, `elem` bytes per element of the compute dtype.
    `cpu`: the pass runs on this CPU, whose kernels decide the convolutions' temporaries (`conv_temp`); `nhwc`: its
    maps are channels-last (`channels_last`).
    """

    def __init__(self, elem: int, groups: int, separate: bool = False, cpu: bool = True, nhwc: bool = False) -> None:
        self.e, self.groups, self.separate, self.cpu, self.nhwc = elem, groups, separate, cpu, nhwc
        self.device = Peak()
        self.store = Peak() if separate else self.device

    def then(self, old: int, new: int, pool: Peak | None = None) -> int:
        """`x = step(x)`: the old map goes once the new one exists."""
        (pool or self.device).free(old)
        return new

    def conv(self, cin: int, cout: int, n_in: int, n_out: int | None = None, k: int = 3,
             contiguous: bool = True) -> int:
        n_out = n_in if n_out is None else n_out
        out = cout * n_out * self.e
        self.device.during(out + conv_temp(cin, cout, n_in, n_out, k, self.e, contiguous, self.cpu, self.nhwc))
        return self.device.alloc(out)

    def resnet(self, cin: int, cout: int, n: int) -> int:
        d, e = self.device, self.e
        normed = d.alloc(cin * n * e)  # norm1, SiLU in place
        h = self.then(normed, self.conv(cin, cout, n))
        h = self.then(h, d.alloc(cout * n * e))  # norm2
        h = self.then(h, self.conv(cout, cout, n))
        if cin != cout:
            d.free(self.conv(cin, cout, n, k=1))  # the shortcut, added into h in place
        return h

    def attention(self, c: int, n: int) -> int:
        # GroupNorm, q, k, v and the attention output, with the kernel's temporaries: on the CPU in bf16 the route
        # of layers.attention (its buffers and the scratch of oneDNN's bf16 matmuls), else the CPU flash kernel's
        # blocks (CUDA's hold no scores); then to_out beside them (a bf16 Linear on the CPU, with the same scratch),
        # and x + that. The scratch: 66-450 KiB measured at 128 to 512 channels on 2 threads, 2.5-4 MiB on 32.
        m = c * n * self.e
        bf16_cpu = self.cpu and self.e != F32
        scratch = 2 * c * c * self.e + (256 << 10) * torch.get_num_threads() if bf16_cpu else 0
        if bf16_cpu and cpu_bf16_route("cpu", torch.bfloat16):
            kernel = cpu_bf16_route_bytes(1, n, n, c) + scratch
        else:
            kernel = sdpa_cpu_buffers(n, c, self.e) if self.cpu else 0
        self.device.during(max(5 * m + kernel, 6 * m + scratch, 7 * m))
        return self.device.alloc(m)

    def mid(self, c: int, n: int, attention: bool) -> int:
        x = self.resnet(c, c, n)
        if attention:
            x = self.then(x, self.attention(c, n))
        return self.then(x, self.resnet(c, c, n))

    def upsample(self, c: int, h: int, w: int) -> int:
        """vae.upsample_conv on an h x w map: the phases' kernels, x padded, their 2x2 convolution, interleaved."""
        d = self.device
        taps = d.alloc(12 * self.e)  # PHASE_TAPS, held to the end
        d.during(9 * c * c * self.e)  # einsum's copy of the 3x3 weights
        kernel = d.alloc((16 * c * c + 4 * c) * self.e)  # 4 phases x 2x2 taps; the bias repeated
        padded = d.alloc(c * (h + 2) * (w + 2) * self.e)
        y = self.conv(c, 4 * c, (h + 2) * (w + 2), (h + 1) * (w + 1), k=2)
        d.free(padded + kernel)
        out = d.alloc(4 * c * h * w * self.e)
        d.free(y + taps)
        return out

    def downsample(self, c: int, h: int, w: int) -> int:
        padded = self.device.alloc(c * (h + 1) * (w + 1) * self.e)  # one zero row and column
        return self.then(padded, self.conv(c, c, (h + 1) * (w + 1), h * w // 4))

    def head(self, cin: int, cout: int, n: int) -> int:
        """GroupNorm, SiLU in place, conv."""
        normed = self.device.alloc(cin * n * self.e)
        return self.then(normed, self.conv(cin, cout, n))

    # --- tiled steps: maps in `store`, one tile's temporaries on the device ------------------------------------

    def stats(self, c: int, n: int) -> None:
        """`group_stats`: in bf16, one group's fp32 copy at a time."""
        if self.e != F32:
            self.store.during(c // self.groups * n * F32)

    def norm_silu(self, c: int, n: int) -> int:
        self.device.during(8 * c * F32)  # per-channel mean, 1/std, scale, shift and their temporaries
        y = self.device.alloc(c * n * F32)
        return y if self.e == F32 else self.then(y, self.device.alloc(c * n * self.e))

    def tile(self, cin: int, win: int, fn: Callable[[], int]) -> int:
        """One tile: its window copied to the device (when that is another memory), then `fn`'s output."""
        window = self.device.alloc(cin * win * self.e) if self.separate else 0
        return self.then(window, fn())

    def map_tiles(self, cin: int, cout: int, n_out: int, win: int, core_out: int, fn: Callable[[], int]) -> int:
        """A new map of cout x n_out in the store, written tile by tile: the largest tile's steps (`fn` on a
        window of `win` pixels, `core_out` of its output kept) happen once, as every tile's do."""
        out = self.store.alloc(cout * n_out * self.e)
        piece = self.tile(cin, win, fn)
        if self.separate:
            self.store.during(cout * core_out * self.e)  # the kept part, back in host memory
        self.device.free(piece)
        return out

    def resnet_tiled(self, cin: int, cout: int, h: int, w: int, tile: int) -> int:
        """`resnet_tiled` on an h x w map; returns the bytes of the new map it allocated (0 when written into x)."""
        n, win, core = h * w, window(h, tile) * window(w, tile), min(tile, h) * min(tile, w)
        stats = self.device.alloc(4 * self.groups * F32)  # both norms' (mean, 1/std) stay for the block
        self.stats(cin, n)

        def first() -> int:
            normed = self.norm_silu(cin, win)
            return self.then(normed, self.conv(cin, cout, win))

        hmap = self.map_tiles(cin, cout, n, win, core, first)
        self.stats(cout, n)
        out = self.store.alloc(cout * n * self.e) if cout > cin else 0

        def second() -> int:
            normed = self.norm_silu(cout, win)
            piece = self.then(normed, self.conv(cout, cout, win))
            skip = self.device.alloc(cin * core * self.e) if self.separate else 0  # x's core (a view on the CPU)
            # the shortcut, on a strided view of x on the CPU; then the sum
            short = self.conv(cin, cout, core, k=1, contiguous=self.separate) if cin != cout else 0
            total = self.device.alloc(cout * core * self.e)
            if self.separate:
                self.store.during(cout * core * self.e)
            self.device.free(total + short + skip)
            return piece

        self.device.free(self.tile(cout, win, second))
        self.store.free(hmap)
        self.device.free(stats)
        return out


def window(size: int, tile: int, lo: int = 1, hi: int = 1) -> int:
    """The largest window side `tile_grid` reads along an axis of `size` pixels."""
    return min(min(tile, size) + lo + hi, size)
