"""A K-quantized Qwen3 GGUF through the runtime: the packed embedding (QEmbedding) and Linears (QLinear) really run.

The file is what `zimage-lite quantize --component text-encoder --type Q4_K_M` writes from the 256-wide KQ_TEXT
fixture (token_embd Q6_K, Linears Q4_K and Q6_K), read back by `zimage_lite.load(..., text_encoder=FILE)`. Features
are compared with the same encoder from the BF16 folder, computed in fp32.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures import KQ_TEXT, PROMPTS
from gguf import GGMLQuantizationType as Q

import zimage_lite
from zimage_lite.cli import main
from zimage_lite.models.qwen3 import Qwen3Encoder
from zimage_lite.quant.formats import quantize
from zimage_lite.quant.qlinear import QEmbedding, QLinear, QTensor, release_scratch
from zimage_lite.weights.components import open_text_encoder
from zimage_lite.weights.gguf_source import GGUFSource
from zimage_lite.weights.load import load_module

# Relative L2 of the Q4_K_M encoder's features against the BF16 one's (fp32 compute): measured 0.144 ("en") and
# 0.139 ("cjk"), Q4_K's 7% weight error compounded over 3 layers; tolerance 2x that. Against float layers holding
# gguf-py's dequantization of the same bytes the packed encoder is exact (measured 0.0).
FEATURE_TOL = 0.3
LAYERS = KQ_TEXT.text_encoder.layers_used


@pytest.fixture(scope="module")
def te_gguf(kq_text_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("te-q4km")
    args = ["quantize", str(kq_text_model), "--component", "text-encoder", "--type", "Q4_K_M", "--out", str(out)]
    assert main(args) == 0
    [path] = out.glob("*.gguf")
    return path


def test_the_file_holds_k_quants(te_gguf):
    """The precondition of everything below: the fixture's widths really take K-quants, the embedding included."""
    src = GGUFSource(te_gguf)  # gguf-py's own reader parses the 152k-entry vocabulary: 6 s
    assert src.qtype("token_embd.weight") == "Q6_K"
    assert src.qtype("blk.0.attn_q.weight") == src.qtype("blk.1.ffn_down.weight") == "Q4_K"
    assert src.qtype("blk.2.attn_v.weight") == src.qtype("blk.2.ffn_down.weight") == "Q6_K"  # use_more_bits


def _spy(monkeypatch, cls: type) -> list:
    """Record every module of `cls` whose forward runs."""
    ran, forward = [], cls.forward

    def spied(self, x):
        ran.append(self)
        return forward(self, x)

    monkeypatch.setattr(cls, "forward", spied)
    return ran


def test_encode_runs_packed_within_bound(kq_text_model, te_gguf, monkeypatch):
    reference = zimage_lite.load(kq_text_model, device="cpu", dtype="fp32")
    packed = zimage_lite.load(kq_text_model, text_encoder=te_gguf, device="cpu", dtype="fp32")
    # --ram small enough that the plan streams every decoder layer: each is read from the map at every use
    streamed = zimage_lite.load(kq_text_model, text_encoder=te_gguf, device="cpu", dtype="fp32", ram="8MB")
    streamed.plan = streamed.make_plan(64, 64, 0.0)
    assert streamed.plan.stage("text_encoder").resident == ()
    embeds, linears = _spy(monkeypatch, QEmbedding), _spy(monkeypatch, QLinear)
    for prompt in PROMPTS.values():
        want, got = reference.encode(prompt), packed.encode(prompt)
        assert got.shape == want.shape == (got.shape[0], KQ_TEXT.text_encoder.hidden_size)
        assert float((got - want).norm() / want.norm()) < FEATURE_TOL, prompt
        assert torch.equal(streamed.encode(prompt), got)
    # every lookup and every Linear of every used layer ran packed (both pipelines), in the types the file holds
    assert len(embeds) == 2 * len(PROMPTS) and {m.qtype for m in embeds} == {Q.Q6_K}
    assert len(linears) == 2 * len(PROMPTS) * LAYERS * 7 and {m.qtype for m in linears} == {Q.Q4_K, Q.Q6_K}


def _floats_of_the_same_bytes(model: Qwen3Encoder) -> Qwen3Encoder:
    """`model` with each packed layer replaced by a float one holding gguf-py's dequantization of its bytes."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (QLinear, QEmbedding)):
            w = np.asarray(gguf.quants.dequantize(m.weight.numpy(), m.qtype), np.float32).reshape(m.shape)
            layer = torch.nn.Linear(1, 1, bias=False) if isinstance(m, QLinear) else torch.nn.Embedding(1, 1)
            layer.weight = torch.nn.Parameter(torch.from_numpy(w), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def test_packed_encoder_equals_float_layers_of_the_same_bytes(te_gguf):
    cfg, src = open_text_encoder(te_gguf)
    with torch.device("meta"):
        packed, floats = Qwen3Encoder(cfg), Qwen3Encoder(cfg)
    packed = load_module(packed, src, torch.float32, "cpu", "text encoder")
    floats = _floats_of_the_same_bytes(load_module(floats, src, torch.float32, "cpu", "text encoder"))
    assert isinstance(packed.embed_tokens, QEmbedding) and isinstance(floats.embed_tokens, torch.nn.Embedding)
    ids = torch.cat([torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0)),
                     torch.tensor([151644, 151645, 151644])])  # random rows, the chat template's specials, a repeat
    with torch.no_grad():
        assert torch.equal(packed(ids, "cpu", torch.float32), floats(ids, "cpu", torch.float32))


def test_image_from_a_quantized_text_encoder(kq_text_model, te_gguf):
    kwargs = dict(width=32, height=32, steps=2, seed=3)
    packed = zimage_lite.load(kq_text_model, text_encoder=te_gguf, device="cpu", dtype="fp32")
    image = np.asarray(packed.text_to_image(PROMPTS["en"], **kwargs), np.float32)
    f32 = np.asarray(zimage_lite.load(kq_text_model, device="cpu", dtype="fp32").text_to_image(PROMPTS["en"], **kwargs),
                     np.float32)
    assert image.shape == (32, 32, 3) and image.std() > 5
    assert 0 < np.abs(image - f32).mean() < 4  # other features, nearly the same picture (measured 0.38 levels)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q3_K], ids=lambda q: q.name)
def test_qembedding_rows_equal_the_dequantized_table(qtype):
    table = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    raw = quantize(table, qtype)
    ids = torch.tensor([[5, 0, 299], [5, 17, 128]])  # 2-D, a repeated id, first and last rows
    got = QEmbedding(QTensor(torch.from_numpy(raw), qtype, (300, 256)))(ids)
    whole = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), np.float32))  # gguf-py's, the table
    assert got.shape == (2, 3, 256) and got.dtype == torch.float32
    assert torch.equal(got, whole[ids])


def test_packed_layers_run_in_and_out_of_inference_mode():
    """The CPU dequantize scratch outlives a call: one made under the pipeline's inference_mode must not break a
    later run under no_grad (it did: "Inplace update to inference tensor outside InferenceMode")."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    layer, x = QLinear(QTensor(torch.from_numpy(quantize(w, Q.Q4_K)), Q.Q4_K, (64, 256)), None), torch.randn(3, 256)
    release_scratch()
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), first)
