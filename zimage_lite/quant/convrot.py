"""INT8 weights with one scale per output row, optionally ConvRot-rotated: ComfyUI's `int8_tensorwise` format.

A layer `M` is stored as three tensors (ComfyUI's mixed-precision loader, comfy/ops.py, and its quant table
comfy/quant_ops.py QUANT_ALGOS["int8_tensorwise"]: storage int8, parameter `weight_scale`):
- `M.weight`: int8 [out, in];
- `M.weight_scale`: fp32 [out, 1] (one scale per row; a scalar `[]`/`[1]` per-tensor scale is also read);
- `M.comfy_quant`: uint8, the UTF-8 bytes of a JSON object: `{"format": "int8_tensorwise"}` for plain rows, plus
  `"convrot": true, "convrot_groupsize": 256` when the weight is stored rotated. ComfyUI also accepts those two
  fields nested under `"params"`, and a missing `convrot` means no rotation.

ConvRot (comfy-kitchen, comfy_kitchen/tensor/int8_utils.py `_build_hadamard` / `_rotate_weight` /
`_rotate_activation`, and backends/eager/quantization.py `quantize_int8_convrot_weight`, `quantize_int8_rowwise`,
`dequantize_int8_convrot_weight`, `int8_linear`; github.com/Comfy-Org/comfy-kitchen, read 2026-12-02):
- H is the *regular* Hadamard matrix of order n = 4^k, the k-th Kronecker power of the symmetric
  H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]] (not Sylvester's construction), divided by sqrt(n). H is
  symmetric and orthogonal, so it is its own inverse.
- The input dimension is cut into consecutive groups of n (group g holds columns g*n .. g*n+n-1); each group of each
  weight row is multiplied by H^T (= H), and each group of each activation row by H at run time, so that
  (x H)(W H^T)^T = x W^T.
- The rotated weight is quantized per row: scale = max|row| / 127 (at least 1e-30), q = round-half-even(w / scale)
  clamped to [-128, 127]. Dequantized: (q * scale) with each group multiplied by H again.
- Activations: rotated, then quantized per row the same way (symmetric, 127), int8 x int8 -> int32, and the product
  scaled by the activation row scale times the weight row scale. No `input_scale` is stored for this format.
Which Z-Image tensors the published file (Comfy-Org/z_image_turbo split_files/diffusion_models/
z_image_turbo_int8_convrot.safetensors: 857 tensors of F32, I8, U8, 6.20 GB) quantizes: see quant/recipes.py
`int8_quantized`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, UnsupportedQuantError

COMFY_FORMAT = "int8_tensorwise"  # the format name ComfyUI's loader keys its int8 layout by
CONVROT_GROUPSIZE = 256  # what ComfyUI's converters write
_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


@dataclass(frozen=True)
class Int8Rows:
    """ComfyUI int8_tensorwise with per-row scales; `groupsize` > 0: stored ConvRot-rotated in groups of that many
    input columns. A QTensor of this type holds the int8 bytes and `state` = (fp32 row scales [out],)."""

    groupsize: int = 0

    @property
    def name(self) -> str:
        return f"int8-convrot{self.groupsize}" if self.groupsize else "int8-rowwise"


CONVROT = Int8Rows(CONVROT_GROUPSIZE)
ROWWISE = Int8Rows(0)
# every name an Int8Rows type reports (the group sizes comfy-kitchen builds: 4 .. 4^7)
INT8_ROWS_NAMES = frozenset({ROWWISE.name} | {Int8Rows(4 ** k).name for k in range(1, 8)})


def is_power_of_4(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


@functools.lru_cache(maxsize=8)
def _hadamard(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h = torch.tensor(_H4, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h, torch.tensor(_H4, dtype=torch.float64))
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def hadamard(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised regular Hadamard matrix of order `n` (a power of 4): symmetric, orthogonal."""
    if not is_power_of_4(n):
        raise UnsupportedQuantError(f"ConvRot group size {n} is not a power of 4 (16, 64, 256, ...)")
    return _hadamard(n, torch.device(device), dtype)


# values rotated at a time: the one temporary of `rotate`, 512 KiB in fp32, under the 1 MiB from which blocks are
# mapped afresh outside a DiT forward (runtime/memory.HOST_MMAP_THRESHOLD): --int8-compute converting the Q4_K_M
# text encoder took 21.3 s with 2**18 values (each temporary a new mapping faulted in), 13.5 s with 2**17; inside a
# forward 2**16..2**18 rotate [1088, 3840] alike (6.4-7.4 ms)
ROTATE_CHUNK = 2**17


