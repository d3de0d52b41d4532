"""The decoder's upsampling (vae.upsample_conv): a 2x2 convolution per output phase on the low-resolution map, the
same function as nearest x2 upsampling then the 3x3 convolution (diffusers' Upsample2D), whole and in tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures import allocated_peak, rel_err

from zimage_lite.models.vae import upsample_conv
from zimage_lite.models.vae_tiles import Walk, map_tiles


def _reference(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.fixture
def case():
    generator = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(24, 20, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
        conv.bias.copy_(torch.randn(20, generator=generator))
    return conv, torch.randn(2, 24, 7, 11, generator=generator)  # odd, non-square: every phase and edge


@torch.no_grad()
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_phases_compute_the_upsampled_convolution_in_fp32(case, layout):
    """NCHW maps, and NHWC ones (vae_tiles.channels_last), which come out NHWC."""
    conv, x = case
    got = upsample_conv(x.contiguous(memory_format=layout), conv)
    assert got.is_contiguous(memory_format=layout)
    # measured relative error 3.0e-7 NCHW, 3.1e-7 NHWC (the taps on one input pixel are summed first); tolerance 3e-6
    assert rel_err(got, _reference(x, conv)) <= 3e-6


@torch.no_grad()
def test_phases_in_bf16_err_as_little_as_the_upsampled_map_does(case):
    """In bf16 the summed kernel is rounded once more: against the fp32 truth the error stays that of bf16."""
    conv, x = case
    truth = _reference(x.double(), conv.double())
    conv16 = conv.to(torch.bfloat16)
    old = rel_err(_reference(x.bfloat16(), conv16).double(), truth)
    new = rel_err(upsample_conv(x.bfloat16(), conv16).double(), truth)
    # measured: old 3.6e-3, new 3.9e-3 (ratio 1.08); bound: 1.5x the old path's error
    assert new <= 1.5 * old


@torch.no_grad()
@pytest.mark.parametrize("tile", [4, 3])
def test_tiles_of_the_phases_match_the_whole_map(case, tile):
    """A tile's window zero-padded is the upsampled map's zero padding: tiles with a one-pixel halo compute the
    same image (the decoder's tiled path, vae.decode_tiled)."""
    conv, x = case
    tiled = map_tiles(lambda t: upsample_conv(t, conv), x, tile, conv.out_channels, torch.device("cpu"), scale=2.0)
    # measured 0 (oneDNN could block a window's convolution differently); tolerance 1e-6
    assert rel_err(tiled, upsample_conv(x, conv)) <= 1e-6


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,h,w", [(32, 20, 12), (64, 33, 17), (8, 40, 24)])
def test_memory_walk_counts_what_the_phases_allocate(dtype, c, h, w, nhwc):
    """vae_tiles.Walk.upsample (what the plan's VAE stages add up) against torch's allocator for upsample_conv, on
    NCHW and NHWC maps."""
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dtype)
    x = torch.randn(1, c, h, w, dtype=dtype)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        upsample_conv(x, conv)  # oneDNN's one-time setup is not the pass's memory
        allocated = allocated_peak(lambda: upsample_conv(x, conv))
    walk = Walk(x.element_size(), 4, nhwc=nhwc)
    walk.upsample(c, h, w)
    # counted / allocated measured 1.000 .. 1.27 NCHW (oneDNN pads to 16 channels; the einsum's copy is an upper
    # bound), 1.00 .. 1.61 NHWC (the scratchpad's bound, large beside these small bf16 maps)
    assert allocated <= walk.device.peak <= (1.8 if nhwc else 1.5) * allocated
