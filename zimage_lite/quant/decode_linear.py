"""Weight-only integer Linears for the enhancer's token-by-token decoding on the CPU: `DecodeLinear`.

A decoding step multiplies one activation row by every weight (M = 1): it is bound by the bytes of weight read, not
by arithmetic. Dequantized once to bf16 (2 bytes a weight, 8 GB a token at 4B) the enhancer made 0.14 tokens/s on 2
cores; torch's weight-only kernels read the packed integers directly:
- "int4": `torch._weight_int4pack_mm_for_cpu`, groups of 32 along K, one bf16 (scale, zero) pair per group,
  w = scale * (q - 8) + zero for q in 0..15 (the kernel's convention). A Q4_K weight maps onto it exactly: each
  32-weight sub-block is w = d*sc * q - dmin*m, so scale = d*sc and zero = 8*scale - dmin*m; only rounding the two
  to bf16 changes anything (measured: 0.5% of max|w| at worst, 0.3% on a product, as much as bf16 weights lose).
  The pairs are bf16 whatever the compute dtype (an fp32 run multiplies these layers in bf16), so the bytes are
  always 0.625 a weight: what a Q4_1 tensor takes.
- "int8": `torch._weight_int8pack_mm`, int8 per output row with an fp32 row scale (symmetric, max|row| / 127), for
  every other type (Q6_K, Q8_0, Q5_K, floats): 1 byte a weight plus 4 a row (the plan's "int8").
The route is chosen once (`decode_route`): $ZIMAGE_LITE_DECODE_ROUTE ("packed" or "float"), else "packed" when
this torch has both ops on the CPU, else "float" (the old bf16 dequantization).
"""

from __future__ import annotations

import functools
import os

import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from .convrot import quantize_rows
from .formats import DEQUANT_CHUNK_WEIGHTS, block_half, dequantize, nibbles, scale_min_k4
from .qlinear import QEmbedding, QLinear

ROUTE_ENV = "ZIMAGE_LITE_DECODE_ROUTE"
ROUTES = ("packed", "float")
GROUP = 32  # int4 group along K: a Q4_K sub-block
_INT4_N = 16  # the int4 packing wants N a multiple of 16


def int4_fits(shape: tuple[int, ...], qtype: object) -> bool:
    """Whether a weight of `qtype` and torch `shape` goes the int4 way (a Q4_K matrix the int4 packing takes)."""
    return qtype == Q.Q4_K and len(shape) == 2 and shape[0] % _INT4_N == 0 and shape[1] % GROUP == 0


def plan_type(shape: tuple[int, ...], qtype_name: str) -> str:
    """The stored type whose bytes a `DecodeLinear` made from this weight occupies (runtime/sizes.py stored_bytes):
    Q4_1 (16 bytes of nibbles and two 2-byte numbers per 32) for int4, "int8" (a byte a weight, 4 a row) else."""
    return "Q4_1" if qtype_name == "Q4_K" and int4_fits(shape, Q.Q4_K) else "int8"


def q4k_to_int4(raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K bytes of an [N, K] weight -> (levels [N, K] int32 in 0..15, scale [N, K/32], zero [N, K/32]) in fp32
    with w = scale * (q - 8) + zero, exactly the file's dequantization (formats._q4_k)."""
    n, k = shape
    b = raw.reshape(-1, 144)  # block_q4_K: half d, half dmin, 12 bytes of scales and mins, 128 of nibbles
    q = nibbles(b[:, 16:].view(-1, 4, 32)).reshape(n, k).to(torch.int32)
    sc, mn = scale_min_k4(b[:, 4:16])
    scale = (block_half(b, 0) * sc).reshape(n, k // GROUP)
    zero = (8 * scale - (block_half(b, 2) * mn).reshape(n, k // GROUP))
    return q, scale, zero


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float [N, K] weight -> (int8 [N, K], fp32 row scales [N]), symmetric per row (convrot.quantize_rows)."""
    q, scale = quantize_rows(w)
    return q, scale.reshape(-1)


class DecodeLinear(nn.Module):
    """y = x @ W^T for a weight held packed for weight-only integer kernels ("int4" or "int8", module docstring)."""

    def __init__(self, kind: str, packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int]) -> None:
        super().__init__()
        self.kind, self.out_features, self.in_features = kind, shape[0], shape[1]
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)  # int4: (K/32, N, 2) scale and zero; int8: fp32 (N,)

    @classmethod
    def from_qlinear(cls, m: QLinear) -> DecodeLinear:
        """The decode form of a packed Linear: int4 from Q4_K (exact up to bf16 scales), int8 rows else."""
        if int4_fits(m.shape, m.qtype):
            q, scale, zero = q4k_to_int4(m.weight, m.shape)
            pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            return cls("int4", torch._convert_weight_to_int4pack_for_cpu(q, 1), pairs, m.shape)
        q8, scale = int8_rows(dequantize(m.weight, m.qtype, m.shape, torch.float32, state=m.state))
        return cls("int8", q8, scale, m.shape)

    @classmethod
    def head_of(cls, embedding: nn.Module) -> DecodeLinear:
        """The output head tied to an embedding table (a QEmbedding's GGML rows or an nn.Embedding's float weight)
        as int8 rows, converted a chunk of rows at a time: the fp32 transient stays at DEQUANT_CHUNK_WEIGHTS weights,
        not the 1.5 GB the whole Qwen3-4B table would take."""
        table = embedding.weight
        n, k = shape = (table.shape[0], embedding.shape[1] if isinstance(embedding, QEmbedding) else table.shape[1])
        packed, scales = torch.empty(shape, dtype=torch.int8), torch.empty(n)
        step = max(1, DEQUANT_CHUNK_WEIGHTS // k)
        for i in range(0, n, step):
            rows = table[i:i + step]
            if isinstance(embedding, QEmbedding):
                rows = dequantize(rows, embedding.qtype, (rows.shape[0], k))
            packed[i:i + step], scales[i:i + step] = int8_rows(rows)
        return cls("int8", packed, scales, shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kind == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(self.scales.dtype), self.packed, GROUP, self.scales)
        else:
            y = torch._weight_int8pack_mm(x2, self.packed, self.scales.to(x.dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight this module multiplies by (tests; the int4 levels read back through the kernel)."""
        if self.kind == "int8":
            return self.packed.float() * self.scales[:, None]
        eye = torch.eye(self.in_features, dtype=self.scales.dtype)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scales).float().t().contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


@functools.cache
def _ops_present() -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def decode_route(device: torch.device | str) -> str:
    """How the enhancer holds its decoder layers on `device`: "packed" (DecodeLinear) or "float" (dequantized once).
    $ZIMAGE_LITE_DECODE_ROUTE forces one; only the CPU has the packed kernels."""
    forced = os.environ.get(ROUTE_ENV)
    if forced:
        if forced not in ROUTES:
            from ..errors import OptionError

            raise OptionError(f"${ROUTE_ENV}={forced!r}: expected one of {', '.join(ROUTES)}")
        return forced if torch.device(device).type == "cpu" else "float"
    return "packed" if torch.device(device).type == "cpu" and _ops_present() else "float"


def to_decode(m: QLinear) -> DecodeLinear:
    """`DecodeLinear.from_qlinear` under no autograd (the packed buffers are plain tensors)."""
    with torch.no_grad():
        return DecodeLinear.from_qlinear(m)

