"""What every converter shares: the component to convert (`SourceInput`), reading its tensors, the streamed GGUF
writer and the atomic file write with its `Result` (convert.py has the memory story: one tensor at a time, the
source's pages handed back after each)."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch
from tqdm import tqdm

from zimage_lite.errors import CheckpointError
from zimage_lite.output import write_atomic
from zimage_lite.quant.formats import quantize
from zimage_lite.quant.recipes import TensorPlan
from zimage_lite.runtime.memory import release_pages
from zimage_lite.weights.gguf_source import GGUFSource
from zimage_lite.weights.load import load_tensor
from zimage_lite.weights.sources import TensorSource

from . import recipes


@dataclass
class Result:
    path: Path
    nbytes: int
    histogram: dict[str, int]
    seconds: float
    fallbacks: dict[tuple[str, str], int] = field(default_factory=dict)  # (recipe's type, written type): tensors
    short_rows: tuple[int, ...] = ()  # the row lengths that made them fall back


@dataclass
class SourceInput:
    """One component to convert: its config and tensor source (official names) from components.py's openers."""

    component: str  # "dit" or "text_encoder"
    config: Any  # DiTConfig or TextEncoderConfig
    source: TensorSource
    root: Path  # the component folder or the single file
    digest: str  # sha256 of the config/index files or of the file's header: cheap provenance
    raw_config: dict | None  # config.json as stored, when there is one
    tokenizer: Path | None  # tokenizer.json, when one lies beside the source
    shapes: dict[str, tuple[int, ...]]  # official name -> shape of every tensor the output is made of


def digest(root: Path, stored: TensorSource) -> str:
    """sha256 of what identifies the source cheaply: a folder's config and index files (or its safetensors
    headers when it has no index), a single file's header (safetensors JSON header, GGUF metadata and infos)."""
    h = hashlib.sha256()
    if root.is_file():
        if isinstance(stored, GGUFSource):
            length = int(stored.reader.data_offset)
        else:
            with open(root, "rb") as f:
                length = 8 + int.from_bytes(f.read(8), "little")
        with open(root, "rb") as f:
            h.update(f.read(length))
        return h.hexdigest()
    for p in sorted(root.glob("*.json")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    if not any(root.glob("*.safetensors.index.json")):
        for p in sorted(root.glob("*.safetensors")):
            with open(p, "rb") as f:
                h.update(f.read(8 + int.from_bytes(f.read(8), "little")))
    return h.hexdigest()


def read(source: TensorSource, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One official tensor as a float tensor of `shape`; a read error names the file."""
    try:
        t = load_tensor(source, name, torch.Size(shape))
    except OSError as e:
        raise CheckpointError(f"{source.where(name)}: tensor {name} cannot be read ({e})") from None
    return t  # check_readable let float types only through: never a packed QTensor


def read_plan(inp: SourceInput, tp: TensorPlan) -> torch.Tensor:
    parts = [read(inp.source, p, inp.shapes[p]) for p in tp.parts]
    t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]  # fused qkv: q, k, v rows in that order
    return t.reshape(tp.shape)


def write_gguf(path: Path, arch: str, plan: list[TensorPlan], metadata: Callable[[gguf.GGUFWriter], None],
               inp: SourceInput, bar: tqdm) -> None:
    """Stream `plan` into a GGUF file at `path`: all tensor infos first, then each tensor as it is quantized."""
    writer = gguf.GGUFWriter(path, arch)
    try:
        metadata(writer)
        for tp in plan:
            writer.add_tensor_info(tp.name, tp.byte_shape, gguf.np.dtype(gguf.np.uint8), tp.nbytes, raw_dtype=tp.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tp in plan:
            data = quantize(read_plan(inp, tp), tp.qtype, name=tp.name)
            writer.write_tensor_data(data)
            del data
            release_pages(inp.root)
            bar.update(tp.nbytes)
        writer.flush()
    finally:
        writer.close()


def provenance(writer: gguf.GGUFWriter, inp: SourceInput, recipe: str) -> None:
    import zimage_lite

    writer.add_string("zimage_lite.source_sha256", inp.digest)
    writer.add_string("zimage_lite.recipe", recipe)
    writer.add_string("zimage_lite.version", zimage_lite.__version__)


def write_file(out: Path, force: bool, plan: list[TensorPlan], write: Callable[[Path, tqdm], None]) -> Result:
    start = time.perf_counter()
    total = sum(t.nbytes for t in plan)
    with tqdm(total=total, desc=out.name, unit="B", unit_scale=True, disable=None) as bar:
        write_atomic(out, lambda tmp: write(tmp, bar), force, needed=total)
    fell = [t for t in plan if t.fell_back]
    return Result(out, out.stat().st_size, recipes.type_histogram(plan), time.perf_counter() - start,
                  dict(Counter((t.wanted.name, t.qtype.name) for t in fell)),
                  tuple(sorted({t.shape[-1] for t in fell})))
