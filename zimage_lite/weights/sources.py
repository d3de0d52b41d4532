"""Lazy tensor sources: name → tensor, read one tensor at a time, never a whole file.

A source answers `names()`, `shape(name)` and `get(name)`. Safetensors files are opened with `safe_open` (the
header only; tensors are read on request); a sharded folder is found through its `*.safetensors.index.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..quant.qlinear import QTensor
from .names import Part


class TensorSource:
    """Base class. `path` names what was opened, for error messages."""

    path: Path

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def qtype(self, name: str) -> str:
        """Storage type of a tensor as a GGML type name: 'F32', 'BF16', 'Q4_K', ..."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def where(self, name: str) -> Path:
        return self.path


_ST_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I8": "I8", "U8": "U8", "I32": "I32",
             "I64": "I64", "F8_E4M3": "F8_E4M3", "F8_E5M2": "F8_E5M2", "BOOL": "BOOL", "I16": "I16"}


class SafetensorsSource(TensorSource):
    """One or several safetensors files seen as one name space."""

    def __init__(self, files: list[Path], path: Path | None = None) -> None:
        self.path = path or files[0]
        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: file not found")
            try:
                handle = safe_open(str(f), framework="pt")
                keys = list(handle.keys())
            except Exception as e:
                # safe_open checks the header's data offsets against the file size ("incomplete metadata, file
                # not fully covered"), so a data section cut short fails here too, before any tensor is read.
                raise CheckpointError(f"{f}: truncated or corrupt safetensors file, it cannot be opened ({e}); "
                                      f"download or convert it again") from None
            self._handles[f] = handle
            for k in keys:
                self._where[k] = f

    @classmethod
    def from_folder(cls, folder: Path) -> SafetensorsSource:
        """A component folder: sharded with an index, or holding exactly one safetensors file."""
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            index = indexes[0]
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            shards = sorted({folder / s for s in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
            return cls(shards, folder)
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise CheckpointError(f"{folder}: expected one *.safetensors file or an index, found {found}")
        return cls(files, folder)

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def where(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def qtype(self, name: str) -> str:
        return _ST_TYPES.get(self._handles[self._where[name]].get_slice(name).get_dtype(), "?")

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {name} cannot be read ({e})") from None


class RenamedSource(TensorSource):
    """A view of another source under official names.

    `mapping` is official name → name in the file, or → (name in the file, part) as names.translate returns it:
    part (i, n) means rows i/n of a fused tensor (ComfyUI's `qkv` holds q, k and v), on torch tensors and on
    packed QTensors alike (blocks never cross rows).
    """

    def __init__(self, inner: TensorSource, mapping: dict[str, str | tuple[str, Part]]) -> None:
        self.inner, self.path = inner, inner.path
        self.mapping: dict[str, tuple[str, Part]] = {
            k: (v, None) if isinstance(v, str) else v for k, v in mapping.items()}

    def names(self) -> Iterable[str]:
        return self.mapping.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.mapping

    def where(self, name: str) -> Path:
        return self.inner.where(self.mapping[name][0])

    def _rows(self, name: str) -> tuple[str, slice | None]:
        stored, part = self.mapping[name]
        if part is None:
            return stored, None
        rows = self.inner.shape(stored)[0]
        i, n = part
        if rows % n:
            raise CheckpointError(f"{self.inner.where(stored)}: tensor {stored} has {rows} rows, which do not split "
                                  f"into {n} equal parts for {name}")
        return stored, slice(i * rows // n, (i + 1) * rows // n)

    def shape(self, name: str) -> tuple[int, ...]:
        stored, rows = self._rows(name)
        shape = self.inner.shape(stored)
        return shape if rows is None else (rows.stop - rows.start, *shape[1:])

    def qtype(self, name: str) -> str:
        return self.inner.qtype(self.mapping[name][0])

    def get(self, name: str) -> torch.Tensor | QTensor:
        stored, rows = self._rows(name)
        t = self.inner.get(stored)
        if rows is None:
            return t
        if isinstance(t, QTensor):
            return t.rows(rows.start, rows.stop)
        # A view would keep the whole fused tensor alive (three times over for q, k, v) unless it is a view of a
        # memory-mapped file, which costs nothing until read.
        piece = t[rows]
        return piece if getattr(self.inner, "memory_mapped", False) else piece.clone()
