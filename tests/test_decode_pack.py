"""The enhancer's decode Linears (quant/decode_linear.py): int4 from Q4_K, int8 rows from other types, against the
float weight the file dequantizes to; their bytes as the plan counts them; the enhancer using them on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from test_enhance import PROMPTS, SHORT_SYSTEM, _ours, lm_model, lm_q8  # noqa: F401  (its fixtures)

import zimage_lite
from zimage_lite.enhance import encode_chat, unpack_layers
from zimage_lite.enhance_options import CONTEXT
from zimage_lite.quant.decode_linear import ROUTE_ENV, DecodeLinear, _ops_present, decode_route, plan_type, to_decode
from zimage_lite.quant.formats import dequantize, quantize
from zimage_lite.quant.qlinear import QLinear, QTensor
from zimage_lite.runtime.sizes import stored_bytes

CPU = torch.device("cpu")
needs_ops = pytest.mark.skipif(not _ops_present(), reason="this torch has no weight-only int4/int8 CPU kernels")


def _qlinear(qtype: Q, shape: tuple[int, int], seed: int = 0) -> tuple[QLinear, torch.Tensor]:
    """A packed Linear of a random weight in `qtype` and the fp32 weight the file's dequantization gives."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    raw = torch.from_numpy(quantize(w, qtype)).reshape(shape[0], -1)
    return QLinear(QTensor(raw, qtype, shape), None), dequantize(raw, qtype, shape, torch.float32)


# kind, relative max weight error, relative product error (each measured on these weights / allowed ~10x):
# int4: only the bf16 rounding of each group's scale and zero (4.8e-3 / 3.4e-3 measured); int8 rows: one scale per
# row instead of per block (3.9e-3 / 7.9e-3 measured).
CASES = [(Q.Q4_K, (48, 512), "int4", 3e-2, 3e-2), (Q.Q6_K, (48, 512), "int8", 3e-2, 6e-2),
         (Q.Q8_0, (48, 512), "int8", 3e-2, 6e-2),
         (Q.Q4_K, (8, 512), "int8", 3e-2, 6e-2)]  # 8 rows: the int4 packing wants 16k; falls back to int8 rows


