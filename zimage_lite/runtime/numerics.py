"""NaN and inf: one check of each stage's output while a run goes, and a look at the weights once one is found.

While all is well the only cost is `finite` on what a stage hands on (the caption features, each step's
prediction, the decoded image): one reduction over a tensor the size of the latent or the image, never over weights.
When a stage's output is not finite, `nonfinite_error` finds out why, after the fact: it reads that component's
weights through its source, tensor by tensor and in row pieces of at most `SCAN_PIECE` values (a 0.4 G-param
embedding table is never whole in fp32), dequantizing packed ones (a NaN scale in a Q8_0 block shows up as NaN
weights), and names the tensors that hold NaN/inf and their files. Only when every weight is finite is the compute
dtype blamed, and fp16 only on an fp16 run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..components import REGISTRY
from ..errors import NumericsError
from ..quant.formats import INT8, BnbType
from ..quant.qlinear import QTensor
from ..weights.sources import TensorSource

SCAN_PIECE = 1 << 22  # values per piece scanned: 16 MB in fp32
FP16_MAX = float(torch.finfo(torch.float16).max)
LISTED = 3  # tensors named in a message; the rest are counted
LARGE_WEIGHT = 1e4  # trained weights sit within a few units; one this large points at a damaged file


def finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite: the per-stage check (one reduction and one sync)."""
    return bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class BadTensor:
    """A weight that holds NaN/inf: its official name, its name in the file, the file, and how many values."""

    name: str
    stored: str
    file: Path
    count: int
    total: int


@dataclass
class WeightScan:
    """What `scan_weights` found: the non-finite tensors, and the largest finite magnitude and where it is."""

    bad: list[BadTensor] = field(default_factory=list)
    largest: float = 0.0
    largest_name: str = ""


def _pieces(t: torch.Tensor | QTensor) -> Iterator[torch.Tensor]:
    """`t` in fp32, as row ranges of at most SCAN_PIECE values. Packed tensors are dequantized piece by piece where
    their blocks allow slicing rows (GGML types, int8), else whole (nf4/fp4 blocks run across rows)."""
    shape = tuple(t.shape)
    rows, per_row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    step = max(1, SCAN_PIECE // max(1, per_row))
    if isinstance(t, QTensor):
        if len(shape) < 2 or (isinstance(t.qtype, BnbType) and t.qtype != INT8):
            yield t.dequantize(torch.float32)
            return
        for start in range(0, rows, step):
            yield t.rows(start, min(rows, start + step)).dequantize(torch.float32)
        return
    flat = t.reshape(rows, -1)
    for start in range(0, rows, step):
        yield flat[start:start + step].float()


def scan_weights(source: TensorSource, names: Iterable[str]) -> WeightScan:
    """Read each named tensor through `source` and count its non-finite values; one piece in memory at a time."""
    scan = WeightScan()
    mapping = getattr(source, "mapping", {})
    for name in names:
        t = source.get(name)
        count = 0
        for piece in _pieces(t):
            count += int((~torch.isfinite(piece)).sum())
            big = float(piece.nan_to_num(0.0, 0.0, 0.0).abs().max()) if piece.numel() else 0.0
            if big > scan.largest:
                scan.largest, scan.largest_name = big, name
        if count:
            stored = mapping.get(name, (name,))[0]
            scan.bad.append(BadTensor(name, stored, source.where(name), count, math.prod(t.shape)))
    return scan


def _listed(bad: list[BadTensor]) -> str:
    def one(b: BadTensor) -> str:
        as_stored = f", stored as {b.stored}" if b.stored != b.name else ""
        return f"{b.name} ({b.count:,} of {b.total:,} values{as_stored}) in {b.file}"

    more = f", and {len(bad) - LISTED} more tensor(s)" if len(bad) > LISTED else ""
    return "; ".join(one(b) for b in bad[:LISTED]) + more


def weight_names(kind: str, config: Any, model: type[torch.nn.Module] | None = None) -> list[str]:
    """The tensors a model of component `kind` reads (its run model unless `model` names another of the component's
    models, such as the VAE's encoder), built on `meta` (no memory), in the model's order."""
    with torch.device("meta"):
        return list((model or REGISTRY[kind].model)(config).state_dict())


def nonfinite_error(kind: str, config: Any, source: TensorSource, dtype: torch.dtype,
                    model: type[torch.nn.Module] | None = None, label: str | None = None) -> NumericsError:
    """Why the `kind` stage ('text_encoder', 'dit', 'vae'; `model` and `label` for another model of the component,
    as the VAE encoder) produced NaN/inf while computing in `dtype`: the tensors of its weights that hold NaN/inf, or,
    with all weights finite, the range of the compute dtype."""
    label = label or REGISTRY[kind].label
    scan = scan_weights(source, weight_names(kind, config, model))
    what = f"the {label} produced NaN/inf values"
    if scan.bad:
        return NumericsError(f"{what}: its weights hold NaN/inf in tensor {_listed(scan.bad)}; the file is corrupt: "
                             f"download or convert it again")
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))
    where = f"in tensor {scan.largest_name} of {source.where(scan.largest_name)}" if scan.largest_name else ""
    if dtype == torch.float16:
        beyond = (f"; its largest weight, {scan.largest:.3g} {where}, is beyond fp16's range itself"
                  if scan.largest > FP16_MAX else "")
        return NumericsError(f"{what} computing in fp16, and its weights are all finite: fp16 overflowed{beyond}; "
                             f"use --dtype bf16 or fp32")
    if scan.largest > LARGE_WEIGHT:
        return NumericsError(f"{what} computing in {dtype_name} although its weights are all finite; the largest is "
                             f"{scan.largest:.3g} {where}, and weights that large overflow: the file is likely "
                             f"corrupt, download or convert it again")
    return NumericsError(f"{what} computing in {dtype_name} although its weights are all finite and of ordinary size "
                         f"(the largest {scan.largest:.3g}): an input or an intermediate overflowed; if other prompts "
                         f"and images do the same, the file may be damaged: download or convert it again")
