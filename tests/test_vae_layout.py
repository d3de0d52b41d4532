"""The decoder's channels-last maps on the CPU (models/vae_tiles.channels_last): the image NCHW maps give, whole and
tiled, with every convolution reading a channels-last map where the rule says so, and none where it does not."""

from __future__ import annotations

import pytest
import torch
from fixtures import rel_err

from zimage_lite.models import vae as vae_module
from zimage_lite.models.vae import AutoencoderDecoder
from zimage_lite.models.vae_tiles import channels_last
from zimage_lite.weights.components import open_vae
from zimage_lite.weights.load import load_module

# fp32, the two layouts' convolutions summing in different orders; measured on these inputs: 3.7e-6 whole, 9.0e-7
# tiled (Zen 5, torch 2.13)
LAYOUT_TOL = 2e-5


def _decoder(path) -> AutoencoderDecoder:
    cfg, src = open_vae(path / "vae")
    with torch.device("meta"):
        model = AutoencoderDecoder(cfg)
    return load_module(model, src, torch.float32, "cpu", "AutoencoderDecoder")


@pytest.mark.parametrize("tile", [None, 9])
def test_channels_last_decode_gives_the_nchw_image(tiny_model, monkeypatch, tile):
    vae = _decoder(tiny_model)
    latent = torch.randn(1, 16, 40, 24, generator=torch.Generator().manual_seed(3))
    nhwc_inputs = []
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):  # the upsampling's phase convolution runs outside its module
            m.register_forward_hook(lambda m, args, out: nhwc_inputs.append(args[0].stride(1) == 1))
    with torch.no_grad():
        nhwc = vae.decode(latent, tile=tile)
        assert nhwc_inputs and all(nhwc_inputs)
        nhwc_inputs.clear()
        monkeypatch.setattr(vae_module, "channels_last", lambda device, elem: False)
        nchw = vae.decode(latent, tile=tile)
        assert nhwc_inputs and not any(nhwc_inputs)
    assert nhwc.shape == nchw.shape == (1, 3, 320, 192) and nhwc.is_contiguous() and nhwc.dtype == torch.float32
    assert rel_err(nhwc, nchw) <= LAYOUT_TOL


def test_channels_last_only_where_onednn_runs_the_convolutions(monkeypatch):
    from zimage_lite.models import vae_tiles

    assert channels_last("cpu", 4) and not channels_last("cuda", 4) and not channels_last("cuda", 2)
    monkeypatch.setattr(vae_tiles, "_bf16_on_onednn", lambda: False)  # AVX2: bf16 on torch's own kernel
    assert channels_last("cpu", 4) and not channels_last("cpu", 2)
    monkeypatch.setattr(vae_tiles, "_bf16_on_onednn", lambda: True)
    assert channels_last("cpu", 2)
