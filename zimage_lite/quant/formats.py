"""GGML block formats in pure torch: one table of dequant kernels keyed by quant type, plus quantize and sizes.

`dequantize` is the hot path: it runs just before every matmul of a packed weight, on the weight's device (CPU or
CUDA), without Python loops over blocks (on CPU, chunks of a million weights run on worker threads: chunks.py).
Each kernel takes the blocks as uint8 rows (n_blocks, type_size) and returns fp32 (n_blocks, block_size) with the
same operations, in the same order, as gguf-py's numpy `dequantize_blocks`, so the two agree bit for bit. Block
layouts: ggml-common.h (summarised in shared/reference/gguf_interop.md section 4.4).

`quantize` writes the bytes GGUFWriter.add_tensor(..., raw_dtype=qtype) takes: gguf-py's numpy quantizers for the
float and 32-weight types, kquants.py for Q2_K..Q6_K.

bitsandbytes weights (LLM.int8, NF4) pass through the same `dequantize`, keyed by a `BnbType` instead of a GGML type.
Their scales are not inside the packed bytes but separate tensors (`state`), in the order `bnb_sizes` lists them.
So do ComfyUI's int8 rows (convrot.py `Int8Rows`, ConvRot or plain): int8 bytes, fp32 row scales as their state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError, UnsupportedQuantError
from . import chunks
from .chunks import run_on
from .convrot import Int8Rows, rotate
from .kquants import K_QUANT_TYPES, quantize_k

Q = GGMLQuantizationType

FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
DEQUANT_CHUNK_WEIGHTS = 1 << 20  # CPU: 4 MB fp32 temporaries per chunk (fastest of 0.25M..4M, see chunks.py)


# ---- byte-level helpers (blocks: (n, type_size) uint8). `new(shape, dtype)` makes a kernel's temporaries: a chunk
# worker's kept buffers (chunks.Temps) in `dequantize`, plain allocation when absent.
New = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
Kernel = Callable[[torch.Tensor, torch.Tensor, New], None]  # (blocks, out (n, block_size) float, new): see below


def block_half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The ggml_half at byte `at` of each block as (n, 1) fp32. The copy is 2 bytes a block, and makes any
    alignment of the file's bytes fine for the fp16 view."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _fields(b: torch.Tensor, shifts: tuple[int, ...], bits: int, new: New | None = None) -> torch.Tensor:
    """(..., k) bytes -> (..., len(shifts), k) uint8: the `bits`-wide field at each shift. One scalar shift and mask
    per field, written in place: several times faster than broadcasting a tensor of shifts."""
    shape = (*b.shape[:-1], len(shifts), b.shape[-1])
    out = new(shape, torch.uint8) if new else b.new_empty(shape)
    mask = (1 << bits) - 1
    for i, shift in enumerate(shifts):
        field = out[..., i, :]
        if shift == 0:
            torch.bitwise_and(b, mask, out=field)
            continue
        torch.bitwise_right_shift(b, shift, out=field)
        if shift + bits < 8:  # the top field needs no mask
            field.bitwise_and_(mask)
    return out


def _bits(b: torch.Tensor, new: New | None = None) -> torch.Tensor:
    """(n, k) bytes -> (n, 8, k): [j, i] is bit j of byte i (hmask, qh: element k*j + i)."""
    return _fields(b, tuple(range(8)), 1, new)


def nibbles(b: torch.Tensor, new: New | None = None) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k): the low nibbles, then the high nibbles (element j, element j + k)."""
    return _fields(b, (0, 4), 4, new).flatten(-2)


def _crumbs(b: torch.Tensor, new: New | None = None) -> torch.Tensor:
    """(..., k) bytes -> (..., 4k): the 2-bit fields at bits 0, 2, 4, 6, each a run of k elements."""
    return _fields(b, (0, 2, 4, 6), 2, new).flatten(-2)


def _signed(q: torch.Tensor, offset: int) -> torch.Tensor:
    """uint8 levels minus `offset`, in place, read as int8 (exact for results in -128..127; uint8 wraps)."""
    return q.sub_(offset).view(torch.int8)


def _qh32(b: torch.Tensor, new: New) -> torch.Tensor:
    """Q5_0/Q5_1 qh: 4 bytes, a little-endian uint32 whose bit j is bit 4 of element j -> (n, 32)."""
    bits = _bits(b, new)
    return new((b.shape[0], 4, 8), torch.uint8).copy_(bits.transpose(1, 2)).view(-1, 32)


def scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, as get_scale_min_k4 in ggml-quants.c."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _float(q: torch.Tensor, out: torch.Tensor, new: New) -> torch.Tensor:
    """The integer levels `q` as fp32, shaped as q, in `out` itself when out is fp32, else in an fp32 temporary that
    `_store` rounds into out once at the end. copy_ converts in place, where a mixed-dtype op would first make an
    fp32 copy of its integer input (TensorIterator promotes CPU inputs through temporaries)."""
    x = out if out.dtype == torch.float32 else new(out.shape, torch.float32)
    return x.view(q.shape).copy_(q)


def _store(x: torch.Tensor, out: torch.Tensor) -> None:
    if x.data_ptr() != out.data_ptr():
        out.copy_(x.view(out.shape))


# ---- kernels: each mirrors gguf/quants.py's dequantize_blocks op for op (fp32, no FMA) into `out` (n, block_size),
# any float dtype (rounded once); every temporary comes from `new` (on the CPU allocating costs as much as the math)


def _q8_0(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q8_0: {half d; int8 qs[32]}; x = q * d
    _store(_float(b[:, 2:].view(torch.int8), out, new).mul_(block_half(b, 0)), out)


def _q4_0(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q4_0: {half d; uint8 qs[16]}; x = d * (q - 8)
    _store(_float(_signed(nibbles(b[:, 2:], new), 8), out, new).mul_(block_half(b, 0)), out)


def _q4_1(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q4_1: {half d; half m; uint8 qs[16]}; x = d * q + m
    _store(_float(nibbles(b[:, 4:], new), out, new).mul_(block_half(b, 0)).add_(block_half(b, 2)), out)


def _q5_0(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q5_0: {half d; uint8 qh[4]; uint8 qs[16]}; x = d * (q - 16)
    q = nibbles(b[:, 6:], new).bitwise_or_(_qh32(b[:, 2:6], new).bitwise_left_shift_(4))
    _store(_float(_signed(q, 16), out, new).mul_(block_half(b, 0)), out)


def _q5_1(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q5_1: {half d; half m; uint8 qh[4]; uint8 qs[16]}; x = d * q + m
    q = nibbles(b[:, 8:], new).bitwise_or_(_qh32(b[:, 4:8], new).bitwise_left_shift_(4))
    _store(_float(q, out, new).mul_(block_half(b, 0)).add_(block_half(b, 2)), out)


def _q2_k(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q2_K: {uint8 scales[16]; uint8 qs[64]; half d; half dmin}; per 128: byte l has elements l, +32, +64, +96
    sc = b[:, :16]
    dl = (block_half(b, 80) * (sc & 0xF).float()).unsqueeze(2)
    ml = (block_half(b, 82) * (sc >> 4).float()).unsqueeze(2)
    q = _crumbs(b[:, 16:80].view(-1, 2, 32), new).view(-1, 16, 16)
    _store(_float(q, out, new).mul_(dl).sub_(ml), out)


def _q3_k(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q3_K: {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d}; a clear hmask bit means q - 4
    s = b[:, 96:108]
    low = nibbles(s[:, :8])  # scales 0-7 in the low nibbles, 8-15 in the high ones
    high = _crumbs(s[:, 8:12])  # bits 4-5 of scale j: byte j % 4, bit 2 * (j // 4)
    dl = (block_half(b, 108) * _signed(low | (high << 4), 32).float()).unsqueeze(2)
    ql = _crumbs(b[:, 32:96].view(-1, 2, 32), new)
    low_bit = _bits(b[:, :32], new).bitwise_xor_(1).bitwise_left_shift_(2)
    q = ql.sub_(low_bit.view(ql.shape)).view(torch.int8)  # uint8 wraps; read as int8
    _store(_float(q.view(-1, 16, 16), out, new).mul_(dl), out)


def _k4(b: torch.Tensor, q: torch.Tensor, out: torch.Tensor, new: New) -> None:
    """Q4_K/Q5_K tail: x = (d * scale) * q - dmin * min, per sub-block of 32."""
    sc, mn = scale_min_k4(b[:, 4:16])
    d = (block_half(b, 0) * sc).unsqueeze(2)
    dm = (block_half(b, 2) * mn).unsqueeze(2)
    _store(_float(q.view(-1, 8, 32), out, new).mul_(d).sub_(dm), out)


def _q4_k(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q4_K: {half d; half dmin; uint8 scales[12]; uint8 qs[128]}; per 64: low nibbles, then high nibbles
    _k4(b, nibbles(b[:, 16:].view(-1, 4, 32), new), out, new)


def _q5_k(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q5_K: {half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}; qh bit k: element 32k + i
    ql = nibbles(b[:, 48:].view(-1, 4, 32), new).view(-1, 8, 32)
    _k4(b, ql.bitwise_or_(_bits(b[:, 16:48], new).bitwise_left_shift_(4)), out, new)


def _q6_k(b: torch.Tensor, out: torch.Tensor, new: New) -> None:
    # block_q6_K: {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}; x = d * scale * (q - 32)
    ql = nibbles(b[:, :128].view(-1, 2, 64), new)  # per 128: two nibble planes of 64
    qh = _crumbs(b[:, 128:192].view(-1, 2, 32), new).bitwise_left_shift_(4)
    d = (block_half(b, 208) * b[:, 192:208].view(torch.int8).float()).unsqueeze(2)
    q = _signed(ql.bitwise_or_(qh), 32)
    _store(_float(q.view(-1, 16, 16), out, new).mul_(d), out)


KERNELS: dict[GGMLQuantizationType, Kernel] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
SUPPORTED_TYPES = (*FLOAT_TYPES, *KERNELS)

# Row length that does not fit a K-quant: llama.cpp's llama_tensor_get_type picks a 32-weight type of about the same
# size (Q2_K/Q3_K -> IQ4_NL there; we use Q4_0, same 4.5 bpw, as IQ* is not in the table), then F16 if that does
# not fit either. A 32-weight type whose row does not fit goes straight to F16; float types fit any row.
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


# ---- public API and the checks behind its errors


def _tensor_label(name: str | None) -> str:
    return f"tensor {name}" if name else "a tensor"


def _check_type(qtype: GGMLQuantizationType | int, name: str | None, verb: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedQuantError(f"{_tensor_label(name)} has unknown GGML type {qtype!r}") from None
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedQuantError(f"{_tensor_label(name)} is {qtype.name}, which zimage-lite cannot {verb}; "
                                    f"supported types: {names}")
    return qtype


def _check_row(qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str | None) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    row = shape[-1] if shape else 1
    if row % block:
        hint = f"; {fallback_type(qtype, row).name} fits" if row > 0 else ""
        raise UnsupportedQuantError(f"{_tensor_label(name)} is {qtype.name} but its row length {row} "
                                    f"(shape {list(shape)}) is not a multiple of {block}{hint}")


def can_quantize(qtype: GGMLQuantizationType | int, row_length: int) -> bool:
    """True when zimage-lite can write a row of `row_length` weights as `qtype`."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        return False
    return qtype in SUPPORTED_TYPES and row_length > 0 and row_length % GGML_QUANT_SIZES[qtype][0] == 0


def fallback_type(qtype: GGMLQuantizationType | int, row_length: int) -> GGMLQuantizationType:
    """`qtype` if a row of `row_length` fits it, else the nearest type that fits (llama.cpp's rule, see _FALLBACK):
    Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when the row is not a multiple of 32."""
    qtype = _check_type(qtype, None, "write")
    if can_quantize(qtype, row_length):
        return qtype
    alt = _FALLBACK.get(qtype, Q.F16)
    return alt if can_quantize(alt, row_length) else Q.F16


def quant_bytes(qtype: GGMLQuantizationType | int, shape: tuple[int, ...], name: str | None = None) -> int:
    """Bytes a tensor of logical `shape` takes as `qtype` (GGML_QUANT_SIZES: whole blocks along each row)."""
    qtype = _check_type(qtype, name, "read")
    shape = tuple(shape)
    _check_row(qtype, shape, name)
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType | BnbType | int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32, name: str | None = None,
               state: tuple[torch.Tensor, ...] = (), out: torch.Tensor | None = None) -> torch.Tensor:
    """Unpack `raw` (the uint8 bytes as they lie in the file, any shape, on any device) into a `dtype` tensor of the
    logical torch `shape`. Float types are a view when `dtype` matches; block types are computed in fp32.
    bitsandbytes types take their scales from `state` (see `bnb_sizes`). A packed type is written into `out` when
    given (a flat buffer of at least that many `dtype` elements on raw's device, reused from call to call: on CPU a
    fresh 80 MB result costs nearly as much in page faults as the dequantization itself); the result is a view of
    it."""
    if isinstance(qtype, Int8Rows):
        return _int8_rows(raw, qtype, tuple(shape), state[0], _result(shape, dtype, raw.device, out))
    if isinstance(qtype, BnbType):
        return _dequantize_bnb(raw, qtype, tuple(shape), state, _result(shape, dtype, raw.device, out), name)
    qtype = _check_type(qtype, name, "read")
    shape = tuple(shape)
    expected = quant_bytes(qtype, shape, name)
    if raw.numel() != expected or raw.dtype != torch.uint8:
        raise CheckpointError(f"{_tensor_label(name)} ({qtype.name}, shape {list(shape)}) should be {expected} "
                              f"uint8 bytes, found {raw.numel()} of {raw.dtype}: the file is truncated or corrupt")
    flat = raw.reshape(-1)
    if qtype in FLOAT_TYPES:
        if flat.data_ptr() % FLOAT_TYPES[qtype].itemsize:
            flat = flat.clone()  # the dtype view needs an aligned start
        return flat.view(FLOAT_TYPES[qtype]).view(shape).to(dtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks, kernel = flat.view(-1, size), KERNELS[qtype]
    result = _result(shape, dtype, raw.device, out).view(-1, block)

    def fill(start: int, stop: int) -> None:
        kernel(blocks[start:stop], result[start:stop], chunks.temps(raw.device))

    _by_chunks(blocks.shape[0], block, raw.device, fill)
    return result.view(shape)


def _int8_rows(raw: torch.Tensor, qtype: Int8Rows, shape: tuple[int, ...], scale: torch.Tensor,
               result: torch.Tensor) -> torch.Tensor:
    # ComfyUI int8_tensorwise (convrot.py): q * row scale, then each ConvRot group times H (its own inverse), in fp32
    q, scale = raw.view(torch.int8).reshape(shape[0], -1), scale.reshape(-1, 1)
    out = result.view(q.shape)

    def fill(start: int, stop: int) -> None:
        w = _float(q[start:stop], out[start:stop], chunks.temps(raw.device)).mul_(scale[start:stop])
        if qtype.groupsize:
            rotate(w, qtype.groupsize, out=w)  # in place: no second chunk-sized temporary
        _store(w, out[start:stop])

    _by_chunks(q.shape[0], q.shape[1], raw.device, fill)
    return out.view(shape)


def _result(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, out: torch.Tensor | None) -> torch.Tensor:
    """A flat `dtype` tensor for the result: the start of `out`, or a new one."""
    n = math.prod(shape)
    if out is None:
        return torch.empty(n, dtype=dtype, device=device)
    if out.dtype != dtype or out.device != device or out.dim() != 1 or out.numel() < n:
        raise ValueError(f"dequantize: out is {out.dtype} {list(out.shape)} on {out.device}; "
                         f"need a flat {dtype} buffer of at least {n} elements on {device}")
    return out[:n]


def _by_chunks(rows: int, row_weights: int, device: torch.device, fill: Callable[[int, int], None]) -> None:
    """fill(start, stop) over range(rows), rows of `row_weights` weights each, in chunks of about
    DEQUANT_CHUNK_WEIGHTS weights on CPU and DEVICE_CHUNK on a GPU (chunks.py)."""
    run_on(device, rows, max(1, DEQUANT_CHUNK_WEIGHTS // row_weights), fill,
           device_step=max(1, chunks.DEVICE_CHUNK // row_weights))


def quantize(t: torch.Tensor, qtype: GGMLQuantizationType | int, name: str | None = None) -> np.ndarray:
    """Pack `t` (any float dtype and device) as `qtype`: uint8 of shape (*t.shape[:-1], bytes_per_row), the layout
    gguf.quants.quantize returns and GGUFWriter.add_tensor(name, bytes, raw_dtype=qtype) stores."""
    qtype = _check_type(qtype, name, "write")
    shape = tuple(t.shape) or (1,)
    _check_row(qtype, shape, name)
    t = t.detach().reshape(shape)
    if qtype in K_QUANT_TYPES:
        return quantize_k(t, qtype)
    x = t.to("cpu", torch.float32).contiguous().numpy()
    out = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    # F32 comes back as `x`, which may be t's own memory: copy, so later edits of t do not change the bytes
    return out.copy() if np.shares_memory(out, x) else out


# ---- bitsandbytes: LLM.int8 and 4-bit (NF4), as diffusers/transformers serialize them


@dataclass(frozen=True)
class BnbType:
    """A bitsandbytes storage format with its fixed parameters.

    'int8': LLM.int8, an int8 weight and one fp32 absmax (`SCB`) per row. 'nf4' (and 'fp4', same layout): two 4-bit
    codes a byte over the flattened weight, a 16-entry code table (`quant_map`) and one absmax per `blocksize`
    weights; with double quantization (`nested_blocksize` > 0) that absmax is itself 8-bit codes of a 256-entry
    table, scaled per `nested_blocksize` absmaxes and shifted by an offset.
    """

    name: str
    blocksize: int = 0
    nested_blocksize: int = 0

    @property
    def nested(self) -> bool:
        return self.nested_blocksize > 0


INT8 = BnbType("int8")
# bitsandbytes' int8_vectorwise_dequant multiplies by this fp32 reciprocal of 127 rather than dividing: same result
# bit for bit only this way
_INV_127 = 7.874015718698502e-3


def bnb_sizes(qtype: BnbType, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element counts of the packed weight (bytes) and of each state tensor, in `QTensor.state` order:
    int8: weight, SCB; 4-bit: weight, absmax, quant_map (+ nested_absmax, nested_quant_map, offset)."""
    n = math.prod(shape)
    if qtype.name == "int8":
        return n, shape[0]
    blocks = -(-n // qtype.blocksize)
    if not qtype.nested:
        return -(-n // 2), blocks, 16
    return -(-n // 2), blocks, 16, -(-blocks // qtype.nested_blocksize), 256, 1


def _blockwise(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) fp32 times absmax per run of `blocksize` (the last run may be shorter), in place: the same fp32
    products as bitsandbytes' _dequantize_blockwise_compute / _dequantize_4bit_compute."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[:full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[full // blocksize])
    return values


def _bnb_int8(raw: torch.Tensor, shape: tuple[int, ...], scb: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    # W = q * SCB[row] / 127, in bitsandbytes' operation order
    q, scb = raw.view(torch.int8).reshape(shape[0], -1), scb.view(-1, 1)
    out = result.view(q.shape)

    def fill(start: int, stop: int) -> None:
        out[start:stop] = q[start:stop].float().mul_(scb[start:stop]).mul_(_INV_127)

    _by_chunks(q.shape[0], q.shape[1], raw.device, fill)
    return out


def _absmax(qtype: BnbType, state: tuple[torch.Tensor, ...], start: int, stop: int) -> torch.Tensor:
    """fp32 absmax of 4-bit blocks start..stop. Nested: nested code[q] * nested absmax of its run + offset, in
    bitsandbytes' order, for these blocks only (a chunk's temporaries stay a chunk's)."""
    absmax = state[0].reshape(-1)[start:stop]
    if not qtype.nested:
        return absmax
    nested_absmax, nested_code, offset = state[2:]
    run = torch.arange(start, stop, device=absmax.device) // qtype.nested_blocksize
    return nested_code.float().index_select(0, absmax.int()).mul_(nested_absmax[run]).add_(offset)


def _bnb_4bit(raw: torch.Tensor, qtype: BnbType, state: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    code = state[1]
    # One gather per byte instead of one per nibble (3840x3840, one CPU thread: 40 ms instead of 160): a table of each
    # byte's two values, high nibble first, read as one 8-byte integer so that the gather only copies bits.
    i = torch.arange(256, device=raw.device)
    pairs = torch.stack((code[i >> 4], code[i & 15]), dim=1).float().view(torch.int64).view(-1)
    data, bs, n = raw.reshape(-1), qtype.blocksize, out.numel()  # blocksize is even: a block starts on a byte

    def fill(start: int, stop: int) -> None:  # absmax blocks start..stop
        first, last = start * bs, min(stop * bs, n)
        values = pairs.index_select(0, data[first // 2:(last + 1) // 2].int()).view(torch.float32)
        out[first:last] = _blockwise(values[:last - first], _absmax(qtype, state, start, stop), bs)

    _by_chunks(state[0].numel(), bs, raw.device, fill)
    return out


def _dequantize_bnb(raw: torch.Tensor, qtype: BnbType, shape: tuple[int, ...], state: tuple[torch.Tensor, ...],
                    result: torch.Tensor, name: str | None) -> torch.Tensor:
    sizes = bnb_sizes(qtype, shape)
    found = (raw.numel() * raw.element_size(), *(t.numel() for t in state))
    if found != sizes:
        raise CheckpointError(f"{_tensor_label(name)} (bitsandbytes {qtype.name}, shape {list(shape)}) should have "
                              f"weight and state sizes {list(sizes)}, found {list(found)}: the file is corrupt")
    raw = raw.view(torch.uint8) if raw.dtype != torch.uint8 else raw  # 4-bit quant_storage may be any dtype
    if qtype.name == "int8":
        return _bnb_int8(raw, shape, state[0], result).view(shape)
    return _bnb_4bit(raw, qtype, state, result).view(shape)
