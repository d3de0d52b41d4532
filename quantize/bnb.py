"""bitsandbytes int8 (LLM.int8) and nf4 (QLoRA) DiT files, in the layout diffusers saves pre-quantized models in.

The output is a transformer folder that `ZImageTransformer2DModel.from_pretrained(folder)` loads through its
bitsandbytes quantizer: `config.json` with a `quantization_config`, and `diffusion_pytorch_model.safetensors` holding,
for every quantized Linear `M` (official diffusers names, q/k/v split):
- int8: `M.weight` int8 [out, in], `M.SCB` fp32 [out] (the row absmax), `M.weight_format` uint8 scalar 0 ("row").
- nf4: `M.weight` uint8 [ceil(n/2), 1] (two 4-bit codes a byte, first element in the high nibble),
  `M.weight.absmax` fp32 [ceil(n/64)], `M.weight.quant_map` fp32 [16], and
  `M.weight.quant_state.bitsandbytes__nf4`: uint8 bytes of the JSON {"quant_type", "blocksize", "dtype", "shape"}.
Keys found by saving a tiny ZImageTransformer2DModel with diffusers 0.42 + bitsandbytes 0.50 (diffusers refuses
to quantize without a GPU, so its environment check was bypassed for that one experiment). The quantizers below
are torch ports of bitsandbytes' reference ops (backends/default/ops.py): `int8_vectorwise_quant` on the fp16
weight (Int8Params._quantize casts to fp16 first) and `quantize_4bit` (blocks of 64 over the flattened weight,
nearest code by the midpoints of the sorted NF4 table); tests check them byte for byte against bitsandbytes.
The embedders and the final layer stay unquantized (`llm_int8_skip_modules`), as in the GGUF recipes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zimage_lite.quant.formats import BnbType, bnb_sizes, dequantize

NF4_BLOCK = 64
# The NF4 code (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
SKIP_MODULES = ["t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer"]
ST_DTYPES = {"I8": np.int8, "U8": np.uint8, "F32": np.float32, "BF16": np.uint16}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 weight quantization: (int8 weight, fp32 row absmax `SCB`), as bitsandbytes computes it."""
    h = w.detach().to(torch.float16)
    scb = h.abs().amax(dim=1).float()
    scale = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))  # bitsandbytes divides by zero here
    return torch.round(h * scale.unsqueeze(-1)).to(torch.int8), scb


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 blockwise quantization: (packed uint8 [ceil(n/2), 1], fp32 absmax per block of 64)."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % NF4_BLOCK
    blocks = flat[:full].view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if n % NF4_BLOCK:  # a last, shorter block
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of quantize_nf4 (fp32): the runtime's own nf4 kernel, with this file's code table."""
    return dequantize(packed, BnbType("nf4", NF4_BLOCK), shape, state=(absmax, NF4_CODE))


@dataclass(frozen=True)
class StEntry:
    """One tensor of the safetensors output."""

    name: str
    dtype: str  # safetensors dtype: I8, U8, F32, BF16
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(ST_DTYPES[self.dtype]).itemsize


@dataclass(frozen=True)
class BnbGroup:
    """The outputs made from one official source tensor `source`."""

    source: str
    kind: str  # "int8", "nf4", "f32" or "bf16"
    entries: tuple[StEntry, ...]


def _quant_state_json(shape: tuple[int, ...], dtype: str) -> bytes:
    return json.dumps({"quant_type": "nf4", "blocksize": NF4_BLOCK, "dtype": dtype, "shape": list(shape)}).encode()


def bnb_plan(shapes: dict[str, tuple[int, ...]], linear_weights: set[str], target: str,
             dtype: str = "float32") -> list[BnbGroup]:
    """The int8 or nf4 file for official DiT tensor `shapes`; `linear_weights` names the nn.Linear weights."""
    plan = []
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        quantized = name in linear_weights and not any(module.startswith(s) for s in SKIP_MODULES)
        if quantized and target == "int8":
            entries = (StEntry(name, "I8", shape), StEntry(f"{module}.SCB", "F32", shape[:1]),
                       StEntry(f"{module}.weight_format", "U8", ()))
        elif quantized:
            packed, blocks, codes = bnb_sizes(BnbType("nf4", NF4_BLOCK), shape)
            entries = (StEntry(name, "U8", (packed, 1)),
                       StEntry(f"{name}.absmax", "F32", (blocks,)),
                       StEntry(f"{name}.quant_map", "F32", (codes,)),
                       StEntry(f"{name}.quant_state.bitsandbytes__nf4", "U8", (len(_quant_state_json(shape, dtype)),)))
        else:
            # norms, biases and pad tokens in fp32 (diffusers casts them to the load dtype); skipped Linears bf16
            kind = "bf16" if len(shape) == 2 and name in linear_weights else "f32"
            plan.append(BnbGroup(name, kind, (StEntry(name, kind.upper(), shape),)))
            continue
        plan.append(BnbGroup(name, target, entries))
    return plan


def make_arrays(group: BnbGroup, w: torch.Tensor, dtype: str = "float32") -> list[np.ndarray]:
    """The output arrays of `group` from its source tensor `w`, in the order of group.entries."""
    if group.kind == "int8":
        q, scb = quantize_int8(w)
        return [q.numpy(), scb.numpy(), np.zeros((), np.uint8)]
    if group.kind == "nf4":
        packed, absmax = quantize_nf4(w)
        state = np.frombuffer(_quant_state_json(tuple(w.shape), dtype), dtype=np.uint8)
        return [packed.numpy(), absmax.numpy(), NF4_CODE.numpy(), state]
    if group.kind == "bf16":
        return [w.detach().to(torch.bfloat16).contiguous().view(torch.uint16).numpy()]
    return [w.detach().float().contiguous().numpy()]


def quantization_config(target: str, compute_dtype: str = "bfloat16") -> dict:
    """The `quantization_config` block diffusers writes into config.json for a bitsandbytes model."""
    eight = target == "int8"
    return {
        "_load_in_4bit": not eight, "_load_in_8bit": eight, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4" if eight else "nf4",
        "bnb_4bit_use_double_quant": False, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": SKIP_MODULES, "llm_int8_threshold": 6.0,
        "load_in_4bit": not eight, "load_in_8bit": eight, "quant_method": "bitsandbytes",
    }


def safetensors_header(entries: list[StEntry], metadata: dict[str, str]) -> bytes:
    """The safetensors header for `entries` laid out back to back in this order (8-byte length + JSON,
    padded with spaces to a multiple of 8 as the safetensors writer does)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def predicted_bnb_size(plan: list[BnbGroup]) -> int:
    """File size in bytes of the safetensors file for `plan` (the header is estimated at 100 bytes a tensor)."""
    entries = [e for g in plan for e in g.entries]
    return sum(e.nbytes for e in entries) + 100 * len(entries)


def write_safetensors(path: Path, plan: list[BnbGroup], read: Callable[[str], torch.Tensor], metadata: dict[str, str],
                      dtype: str, on_group: Callable[[BnbGroup], None] | None = None,
                      make: Callable[[BnbGroup], list[np.ndarray]] | None = None) -> None:
    """Stream `plan` into `path`: the header first (sizes are known from the plan), then one group at a time.
    `make` builds a group's arrays (default: `make_arrays` of its source tensor)."""
    entries = [e for g in plan for e in g.entries]
    with open(path, "wb") as f:
        f.write(safetensors_header(entries, metadata))
        for group in plan:
            arrays = make(group) if make else make_arrays(group, read(group.source), dtype)
            for arr in _checked(group, arrays):
                np.ascontiguousarray(arr).tofile(f)
            if on_group is not None:
                on_group(group)


def _checked(group: BnbGroup, arrays: list[np.ndarray]) -> Iterator[np.ndarray]:
    for entry, arr in zip(group.entries, arrays, strict=True):
        if arr.nbytes != entry.nbytes:  # a mismatch would corrupt every later offset
            raise AssertionError(f"{entry.name}: {arr.nbytes} bytes, header says {entry.nbytes}")
        yield arr
