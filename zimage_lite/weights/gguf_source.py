"""GGUF files as a lazy tensor source, over gguf-py's memory-mapped `GGUFReader`, and their metadata.

Nothing is read until a tensor is asked for, and then only as a view of the memory map: float tensors come back as
torch tensors on the mapped bytes, quantized ones as a `QTensor` over the packed bytes (the one place they are
unpacked is formats.py). Shapes are torch order, the reverse of GGUF's ne order (shared/reference/gguf_interop.md
4.2). A text encoder GGUF written by llama.cpp also carries its tokenizer (`tokenizer.ggml.*`), which
`tokenizer_json` turns back into the tokenizers-library JSON that text.py reads.

The header is parsed once, into an index (each tensor's type, shape and offset; the metadata values, long arrays by
offset); `close()` drops the reader and the map, and the next read maps the file again and slices it by that index,
without parsing anything.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, TokenType

from ..errors import CheckpointError
from ..quant.formats import FLOAT_TYPES
from ..quant.qlinear import QTensor
from .checks import check_file
from .sources import TensorSource, check_unchanged, file_stamp

GGUF_MAGIC = b"GGUF"
HEADER_BYTES = 24  # magic, version, tensor count, kv count
LONG_ARRAY = 16  # longer metadata arrays are indexed at open and decoded only when asked for


def _as_torch(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only memory-map slice, without a copy.

    torch warns that the array is not writable; the tensor is never written (weights are inference-only), and
    mapping the file copy-on-write instead would count the whole file against the commit limit on Linux, which
    fails for a 12 GB file on an 8 GB machine.
    """
    if arr.ctypes.data % arr.dtype.itemsize:
        arr = arr.copy()  # a file with `general.alignment` below the item size: torch needs aligned data
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


class _DataCutShort(Exception):
    def __init__(self, tensor: str, end: int, size: int) -> None:
        super().__init__(tensor)
        self.tensor, self.end, self.size = tensor, end, size


class _Reader(GGUFReader):
    """GGUFReader that indexes long metadata arrays instead of parsing them.

    gguf-py builds one numpy view per array element: Qwen3's vocabulary, token types and merges (450k entries) take
    ~12 s to parse on every open. Long arrays are only skipped here (string lengths walked, fixed-size items jumped)
    and decoded on request by `GGUFSource.meta`; every other field takes gguf-py's own path.
    """

    def __init__(self, path: Path) -> None:
        self.lazy: dict[str, tuple[int, int, GGUFValueType]] = {}  # key → (data offset, count, item type)
        super().__init__(path, "r")

    def _build_fields(self, offs: int, count: int) -> int:
        for _ in range(int(count)):
            key_len = int(self._get(offs, np.uint64)[0])
            at = offs + 8 + key_len
            if int(self._get(at, np.uint32)[0]) == GGUFValueType.ARRAY:
                item = GGUFValueType(int(self._get(at + 4, np.uint32)[0]))
                n = int(self._get(at + 8, np.uint64)[0])
                if n > LONG_ARRAY and item != GGUFValueType.ARRAY:
                    key = bytes(self.data[offs + 8:at]).decode("utf-8")
                    self.lazy[key] = (at + 16, n, item)
                    offs = self._skip(at + 16, n, item)
                    continue
            offs = super()._build_fields(offs, 1)
        return offs

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        # gguf-py would fail on a cut data section with a reshape error; say which tensor runs past the end
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
            if end > len(self.data):
                raise _DataCutShort(str(bytes(name), "utf-8"), end, len(self.data))
        super()._build_tensors(start_offs, fields)

    def _skip(self, offs: int, n: int, item: GGUFValueType) -> int:
        if item != GGUFValueType.STRING:
            end = offs + n * np.dtype(self.gguf_scalar_to_np[item]).itemsize
        else:
            buf, order = memoryview(self.data), _byte_order(self)
            end = offs
            for _ in range(n):
                end += 8 + int.from_bytes(buf[end:end + 8], order)
                if end > len(self.data):  # a garbled count must not spin through the whole file
                    break
        if end > len(self.data):
            raise ValueError(f"metadata array cut short at byte {len(self.data)}")
        return end



def _read_array(data: np.ndarray, entry: tuple[int, int, GGUFValueType], order: str) -> list[Any]:
    """A long metadata array that `_Reader` indexed, decoded from the file's bytes."""
    offs, n, item = entry
    if item != GGUFValueType.STRING:
        dtype = np.dtype(GGUFReader.gguf_scalar_to_np[item]).newbyteorder("<" if order == "little" else ">")
        return np.frombuffer(data, dtype, n, offs).tolist()
    buf, out = memoryview(data), []
    for _ in range(n):
        size = int.from_bytes(buf[offs:offs + 8], order)
        out.append(str(buf[offs + 8:offs + 8 + size], "utf-8"))
        offs += 8 + size
    return out


