"""The model-side seams later features plug into: the DiT split into embed -> blocks -> final (ControlNet hints,
an early stop of the runner) and the VAE encoder, loaded the way the decoder is, from either name layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fixtures import TINY, load_model, make_checkpoint, rel_err
from safetensors.torch import save_file

from zimage_lite.config import VAEConfig
from zimage_lite.errors import CheckpointError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.models.layers import Resident
from zimage_lite.models.vae_encoder import AutoencoderEncoder
from zimage_lite.weights.components import open_dit, open_vae
from zimage_lite.weights.load import load_module
from zimage_lite.weights.names import vae_flux_name
from zimage_lite.weights.sources import SafetensorsSource


def _cfg_inputs(times=(0.4, 0.4)):
    """A CFG-style batch of two items whose captions differ in length (back to back in every block)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 12, 10, generator=g)
    return x, torch.tensor(times), [torch.randn(20, 48, generator=g), torch.randn(7, 48, generator=g)]


@pytest.fixture(scope="module")
def dit(tiny_model):
    return load_model(ZImageDiT, open_dit, tiny_model / "transformer")


# Items at different times get their adaLN rows from one batched MLP: BLAS rounding only. Measured 6.1e-7.
ITEM_TOL = 6e-6


@pytest.mark.parametrize("times,tol", [((0.4, 0.4), 0.0), ((0.3, 0.8), ITEM_TOL)])
def test_split_forward_is_forward(dit, times, tol):
    x, t, caps = _cfg_inputs(times)
    with torch.no_grad():
        state = dit.blocks(dit.embed(x, t, caps))
        assert state.x.shape == (sum(state.spans), dit.cfg.dim)
        batched = dit.final(state)
        assert torch.equal(batched, dit(x, t, caps))
        # CFG batching: each item run alone gives its row of the batch
        for i in range(2):
            assert rel_err(batched[i:i + 1], dit(x[i:i + 1], t[i:i + 1], caps[i:i + 1])) <= tol


def test_a_hint_is_added_after_its_layer(dit):
    x, t, caps = _cfg_inputs()
    with torch.no_grad():
        state = dit.embed(x, t, caps)
        plain = dit.final(dit.blocks(state))
        hint = 0.5 * torch.randn(sum(state.spans), dit.cfg.dim, generator=torch.Generator().manual_seed(1))
        hinted = dit.final(dit.blocks(state, hints={0: hint}))
        # by hand: the same tensor added to the output of layers.0 by a forward hook
        handle = dit.layers[0].register_forward_hook(lambda module, args, out: out + hint)
        try:
            by_hand = dit(x, t, caps)
        finally:
            handle.remove()
        # after the last layer the hint reaches the final layer directly
        last = dit.final(dit.blocks(state, hints={dit.cfg.n_layers - 1: hint}))
    assert (hinted - plain).abs().max() > 1e-3
    assert torch.equal(hinted, by_hand)
    assert not torch.equal(last, hinted) and (last - plain).abs().max() > 1e-3


@pytest.mark.parametrize("k", [1, 4, 5])  # inside the noise refiners, after all refiners, after layers.0
def test_stop_mid_pass_skips_the_rest(dit, k):
    """runner.stop() called once k blocks have run (as a step cache would, from a hook): the pass equals a schedule
    of those k blocks alone, and the next pass runs every block again."""
    x, t, caps = _cfg_inputs()
    modules = [b.module for b in dit.schedule()]
    with torch.no_grad():
        full = dit(x, t, caps)
        dit.runner = Resident(modules[:k])
        want = dit(x, t, caps)
        dit.runner = Resident(modules)
        handle = modules[k - 1].register_forward_hook(lambda *args: dit.runner.stop())
        try:
            got = dit(x, t, caps)
        finally:
            handle.remove()
        again = dit(x, t, caps)
    assert torch.equal(got, want) and not torch.equal(got, full)
    assert torch.equal(again, full)


# --- VAE encoder ----------------------------------------------------------------------------------------------

# widths that are multiples of 32: a single file's GroupNorm group count is FLUX's 32 (see test_layouts.py)
CFG = dataclasses.replace(TINY, vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1))


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("enc") / "official", CFG) / "vae"


def _flux_ae(folder):
    src = SafetensorsSource.from_folder(folder)
    out = {}
    for name in src.names():
        new = vae_flux_name(name, len(CFG.vae.block_out_channels))
        t = src.get(name)
        out[new] = t[:, :, None, None] if ".attn_1." in new and t.ndim == 2 else t  # FLUX: 1x1-conv projections
    return out


def test_encoder_from_the_flux_ae_layout_is_exact(vae_folder, tmp_path):
    """FLUX's ae.safetensors names (test_layouts.py checks every name both ways) give the same latents."""
    save_file(_flux_ae(vae_folder), tmp_path / "ae.safetensors")
    image = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = load_model(AutoencoderEncoder, open_vae, vae_folder).encode(image)
        got = load_model(AutoencoderEncoder, open_vae, tmp_path / "ae.safetensors").encode(image)
    assert want.shape == (1, 16, 6, 5)
    assert torch.equal(got, want)


def test_decoder_only_file_loads_the_decoder_and_names_the_missing_encoder(vae_folder, tmp_path):
    decoder_only = {n: t for n, t in _flux_ae(vae_folder).items() if n.startswith("decoder.")}
    save_file(decoder_only, tmp_path / "ae_decoder.safetensors")
    cfg, src = open_vae(tmp_path / "ae_decoder.safetensors")  # the decoder alone is a VAE file that decodes
    with torch.device("meta"):
        encoder = AutoencoderEncoder(cfg)
    with pytest.raises(CheckpointError, match=r"ae_decoder.safetensors: the VAE encoder is missing tensor\(s\) "
                                              r"encoder.conv_in.weight"):
        load_module(encoder, src, torch.float32, "cpu", "VAE encoder")
