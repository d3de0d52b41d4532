"""models/layers.attention: the CPU bf16 route (bf16 matmuls per head and chunk of query rows) against SDPA.

The route is taken on CPUs with native bf16 (`cpu_has_bf16`); it computes the same on any CPU (slowly where torch
emulates bf16), so these tests force it, and one checks that without native bf16 SDPA stays.
"""

import pytest
import torch
import torch.nn.functional as F

from zimage_lite.models import layers
from zimage_lite.models.layers import attention


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    monkeypatch.setattr(layers, "cpu_has_bf16", lambda: True)


def _qkv(seed: int, heads: int = 3, seq: int = 300, dim: int = 64, logits: float = 1.0):
    """bf16 (1, heads, seq, dim) inputs; `logits` scales q, so the scores' spread (about logits x sqrt(dim))."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g) for _ in range(3))
    return (q * logits).bfloat16(), k.bfloat16(), v.bfloat16()


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


# Against fp64 SDPA on the same bf16 inputs. Measured (300 rows, 3 heads of 64): ours 4.1e-3 at logits 1 and 9.6e-3
# at logits 4, SDPA's bf16 2.2e-3 and 1.8e-3: rounding the scores to bf16 (the GEMM's output) adds an error that
# grows with the logits. In a whole bf16 DiT forward of the tiny model it moves the error against fp32 from 1.13-1.18%
# to 1.15-1.21% (three seeds).
@pytest.mark.parametrize(("logits", "tol", "vs_sdpa"), [(1.0, 1e-2, 3.0), (4.0, 3e-2, 10.0)])
def test_cpu_bf16_route_within_bf16_error(logits, tol, vs_sdpa):
    q, k, v = _qkv(0, logits=logits)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = attention(q, k, v)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert _err(ours, ref) < tol
    assert _err(ours, ref) < vs_sdpa * _err(F.scaled_dot_product_attention(q, k, v), ref)


def test_cpu_bf16_route_takes_no_sdpa_and_fp32_does(monkeypatch):
    q, k, v = _qkv(1)
    want = attention(q, k, v)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert torch.equal(attention(q, k, v), want) and not calls
    attention(q.float(), k.float(), v.float())
    attention(q, k, v, causal=True)  # the text encoder's causal attention stays on SDPA
    monkeypatch.setattr(layers, "cpu_has_bf16", lambda: False)  # emulated bf16 (AVX2): SDPA, at fp32 speed
    attention(q, k, v)
    assert len(calls) == 3


def test_cpu_bf16_route_rows_and_grouped_heads():
    """Rows cut finer (a plan's query chunk of 24, a tail of 12) give the same rows as the route's 512 (here the
    whole 300; measured: equal to the last bit on Zen 5; other BLAS blockings may round differently, hence 1e-3), and
    grouped KV heads are expanded."""
    q, k, v = _qkv(2, heads=4, seq=300)
    whole = attention(q, k, v)
    assert _err(attention(q, k, v, chunk=24), whole.double()) < 1e-3
    grouped = attention(q, k[:, :2], v[:, :2])
    expanded = attention(q, k[:, :2].repeat_interleave(2, dim=1), v[:, :2].repeat_interleave(2, dim=1))
    assert torch.equal(grouped, expanded)
