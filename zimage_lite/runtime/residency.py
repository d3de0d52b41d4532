"""Which blocks of a stage stay resident and which stream, under a budget: the arithmetic of a block stage.

A block stage (the text encoder's layers, the DiT's blocks) holds its non-block weights, its resident blocks, the
streaming slots (the largest streamed block, once per slot), a dequantize scratch and its activations. Attention is
settled first (SDPA unless its scores cannot fit, then query chunks of halving size), then as many blocks as fit stay
resident, largest first. With `keep_loaded` a stage also runs beside the other components' weights (`Beside`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .memory import pinned_layout
from .units import format_size

STREAM_SLOTS = {"cuda": 2, "cpu": 1}  # cuda: copy the next block while one computes; cpu: one block read at a time
MIN_ATTENTION_CHUNK = 64  # query rows per chunk below which chunked attention stops paying its loop overhead


class NoFit(Exception):
    """A stage that cannot fit even at its smallest setting; `parts` is its smallest need, itemised."""

    def __init__(self, stage: str, parts: str):
        super().__init__(stage)
        self.stage, self.parts = stage, parts


@dataclass(frozen=True)
class BlockCost:
    name: str
    device: int  # bytes while held resident on the device (a GPU's slot or pinned chunk too: `in_slot`)
    moved: int  # bytes copied (cuda) or read from the memory map (cpu) each time it streams
    slot: int = 0  # bytes while held streamed, when more than `device` (sizes.BlockBytes.streaming)

    @property
    def in_slot(self) -> int:
        return max(self.device, self.slot)


@dataclass(frozen=True)
class BlockStage:
    """A block stage's needs, whatever the budget."""

    name: str
    blocks: list[BlockCost]  # schedule order
    weights: int  # non-block bytes on the device
    scratch: int  # dequantize scratch
    activations: int  # without attention scores
    scores: Callable[[int | None], int]  # attention scores for a query chunk (None: unchunked)
    seq: int  # attention sequence length


@dataclass(frozen=True)
class Beside:
    """keep_loaded: what the other components hold while a stage runs (nothing without keep_loaded)."""

    kept: int = 0  # their weights, resident blocks and slots, on the device
    transient: int = 0  # the largest transient of the other stages, which must fit beside this stage's weights


ALONE = Beside()  # a stage with nothing else loaded


@dataclass(frozen=True)
class Residency:
    """The settings chosen for a block stage under a budget."""

    resident: tuple[str, ...]  # schedule order
    streamed: tuple[str, ...]
    resident_bytes: int
    slot_bytes: int
    n_slots: int  # 0 when nothing streams
    chunk: int | None  # attention query chunk, None for SDPA
    activation_bytes: int  # with the attention scores
    transfer_bytes: int  # streamed bytes per run of the blocks
    pinned_bytes: int  # cuda: the pinned host chunks holding the streamed blocks (memory.pinned_layout)


def order_for_residency(blocks: list[BlockCost], k: int) -> tuple[set[str], list[BlockCost]]:
    """The k blocks to keep: the largest (small slots, least traffic); among equal blocks the streamed ones are spread
    evenly, so each copy hides behind the compute of the resident blocks before it."""
    by_size = sorted(blocks, key=lambda b: -b.device)
    keep = {b.name for b in by_size[:k]}
    if 0 < k < len(blocks):
        edge = by_size[k - 1].device  # the size group cut by the boundary
        group = [b for b in blocks if b.device == edge]
        n_stream = sum(1 for b in group if b.name not in keep)
        keep -= {b.name for b in group}
        spread = {int((i + 0.5) * len(group) / n_stream) for i in range(n_stream)}
        keep |= {b.name for i, b in enumerate(group) if i not in spread}
    return keep, [b for b in blocks if b.name not in keep]


def _options(st: BlockStage, n_slots: int) -> list[tuple[set[str], int, int]]:
    """(kept names, resident bytes, slot bytes) for k = 0..n resident blocks."""
    options = []
    for k in range(len(st.blocks) + 1):
        keep, streamed = order_for_residency(st.blocks, k)
        slots = n_slots * max((b.in_slot for b in streamed), default=0)
        options.append((keep, sum(b.device for b in st.blocks if b.name in keep), slots))
    return options


def _chunks(st: BlockStage) -> list[int | None]:
    """Attention settings, largest first: SDPA, then query chunks of halving size while the scores still count."""
    return [None] + [c for c in (2**p for p in range(20, 5, -1))
                     if MIN_ATTENTION_CHUNK <= c < st.seq and st.scores(c)]


def floor(st: BlockStage, kind: str) -> tuple[int, int]:
    """(least bytes the component keeps loaded, least transient of its stage): what it needs beside the others."""
    kept = st.weights + min(o[1] + o[2] for o in _options(st, STREAM_SLOTS[kind]))
    return kept, st.scratch + st.activations + st.scores(_chunks(st)[-1])


def place(st: BlockStage, kind: str, budget: int, beside: Beside = ALONE) -> Residency:
    """The stage's settings under `budget` on a `kind` device; NoFit with its smallest need when none fits."""
    n_slots = STREAM_SLOTS[kind]
    options = _options(st, n_slots)
    # Not always k = 0: one large block kept resident can need less than two slots of its size.
    best = min(options, key=lambda o: o[1] + o[2])
    least = best[1] + best[2]
    for chunk in _chunks(st):
        transient = st.scratch + st.activations + st.scores(chunk)
        fixed = st.weights + beside.kept + max(transient, beside.transient)
        if fixed + least <= budget:
            break
    else:
        slot_words = "two streaming slots" if n_slots == 2 else "one streamed block"
        parts = [f"{len(best[0])} resident blocks {format_size(best[1])}" if best[0] else "",
                 f"{slot_words} {format_size(best[2])}" if best[2] else "",
                 f"activations {format_size(st.activations + st.scores(chunk))}"
                 + (f" with attention in chunks of {chunk}" if chunk else ""),
                 f"non-block weights {format_size(st.weights)}" if st.weights else "",
                 f"dequantize scratch {format_size(st.scratch)}" if st.scratch else "",
                 f"other components kept loaded {format_size(beside.kept)}" if beside.kept else ""]
        raise NoFit(st.name, " + ".join(p for p in parts if p))
    # The most resident blocks that fit; with the attention settled, more budget never keeps fewer.
    keep, resident, slots = next(o for o in reversed(options) if fixed + o[1] + o[2] <= budget)
    streamed = [b for b in st.blocks if b.name not in keep]
    # cuda: the streamed blocks live in pinned host chunks, packed in schedule order as placement packs them
    pinned = sum(pinned_layout([b.device for b in streamed])[1]) if kind == "cuda" else 0
    return Residency(
        resident=tuple(b.name for b in st.blocks if b.name in keep), streamed=tuple(b.name for b in streamed),
        resident_bytes=resident, slot_bytes=slots, n_slots=n_slots if slots else 0, chunk=chunk,
        activation_bytes=st.activations + st.scores(chunk), transfer_bytes=sum(b.moved for b in streamed),
        pinned_bytes=pinned)