@needs_ops
@pytest.mark.parametrize("qtype,shape,kind,w_tol,y_tol", CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_linear_matches_the_dequantized_weight(qtype, shape, kind, w_tol, y_tol, dtype):
    m, w = _qlinear(qtype, shape)
    d = to_decode(m)
    assert d.kind == kind
    assert (d.dequantized() - w).abs().max() <= w_tol * w.abs().max()
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    y, ref = d(x), F.linear(x.float(), w)
    assert y.dtype == dtype and y.shape == (3, 5, shape[0])
    assert (y.float() - ref).norm() <= y_tol * ref.norm()


@needs_ops
def test_a_q4k_weight_maps_onto_int4_groups_exactly_but_for_bf16_scales():
    """Scale d*sc and zero 8*scale - dmin*m reproduce every Q4_K weight; the only error is rounding them to bf16,
    so the weight error is within a bf16 step of the largest group term (measured 4.8e-3 of max|w|)."""
    m, w = _qlinear(Q.Q4_K, (32, 256), seed=3)
    d = to_decode(m)
    err = (d.dequantized() - w).abs().max() / w.abs().max()
    assert 0 < err <= 2 ** -6  # nonzero: the bf16 pairs; a wrong level mapping (q-8 vs q) errs by ~8 steps


@needs_ops
@pytest.mark.parametrize("qtype,shape", [(Q.Q4_K, (48, 512)), (Q.Q6_K, (48, 512)), (Q.Q4_K, (8, 512))])
def test_the_plan_counts_exactly_what_a_decode_linear_holds(qtype, shape):
    d = to_decode(_qlinear(qtype, shape)[0])
    held = sum(b.numel() * b.element_size() for b in d.buffers())
    assert stored_bytes(shape, plan_type(shape, qtype.name)) == held


@needs_ops
def test_the_enhancer_decodes_with_decode_linears_on_the_cpu(lm_model, lm_q8, tmp_path, monkeypatch):  # noqa: F811
    """No QLinear and no float Linear dequantization per token: every packed Linear of the layers is a DecodeLinear.
    The random tiny model's logits are nearly flat, so int8 rows (Q8_0 per row, 0.8% on a product) may change its
    greedy ids (they do: the float route's parity test is test_enhance.test_packed_layers_are_dequantized_once);
    the check is the prefill logits against the float route's (measured 3.2e-2 relative; tolerance 1e-1)."""
    monkeypatch.delenv(ROUTE_ENV, raising=False)
    float_model, packed_model = _ours(lm_q8), _ours(lm_q8)
    unpack_layers(packed_model, torch.float32)
    kinds = [m.kind for m in packed_model.modules() if isinstance(m, DecodeLinear)]
    assert kinds and set(kinds) == {"int8"} and not any(isinstance(m, QLinear) for m in packed_model.layers.modules())
    pipe = zimage_lite.load(lm_model, text_encoder=lm_q8, device="cpu", dtype="fp32")
    ids = torch.tensor(encode_chat(pipe.tokenizer.tokenizer, SHORT_SYSTEM, PROMPTS["en"], CONTEXT)[0])
    with torch.inference_mode():
        ref, got = float_model.logits(ids, None, CPU, torch.float32), packed_model.logits(ids, None, CPU, torch.float32)
    assert (got - ref).norm() <= 1e-1 * ref.norm()
    calls = []
    forward = DecodeLinear.forward
    monkeypatch.setattr(DecodeLinear, "forward", lambda self, x: calls.append(self) or forward(self, x))
    system = tmp_path / "system.txt"
    system.write_text(SHORT_SYSTEM, encoding="utf-8")
    pipe.enhance(PROMPTS["en"], max_tokens=3, system=system)
    assert calls


def test_the_decode_route_is_forced_by_its_variable(monkeypatch):
    from zimage_lite.errors import OptionError

    monkeypatch.setenv(ROUTE_ENV, "float")
    assert decode_route("cpu") == "float"
    monkeypatch.setenv(ROUTE_ENV, "int3")
    with pytest.raises(OptionError, match=ROUTE_ENV):
        decode_route("cpu")


@needs_ops
def test_the_head_is_int8_rows_of_a_quantized_table_converted_by_chunks(lm_model, lm_q8, monkeypatch):  # noqa: F811
    """A Q8_0 embedding table becomes an int8-row head, chunk by chunk (DEQUANT_CHUNK_WEIGHTS) yet equal to the whole
    table's conversion; the plan holds it so and counts its bytes exactly; the bf16 table of the safetensors file
    keeps a float head (the layers' rule: only packed weights change form)."""
    import zimage_lite.quant.decode_linear as dl
    from zimage_lite.enhance import hold_for_decoding
    from zimage_lite.quant.decode_linear import int8_rows
    from zimage_lite.weights.components import open_language_model

    monkeypatch.delenv(ROUTE_ENV, raising=False)
    monkeypatch.setattr(dl, "DEQUANT_CHUNK_WEIGHTS", 1000)  # many chunks, a last one shorter than the others
    model = _ours(lm_q8)
    emb = model.embed_tokens
    whole, scale = int8_rows(dequantize(emb.weight, emb.qtype, emb.shape))
    pipe = zimage_lite.load(lm_model, text_encoder=lm_q8, device="cpu", dtype="fp32")
    cfg, source = open_language_model(lm_q8)
    stage = pipe.enhance_stage(cfg, source, 64)
    assert stage.unpacked and stage.head == "int8"
    hold_for_decoding(model, stage, torch.float32)
    head = model.head
    assert isinstance(head, DecodeLinear) and emb.shape[0] % (1000 // emb.shape[1]) != 0
    assert torch.equal(head.packed, whole) and torch.equal(head.scales, scale)
    assert sum(b.nbytes for b in head.buffers()) == stored_bytes(tuple(emb.shape), "int8")
    assert pipe.make_plan(64, 64, 0.0, enhance_tokens=64).stage("enhance") == stage  # `plan --enhance`: one planner
    float_pipe = zimage_lite.load(lm_model, device="cpu", dtype="fp32")
    float_stage = float_pipe.make_plan(64, 64, 0.0, enhance_tokens=64).stage("enhance")
    assert float_stage.head == "fp32"
    # the activations differ by the two heads alone, each with the mapped table it is read from: an fp32 copy of the
    # BF16 table against the int8 rows held of the Q8_0 one
    shape, held = tuple(emb.shape), sum(b.nbytes for b in head.buffers())
    assert (float_stage.activation_bytes - stage.activation_bytes
            == emb.shape[0] * emb.shape[1] * 4 + stored_bytes(shape, "BF16") - held - stored_bytes(shape, "Q8_0"))
