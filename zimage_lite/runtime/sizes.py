"""Bytes of weights, tensor by tensor: what a file stores and what the runtime holds of it, block by block.

A tensor table (official name -> (shape, stored type)) says what a file really has: read from its weight source
(`source_table`), or, to plan a preset without files, what the quantize tool would write (`recipe_table`, by the
per-tensor rules of quant/recipes.py). The blocks are the model's own schedule (`ZImageDiT.schedule()`,
`Qwen3Encoder.schedule()`, built on the meta device), so nothing here names a block; the other tensors are the
model's state dict minus the blocks'.

What the runtime holds of a tensor follows weights/load.py: a quantized Linear weight (or GGML-quantized embedding
table) stays packed and is dequantized just before its matmul; a host-only float tensor (model.HOST_ONLY) stays as
stored; every other tensor (float weights, norms, biases, quantized norms) is cast to the compute dtype as it loads.
Inside a buffer each tensor starts on memory.ALIGN.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import gguf

from ..config import DiTConfig, TextEncoderConfig, VAEConfig
from ..errors import CheckpointError, OptionError
from ..quant.convrot import INT8_ROWS_NAMES, Int8Rows
from ..quant.formats import FLOAT_TYPES
from ..quant.recipes import (
    INT8_TARGETS,
    TARGETS,
    Target,
    dit_plan,
    dit_shapes,
    file_type_name,
    int8_quantized,
    te_plan,
    te_shapes,
)
from .memory import RELEASES_FILE_PAGES, aligned

TensorTable = Mapping[str, tuple[tuple[int, ...], str]]  # official name -> (torch shape, stored type name)
ComponentConfig = DiTConfig | TextEncoderConfig

FLOATS = frozenset(t.name for t in FLOAT_TYPES)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_TYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # the stored type that needs no cast
BNB = frozenset({"int8", "nf4"})  # bitsandbytes LLM.int8 (fp32 scale per row) and NF4 (fp32 absmax per 64)
_BNB_TYPES = BNB | {"fp4"}  # what a bitsandbytes source reports; fp4 has nf4's layout
# int8 with an fp32 scale per row: bitsandbytes LLM.int8 and ComfyUI's int8_tensorwise (convrot.py), as sources
# report them, and the int8 --type names a plan may be asked for
ROW_INT8 = frozenset({"int8"}) | INT8_ROWS_NAMES | frozenset(INT8_TARGETS)
_UNPACKED_TABLES = _BNB_TYPES | ROW_INT8  # embeddings in these are dequantized at load (no row lookup kernel)
NF4_BLOCK = 64
# Types that only exist inside ggml's dot products or are integers, never a weight format.
_NOT_WEIGHTS = frozenset({"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"})
# The alternatives a BudgetError proposes, largest first.
QUANT_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def normalize_format(name: str, option: str) -> str:
    """The canonical spelling of a weight format (`q4_k_m` -> `Q4_K_M`), or OptionError naming `option`."""
    if name.lower() in BNB or name.lower() in INT8_TARGETS:
        return name.lower()
    upper = name.upper()
    if upper in TARGETS or (upper in gguf.GGMLQuantizationType.__members__ and upper not in _NOT_WEIGHTS):
        return upper
    raise OptionError(f"{option} {name!r} is not a weight format: use BF16, F16, F32, Q8_0, Q6_K, Q5_K_M, Q5_0, "
                      "Q4_K_M, Q4_K_S, Q4_0, Q3_K_M, Q2_K (another GGML type), int8, nf4, int8-convrot, int8-rowwise")


def stored_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of a tensor of torch `shape` stored as `fmt` (GGML blocks run along the last axis, ggml-common.h;
    bitsandbytes int8 adds an fp32 scale per row, nf4/fp4 an fp32 absmax per 64 weights)."""
    n = math.prod(shape)
    if fmt in ROW_INT8:
        return n + shape[0] * 4
    if fmt in _BNB_TYPES:
        return n // 2 + -(-n // NF4_BLOCK) * 4
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
    except KeyError:
        raise CheckpointError(f"stored type {fmt!r} is not a weight type zimage-lite can size") from None
    return n // block * type_size