def rotate(x: torch.Tensor, groupsize: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each run of `groupsize` values along the last axis times H (weights and activations alike, H = H^T), into
    `out` (contiguous, x's shape and dtype; x itself for in place) or a new tensor.

    H of order n = a * b is the Kronecker product of the regular ones of orders a and b (both powers of 4), so a
    group read as an a x b matrix V becomes H_a V H_b: a + b multiply-adds per value instead of n (n = 256: two
    16 x 16 products, 3x faster than one 256 x 256 product on the CPU). Done ROTATE_CHUNK values at a time, each
    chunk read before its place in `out` is written, so the only temporary is one chunk's first product."""
    k = x.shape[-1]
    if not is_power_of_4(groupsize) or k % groupsize:
        raise UnsupportedQuantError(f"ConvRot group size {groupsize} is not a power of 4 dividing the row length {k}")
    a = 4 ** ((groupsize.bit_length() - 1) // 4)  # n = 4^j: a = 4^(j // 2), b = 4^(j - j // 2)
    b = groupsize // a
    h_a, h_b = hadamard(a, x.device, x.dtype) if a > 1 else None, hadamard(b, x.device, x.dtype)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    groups, into = x.reshape(-1, a, b), out.view(-1, a, b)
    step = max(1, ROTATE_CHUNK // groupsize)
    for i in range(0, groups.shape[0], step):
        first = torch.matmul(groups[i:i + step], h_b)
        if h_a is None:
            into[i:i + step] = first
        else:
            torch.matmul(h_a, first, out=into[i:i + step])
    return out


def row_scale(x: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """The symmetric scale of each row of fp32 `x` for values in -levels..levels (int8: 127): max|row| / levels, at
    least 1e-30, as [rows, 1]. max|row| as max(max x, -min x): two vectorised reductions and no |x| temporary (10-20x
    faster on the CPU than the infinity norm); |x| / scale <= levels then."""
    peak = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    return peak.div_(float(levels)).clamp_(min=1e-30)


def round_rows_(x: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of fp32 `x` (ours: worked in place), as (x rounded to its values in -levels..levels,
    still fp32; fp32 scales [rows, 1] = max|row| / levels). |x| / scale <= levels, so the values need no clamp. The
    one int8 rounding of weights (`quantize_weight`), activations (int8_compute: fewer levels where its kernel needs
    them) and the enhancer's rows (decode_linear), through `rounded_rows` where x is not theirs to change."""
    scale = row_scale(x, levels)
    return x.div_(scale).round_(), scale


def rounded_rows(x: torch.Tensor, groupsize: int = 0, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """`round_rows_` of any float `x`, left as it is, rotated first in groups of `groupsize` (0: not): (values in
    -levels..levels as fp32, fp32 scales [rows, 1]). One fp32 copy of x is all it makes. Weights at quantization and
    activations at each int8 matmul (int8_compute) alike; callers pick the integer dtype."""
    # x itself when fp32 (not ours to change), else a contiguous copy of our own (rotate writes into it by rows)
    x32 = x if x.dtype == torch.float32 else x.to(torch.float32, memory_format=torch.contiguous_format)
    own = x32 if x32 is not x else None
    if groupsize:
        x32 = rotate(x32, groupsize, out=own)  # into our copy, else a new tensor: worked in place below
    elif own is None:
        x32 = x32.clone()
    return round_rows_(x32, levels)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of any float `x` (left as it is): (int8 values, fp32 scales [rows, 1])."""
    values, scale = rounded_rows(x)
    return values.to(torch.int8), scale


def quantize_weight(w: torch.Tensor, qtype: Int8Rows,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] as stored: (int8 [out, in], fp32 weight_scale [out, 1]), rotated first for
    ConvRot (in fp32). With `out` (int8, w's shape) the values go there and fp32 `w`, ours to overwrite, is
    rotated and rounded in place: no temporary of w's size (the same values as without)."""
    if out is None:
        values, scale = rounded_rows(w.detach(), qtype.groupsize)
        return values.to(torch.int8), scale
    if w.dtype != torch.float32 or out.shape != w.shape or out.dtype != torch.int8:
        raise ValueError(f"quantize_weight: w {w.dtype} {list(w.shape)} into {out.dtype} {list(out.shape)}: "
                         "expected fp32 into int8 of the same shape")
    if qtype.groupsize:
        rotate(w, qtype.groupsize, out=w)
    values, scale = round_rows_(w)
    return out.copy_(values), scale  # whole numbers: the copy to int8 is exact


# ---- comfy_quant: the per-layer JSON tag


def comfy_quant_bytes(qtype: Int8Rows) -> bytes:
    """The `M.comfy_quant` tensor's bytes: "format" first, convrot fields only for a rotated weight."""
    conf: dict[str, object] = {"format": COMFY_FORMAT}
    if qtype.groupsize:
        conf |= {"convrot": True, "convrot_groupsize": qtype.groupsize}
    return json.dumps(conf).encode()


def parse_comfy_quant(raw: torch.Tensor | bytes, where: str) -> Int8Rows:
    """The quant type a `comfy_quant` tensor declares, or a typed error naming `where` (file: tensor)."""
    data = raw if isinstance(raw, bytes) else bytes(raw.reshape(-1).to(torch.uint8).tolist())
    try:
        conf = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where} is not the JSON object ComfyUI writes ({e}); the file is corrupt") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where} holds {type(conf).__name__}, not a JSON object: the file is corrupt")
    fmt = conf.get("format")
    if fmt != COMFY_FORMAT:
        raise UnsupportedQuantError(f"{where} declares format {fmt!r}; zimage-lite reads ComfyUI's {COMFY_FORMAT!r} "
                                    f"(INT8, with or without ConvRot): use an int8 ConvRot, GGUF or BF16 file")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if not conf.get("convrot", params.get("convrot", False)):
        return ROWWISE
    size = conf.get("convrot_groupsize", params.get("convrot_groupsize", CONVROT_GROUPSIZE))
    if not isinstance(size, int) or not is_power_of_4(size):
        raise UnsupportedQuantError(f"{where} has convrot_groupsize {size!r}; ConvRot groups are powers of 4")
    return Int8Rows(size)


def row_scales(scale: torch.Tensor, rows: int, where: str) -> torch.Tensor:
    """weight_scale as fp32 [rows]: per-row [rows, 1] / [rows], or one per-tensor scale repeated."""
    n = scale.numel()
    if n == rows:
        return scale.reshape(rows).float()
    if n == 1:
        return scale.reshape(1).float().expand(rows).contiguous()
    raise CheckpointError(f"{where} has {n} values for a weight of {rows} rows: expected {rows} (one per row) or 1")
