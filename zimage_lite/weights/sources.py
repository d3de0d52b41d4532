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
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
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
    """A view of another source under different names: `mapping` is official name → name in the file."""

    def __init__(self, inner: TensorSource, mapping: dict[str, str]) -> None:
        self.inner, self.path, self.mapping = inner, inner.path, mapping

    def names(self) -> Iterable[str]:
        return self.mapping.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.mapping

    def where(self, name: str) -> Path:
        return self.inner.where(self.mapping[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self.mapping[name])

    def qtype(self, name: str) -> str:
        return self.inner.qtype(self.mapping[name])

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self.mapping[name])
