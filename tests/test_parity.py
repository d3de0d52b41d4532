"""Parity with the reference libraries (diffusers' ZImagePipeline, transformers' Qwen3) on the same random weights.

fp32 on CPU. Errors are max |diff| / max |ref| (`rel_err`); each tolerance sits within 10x of the error measured on
this fixture, so a wrong constant (an epsilon of RMSNorm, GroupNorm or the final LayerNorm) fails: changing any of
them was checked to break these tests (RMSNorm 1e-5 -> 1e-6 moves the DiT forward by ~1e-5, GN_EPS 1e-6 -> 1e-5 the
VAE by ~1e-5, the final LayerNorm's 1e-6 -> 1e-5 the DiT forward by ~1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import PROMPTS, load_model, optional, rel_err

import zimage_lite
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.models.qwen3 import Qwen3Encoder
from zimage_lite.models.vae import AutoencoderDecoder
from zimage_lite.models.vae_encoder import AutoencoderEncoder
from zimage_lite.sampling import get_sigmas, model_time
from zimage_lite.text import PromptTokenizer
from zimage_lite.weights.components import open_dit, open_text_encoder, open_vae

diffusers, needs_diffusers = optional("diffusers")
transformers, needs_transformers = optional("transformers")
# diffusers' ZImagePipeline (the `reference` fixture) loads its text encoder with transformers
needs_pipeline = pytest.mark.skipif(diffusers is None or transformers is None,
                                    reason="needs diffusers and transformers (diffusers' ZImagePipeline)")

# Text encoder, VAE encode: measured 0 (the same operations in the same order as the references); the
# tolerance allows 8 float32 ulps, for kernels that pick a summation order by pointer alignment.
EXACT_TOL = 1e-6
# VAE decode: our maps channels-last on the CPU (models/vae_tiles.channels_last), diffusers' NCHW: oneDNN sums in
# another order; measured 1.04e-6
DECODE_TOL = 1e-5
DIT_TOL = 1.4e-6  # DiT forward: measured 1.2e-7 .. 1.4e-7
LATENT_TOL = 1e-5  # final latents after 8 steps, with and without CFG: measured 1.6e-7 .. 1.0e-6
# 8-bit levels, max over all pixels: measured 1 (one pixel whose float values straddle a rounding boundary)
IMAGE_TOL = 1


@pytest.fixture(scope="module")
def reference(tiny_model):
    return diffusers.ZImagePipeline.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(tiny_model):
    return zimage_lite.load(tiny_model, device="cpu", dtype="fp32", keep_loaded=True)


@needs_transformers
# Embedding scales: the fixture's N(0, 1) rows, and rows near the real Qwen3-4B's (RMS ~0.03), where mean(x^2) is
# within 1000x of rms_norm_eps, so a wrong epsilon moves the hidden states far beyond the tolerance.
@pytest.mark.parametrize("lang,embed_scale", [("en", 1.0), ("cjk", 1.0), ("en", 0.03)])
def test_text_encoder_matches_transformers(tiny_model, lang, embed_scale):
    tok = PromptTokenizer(tiny_model / "tokenizer" / "tokenizer.json")
    ids = tok.encode(PROMPTS[lang]).ids
    ref_tok = transformers.AutoTokenizer.from_pretrained(tiny_model / "tokenizer")
    rendered = ref_tok.apply_chat_template([{"role": "user", "content": PROMPTS[lang]}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True)
    assert ref_tok(rendered)["input_ids"] == ids.tolist()
    ref = transformers.Qwen3Model.from_pretrained(tiny_model / "text_encoder", dtype=torch.float32).eval()
    ours = load_model(Qwen3Encoder, open_text_encoder, tiny_model / "text_encoder")
    with torch.no_grad():
        ref.embed_tokens.weight.mul_(embed_scale)
        # the same scaled rows in ours (its table stays as stored, bf16 here, where scaling would round them)
        ours.embed_tokens.weight = torch.nn.Parameter(ref.embed_tokens.weight.clone(), requires_grad=False)
        want = ref(ids[None], output_hidden_states=True).hidden_states[-2][0]
        got = ours(ids, "cpu", torch.float32)
    assert got.shape == want.shape
    assert rel_err(got, want) <= EXACT_TOL


@needs_diffusers
@pytest.mark.parametrize("hw,cap_len", [((16, 16), 45), ((12, 18), 64), ((10, 6), 7)])
def test_dit_forward_matches_diffusers(tiny_model, hw, cap_len):
    ref = diffusers.ZImageTransformer2DModel.from_pretrained(tiny_model / "transformer", dtype=torch.float32)
    ours = load_model(ZImageDiT, open_dit, tiny_model / "transformer")
    g = torch.Generator().manual_seed(hw[0] * 100 + cap_len)
    x = torch.randn(2, 16, *hw, generator=g)
    caps = [torch.randn(cap_len, 48, generator=g), torch.randn(cap_len // 2 + 1, 48, generator=g)]
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        want = torch.stack(ref(list(x.unsqueeze(2)), t, caps, return_dict=False)[0]).squeeze(2)
        got = ours(x, t, caps)
    assert rel_err(got, want) <= DIT_TOL


@needs_diffusers
def test_vae_decode_matches_diffusers(tiny_model):
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_model / "vae", dtype=torch.float32)
    ours = load_model(AutoencoderDecoder, open_vae, tiny_model / "vae")
    lat = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.decode(lat / 0.3611 + 0.1159).sample
        got = ours.decode(lat)
    assert rel_err(got, want) <= DECODE_TOL


@needs_diffusers
@pytest.mark.parametrize("sampled", [False, True])
def test_vae_encode_matches_diffusers(tiny_model, sampled):
    """The posterior mean (sample_mode "argmax"), or a sample with the same generator (the img2img default), then
    (z - shift) * scale as diffusers' Z-Image img2img pipeline prepares its latents."""
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_model / "vae", dtype=torch.float32)
    ours = load_model(AutoencoderEncoder, open_vae, tiny_model / "vae")
    image = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        want = dist.sample(torch.Generator().manual_seed(5)) if sampled else dist.mode()
        want = (want - ref.config.shift_factor) * ref.config.scaling_factor
        got = ours.encode(image, generator=torch.Generator().manual_seed(5) if sampled else None)
    assert got.shape == (1, 16, 12, 10)
    assert rel_err(got, want) <= EXACT_TOL


