"""Dequantization on a GPU: in chunks of DEVICE_CHUNK weights into one reused buffer per device, with a chunk's
temporaries within DEVICE_CHUNK_TEMP_BYTES a weight (the plan counts both).

On the CPU the GPU's chunking runs on CPU tensors (`run_on` told the device is a GPU): the same torch ops, so the
same bits and the same temporaries. The CUDA test at the end measures the real peak and skips without a GPU.
On the CPU itself the chunk workers carve those temporaries from a buffer each keeps (chunks.Temps).
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from fixtures import allocated_peak
from gguf import GGMLQuantizationType as Q

from zimage_lite.quant import chunks, formats
from zimage_lite.quant.convrot import CONVROT
from zimage_lite.quant.formats import INT8, BnbType, bnb_sizes, dequantize, quantize
from zimage_lite.quant.qlinear import QLinear, QTensor, dequant_scratch, release_scratch

cuda = pytest.mark.cuda  # skipped without a GPU (conftest); benchmarks/gpu_check.sh selects these
GGML = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
KINDS = (*(t.name for t in GGML), "int8", "int8-convrot", "nf4", "nf4-nested")


def _packed(kind: str, shape: tuple[int, int], seed: int = 0, device: str = "cpu") -> QTensor:
    """A packed weight of `kind` (on the CPU): GGML types quantized from N(0, 1) on `device`; bitsandbytes ones from
    random codes and scales in the layout `bnb_sizes` gives (nf4's last block short when the size asks for it)."""
    g = torch.Generator().manual_seed(seed)
    if kind in Q.__members__:
        qtype, w = Q[kind], torch.randn(shape, generator=g).to(device)
        return QTensor(torch.from_numpy(quantize(w, qtype)), qtype, shape)
    if kind in ("int8", "int8-convrot"):  # bitsandbytes int8; ComfyUI's int8 rows, rotated back as dequantized
        q = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).view(torch.uint8)
        return QTensor(q, INT8 if kind == "int8" else CONVROT, shape, (torch.rand(shape[0], generator=g) + 0.5,))
    qtype = BnbType("nf4", 64, 256 if kind == "nf4-nested" else 0)
    sizes = bnb_sizes(qtype, shape)
    codes = lambda n: torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)  # noqa: E731
    table = torch.linspace(-1, 1, 16)
    state = ((codes(sizes[1]), table, torch.rand(sizes[3], generator=g), torch.linspace(-1, 1, 256) * 0.1,
              torch.tensor([0.05])) if qtype.nested else (torch.rand(sizes[1], generator=g), table))
    return QTensor(codes(sizes[0]), qtype, shape, state)


@pytest.fixture
def gpu_chunking(monkeypatch):
    """Dequantize as on a GPU (chunks of DEVICE_CHUNK in this thread), on CPU tensors; returns the chunks seen."""
    seen, real = [], chunks.run_on

    def as_gpu(device, n, step, job, device_step=None):
        def noted(start, stop):
            seen.append((start, stop))
            job(start, stop)
        real(torch.device("cuda"), n, step, noted, device_step)

    monkeypatch.setattr(formats, "run_on", as_gpu)
    monkeypatch.setattr(chunks, "temps", lambda device: chunks.Temps(device, keep=False))  # fresh, as on a GPU
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_device_chunks_equal_one_pass(kind, gpu_chunking, monkeypatch):
    w = _packed(kind, (300, 512))  # nf4: 2400 blocks, 10 nested runs; chunks below cut across runs
    monkeypatch.setattr(chunks, "DEVICE_CHUNK", 10**9)
    whole = w.dequantize(torch.bfloat16).clone()
    assert len(gpu_chunking) == 1
    monkeypatch.setattr(chunks, "DEVICE_CHUNK", 4096 + 1024)  # 5120 weights: 80 nf4 blocks, not a nested run
    out = torch.full((400 * 512,), float("nan"), dtype=torch.bfloat16)
    chunked = dequantize(w.data, w.qtype, w.shape, torch.bfloat16, state=w.state, out=out)
    assert len(gpu_chunking) > 20  # precondition: it did run in chunks
    assert torch.equal(chunked, whole)
    assert chunked.data_ptr() == out.data_ptr()  # written into the given buffer


# Measured (this test's setup, bf16; fp32 results need no fp32 temporary: 0.19-2.52): Q8_0 4.19, Q4_0 5.00, Q4_1
# 5.00, Q5_0 5.19, Q5_1 5.19, Q2_K 5.50, Q3_K 6.38, Q4_K 5.50, Q5_K 5.50, Q6_K 6.25, int8 4.00, int8-convrot 6.00
# (over 8 with the rotation written to a new tensor), nf4 6.00 (nested too) bytes per weight of a chunk;
# DEVICE_CHUNK_TEMP_BYTES = 8 bounds them all. The FFN-sized nested nf4 weight
# checks that no per-tensor state (its absmax, decoded for the whole weight at once before) adds up beyond one chunk.
@pytest.mark.parametrize("kind,shape", [*(pytest.param(k, (768, 4096), id=k) for k in KINDS),  # 3 chunks
                                        pytest.param("nf4-nested", (10240, 3840), id="nf4-nested-ffn")])
