"""The decoder's channels-last maps (models/vae_tiles.channels_last): the image NCHW maps give, whole and tiled, with
every convolution reading a channels-last map when the rule says so and none when it does not; and the rule."""

from __future__ import annotations

import pytest
import torch
from fixtures import load_model, rel_err

from zimage_lite.models import vae as vae_module
from zimage_lite.models import vae_tiles
from zimage_lite.models.vae import AutoencoderDecoder
from zimage_lite.models.vae_tiles import channels_last
from zimage_lite.weights.components import open_vae

# The two layouts' convolutions sum in different orders. Measured on these inputs (Zen 5, torch 2.13): fp32 3.7e-6
# whole, 9.0e-7 tiled, 7.2e-6 batch of 2; bf16 1.3e-2 .. 1.4e-2 (every map rounded to bf16 after other sums)
LAYOUT_TOL = {torch.float32: 5e-5, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "tile"), [(1, None), (1, 9), (2, None)])
def test_channels_last_decode_gives_the_nchw_image(tiny_model, monkeypatch, dtype, batch, tile):
    """Forced each way (the rule itself depends on the CPU: the next test)."""
    vae = load_model(AutoencoderDecoder, open_vae, tiny_model / "vae", dtype)
    latent = torch.randn(batch, 16, 40, 24, generator=torch.Generator().manual_seed(3))
    nhwc_inputs = []
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):  # the upsampling's phase convolution runs outside its module
            m.register_forward_hook(lambda m, args, out: nhwc_inputs.append(args[0].stride(1) == 1))
    images = {}
    with torch.no_grad():
        for nhwc in (True, False):
            monkeypatch.setattr(vae_module, "channels_last", lambda device, elem, nhwc=nhwc: nhwc)
            nhwc_inputs.clear()
            images[nhwc] = vae.decode(latent, tile=tile)
            assert nhwc_inputs and all(x == nhwc for x in nhwc_inputs)
    assert images[True].shape == images[False].shape == (batch, 3, 320, 192)
    assert images[True].is_contiguous() and images[True].dtype == torch.float32
    assert rel_err(images[True], images[False]) <= LAYOUT_TOL[dtype]


def test_channels_last_only_on_a_cpu_whose_onednn_runs_bf16(monkeypatch):
    monkeypatch.setattr(vae_tiles, "_bf16_on_onednn", lambda: False)  # AVX2: NCHW, as measured there
    assert not channels_last("cpu", 4) and not channels_last("cpu", 2)
    monkeypatch.setattr(vae_tiles, "_bf16_on_onednn", lambda: True)
    assert channels_last("cpu", 4) and channels_last("cpu", 2)
    assert not channels_last("cuda", 4) and not channels_last("cuda", 2)
