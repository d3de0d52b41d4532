"""The LoRAs a run applies to the DiT: read and checked once, folded into one low-rank pair per linear at each load.

A LoRA adds s * B (A x) to a linear's output, s = the user's scale x alpha / rank (what diffusers' `set_adapters`
weights mean). Several LoRAs on one linear fold into one pair, each scale going into its B:

    s1 B1 A1 x + s2 B2 A2 x = [s1 B1 | s2 B2] ([A1; A2] x)

so n LoRAs cost one pair of thin matmuls per linear, of rank r1 + r2 + ..., not n pairs (models/adapters.py).
The pairs are made in the compute dtype (fp32 arithmetic for the scaling, one rounding) when the DiT is placed and
are served beside the checkpoint's tensors by `AdapterSource`, under their names in the model
(`layers.3.attention.to_q.lora.down`): the planner counts them with their block (`table`), placement places them,
the streamer moves them. The base weights are never modified.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DiTConfig
from .errors import CheckpointError, OptionError
from .models.adapters import adapter_names, attach
from .options import check_lora_scale
from .runtime.sizes import DTYPE_TYPES, TensorTable
from .weights.lora import read_lora
from .weights.sources import TensorSource

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SHA_SHOWN = 16  # hex digits of a LoRA's sha256 in the run parameters


class DuplicateLoraWarning(UserWarning):
    """The same LoRA file (by its sha256) is given more than once: each use applies, so their scales add up."""


class PartialLoraWarning(UserWarning):
    """Some keys of a LoRA map onto no linear of the DiT: the rest applies, those are skipped (listed)."""


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as the run applies it."""

    path: Path
    scale: float  # the user's; each adapter's alpha / rank comes on top
    sha256: str
    shapes: Mapping[str, tuple[int, int, int]]  # linear -> (rank, in, out)

    def param(self) -> dict[str, str | float]:
        """What the image's parameters record of it: file name, sha256 (first 16 hex digits), scale."""
        return {"name": self.path.name, "sha256": self.sha256[:SHA_SHOWN], "scale": self.scale}


class Loras:
    """The LoRAs of a run, in the order given. Empty (falsy) when there are none."""

    def __init__(self, uses: Iterable[LoraUse] = (), dit: DiTConfig | None = None) -> None:
        self.uses, self.dit = tuple(uses), dit

    @classmethod
    def read(cls, specs: Iterable[tuple[str | Path, float]] | str | Path, dit: DiTConfig) -> Loras:
        """Read and check each (path, scale) against the DiT of `dit`; the tensors are dropped again (they are read
        once more when the DiT is placed, so they take no memory between DiT stages). The same file twice: a
        DuplicateLoraWarning, and both apply."""
        uses: list[LoraUse] = []
        if isinstance(specs, (str, Path)):
            specs = [specs]  # one file, not its characters: refused below as not a pair
        for spec in specs:
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
                raise OptionError(f"loras: {spec!r} is not a (file, scale) pair; give a list of pairs, e.g. "
                                  "[('style.safetensors', 0.8)]")
            path, scale = spec
            scale = check_lora_scale(scale, path)
            f = read_lora(Path(path), dit)
            twin = next((u for u in uses if u.sha256 == f.sha256), None)
            if twin is not None:
                warnings.warn(DuplicateLoraWarning(
                    f"LoRA {f.path} is given twice (also as {twin.path}): both apply, so their scales add up "
                    f"({twin.scale:g} + {scale:g})"), stacklevel=2)
            if f.skipped:
                shown = ", ".join(f.skipped[:3]) + (f", and {len(f.skipped) - 3} more" if len(f.skipped) > 3 else "")
                warnings.warn(PartialLoraWarning(
                    f"LoRA {f.path}: {len(f.skipped)} of its keys map onto no DiT linear and are skipped ({shown}); "
                    f"the other {len(f.adapters)} modules apply"), stacklevel=2)
            shapes = {m: (a.down.shape[0], a.down.shape[1], a.up.shape[0]) for m, a in f.adapters.items()}
            uses.append(LoraUse(f.path, scale, f.sha256, shapes))
        return cls(uses, dit)

    def __bool__(self) -> bool:
        return bool(self.uses)

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """Linear -> (total rank, in, out): the folded pair on each linear that some LoRA targets."""
        out: dict[str, tuple[int, int, int]] = {}
        for use in self.uses:
            for m, (rank, n_in, n_out) in use.shapes.items():
                out[m] = (out.get(m, (0,))[0] + rank, n_in, n_out)
        return out

    def table(self) -> TensorTable:
        """The adapter tensors as the planner sizes them: name -> (shape, type). The planner counts them in the
        compute dtype, in which `tensors` makes them; the type says what their scaling is computed in (fp32)."""
        out = {}
        for m, (rank, n_in, n_out) in self.shapes().items():
            down, up = adapter_names(m)
            out[down], out[up] = ((rank, n_in), "F32"), ((n_out, rank), "F32")
        return out

    def params(self) -> list[dict[str, str | float]]:
        """The run parameter "loras": one entry per LoRA, in order."""
        return [u.param() for u in self.uses]

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The folded pairs in `dtype`, read from the files again: one file's tensors at a time beside the result."""
        shapes = self.shapes()
        out: dict[str, torch.Tensor] = {}
        for m, (rank, n_in, n_out) in shapes.items():
            down, up = adapter_names(m)
            out[down], out[up] = torch.empty(rank, n_in, dtype=dtype), torch.empty(n_out, rank, dtype=dtype)
        filled = dict.fromkeys(shapes, 0)
        for use in self.uses:
            f = read_lora(use.path, self.dit)
            if f.sha256 != use.sha256:
                raise CheckpointError(f"{use.path}: the LoRA file changed on disk since the model was loaded; load "
                                      "the model again")
            for m, a in f.adapters.items():
                down, up = adapter_names(m)
                lo, hi = filled[m], filled[m] + a.down.shape[0]
                out[down][lo:hi] = a.down
                out[up][:, lo:hi] = a.up.float() * (use.scale * a.scale)  # one rounding into `dtype`
                filled[m] = hi
        return out

    def attach(self, model: nn.Module, source: TensorSource, dtype: torch.dtype) -> TensorSource:
        """Give the DiT `model` (on `meta`, not yet placed) its side paths; the source to place it from."""
        attach(model, self.shapes())
        return AdapterSource(source, self.tensors(dtype))


class AdapterSource(TensorSource):
    """A weight source plus in-memory tensors (the folded adapter pairs) under the model's names."""

    def __init__(self, base: TensorSource, tensors: dict[str, torch.Tensor]) -> None:
        self.base, self.tensors, self.path = base, tensors, base.path

    def names(self) -> Iterable[str]:
        return [*self.base.names(), *self.tensors]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape) if name in self.tensors else self.base.shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name] if name in self.tensors else self.base.get(name)

    def qtype(self, name: str) -> str:
        if name in self.tensors:
            return DTYPE_TYPES[DTYPE_NAMES[self.tensors[name].dtype]]
        return self.base.qtype(name)

    def where(self, name: str) -> Path:
        return Path("LoRA adapters") if name in self.tensors else self.base.where(name)

    def close(self) -> None:
        self.base.close()
