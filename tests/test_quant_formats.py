"""GGML block formats (zimage_lite.quant.formats, kquants): round trips against gguf-py, error bounds, parity with
llama.cpp's reference K-quant bytes, and bad input."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from zimage_lite.errors import CheckpointError, UnsupportedQuantError
from zimage_lite.quant import formats
from zimage_lite.quant.chunks import run_in_chunks
from zimage_lite.quant.formats import (
    SUPPORTED_TYPES,
    can_quantize,
    dequantize,
    fallback_type,
    quant_bytes,
    quantize,
)
from zimage_lite.quant.qlinear import QLinear, QTensor

GGUF_QUANTIZED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf-py quantizes these itself
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# Relative RMS error of quantize -> dequantize on N(0, 1) weights, 64 x 4096. Measured (three seeds agree to within
# 1% of these): F16 0.021%, BF16 0.166%, Q8_0 0.535%, Q6_K 1.77%, Q5_K 3.61%, Q5_1 3.79%, Q5_0 4.27%,
# Q4_K 7.14%, Q4_1 7.83%, Q4_0 8.60%, Q3_K 15.1%, Q2_K 29.7%. Bounds: the measurement plus ~12% margin.
MAX_REL_RMS = {
    Q.F32: 0.0, Q.F16: 0.00025, Q.BF16: 0.0019, Q.Q8_0: 0.006,
    Q.Q6_K: 0.020, Q.Q5_K: 0.041, Q.Q5_1: 0.043, Q.Q5_0: 0.048,
    Q.Q4_K: 0.080, Q.Q4_1: 0.088, Q.Q4_0: 0.096, Q.Q3_K: 0.17, Q.Q2_K: 0.33,
}

# sha256 of the bytes ggml's quantize_row_qN_K_ref writes for portable_weights(16, 1024). Made with ggml-org/ggml
# d99724f src/ggml-quants.c, built with gcc -O3 for x86-64 (no FMA: the flags llama.cpp builds ggml-base with).
LLAMA_CPP_REFERENCE_SHA256 = {
    Q.Q2_K: "454420b74d505a0a3020bc7265e27343ed92a3da5119aa5b30d3f356c0ffbc4c",
    Q.Q3_K: "d47f4bbbc94bd6e83dddb61db445a8fdc2a3b0142c5065271760fec1a58273eb",
    Q.Q4_K: "bc6a76871f4e3eb5e52f071e7e77e990d691d45e34d3f48c2b4f9e9183bdf00d",
    Q.Q5_K: "9ef8d2c33af8c89b9dfbe68d1d4f02aa7dd67101e92176fa137e4daecca297a9",
    Q.Q6_K: "45e98e513b5995fad86278c959711d95d9de7b969c0fa7f7d897aef1d3eb962a",
}


def portable_weights(rows: int, cols: int) -> np.ndarray:
    """Gaussian-like fp32 weights made with integer arithmetic only (splitmix64), so every platform and numpy version
    gives the same bits; plus an all-zero super-block, a constant one, outliers and a tiny sub-block."""
    i = np.arange(rows * cols * 4, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    u = (z >> np.uint64(40)).astype(np.float64).reshape(rows, cols, 4).sum(-1)  # four 24-bit uniforms: exact
    x = ((u - 2 * 2**24) / 2**24).astype(np.float32)  # Irwin-Hall, mean 0; one rounding, to fp32
    x[1, :256] = 0.0
    x[2, 256:512] = 0.5
    x[3, ::37] *= 64
    x[4, :16] = 1e-20
    return x


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """fp32 values as their bit patterns, for bit-for-bit comparison (-0.0 != 0.0)."""
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# None: the default chunk (the test tensors are one chunk); 1536 weights: several chunks on worker threads, the
# last one short
@pytest.mark.parametrize("chunk", [None, 1536], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_numpy_bit_for_bit(qtype: Q, chunk: int | None, monkeypatch) -> None:
    if chunk:
        monkeypatch.setattr(formats, "DEQUANT_CHUNK_WEIGHTS", chunk)
    x = torch.from_numpy(portable_weights(8, 1024))
    raw = quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (8, quant_bytes(qtype, (1024,)))
    ours = dequantize(torch.from_numpy(raw), qtype, (8, 1024))
    assert ours.dtype == torch.float32 and ours.shape == (8, 1024)
    np.testing.assert_array_equal(bits(ours), bits(gguf.quants.dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_error_within_bound(qtype: Q) -> None:
    x = gaussian(64, 4096, seed=1)
    y = dequantize(torch.from_numpy(quantize(x, qtype)), qtype, tuple(x.shape))
    rel_rms = ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert rel_rms <= MAX_REL_RMS[qtype], f"{qtype.name}: relative RMS error {rel_rms:.4%}"


@pytest.mark.parametrize("qtype", GGUF_QUANTIZED, ids=lambda q: q.name)
def test_quantize_matches_gguf_quantizer(qtype: Q) -> None:
    x = portable_weights(8, 512)
    expected = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), qtype), expected)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_match_llama_cpp_reference(qtype: Q) -> None:
    raw = quantize(torch.from_numpy(portable_weights(16, 1024)), qtype)
    assert hashlib.sha256(raw.tobytes()).hexdigest() == LLAMA_CPP_REFERENCE_SHA256[qtype]


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_leading_dims_and_1d(qtype: Q) -> None:
    x = gaussian(3, 2, 512, seed=2)
    flat = quantize(x.reshape(6, 512), qtype)
    raw = quantize(x, qtype)
    assert raw.shape == (3, 2, flat.shape[-1])
    np.testing.assert_array_equal(raw.reshape(6, -1), flat)  # rows are independent: same bytes
    y = dequantize(torch.from_numpy(raw), qtype, (3, 2, 512))
    assert y.shape == (3, 2, 512)
    np.testing.assert_array_equal(bits(y.reshape(6, 512)), bits(gguf.quants.dequantize(flat, qtype)))

    row = quantize(x[0, 0], qtype)  # 1-D: one row
    assert row.shape == (flat.shape[-1],)
    np.testing.assert_array_equal(row, flat[0])
    np.testing.assert_array_equal(bits(dequantize(torch.from_numpy(row), qtype, (512,))), bits(y[0, 0]))


@pytest.mark.parametrize("qtype", (Q.BF16, Q.Q8_0, Q.Q4_K, Q.Q6_K), ids=lambda q: q.name)
def test_dtypes_in_and_out(qtype: Q) -> None:
    x = gaussian(4, 512, seed=3).to(torch.bfloat16)
    raw = quantize(x, qtype)
    np.testing.assert_array_equal(raw, quantize(x.float(), qtype))  # any float input: converted to fp32 first
    y32 = dequantize(torch.from_numpy(raw), qtype, (4, 512))
    for dtype in (torch.bfloat16, torch.float16):
        y = dequantize(torch.from_numpy(raw), qtype, (4, 512), dtype)
        assert y.dtype == dtype and torch.equal(y, y32.to(dtype))  # computed in fp32, rounded once


def test_dequantize_into_a_reused_buffer() -> None:
    x = torch.from_numpy(portable_weights(8, 512))
    raw = torch.from_numpy(quantize(x, Q.Q4_K))
    out = torch.full((5000,), float("nan"), dtype=torch.bfloat16)
    y = dequantize(raw, Q.Q4_K, (8, 512), torch.bfloat16, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.equal(y, dequantize(raw, Q.Q4_K, (8, 512), torch.bfloat16))
    assert out[4096:].isnan().all()  # only the start of the buffer is written
    for bad in (torch.empty(100, dtype=torch.bfloat16), torch.empty(5000), torch.empty(64, 64, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="need a flat torch.bfloat16 buffer of at least 4096"):
            dequantize(raw, Q.Q4_K, (8, 512), torch.bfloat16, out=bad)


def test_qlinears_share_one_scratch_buffer() -> None:
    big, small = (torch.from_numpy(portable_weights(*shape)) for shape in ((8, 1024), (8, 512)))
    layers = [QLinear(QTensor(torch.from_numpy(quantize(w, Q.Q4_K)), Q.Q4_K, tuple(w.shape)), None)
              for w in (big, small)]
    x = [gaussian(3, 1024, seed=1), gaussian(3, 512, seed=2)]
    refs = [torch.nn.functional.linear(xi, dequantize(m.weight, Q.Q4_K, m.shape))
            for xi, m in zip(x, layers, strict=True)]
    for i in (0, 1, 0, 1):  # each call overwrites the buffer the other one used
        assert torch.equal(layers[i](x[i]), refs[i])


def test_run_in_chunks_covers_each_range_once() -> None:
    threads = torch.get_num_threads()
    seen, inner = [], []

    def job(start: int, stop: int) -> None:
        seen.append((start, stop))
        run_in_chunks(4, 2, lambda a, b: inner.append((a, b)))  # from a worker: runs in place, no deadlock

    run_in_chunks(10, 3, job)
    assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)] and sorted(inner) == [(0, 2)] * 4 + [(2, 4)] * 4
    assert torch.get_num_threads() == threads

    def fill(start: int, stop: int) -> None:
        out[start:stop] = torch.arange(start, stop)

    for mode in (torch.inference_mode(), torch.no_grad()):  # the workers run in the caller's mode
        with mode:
            out = torch.empty(10)
            run_in_chunks(10, 3, fill)
        assert torch.equal(out, torch.arange(10.0))

    def fail(start: int, stop: int) -> None:
        if start == 6:
            raise RuntimeError("chunk 6 failed")

    with pytest.raises(RuntimeError, match="chunk 6 failed"):
        run_in_chunks(10, 3, fail)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("qtype", (Q.F32, Q.F16, Q.BF16, Q.Q6_K), ids=lambda q: q.name)
def test_unaligned_bytes(qtype: Q) -> None:
    x = gaussian(2, 256, seed=4)
    raw = torch.from_numpy(quantize(x, qtype))
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), raw.reshape(-1)])[1:]  # odd address, as a file may hold
    assert torch.equal(dequantize(shifted, qtype, (2, 256)), dequantize(raw, qtype, (2, 256)))


def test_gguf_file_round_trip(tmp_path) -> None:
    x = gaussian(4, 512, seed=5)
    path = tmp_path / "formats.gguf"
    writer = gguf.GGUFWriter(str(path), "lumina2")
    for qtype in SUPPORTED_TYPES:
        writer.add_tensor(f"w.{qtype.name}", quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path), "c").tensors}  # copy-on-write: writable views
    for qtype in SUPPORTED_TYPES:
        t = tensors[f"w.{qtype.name}"]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF ne order -> torch order
        assert t.tensor_type == qtype and shape == (4, 512)
        raw = torch.from_numpy(np.asarray(t.data).view(np.uint8))
        y = dequantize(raw, t.tensor_type, shape)
        np.testing.assert_array_equal(bits(y), bits(gguf.quants.dequantize(quantize(x, qtype), qtype)))


@pytest.mark.parametrize("qtype", (Q.IQ2_XXS, Q.IQ4_NL, Q.TQ1_0), ids=lambda q: q.name)
def test_unsupported_type_is_named(qtype: Q) -> None:
    with pytest.raises(UnsupportedQuantError, match=f"blocks.0.w1.weight is {qtype.name}"):
        quantize(gaussian(2, 256), qtype, name="blocks.0.w1.weight")
    with pytest.raises(UnsupportedQuantError, match=qtype.name):
        dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (4, 256))
    with pytest.raises(UnsupportedQuantError, match="999"):
        dequantize(torch.zeros(16, dtype=torch.uint8), 999, (4, 4))
    assert not can_quantize(qtype, 256)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_row_length_not_a_multiple_of_256(qtype: Q) -> None:
    name = "layers.3.attention.qkv.weight"
    message = rf"{name} is {qtype.name} but its row length 320 .* multiple of 256"
    with pytest.raises(UnsupportedQuantError, match=message):
        quantize(gaussian(4, 320), qtype, name=name)
    with pytest.raises(UnsupportedQuantError, match=qtype.name):
        dequantize(torch.zeros(4096, dtype=torch.uint8), qtype, (4, 320))
    with pytest.raises(UnsupportedQuantError, match=qtype.name):
        quant_bytes(qtype, (64,))


def test_row_length_not_a_multiple_of_32() -> None:
    with pytest.raises(UnsupportedQuantError, match=r"Q8_0 but its row length 48 .* multiple of 32; F16 fits"):
        quantize(gaussian(2, 48), Q.Q8_0)


def test_wrong_byte_count_is_a_checkpoint_error() -> None:
    raw = torch.from_numpy(quantize(gaussian(4, 256), Q.Q4_K))
    with pytest.raises(CheckpointError, match=r"layers.0.out.weight \(Q4_K, shape \[4, 256\]\) should be 576"):
        dequantize(raw.reshape(-1)[:-1], Q.Q4_K, (4, 256), name="layers.0.out.weight")


def test_sizes_and_fallbacks() -> None:
    assert quant_bytes(Q.Q4_K, (10240, 3840)) == 10240 * 15 * 144
    assert quant_bytes(Q.Q6_K, (3840,)) == 15 * 210
    assert quant_bytes(Q.BF16, (3, 7)) == 42
    assert can_quantize(Q.Q4_K, 3840) and not can_quantize(Q.Q4_K, 3872) and can_quantize(Q.Q4_0, 3872)
    assert can_quantize(Q.F16, 7) and not can_quantize(Q.Q8_0, 0)
    # llama.cpp's rule: a K-quant falls back to the 32-weight type of about its size, else F16
    for qtype, alt in ((Q.Q2_K, Q.Q4_0), (Q.Q3_K, Q.Q4_0), (Q.Q4_K, Q.Q5_0), (Q.Q5_K, Q.Q5_1), (Q.Q6_K, Q.Q8_0)):
        assert fallback_type(qtype, 3840) == qtype
        assert fallback_type(qtype, 288) == alt
        assert fallback_type(qtype, 100) == Q.F16
    assert fallback_type(Q.Q8_0, 100) == Q.F16 and fallback_type(Q.BF16, 7) == Q.BF16
