"""Packed quantized weights and the one place they are dequantized: `QLinear.forward`.

A `QTensor` is the bytes of a quantized tensor as they lie in the file (usually a view of the memory map), its
quant type and its logical torch shape, plus, for bitsandbytes types, the small tensors holding its scales
(`state`: int8's SCB, nf4's absmax and code table). It moves between devices still packed (Q4_K: 4.5 bits per
weight) and is dequantized just before the matmul, by the torch kernels of `formats.py`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from ..runtime.memory import FileViews
from .chunks import release_temps
from .convrot import Int8Rows
from .formats import FLOAT_TYPES, INT8, BnbType, dequantize
from .int8_compute import Int8Activations, int8_activations, int8_linear, prepack, route_for, route_for_shape

QType = GGMLQuantizationType | BnbType | Int8Rows

# The reused buffer each QLinear dequantizes its weight into (the dequantize scratch of the memory plan): on CPU one
# per thread (the chunk workers of chunks.py fill it together); on a GPU one per device, as its compute stream runs
# one Linear at a time.
_cpu = threading.local()
_on_devices: dict[torch.device, torch.Tensor] = {}


def _held() -> dict[torch.device, torch.Tensor]:
    if not hasattr(_cpu, "held"):
        _cpu.held = {}
    return _cpu.held


def dequant_scratch(device: torch.device, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least n `dtype` elements on `device`, kept for the next call. Grows to the largest
    weight seen (Z-Image's FFN: 39M weights, 79 MB in bf16); the old buffer is freed before a new one exists."""
    held = _held() if device.type == "cpu" else _on_devices
    buf = held.get(device)
    # a buffer made under inference_mode (the pipeline's) cannot be written outside it (a model run under no_grad)
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or stale or buf.dtype != dtype or buf.numel() < n:
        buf = held[device] = None  # drop both references first
        buf = held[device] = torch.empty(n, dtype=dtype, device=device)
    return buf


def release_scratch() -> None:
    """Free this thread's CPU buffer, every device's buffer and the chunk workers' temporaries (when a stage's model
    is freed)."""
    _held().clear()
    _on_devices.clear()
    release_temps()


# The input that int8 Linears inside `shared_input` rotate and quantize once between them (per thread: the CPU's
# chunk workers never run Linears)
_shared = threading.local()


@contextmanager
def shared_input(x: torch.Tensor) -> Iterator[None]:
    """Within: the int8-row Linears called on `x` itself (the same tensor object) rotate and quantize it once for
    all of them, per group size and route (attention's q, k and v read one input, the FFN's w1 and w3 another: a
    DiT block quantizes 4 inputs, not 7). Any other layer is unaffected."""
    outer = getattr(_shared, "entry", None)
    _shared.entry = (x, {})
    try:
        yield
    finally:
        _shared.entry = outer


def _activations_of(x: torch.Tensor, groupsize: int, route: str) -> Int8Activations | None:
    entry = getattr(_shared, "entry", None)
    if entry is None or entry[0] is not x:
        return None
    made = entry[1]
    if (groupsize, route) not in made:
        made[groupsize, route] = int8_activations(x, groupsize, route)
    return made[groupsize, route]