def packed_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes a packed weight holds once placed, each of its buffers aligned (quant/qlinear.py QLinear): the packed
    bytes, and for bitsandbytes its scales as separate buffers (int8: an fp32 scale per row; nf4/fp4: an fp32
    absmax per 64 weights and the 16-entry fp32 code table, as our quantize tool and diffusers write them without
    double quantization)."""
    n = math.prod(shape)
    if fmt in ROW_INT8:
        return aligned(n) + aligned(shape[0] * 4)
    if fmt in _BNB_TYPES:
        return aligned(-(-n // 2)) + aligned(-(-n // NF4_BLOCK) * 4) + aligned(16 * 4)
    return aligned(stored_bytes(shape, fmt))


# ---- what a component is made of, from its model built on meta --------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """A component's tensors as its model (built on meta) has them."""

    blocks: tuple[tuple[str, tuple[str, ...]], ...]  # (block name, its tensors), the schedule's execution order
    shapes: Mapping[str, tuple[int, ...]]  # every tensor of the state dict
    linears: frozenset[str]  # nn.Linear weights: kept packed when quantized
    embeddings: frozenset[str]  # nn.Embedding weights: kept packed when GGML-quantized (rows are looked up)
    host_only: frozenset[str]  # tensors kept on the host on every device (model.HOST_ONLY modules)
    block_tensors: frozenset[str]  # the blocks' tensors together


@functools.lru_cache(maxsize=16)
def layout(cfg: ComponentConfig, lm: bool = False) -> Layout:
    """The layout of the DiT or text encoder of `cfg`: its schedule and state dict, read from the model itself.
    `lm`: the text encoder as the prompt enhancer's causal LM (every layer and the final norm)."""
    import torch
    from torch import nn

    from ..components import REGISTRY

    cls = next(c.model for c in REGISTRY.values() if isinstance(cfg, c.config))
    with torch.device("meta"):
        model = cls(cfg, lm=True) if lm else cls(cfg)
    modules = dict(model.named_modules())
    host = tuple(f"{m}." for m in getattr(model, "HOST_ONLY", ()))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    return Layout(
        blocks=tuple((b.name, b.tensors) for b in model.schedule()),
        shapes=MappingProxyType(shapes),
        linears=frozenset(f"{n}.weight" for n, m in modules.items() if isinstance(m, nn.Linear)),
        embeddings=frozenset(f"{n}.weight" for n, m in modules.items() if isinstance(m, nn.Embedding)),
        host_only=frozenset(n for n in shapes if n.startswith(host)),
        block_tensors=frozenset(t for b in model.schedule() for t in b.tensors))


# ---- tensor tables ----------------------------------------------------------------------------------------------

def source_table(source) -> dict[str, tuple[tuple[int, ...], str]]:
    """The typed table of a weight source (a TensorSource under official names): shape and stored type per tensor,
    read from the headers alone."""
    return {n: (tuple(source.shape(n)), source.qtype(n)) for n in source.names()}


