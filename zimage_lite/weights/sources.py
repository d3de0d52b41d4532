"""Lazy tensor sources: name → tensor, read one tensor at a time, never a whole file.

A source answers `names()`, `shape(name)` and `get(name)`. Safetensors files are opened with `safe_open` (the
header only; tensors are read on request); a sharded folder is found through its `*.safetensors.index.json`.
`close()` drops a source's memory maps and handles at the end of a stage, keeping its index (names, shapes, types):
a map keeps every page read through it resident until it goes, so a stage that ends must unmap, or the text
encoder's pages stay in RSS through the DiT's steps. The next read maps the file again (a syscall, no header parse).
A bitsandbytes folder (diffusers' pre-quantized layout) is seen through `BnbSource`, which folds each quantized
weight and its scale tensors into one packed `QTensor`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import read_json, show_value
from ..errors import CheckpointError, UnsupportedQuantError
from ..quant.formats import INT8, BnbType, bnb_sizes
from ..quant.qlinear import QTensor
from .checks import check_file
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

    def nbytes(self, name: str) -> int:
        """Bytes the tensor takes as stored."""
        return math.prod(self.shape(name)) * ITEM_BYTES.get(self.qtype(name), 0)

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def where(self, name: str) -> Path:
        return self.path

    def close(self) -> None:
        """Drop memory maps and file handles; the index stays and the next `get` reopens. Tensors already read keep
        their own pages alive (a packed weight is a view of the map) until they are freed."""


def file_stamp(path: Path) -> tuple[int, int]:
    """Size and modification time: what must be unchanged for an index read earlier to describe the file."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def check_unchanged(path: Path, stamp: tuple[int, int]) -> None:
    """Before mapping a file again: its header was read when it was first opened."""
    try:
        now = file_stamp(path)
    except OSError as e:
        raise CheckpointError(f"{path}: the file cannot be opened again ({e}); load the model again") from None
    if now != stamp:
        raise CheckpointError(f"{path}: the file changed on disk since it was opened (size or time differs); load "
                              f"the model again")


# safetensors dtypes (the names are the GGML-style type names `qtype` answers) and their item sizes
ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


class SafetensorsSource(TensorSource):
    """One or several safetensors files seen as one name space."""

    def __init__(self, files: list[Path], path: Path | None = None) -> None:
        self.path = path or files[0]
        self._handles: dict[Path, Any] = {}  # open safe_open handles (each maps its file); empty once closed
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype), read once at open
        for f in files:
            check_file(f)  # a shard that is a FIFO would block safe_open
            self._stamps[f] = file_stamp(f)
            try:
                handle = self._handle(f)
                for k in handle.keys():
                    piece = handle.get_slice(k)
                    self._where[k], self._info[k] = f, (tuple(piece.get_shape()), piece.get_dtype())
            except CheckpointError:
                raise
            except Exception as e:
                # safe_open checks the header's data offsets against the file size ("incomplete metadata, file
                # not fully covered"), so a data section cut short fails here too, before any tensor is read.
                raise CheckpointError(f"{f}: truncated or corrupt safetensors file, it cannot be opened ({e}); "
                                      f"download or convert it again") from None

    def _handle(self, f: Path) -> Any:
        if f not in self._handles:
            check_unchanged(f, self._stamps[f])  # a reopen: the index read at first must still describe the file
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f]

    def close(self) -> None:
        self._handles.clear()

    @classmethod
    def from_folder(cls, folder: Path) -> SafetensorsSource:
        """A component folder: sharded with an index, or holding exactly one safetensors file."""
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            index = indexes[0]
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
                    for k, v in weight_map.items()):
                raise CheckpointError(f'{index}: "weight_map" must be an object of tensor name -> shard file name '
                                      f"(found {show_value(weight_map)}); download or convert the model again")
            shards = sorted({folder / s for s in weight_map.values()})
            missing = [s.name for s in shards if not s.exists()]
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
        return self._info[name][0]

    def qtype(self, name: str) -> str:
        dtype = self._info[name][1]
        return dtype if dtype in ITEM_BYTES else "?"

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        handle = self._handle(f)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {name} cannot be read ({e})") from None


# Tensors bitsandbytes serializes beside a quantized weight (QuantState.as_dict(packed=True), Linear8bitLt)
_BNB_4BIT_STATE = re.compile(r"^(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$")
_BNB_INT8_STATE = re.compile(r"^(.+)\.(SCB|weight_format)$")


class SideTensorSource(TensorSource):
    """A safetensors file whose quantized weights carry side tensors (scales, tags, quant states) that belong to the
    weight: those are hidden from `names()` and `in`; a subclass fills `_hidden` and `_names` when it opens."""

    inner: SafetensorsSource
    _hidden: set[str]
    _names: list[str]

    def names(self) -> Iterable[str]:
        return self._names

    def close(self) -> None:
        self.inner.close()

    def __contains__(self, name: str) -> bool:
        return name in self.inner and name not in self._hidden

    def where(self, name: str) -> Path:
        return self.inner.where(name)