def test_a_chunks_temporaries_stay_within_the_planned_bound(kind, shape, gpu_chunking, monkeypatch):
    w = _packed(kind, shape)
    out = torch.empty(math.prod(shape), dtype=torch.bfloat16)
    bound = chunks.DEVICE_CHUNK * chunks.DEVICE_CHUNK_TEMP_BYTES
    chunked = allocated_peak(lambda: dequantize(w.data, w.qtype, shape, torch.bfloat16, state=w.state, out=out))
    assert len(gpu_chunking) >= 2 and chunked <= bound
    monkeypatch.setattr(chunks, "DEVICE_CHUNK", 10**9)
    whole = allocated_peak(lambda: dequantize(w.data, w.qtype, shape, torch.bfloat16, state=w.state, out=out))
    assert whole > bound  # precondition: one pass over the same weight breaks the bound (what the GPU did before)


def test_cpu_chunk_workers_reuse_their_temporaries_within_the_bound(monkeypatch):
    """Each CPU worker keeps one buffer for a chunk's temporaries: once warm, every temporary of every chunk is
    carved from it (a fresh 4 MB temporary is a fresh memory mapping, page faults and all, under the pipeline's
    malloc settings), and no worker keeps more than one chunk's worth whatever the mix of types."""
    release_scratch()
    # two workers, whatever the machine, and 8 equal chunks of DEQUANT_CHUNK_WEIGHTS per weight: in two warm-up runs
    # each worker meets the type asking the most (the pool hands chunks to either in no fixed order)
    threads = torch.get_num_threads()
    shape = (2048, 4096)
    weights = [_packed(kind, shape) for kind in ("Q4_K", "Q6_K", "Q3_K", "Q5_0", "Q8_0")]
    out = torch.empty(math.prod(shape), dtype=torch.bfloat16)
    carved, real = [], chunks.Temps.__call__

    def run():
        for w in weights:
            dequantize(w.data, w.qtype, shape, torch.bfloat16, out=out)

    def spy(self, shape, dtype):
        t = real(self, shape, dtype)
        arena = arenas.get(id(self))
        carved.append(arena is not None and arena.data_ptr() <= t.data_ptr() < arena.data_ptr() + arena.numel())
        return t

    torch.set_num_threads(2)
    try:
        run()
        run()  # every worker has met the largest chunk
        arenas = {id(t): t._arena for t in chunks._temps.values()}
        assert arenas and max(a.numel() for a in arenas.values()) <= (formats.DEQUANT_CHUNK_WEIGHTS
                                                                      * chunks.DEVICE_CHUNK_TEMP_BYTES)
        monkeypatch.setattr(chunks.Temps, "__call__", spy)
        run()
    finally:
        torch.set_num_threads(threads)
    assert len(carved) > 80 and all(carved)  # 104: 40 chunks of 1 to 5 temporaries
    release_scratch()
    assert not chunks._temps


def test_dequant_scratch_is_reused_per_device_and_released():
    release_scratch()
    for device in (torch.device("cpu"), torch.device("meta")):  # meta stands in for a GPU: the per-device buffer
        a = dequant_scratch(device, 100, torch.bfloat16)
        assert dequant_scratch(device, 60, torch.bfloat16) is a  # reused
        b = dequant_scratch(device, 200, torch.bfloat16)
        assert b is not a and b.numel() == 200  # grown
        c = dequant_scratch(device, 10, torch.float32)
        assert c.dtype == torch.float32 and c.numel() == 10  # another dtype replaces it
        gone, a, b = weakref.ref(c), None, None
        release_scratch()
        del c
        assert gone() is None  # freed
    assert dequant_scratch(torch.device("meta"), 1, torch.float16).numel() == 1


def test_qlinear_dequantizes_into_the_device_scratch():
    """On a GPU (meta stands in: the same code path, no memory) the weight lands in the device's one buffer."""
    release_scratch()
    w = _packed("Q4_K", (64, 256))
    layer = QLinear(QTensor(w.data.to("meta"), w.qtype, w.shape), None)
    layer(torch.empty(3, 256, device="meta", dtype=torch.bfloat16))
    held = dequant_scratch(torch.device("meta"), 1, torch.bfloat16)
    assert held.numel() == 64 * 256  # the forward's buffer, kept for the next Linear
    layer(torch.empty(3, 256, device="meta", dtype=torch.bfloat16))
    assert dequant_scratch(torch.device("meta"), 1, torch.bfloat16) is held
    release_scratch()


@cuda
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "nf4-nested"])
def test_cuda_dequant_transient_is_the_buffer_and_one_chunk(kind, monkeypatch):
    """The FFN-sized weight of the DiT (39 M weights): the forward allocates at most one chunk's temporaries and its
    output once the buffer exists; one pass (the old way) allocates several bytes per weight of the whole weight."""
    shape = (10240, 3840)
    w = _packed(kind, shape, device="cuda")
    layer = QLinear(QTensor(w.data, w.qtype, w.shape, w.state), None).cuda()
    x = torch.randn(256, 3840, device="cuda", dtype=torch.bfloat16)
    output = 256 * 10240 * 2
    release_scratch()

    def transient() -> int:
        layer(x)  # warm: the scratch buffer and cuBLAS' workspace exist
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        layer(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    with torch.no_grad():
        chunked = transient()
        assert chunked <= chunks.DEVICE_CHUNK * chunks.DEVICE_CHUNK_TEMP_BYTES + output + 2**20
        monkeypatch.setattr(chunks, "DEVICE_CHUNK", 10**10)
        assert transient() > 4 * math.prod(shape)  # precondition: one pass is far above it
    release_scratch()