@needs_pipeline
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 9, 20, 50])
def test_schedule_matches_diffusers(reference, steps):
    """Exact at every step count: the same fp32 arithmetic as diffusers (in float64, as the official code, 3 and 9
    steps are one ulp off, which moves a 3-step img2img's latents by 3e-5)."""
    sched = reference.scheduler
    sched.set_timesteps(sigmas=diffusers.pipelines.z_image.pipeline_z_image.get_default_z_image_sigmas(steps))
    ours = get_sigmas(steps, shift=3.0)
    assert torch.equal(ours, sched.sigmas.float())
    assert torch.equal(model_time(ours[:-1]), (1000 - sched.timesteps.float()) / 1000)


CASES = [  # (prompt, width, height, cfg, negative)
    ("en", 64, 64, 0.0, ""),
    ("cjk", 48, 80, 0.0, ""),  # non-square, image tokens padded (3x5 patches)
    ("en", 80, 48, 4.0, "blurry, low quality"),
    ("cjk", 64, 64, 3.0, ""),  # CFG against the empty negative prompt
]


def _render(reference, ours, prompt, width=64, height=64, cfg=0.0, negative="", seed=7, **extra):
    """(our final latents, our image, the reference's latents, its image) for the same seed and settings, 8 steps."""
    done = next(e for e in ours.generate(prompt, width=width, height=height, steps=8, seed=seed, cfg=cfg,
                                         negative=negative, **extra) if e.stage == "decoded")
    latents = reference(prompt, width=width, height=height, num_inference_steps=8, guidance_scale=cfg,
                        negative_prompt=negative if cfg else None, generator=torch.Generator("cpu").manual_seed(seed),
                        output_type="latent", **extra).images
    with torch.no_grad():  # the rest of the reference pipeline, as it runs for output_type="pil"
        vae = reference.vae
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return done.latents, done.image, latents, reference.image_processor.postprocess(decoded, output_type="pil")[0]


@needs_pipeline
@pytest.mark.parametrize("lang,width,height,cfg,negative", CASES)
def test_image_matches_diffusers(reference, ours, lang, width, height, cfg, negative):
    lat, got, want_lat, want = _render(reference, ours, PROMPTS[lang], width=width, height=height, cfg=cfg,
                                       negative=negative)
    assert rel_err(lat, want_lat) <= LATENT_TOL
    a, b = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert a.shape == b.shape == (height, width, 3)
    assert a.std() > 5  # a real picture of noise, not a flat one
    assert np.abs(a - b).max() <= IMAGE_TOL


@needs_pipeline
def test_cfg_normalization_and_truncation_match_diffusers(reference, ours):
    lat, got, want_lat, want = _render(reference, ours, PROMPTS["en"], seed=3, cfg=5.0, negative="dark",
                                       cfg_normalization=1.0, cfg_truncation=0.4)
    assert rel_err(lat, want_lat) <= LATENT_TOL
    assert np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max() <= IMAGE_TOL


# bf16 vs fp32: one DiT forward differs by bf16 rounding. Measured on this fixture: 1.1% relative (L2).
BF16_FORWARD_TOL = 0.03


def test_bf16_forward_agrees_with_fp32(tiny_model):
    fp32 = load_model(ZImageDiT, open_dit, tiny_model / "transformer")
    bf16 = load_model(ZImageDiT, open_dit, tiny_model / "transformer", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x, cap = torch.randn(1, 16, 16, 16, generator=g), torch.randn(20, 48, generator=g)
    t = torch.tensor([0.5])
    with torch.no_grad():
        a = fp32(x, t, [cap])
        b = bf16(x.bfloat16(), t, [cap.bfloat16()]).float()
    assert float((a - b).norm() / a.norm()) < BF16_FORWARD_TOL
