"""ComfyUI's per-layer quantized safetensors (INT8, with or without ConvRot) seen as packed weights.

A layer `M` quantized by ComfyUI's tools holds `M.weight` (int8 [out, in]), `M.weight_scale` and `M.comfy_quant`
(quant/convrot.py has the conventions). `ComfyQuantSource` folds the three into one `QTensor` under the weight's
name (int8 bytes, `Int8Rows` type, logical shape, fp32 row scales as its state) and hides the other two from
`names()`, as sources.BnbSource does for bitsandbytes. Every tag is parsed and every layer checked against its
scale at open (headers plus the few bytes of each tag), so a foreign format or a missing scale fails before any
work, naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..quant.convrot import CONVROT, ROWWISE, Int8Rows, parse_comfy_quant, quantize_weight, row_scales
from ..quant.formats import FLOAT_TYPES, SUPPORTED_TYPES
from ..quant.qlinear import QTensor
from ..runtime.memory import release_pages
from .sources import SafetensorsSource, SideTensorSource, TensorSource

TAG = ".comfy_quant"
GGML_QUANTIZED = frozenset(t.name for t in SUPPORTED_TYPES if t not in FLOAT_TYPES)  # what --int8-compute converts
# weights converted at a time: fp32 temporaries of a few chunks, not of the whole weight (whole, they took the text
# encoder's stage past its plan: Q4_K_M, 4.05 GiB peak RSS with the ~0.3 GiB baseline, 3.55 planned above it)
CONVERT_CHUNK_WEIGHTS = 2**20


def has_comfy_quant(stored: TensorSource) -> bool:
    return any(n.endswith(TAG) for n in stored.names())


class ComfyQuantSource(SideTensorSource):
    """A safetensors source whose `comfy_quant`-tagged layers come back as packed int8 QTensors."""

    def __init__(self, inner: SafetensorsSource) -> None:
        self.inner, self.path = inner, inner.path
        self._packed: dict[str, Int8Rows] = {}  # weight name -> its type
        hidden: set[str] = set()
        for tag in [n for n in inner.names() if n.endswith(TAG)]:
            module = tag[:-len(TAG)]
            weight, scale = f"{module}.weight", f"{module}.weight_scale"
            where = f"{inner.where(tag)}: tensor {tag}"
            qtype = parse_comfy_quant(inner.get(tag), where)
            for name in (weight, scale):
                if name not in inner:
                    raise CheckpointError(f"{inner.where(tag)}: tensor {name} is missing: the int8 layer {module} "
                                          f"cannot be read without it (an incomplete save?); convert the model again")
            shape = inner.shape(weight)
            if inner.qtype(weight) != "I8" or len(shape) != 2:
                raise CheckpointError(f"{inner.where(weight)}: tensor {weight} is {inner.qtype(weight)} "
                                      f"{list(shape)}; {module}.comfy_quant declares an int8 [out, in] weight")
            if math.prod(inner.shape(scale)) not in (1, shape[0]):
                raise CheckpointError(f"{inner.where(scale)}: tensor {scale} has shape {list(inner.shape(scale))}; "
                                      f"the weight has {shape[0]} rows: expected [{shape[0]}, 1] or one scale")
            if qtype.groupsize and shape[1] % qtype.groupsize:
                raise CheckpointError(f"{inner.where(tag)}: {weight} has {shape[1]} inputs, not a multiple of its "
                                      f"convrot_groupsize {qtype.groupsize}: the file is corrupt")
            self._packed[weight] = qtype
            hidden |= {tag, scale}
        self._hidden = hidden
        self._names = [n for n in inner.names() if n not in hidden]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def qtype(self, name: str) -> str:
        """'int8-convrot256' / 'int8-rowwise' for a tagged weight, else the stored dtype."""
        return self._packed[name].name if name in self._packed else self.inner.qtype(name)

    def nbytes(self, name: str) -> int:
        if name not in self._packed:
            return self.inner.nbytes(name)
        module = name.removesuffix(".weight")
        return sum(self.inner.nbytes(n) for n in (name, f"{module}.weight_scale", f"{module}{TAG}"))

    def get(self, name: str) -> torch.Tensor | QTensor:
        if name not in self._packed:
            return self.inner.get(name)
        scale_name = name.removesuffix(".weight") + ".weight_scale"
        shape = self.inner.shape(name)
        scale = row_scales(self.inner.get(scale_name), shape[0], f"{self.inner.where(scale_name)}: tensor {scale_name}")
        return QTensor(self.inner.get(name).view(torch.uint8), self._packed[name], tuple(shape), (scale,))


class Int8ComputeSource(TensorSource):
    """`--int8-compute`: a source whose GGML-quantized Linear weights (`linears`, official names) come back converted
    to int8 rows at load (ConvRot where 256 divides the row, else plain rows), so that they run on the integer
    matmul route. Dequantized to fp32 and quantized again: the int8 error comes on top of the file's own (measured
    on a full-size Q8_0 FFN weight: 1.33e-2 relative output error, against 1.22e-2 for the same layer quantized
    from BF16 and 5.4e-3 for Q8_0 itself). Sizes and types are reported as converted, so the planner counts them."""

    def __init__(self, inner: TensorSource, linears: frozenset[str]) -> None:
        self.inner, self.path = inner, inner.path
        self._convert = {n: _int8_type(inner.shape(n)) for n in inner.names()
                         if n in linears and inner.qtype(n) in GGML_QUANTIZED and len(inner.shape(n)) == 2}

    @property
    def converts(self) -> bool:
        """Whether any weight of the file is converted (a file with no GGML-quantized Linear reads as stored)."""
        return bool(self._convert)

    def names(self) -> Iterable[str]:
        return self.inner.names()

    def close(self) -> None:
        self.inner.close()

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def where(self, name: str) -> Path:
        return self.inner.where(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def qtype(self, name: str) -> str:
        return self._convert[name].name if name in self._convert else self.inner.qtype(name)

    def nbytes(self, name: str) -> int:
        shape = self.inner.shape(name)
        return shape[0] * (shape[1] + 4) if name in self._convert else self.inner.nbytes(name)

    def get(self, name: str) -> torch.Tensor | QTensor:
        t = self.inner.get(name)
        if name not in self._convert or not isinstance(t, QTensor):
            return t
        qtype, (n, k) = self._convert[name], t.shape
        q, scale = torch.empty((n, k), dtype=torch.int8), torch.empty(n)
        step = max(1, CONVERT_CHUNK_WEIGHTS // k)
        # one fp32 chunk, reused and worked in place: a few-MB temporary per operation would be a fresh mapping
        # each (runtime/memory.map_large_host_blocks) faulted in page by page (the full-size Q4_K_M text encoder,
        # 3.5 G weights: 45.7 s to convert that way, 13.5 s so)
        rows = torch.empty(min(step, n) * k)
        for i in range(0, n, step):  # rows are quantized each on its own: a chunk at a time keeps the fp32 small
            stop = min(i + step, n)
            w = t.rows(i, stop).dequantize(torch.float32, out=rows)
            scale[i:stop] = quantize_weight(w, qtype, out=q[i:stop])[1].reshape(-1)
        # the converted copy is what the plan counts: the file's pages it was read from leave the process's RSS
        # (else the whole GGUF stays resident beside its int8 copy: +4.6 GiB measured for the Q4_K_M DiT)
        release_pages(self.inner.where(name))
        return QTensor(q.view(torch.uint8), qtype, (n, k), (scale,))


def _int8_type(shape: tuple[int, ...]) -> Int8Rows:
    return CONVROT if shape[-1] % CONVROT.groupsize == 0 else ROWWISE