@functools.lru_cache(maxsize=64)
def recipe_table(cfg: ComponentConfig, fmt: str) -> TensorTable:
    """The table of a `fmt` file of `cfg` as `zimage-lite quantize` writes it, under official names. GGUF formats
    follow quant/recipes.py (a plain GGML type is the base type of every quantized tensor); bitsandbytes formats
    quantize every block Linear and keep the rest BF16 (the text encoder is never bitsandbytes: BF16)."""
    target = TARGETS.get(fmt) if fmt not in BNB and fmt not in INT8_TARGETS else TARGETS["BF16"]
    target = target or Target(fmt, gguf.GGMLQuantizationType[fmt], None)
    if isinstance(cfg, DiTConfig):
        shapes = dit_shapes(cfg)
        plan = dit_plan(shapes, target)
    else:
        shapes = te_shapes(cfg)
        plan = te_plan(shapes, target, cfg)
    table = {part: (shapes[part], t.qtype.name) for t in plan for part in t.parts}
    if fmt in BNB and isinstance(cfg, DiTConfig):
        quantized = layout(cfg).linears & layout(cfg).block_tensors
        table = {n: (shape, fmt if n in quantized else "BF16") for n, (shape, _) in table.items()}
    if fmt in INT8_TARGETS:  # quant/recipes.py int8_quantized; the rest as the int8 writer keeps it (F32 / BF16)
        name = (Int8Rows(256) if fmt == "int8-convrot" else Int8Rows(0)).name
        keep = "F32" if isinstance(cfg, DiTConfig) else "BF16"
        table = {n: (shape, name if int8_quantized(n, shape) else keep if len(shape) == 2 else "F32")
                 for n, (shape, _) in table.items()}
    return MappingProxyType(table)


def recipe_label(cfg: ComponentConfig, table: TensorTable, file_type: int | None = None) -> str:
    """What a file is, in one word: the recipe its GGUF `general.file_type` names (Q4_K_M, Q8_0, ...) when it has
    one, else the type most of its block Linear weights are stored in (Q4_K, BF16, int8, nf4)."""
    named = file_type_name(file_type) if file_type is not None else None
    if named:
        return named
    lay = layout(cfg)
    weights: Counter[str] = Counter()
    for name in sorted(lay.linears & lay.block_tensors):
        if name in table:
            shape, fmt = table[name]
            weights[fmt] += math.prod(shape)
    return weights.most_common(1)[0][0] if weights else "F32"


def bits_per_weight(cfg: ComponentConfig, table: TensorTable) -> float:
    """Stored bits per weight over the blocks: the order of formats by size (a smaller format has fewer)."""
    names = layout(cfg).block_tensors
    return sum(stored_bytes(*table[n]) for n in names) * 8 / sum(math.prod(table[n][0]) for n in names)


@functools.lru_cache(maxsize=64)
def format_rank(fmt: str, cfg: DiTConfig | None = None) -> float:
    """Bits per weight of the DiT blocks of `cfg` (full size by default) in `fmt`."""
    cfg = cfg or DiTConfig()
    return bits_per_weight(cfg, recipe_table(cfg, fmt))


# ---- what the runtime holds -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockBytes:
    name: str
    held: int  # while placed resident (on the device, or as a GPU's slot or pinned chunk): packed or cast, aligned
    stored: int  # as the file stores it: what a streamed block reads from the memory map on the CPU
    adapters: int = 0  # its LoRA side paths (in the compute dtype, each tensor aligned), not in `held`
    streaming: int = 0  # while placed as a streamed block, when more than `held` (the CPU: int8 weights' file pages
    # beside oneDNN's copies, which only a resident block hands back)


@dataclass(frozen=True)
class ComponentBytes:
    """A component's weights as the planner counts them, for one compute dtype."""

    blocks: tuple[BlockBytes, ...]  # schedule order
    other: int  # non-block tensors placed with the model (on the device), each aligned
    host_only: int  # host-only tensors' copies: none for floats and packed tables, which stay views of the file
    # (only the rows looked up are ever read); a quantized table that cannot stay packed is dequantized
    largest_packed: int  # weights of the largest packed Linear: what one dequantization writes
    largest_read: int  # the largest tensor as read from the file plus its cast copy: placement's host staging
    adapters: int = 0  # every LoRA side path, in blocks or not (loras.py holds them all in host memory)