def _byte_order(reader: GGUFReader) -> str:
    """The file's byte order: the host's ('I') or the other one ('S')."""
    other = "big" if sys.byteorder == "little" else "little"
    return sys.byteorder if reader.byte_order == "I" else other


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies in the file, and the numpy view gguf-py gives it (item type and shape)."""

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order
    offset: int  # absolute byte offset of the data
    nbytes: int
    item: np.dtype  # uint8 for quantized and BF16 data; the float/int type otherwise (byte order included)
    view_shape: tuple[int, ...]


class GGUFSource(TensorSource):
    """The tensors and metadata of one GGUF file."""

    memory_mapped = True  # tensors are views of the file: slicing them costs no memory (see RenamedSource)

    def __init__(self, path: Path) -> None:
        self.path = check_file(path)  # a FIFO would block the reader
        self._stamp = file_stamp(self.path)
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head != GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
        if self._stamp[0] < HEADER_BYTES:
            raise CheckpointError(f"{self.path}: truncated GGUF file: {self._stamp[0]} bytes, shorter than the "
                                  f"header")
        reader = self._parse()
        self._reader: _Reader | None = reader
        self._map: np.memmap | None = reader.data
        self._tensors = {t.name: _Entry(t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                                        int(t.data_offset), int(t.n_bytes), t.data.dtype, t.data.shape)
                         for t in reader.tensors}
        # metadata decoded now (a few dozen small values; fields are views of the map), long arrays by offset
        self._fields = {key: field.contents() for key, field in reader.fields.items()}
        self._long = {key: f"[{len(field.data)} x {field.types[-1].name if len(field.types) > 1 else '?'}]"
                      for key, field in reader.fields.items()
                      if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > LONG_ARRAY}
        self._lazy, self._order = dict(reader.lazy), _byte_order(reader)

    def _parse(self) -> _Reader:
        try:
            return _Reader(self.path)
        except _DataCutShort as e:
            raise CheckpointError(f"{self.path}: truncated GGUF file: tensor {e.tensor} needs bytes up to {e.end}, "
                                  f"the file has {e.size} (an interrupted download?); download or convert it "
                                  f"again") from None
        except Exception as e:  # gguf-py raises ValueError, IndexError, KeyError... on cut or garbled headers
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file, its header cannot be parsed "
                                  f"({type(e).__name__}: {e}); download or convert it again") from None

    @property
    def reader(self) -> GGUFReader:
        """gguf-py's own reader (raw fields and tensors), parsed again if the source was closed."""
        if self._reader is None:
            check_unchanged(self.path, self._stamp)
            self._reader = self._parse()
            self._map = self._reader.data
        return self._reader

    def _data(self) -> np.memmap:
        if self._map is None:
            check_unchanged(self.path, self._stamp)
            self._map = np.memmap(self.path, mode="r")
        return self._map

    def close(self) -> None:
        # the reader's fields and tensors are views of its map: both go, the index stays
        self._reader = self._map = None

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def qtype(self, name: str) -> str:
        return self._tensors[name].qtype.name

    def nbytes(self, name: str) -> int:
        return self._tensors[name].nbytes

    def get(self, name: str) -> torch.Tensor | QTensor:
        t = self._tensors[name]
        data = self._data()[t.offset:t.offset + t.nbytes].view(t.item).reshape(t.view_shape)
        if t.qtype == GGMLQuantizationType.BF16:
            # gguf-py hands BF16 out as raw bytes, (..., 2 * cols) uint8: reinterpret, still on the map
            return _as_torch(data).view(torch.bfloat16).reshape(t.shape)
        if t.qtype in FLOAT_TYPES or t.item != np.uint8:
            return _as_torch(data).reshape(t.shape)
        return QTensor(_as_torch(data), t.qtype, t.shape)

    # -- metadata -----------------------------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        """One metadata value, decoded (strings as str, arrays as lists)."""
        if key in self._lazy:
            return _read_array(self._data(), self._lazy[key], self._order)
        return self._fields.get(key, default)

    def metadata(self) -> dict[str, Any]:
        """All metadata keys; long arrays (the tokenizer's vocab and merges) as '[N x TYPE]'."""
        out = {key: self._long.get(key, value) for key, value in self._fields.items()
               if not key.startswith("GGUF.")}  # GGUF.*: the container's own version and counts
        for key, (_, n, item) in self._lazy.items():
            out[key] = f"[{n} x {item.name}]"
        return out

    @property
    def architecture(self) -> str | None:
        return self.meta("general.architecture")

    def tokenizer_json(self) -> str | None:
        """The tokenizer as tokenizers-library JSON, rebuilt from llama.cpp's `tokenizer.ggml.*` metadata.

        Only the byte-level BPE of Qwen2/Qwen3 (model `gpt2`, pre-tokenizer `qwen2`) is rebuilt; None otherwise.
        """
        if self.meta("tokenizer.ggml.model") != "gpt2" or self.meta("tokenizer.ggml.pre") != "qwen2":
            return None
        tokens: list[str] = self.meta("tokenizer.ggml.tokens") or []
        types: list[int] = self.meta("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
        merges: list[str] = self.meta("tokenizer.ggml.merges") or []
        if not tokens or len(types) != len(tokens):
            raise CheckpointError(f"{self.path}: tokenizer metadata is incomplete (tokens/token_type)")
        return build_qwen_tokenizer(tokens, types, merges, self.path)


def build_qwen_tokenizer(tokens: list[str], types: list[int], merges: list[str], where: Path) -> str:
    """Qwen2's tokenizer.json from llama.cpp's vocab: byte-level BPE, NFC, Qwen's split rule, added tokens.

    llama.cpp stores added tokens at their ids as CONTROL (special) or USER_DEFINED, and pads the vocab to the
    embedding size with UNUSED `[PADn]` entries, which no merge produces and are left out.
    """
    from tokenizers import AddedToken, Tokenizer, models, processors

    from ..text import qwen_byte_level

    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)) if kind != TokenType.UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = qwen_byte_level(Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False)))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [(i, t, kind) for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
             if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    # add_tokens keeps a token's vocab id when the vocab already has it, so ids stay llama.cpp's (= Qwen's)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for _, t, kind in added if kind == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for _, t, kind in added if kind == TokenType.USER_DEFINED])
    for i, t, _ in added:
        if tok.token_to_id(t) != i:
            raise CheckpointError(f"{where}: tokenizer metadata: added token {t!r} lands at id "
                                  f"{tok.token_to_id(t)}, not {i}")
    return tok.to_str()
