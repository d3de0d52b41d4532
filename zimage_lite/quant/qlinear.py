"""Packed quantized weights and the one place they are dequantized: `QLinear.forward`.

A `QTensor` is the bytes of a GGML-quantized tensor as they lie in the file (usually a view of the memory map),
its quant type and its logical torch shape. It moves between devices still packed (Q4_K: 4.5 bits per weight) and
is dequantized just before the matmul, by the torch kernels of `formats.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .formats import dequantize

FLOAT_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
               GGMLQuantizationType.BF16: torch.bfloat16}


@dataclass(frozen=True)
class QTensor:
    data: torch.Tensor  # uint8, (rows, bytes per row)
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical torch shape; the last axis is the row

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape, dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, start: int, stop: int) -> QTensor:
        """Rows start..stop of dim 0: whole blocks, so the packed bytes slice directly (fused qkv → q, k, v)."""
        block, size = GGML_QUANT_SIZES[self.qtype]
        per_row = self.shape[-1] // block * size
        flat = self.data.reshape(-1, per_row)
        inner = 1
        for d in self.shape[1:-1]:
            inner *= d
        return QTensor(flat[start * inner:stop * inner], self.qtype, (stop - start, *self.shape[1:]))

    def reshape(self, shape: tuple[int, ...]) -> QTensor:
        shape = tuple(shape)
        if shape[-1] != self.shape[-1]:
            raise ValueError(f"cannot reshape packed {self.qtype.name} {self.shape} to {shape}: rows must stay")
        return QTensor(self.data, self.qtype, tuple(shape))


class QLinear(nn.Module):
    """Linear layer over a packed weight: the single dequantize-then-matmul chokepoint."""

    def __init__(self, weight: QTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.qtype, self.shape = weight.qtype, weight.shape
        self.register_buffer("weight", weight.data.reshape(weight.shape[0], -1))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.weight, self.qtype, self.shape, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class QEmbedding(nn.Module):
    """Embedding over a packed table: only the rows looked up are dequantized (Qwen3's table is 0.39 G params)."""

    def __init__(self, weight: QTensor) -> None:
        super().__init__()
        self.qtype, self.shape = weight.qtype, weight.shape
        self.register_buffer("weight", weight.data.reshape(weight.shape[0], -1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.reshape(-1)]
        return dequantize(rows, self.qtype, (rows.shape[0], self.shape[1])).reshape(*ids.shape, self.shape[1])


def packed_module(owner: nn.Module, weight: QTensor) -> nn.Module | None:
    """The packed replacement for a Linear or Embedding whose weight is quantized; None for anything else."""
    if weight.qtype in FLOAT_TYPES:
        return None
    if isinstance(owner, nn.Linear):
        return QLinear(weight, owner.bias)
    if isinstance(owner, nn.Embedding):
        return QEmbedding(weight)
    return None