@dataclass(frozen=True)
class QTensor:
    data: torch.Tensor  # uint8; GGML: (rows, bytes per row); bitsandbytes: as stored (int8 [out, in], 4-bit [n/2, 1])
    qtype: QType
    shape: tuple[int, ...]  # logical torch shape; the last axis is the row
    state: tuple[torch.Tensor, ...] = ()  # bitsandbytes scales (formats.bnb_sizes order), int8 rows' fp32 row scales

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in `dtype`; a packed type written into `out` when given, a float type as stored (a view of
        `data` when `dtype` matches: not a buffer to work in; formats.dequantize)."""
        return dequantize(self.data, self.qtype, self.shape, dtype, state=self.state, out=out)

    def rows(self, start: int, stop: int) -> QTensor:
        """Rows start..stop of dim 0: whole blocks, so the packed bytes slice directly (fused qkv → q, k, v)."""
        inner = math.prod(self.shape[1:-1])
        shape = (stop - start, *self.shape[1:])
        if self.qtype == INT8 or isinstance(self.qtype, Int8Rows):  # one scale per row
            flat = self.data.reshape(-1, self.shape[-1])
            return QTensor(flat[start * inner:stop * inner], self.qtype, shape, (self.state[0][start:stop],))
        if isinstance(self.qtype, BnbType):
            raise ValueError(f"bitsandbytes {self.qtype.name} blocks run across rows: its rows cannot be sliced")
        block, size = GGML_QUANT_SIZES[self.qtype]
        flat = self.data.reshape(-1, self.shape[-1] // block * size)
        return QTensor(flat[start * inner:stop * inner], self.qtype, shape)

    def reshape(self, shape: tuple[int, ...]) -> QTensor:
        shape = tuple(shape)
        if shape[-1] != self.shape[-1]:
            raise ValueError(f"cannot reshape packed {self.qtype.name} {self.shape} to {shape}: rows must stay")
        return QTensor(self.data, self.qtype, tuple(shape), self.state)


class QLinear(nn.Module):
    """Linear layer over a packed weight: the single dequantize-then-matmul chokepoint.

    The packed bytes are the `weight` buffer and a bitsandbytes weight's scales the non-persistent buffers
    `weight_state_0`, ...: the streamer moves every buffer with its block, and `state_dict` (the names the loader
    reads) still lists only `weight` and `bias`. `lora`, when set, is a low-rank side path (models/adapters.py
    LowRank) added to the output: the packed weight is never modified.
    """

    def __init__(self, weight: QTensor, bias: torch.Tensor | None, lora: nn.Module | None = None) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.lora = lora
        self.assign(weight)

    def assign(self, weight: QTensor, device: torch.device | str | None = None) -> None:
        """Take `weight` (packed bytes and state), moved to `device`: at build and when a streamed block reloads."""
        self.qtype, self.shape = weight.qtype, weight.shape
        data = weight.data if isinstance(weight.qtype, BnbType) else weight.data.reshape(weight.shape[0], -1)
        self.register_buffer("weight", data.to(device))
        self._packed_for = None  # a new weight: int8 routes prepack it again
        self.n_state = len(weight.state)
        for i, t in enumerate(weight.state):
            self.register_buffer(f"weight_state_{i}", t.to(device), persistent=False)

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        # read at each call: the streamer swaps the buffers for views of its device slots
        return tuple(self._buffers[f"weight_state_{i}"] for i in range(self.n_state))

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.qtype, Int8Rows) and (route := self._route()) != "float":
            given = _activations_of(x, self.qtype.groupsize, route)
            y = int8_linear(x, self.weight, self.state[0], self.qtype.groupsize, self.bias, route, self._packed(route),
                            given)
            return y if self.lora is None else self.lora.add_to(y, x)
        # Into the reused buffer (the weight is dead once F.linear returns): on a GPU in chunks of DEVICE_CHUNK
        # weights, so the transient is this buffer and one chunk's temporaries (formats.dequantize).
        out = dequant_scratch(self.weight.device, math.prod(self.shape), x.dtype)
        w = dequantize(self.weight, self.qtype, self.shape, x.dtype, state=self.state, out=out)
        y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return y if self.lora is None else self.lora.add_to(y, x)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """Moving the weight (a streamed block dropped to `meta`, a device move) drops oneDNN's copy with it."""
        self._packed_weight = self._packed_for = None
        return super()._apply(fn, recurse)

    def _route(self) -> str:
        """The int8 route of this weight's shape on its device (int8_compute)."""
        return route_for_shape(route_for(self.weight.device), self.weight.device, *self.shape)

    def _packed(self, route: str) -> torch.Tensor | None:
        """oneDNN's blocked copy of the int8 weight: made by `prepare_resident` for a resident weight, else at the
        first call after the weight was (re)placed (a streamed block's)."""
        if route != "onednn":
            return None
        key = self.weight.data_ptr()
        if getattr(self, "_packed_for", None) != key:
            self._packed_weight, self._packed_for = prepack(self.weight), key
        return self._packed_weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


def prepare_resident(model: nn.Module) -> int:
    """Make the route's copy (oneDNN's) of each resident int8 weight of a model placed on the CPU now, as the plan
    counts them held: with the load, not in the first step. A weight that views its file's memory map then hands its
    pages back (runtime/memory.py `FileViews`): the copy is what computes, so the file's pages would double the
    weights' memory (runtime/sizes.py counts the copy alone); a weight converted at load (--int8-compute) stays.
    Streamed blocks' weights (on `meta`) make theirs at each use; the prompt enhancer's unpacked layers (which never
    run QLinear) are not placed through here. Returns the bytes of file pages handed back."""
    views, released = None, 0
    for m in model.modules():
        if isinstance(m, QLinear) and isinstance(m.qtype, Int8Rows) and m.weight.device.type == "cpu":
            if m._packed(m._route()) is not None:  # one weight at a time: its pages and its copy never all at once
                views = views or FileViews()  # the maps read once, and only for a model with copies
                released += views.release(m.weight)
    return released


class QEmbedding(nn.Module):
    """Embedding over a packed table: only the rows looked up are dequantized (Qwen3's table is 0.39 G params)."""

    def __init__(self, weight: QTensor) -> None:
        super().__init__()
        self.assign(weight)

    def assign(self, weight: QTensor, device: torch.device | str | None = None) -> None:
        self.qtype, self.shape = weight.qtype, weight.shape
        self.register_buffer("weight", weight.data.reshape(weight.shape[0], -1).to(device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.reshape(-1)]
        return dequantize(rows, self.qtype, (rows.shape[0], self.shape[1])).reshape(*ids.shape, self.shape[1])


def packed_module(owner: nn.Module, weight: QTensor) -> nn.Module | None:
    """The packed replacement for a Linear or Embedding whose weight is quantized; None for anything else."""
    if weight.qtype in FLOAT_TYPES:
        return None
    if isinstance(owner, nn.Linear):  # the linear's side path (models/adapters.py), if any, carries over
        return QLinear(weight, owner.bias, getattr(owner, "lora", None))
    if isinstance(owner, nn.Embedding) and not isinstance(weight.qtype, BnbType | Int8Rows):  # lookups need GGML rows
        return QEmbedding(weight)
    return None
