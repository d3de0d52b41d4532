"""The VAE's channels-last maps (models/vae_tiles.channels_last): the decoder's image and the encoder's latents that
NCHW maps give, whole and tiled, with every convolution reading a channels-last map when the rule says so and none
when it does not; and the rule."""

from __future__ import annotations

import pytest
import torch
from fixtures import load_model, rel_err

from zimage_lite.models import vae as vae_module
from zimage_lite.models import vae_encoder, vae_tiles
from zimage_lite.models.vae import AutoencoderDecoder
from zimage_lite.models.vae_encoder import AutoencoderEncoder
from zimage_lite.models.vae_tiles import channels_last
from zimage_lite.weights.components import open_vae

# The two layouts' convolutions sum in different orders. Measured on these inputs (Zen 5, torch 2.13): decode fp32
# 3.7e-6 whole, 9.0e-7 tiled, 7.2e-6 batch of 2, bf16 1.3e-2 .. 1.4e-2 (every map rounded to bf16 after other sums);
# encode fp32 1.3e-6, 9.2e-7 and 2.0e-6, bf16 3.9e-3 .. 7.9e-3
LAYOUT_TOL = {torch.float32: 5e-5, torch.bfloat16: 5e-2}


def _both_layouts(monkeypatch, vae: torch.nn.Module, module, run) -> dict[bool, torch.Tensor]:
    """run() with the rule of `module` forced to channels-last, then to NCHW (the rule itself depends on the CPU:
    the last test), each convolution's input checked to be laid out so."""
    nhwc_inputs = []
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):  # the upsampling's phase convolution runs outside its module
            m.register_forward_hook(lambda m, args, out: nhwc_inputs.append(args[0].stride(1) == 1))
    out = {}
    with torch.no_grad():
        for nhwc in (True, False):
            monkeypatch.setattr(module, "channels_last", lambda device, elem, nhwc=nhwc: nhwc)
            nhwc_inputs.clear()
            out[nhwc] = run()
            assert nhwc_inputs and all(x == nhwc for x in nhwc_inputs)
    assert out[True].is_contiguous() and out[True].dtype == out[False].dtype == torch.float32
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "tile"), [(1, None), (1, 9), (2, None)])
def test_channels_last_decode_gives_the_nchw_image(tiny_model, monkeypatch, dtype, batch, tile):
    vae = load_model(AutoencoderDecoder, open_vae, tiny_model / "vae", dtype)
    latent = torch.randn(batch, 16, 40, 24, generator=torch.Generator().manual_seed(3))
    images = _both_layouts(monkeypatch, vae, vae_module, lambda: vae.decode(latent, tile=tile))
    assert images[True].shape == images[False].shape == (batch, 3, 320, 192)
    assert rel_err(images[True], images[False]) <= LAYOUT_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "tile"), [(1, None), (1, 9), (2, None)])
def test_channels_last_encode_gives_the_nchw_latents(tiny_model, monkeypatch, dtype, batch, tile):
    vae = load_model(AutoencoderEncoder, open_vae, tiny_model / "vae", dtype)
    image = torch.rand(batch, 3, 320, 192, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = _both_layouts(monkeypatch, vae, vae_encoder, lambda: vae.encode(image, tile=tile))
    assert latents[True].shape == latents[False].shape == (batch, 16, 40, 24)
    assert rel_err(latents[True], latents[False]) <= LAYOUT_TOL[dtype]


def test_channels_last_only_on_a_cpu_whose_onednn_runs_bf16(monkeypatch):
    monkeypatch.setattr(vae_tiles, "_bf16_on_onednn", lambda: False)  # AVX2: NCHW, as measured there
    assert not channels_last("cpu", 4) and not channels_last("cpu", 2)
    monkeypatch.setattr(vae_tiles, "_bf16_on_onednn", lambda: True)
    assert channels_last("cpu", 4) and channels_last("cpu", 2)
    assert not channels_last("cuda", 4) and not channels_last("cuda", 2)
