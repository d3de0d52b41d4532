"""Our files in the tools people already use: diffusers reads the GGUF DiT (and renders the same image as
zimage-lite from it) and the bitsandbytes folders; transformers reads the Qwen3 GGUF with its tokenizer.

fp32 on CPU. Image tolerance as in test_parity.py: 1.5/255, max over all pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import KQUANT, PROMPTS, optional, rel_err
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import zimage_lite
from quantize import bnb
from quantize.convert import convert
from zimage_lite.quant import formats
from zimage_lite.quant.formats import dequantize

diffusers, needs_diffusers = optional("diffusers")
transformers, needs_transformers = optional("transformers")

IMAGE_TOL = 1.5


@pytest.fixture(scope="module")
def files(kq_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("quantized")
    return {t: convert(kq_model, t, out=out)[0].path for t in ("Q8_0", "Q4_K_M", "int8", "nf4")}


def _diffusers_dit(path: Path, kq_model: Path):
    return diffusers.ZImageTransformer2DModel.from_single_file(
        str(path), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(kq_model / "transformer"), dtype=torch.float32)


@needs_diffusers
@pytest.mark.parametrize("type_name,qkv", [("Q8_0", Q.Q8_0), ("Q4_K_M", Q.Q5_K)])
def test_diffusers_loads_our_gguf(kq_model, files, type_name, qkv):
    model = _diffusers_dit(files[type_name], kq_model)
    to_q = model.layers[0].attention.to_q.weight
    assert type(model.layers[0].attention.to_q).__name__ == "GGUFLinear" and to_q.quant_type == qkv
    assert model.x_pad_token.dtype == torch.float32 and model.x_pad_token.shape == (1, KQUANT.dit.dim)
    # diffusers splits the fused qkv by rows: its q is the first third of our file's bytes, dequantized
    reader = GGUFReader(files[type_name])
    qkv_t = next(t for t in reader.tensors if t.name == "layers.0.attention.qkv.weight")
    dim = KQUANT.dit.dim
    ours = dequantize(torch.from_numpy(np.array(qkv_t.data)), qkv_t.tensor_type, (3 * dim, dim))[:dim]
    theirs = diffusers.quantizers.gguf.utils.dequantize_gguf_tensor(to_q).float()
    assert rel_err(theirs, ours) < 2e-3  # equal up to fp16 rounding: diffusers' kernels keep the fp16 scales


@needs_diffusers
@needs_transformers  # diffusers' ZImagePipeline loads the text encoder with transformers
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K_M"])
def test_diffusers_image_equals_zimage_lite_from_the_same_gguf(kq_model, files, type_name, monkeypatch):
    # chunks of 2048 weights: every Linear dequantizes on worker threads, as the full-size model does
    monkeypatch.setattr(formats, "DEQUANT_CHUNK_WEIGHTS", 2048)
    dit = _diffusers_dit(files[type_name], kq_model)
    reference = diffusers.ZImagePipeline.from_pretrained(kq_model, transformer=dit, dtype=torch.float32)
    want = reference(PROMPTS["en"], width=64, height=64, num_inference_steps=8, guidance_scale=0.0,
                     generator=torch.Generator("cpu").manual_seed(7)).images[0]
    ours = zimage_lite.load(kq_model, dit=files[type_name], device="cpu", dtype="fp32")
    got = ours.text_to_image(PROMPTS["en"], width=64, height=64, steps=8, seed=7)
    a, b = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert a.shape == b.shape == (64, 64, 3) and a.std() > 5
    assert np.abs(a - b).max() <= IMAGE_TOL


def _allow_bnb_on_cpu(monkeypatch):
    """diffusers refuses bitsandbytes models without a GPU (validate_environment), although bitsandbytes >= 0.46
    runs int8 and nf4 on the CPU: lift that check on CPU-only machines."""
    if torch.cuda.is_available():
        return
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    for cls in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(cls, "validate_environment", lambda *a, **k: None)


@needs_diffusers
@pytest.mark.parametrize("type_name", ["int8", "nf4"])
def test_diffusers_loads_our_bitsandbytes_folder(kq_model, files, monkeypatch, type_name):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    _allow_bnb_on_cpu(monkeypatch)
    ref = diffusers.ZImageTransformer2DModel.from_pretrained(kq_model / "transformer", dtype=torch.float32)
    model = diffusers.ZImageTransformer2DModel.from_pretrained(files[type_name], dtype=torch.float32,
                                                               device_map="cpu")
    assert type(model.all_x_embedder["2-1"]).__name__ == "Linear"  # skipped: stays a float Linear
    for name in ("layers.0.attention.to_q", "layers.1.feed_forward.w2", "noise_refiner.0.feed_forward.w1"):
        layer, want = model.get_submodule(name), ref.get_submodule(name).weight.detach()
        if type_name == "int8":
            assert type(layer).__name__ == "Linear8bitLt"
            got = layer.weight.data.float() * layer.weight.SCB[:, None] / 127
            assert rel_err(got, want) < 0.01
        else:
            assert type(layer).__name__ == "Linear4bit"
            got = bitsandbytes.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            packed, absmax = bnb.quantize_nf4(want)
            assert torch.equal(got, bnb.dequantize_nf4(packed, absmax, tuple(want.shape)))
    if type_name == "int8":  # bitsandbytes' CPU nf4 matmul needs out_features % 32 == 0 (682 here)
        g = torch.Generator().manual_seed(0)
        x, cap, t = torch.randn(16, 1, 8, 8, generator=g), torch.randn(10, 48, generator=g), torch.tensor([0.5])
        with torch.no_grad():
            a = model([x], t, [cap], return_dict=False)[0][0]
            b = ref([x], t, [cap], return_dict=False)[0][0]
        assert float((a - b).norm() / b.norm()) < 0.05  # LLM.int8 also rounds the activations to int8


@needs_transformers
def test_transformers_reads_our_text_encoder_gguf(tiny_model, tmp_path):
    [res] = convert(tiny_model, "Q8_0", component="text-encoder", out=tmp_path)
    # transformers takes head_dim from its Qwen3 default (128), not from qwen3.attention.key_length: pass the config
    config = transformers.AutoConfig.from_pretrained(tiny_model / "text_encoder")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=res.path.name, config=config,
                                                              dtype=torch.float32)
    ref = transformers.Qwen3Model.from_pretrained(tiny_model / "text_encoder", dtype=torch.float32)
    for name in ("embed_tokens.weight", "layers.2.mlp.down_proj.weight", "norm.weight"):
        assert rel_err(model.model.get_parameter(name).detach(), ref.get_parameter(name).detach()) < 0.01, name
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=res.path.name)
    ref_tok = transformers.AutoTokenizer.from_pretrained(tiny_model / "tokenizer")
    for text in [*PROMPTS.values(), "<|im_start|>user\nx<|im_end|>"]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.eos_token == "<|im_end|>"