class BnbSource(SideTensorSource):
    """A bitsandbytes folder as diffusers/transformers save it (see quantize/bnb.py for the keys), under its own
    names: each quantized weight comes back as one `QTensor` (packed bytes, BnbType, logical shape, scale tensors)
    and the tensors that hold its state (`.SCB`, `.weight_format`, `.weight.absmax`, `.weight.quant_map`,
    `.weight.nested_*`, `.weight.quant_state.*`) are hidden from `names()`. Every quantized weight is checked
    against its state at open, from the headers plus the small JSON quant states, so a cut file fails before any
    work; unquantized tensors (skipped modules, norms) pass through.
    """

    def __init__(self, inner: SafetensorsSource, quant_config: dict[str, Any]) -> None:
        self.inner, self.path = inner, inner.path
        # diffusers and transformers write both spellings
        if quant_config.get("load_in_8bit") or quant_config.get("_load_in_8bit"):
            self.kind = "int8"
        elif quant_config.get("load_in_4bit") or quant_config.get("_load_in_4bit"):
            self.kind = "4bit"
        else:
            raise CheckpointError(f"{self.path}: config.json's quantization_config (bitsandbytes) sets neither "
                                  f"load_in_8bit nor load_in_4bit")
        # weight name -> (type, logical shape, state tensor names in bnb_sizes order, every stored name it owns)
        self._packed: dict[str, tuple[BnbType, tuple[int, ...], tuple[str, ...], tuple[str, ...]]] = {}
        self._offsets: dict[str, float] = {}  # double quantization's absmax offset, from the JSON quant state
        pattern = _BNB_INT8_STATE if self.kind == "int8" else _BNB_4BIT_STATE
        owned: dict[str, list[str]] = {}
        for name in inner.names():
            m = pattern.match(name)
            if m:
                owned.setdefault(m.group(1) if self.kind == "4bit" else f"{m.group(1)}.weight", []).append(name)
        self._hidden = {n for names in owned.values() for n in names}
        # a weight in bitsandbytes' storage type is quantized even when all its state is gone
        storage = "I8" if self.kind == "int8" else "U8"
        for name in inner.names():
            if name.endswith(".weight") and inner.qtype(name) == storage:
                owned.setdefault(name, [])
        for weight, extra in owned.items():
            self._packed[weight] = self._check(weight, extra, quant_config)
        self._names = [n for n in inner.names() if n not in self._hidden]

    def _missing(self, weight: str, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor {name} is missing: the bitsandbytes {self.kind} weight {weight} "
                               f"cannot be read without it (an incomplete save?); quantize or save the model again")

    def _check(self, weight: str, extra: list[str], quant_config: dict[str, Any]
               ) -> tuple[BnbType, tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
        inner = self.inner
        if weight not in inner:
            raise self._missing(weight, weight)
        if self.kind == "int8":
            module = weight.removesuffix(".weight")
            qtype, shape, state = INT8, inner.shape(weight), (f"{module}.SCB",)
            if f"{module}.weight_format" in inner:
                fmt = int(inner.get(f"{module}.weight_format").reshape(-1)[0])
                if fmt != 0:  # bitsandbytes < 0.45 could save GPU tile layouts (col_turing, col_ampere)
                    raise UnsupportedQuantError(
                        f"{inner.where(weight)}: tensor {module}.weight_format is {fmt}, a GPU tile layout of older "
                        f"bitsandbytes; zimage-lite reads the row layout (0): save the model with bitsandbytes >= 0.45")
        else:
            quant_type = quant_config.get("bnb_4bit_quant_type") or "nf4"
            key = next((n for n in extra if ".quant_state." in n), f"{weight}.quant_state.bitsandbytes__{quant_type}")
            if key not in inner:
                raise self._missing(weight, key)
            try:
                qs = json.loads(bytes(inner.get(key).reshape(-1).tolist()))
                qtype = BnbType(qs["quant_type"], int(qs["blocksize"]), int(qs.get("nested_blocksize") or 0))
                shape = tuple(int(d) for d in qs["shape"])
                if qtype.nested:
                    self._offsets[weight] = float(qs["nested_offset"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{inner.where(key)}: tensor {key} is not a bitsandbytes quant state "
                                      f"({type(e).__name__}: {e})") from None
            state = tuple(f"{weight}.{s}" for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
                          [:4 if qtype.nested else 2])
        for name in state:
            if name not in inner:
                raise self._missing(weight, name)
        found = (inner.nbytes(weight), *(math.prod(inner.shape(n)) for n in state))
        want = bnb_sizes(qtype, shape)
        for name, got, expected in zip((weight, *state), found, want, strict=False):
            if got != expected:
                raise CheckpointError(f"{inner.where(name)}: tensor {name} has {got} elements, the bitsandbytes "
                                      f"{qtype.name} weight {weight} of shape {list(shape)} needs {expected}: the "
                                      f"file is corrupt")
        return qtype, shape, state, (weight, *extra)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._packed[name][1] if name in self._packed else self.inner.shape(name)

    def qtype(self, name: str) -> str:
        """'int8', 'nf4' (or 'fp4') for a quantized weight, else the stored dtype."""
        return self._packed[name][0].name if name in self._packed else self.inner.qtype(name)

    def nbytes(self, name: str) -> int:
        if name not in self._packed:
            return self.inner.nbytes(name)
        return sum(self.inner.nbytes(n) for n in self._packed[name][3])

    def get(self, name: str) -> torch.Tensor | QTensor:
        if name not in self._packed:
            return self.inner.get(name)
        qtype, shape, state_names, _ = self._packed[name]
        state = tuple(self.inner.get(n) for n in state_names)
        if qtype.nested:  # the offset lives in the JSON quant state; as a tensor it travels with the weight
            state += (torch.tensor([self._offsets[name]], dtype=torch.float32),)
        return QTensor(self.inner.get(name).view(torch.uint8), qtype, shape, state)


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

    def close(self) -> None:
        self.inner.close()

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