def component_bytes(cfg: ComponentConfig, table: TensorTable, dtype: str, what: str,
                    adapters: TensorTable | None = None, lm: bool = False, kind: str = "cpu",
                    converted: bool = False) -> ComponentBytes:
    """What the runtime holds of component `cfg` stored as `table`, computing in `dtype` on a `kind` device; `what`
    names the file or component in the error for a tensor the table lacks. `adapters`: the LoRA side paths' tensors
    (loras.py `Loras.table`), each counted with the block whose name it starts with. `lm`: the prompt enhancer's text
    encoder. On the CPU, int8-row weights run by oneDNN hold its blocked copy (quant/qlinear.py): a resident weight
    that views the file hands the file's pages back once copied (`prepare_resident`), one `converted` at load
    (--int8-compute: the table's int8 types are not the file's) is a copy of its own and stays beside it."""
    lay, elem, plain = layout(cfg, lm), DTYPE_BYTES[dtype], DTYPE_TYPES[dtype]
    prepacked = kind == "cpu" and any(fmt in INT8_ROWS_NAMES for _, fmt in table.values()) and _onednn_on_cpu()
    released = RELEASES_FILE_PAGES and not converted
    missing = [n for n in lay.shapes if n not in table]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{what} has no tensor {', '.join(missing[:3])}{more}: the model needs every tensor "
                              "of its blocks and layers; use a complete file of this model")

    def packed(name: str) -> bool:
        fmt = table[name][1]
        return fmt not in FLOATS and (name in lay.linears or (name in lay.embeddings and fmt not in _UNPACKED_TABLES))

    def held(name: str, resident: bool = True) -> int:
        shape, fmt = table[name]
        if packed(name):
            if prepacked and fmt in INT8_ROWS_NAMES:  # oneDNN's copy, and the row scales
                rows = aligned(shape[0] * 4) if resident and released else packed_bytes(shape, fmt)
                return aligned(math.prod(shape)) + rows
            return packed_bytes(shape, fmt)
        return aligned(math.prod(lay.shapes[name]) * elem)

    side = {n: aligned(math.prod(shape) * elem) for n, (shape, _) in (adapters or {}).items()}
    blocks = tuple(BlockBytes(name, sum(held(t) for t in tensors), sum(stored_bytes(*table[t]) for t in tensors),
                              sum(b for n, b in side.items() if n.startswith(name + ".")),
                              sum(held(t, resident=False) for t in tensors))
                   for name, tensors in lay.blocks)
    rest = [n for n in lay.shapes if n not in lay.block_tensors]
    # a host-only float tensor stays as stored, a view of the file (weights/load.py); a quantized one that cannot stay
    # packed is dequantized into a copy
    host_copy = [n for n in rest if n in lay.host_only and not packed(n) and table[n][1] not in FLOATS]
    # placement reads one tensor at a time through the host: its pages of the memory map and, when it is cast, the
    # copy (host-only tensors are not staged: they stay where they are)
    reads = [stored_bytes(*table[n]) + (0 if packed(n) or table[n][1] == plain else held(n))
             for n in lay.shapes if n not in lay.host_only]
    return ComponentBytes(
        blocks=blocks,
        other=sum(held(n) for n in rest if n not in lay.host_only),
        host_only=sum(held(n) for n in host_copy),
        largest_packed=max((math.prod(lay.shapes[n]) for n in lay.linears if packed(n)), default=0),
        largest_read=max(reads, default=0), adapters=sum(side.values()))


def _onednn_on_cpu() -> bool:
    """Whether int8-row weights take the oneDNN route on this CPU (its choice is made once per machine)."""
    from ..quant.int8_compute import route_for

    return route_for("cpu") == "onednn"


def vae_largest_weight(c: VAEConfig) -> int:
    """Weights of the VAE decoder's largest tensor: a 3x3 convolution at its widest level."""
    return max(c.block_out_channels) ** 2 * 9


def kv_cache_bytes(c: TextEncoderConfig, tokens: int, elem: int) -> int:
    """What models.qwen3.KVCache allocates for `tokens` positions of every layer, `elem` bytes per value."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * tokens * c.head_dim * elem
