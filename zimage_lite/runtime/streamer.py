"""Block streaming: run a model whose blocks do not all fit where they compute.

A model's blocks (the DiT's 34, the text encoder's 35) are visited in schedule order through a runner
(`models.layers.Runner`: `with runner.run() as blocks: for block in blocks: ...`). The memory plan decides which
blocks stay resident; the others:

- `Streamer` (a GPU, written against `devices.Device`): live in host memory, still packed (a Q4_K block is 0.10 GB
  instead of 0.36 GB), in large pinned chunks as `memory.pinned_layout` places them, and visit the device through
  two device slots. While block i computes, block i+1 is copied into the other slot on the copy stream; events order
  the two (the compute waits for its copy; a copy waits until the compute has finished with its slot's previous
  block). The plan is made once, so the same blocks are copied every pass and a resident block never moves.
- `LazyBlocks` (the CPU): stay unloaded (on `meta`) and are read from the memory-mapped checkpoint just before they
  run and dropped right after, so at most one streamed block is held at a time.

Both restore every block in a `finally` when a pass ends, whether it ran to the end, raised, was left by `break`,
or was cut short by `stop()`; and the streamer leaves no copy in flight.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.layers import Resident
from .devices import Device
from .memory import FileViews, aligned, own_mappings, pinned_layout
from .residency import STREAM_SLOTS
from .units import format_size

N_SLOTS = STREAM_SLOTS["cuda"]  # copy block i+1 while block i computes


class PageableMemoryWarning(UserWarning):
    """Pinning host memory failed; streamed blocks use pageable memory (slower copies that do not overlap)."""


@dataclass(frozen=True)
class _Tensor:
    """Where one parameter or buffer of a streamed block lives inside the block's bytes."""

    owner: nn.Module
    leaf: str
    is_buffer: bool
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int

    def point_into(self, buf: torch.Tensor) -> None:
        """Make the tensor a view of `buf` (the block's host bytes or a device slot) at its offset."""
        view = buf[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)
        if self.is_buffer:
            self.owner._buffers[self.leaf] = view
        else:
            self.owner._parameters[self.leaf] = nn.Parameter(view, requires_grad=False)

    def drop(self) -> None:
        """Leave only the tensor's shape behind (on `meta`), so nothing references the host bytes any more."""
        empty = torch.empty(self.shape, dtype=self.dtype, device="meta")
        if self.is_buffer:
            self.owner._buffers[self.leaf] = empty
        else:
            self.owner._parameters[self.leaf] = nn.Parameter(empty, requires_grad=False)


def _layout(block: nn.Module) -> tuple[list[_Tensor], int]:
    """Every parameter and buffer of `block` (packed weights, their scales, norms, biases) at ALIGN-ed offsets, and
    the block's bytes."""
    out, size = [], 0
    for module in block.modules():
        for is_buffer, tensors in ((False, module._parameters), (True, module._buffers)):
            for leaf, t in tensors.items():
                if t is not None:
                    nbytes = t.numel() * t.element_size()
                    out.append(_Tensor(module, leaf, is_buffer, t.dtype, t.shape, size, nbytes))
                    size += aligned(nbytes)
    return out, size


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class Streamer:
    """Resident blocks on the device; streamed blocks in pinned host chunks, through two device slots.

    `blocks` in schedule order; `streamed[i]` says whether block i streams. Resident blocks must already be on the
    device. Each streamed block is filled on the host by `load(block, views)` when given (one block at a time,
    straight from the source; `views`: the file maps read once for the placement, memory.FileViews), then copied into
    its place in the pinned chunks; from then on it points there between passes.
    """

    def __init__(self, blocks: Sequence[nn.Module], streamed: Sequence[bool], device: Device,
                 load: Callable[[nn.Module, FileViews | None], None] | None = None) -> None:
        self.device = device
        self.order = list(blocks)
        self.layout: dict[int, list[_Tensor]] = {}
        self.host: dict[int, torch.Tensor] = {}  # block -> its bytes: a view of one pinned chunk
        self.chunks: list[torch.Tensor] = []
        self.pageable_bytes = 0  # host bytes that could not be pinned (see PageableMemoryWarning)
        self._stopped = self._running = self._closed = False
        sizes: list[int] = []
        # for this placement only: a block loaded as views of its file's map hands those pages back once packed
        self._views = FileViews() if any(streamed) else None
        self._count = sum(bool(x) for x in streamed)  # pinned_layout sizes the chunks for this many blocks
        try:
            for block, stream in zip(self.order, streamed, strict=True):
                if stream:
                    if load is not None:
                        load(block, self._views)
                    self._pack(block, sizes)
        finally:
            self._views = None
        if self.pageable_bytes:
            warnings.warn(PageableMemoryWarning(
                f"could not pin {format_size(self.pageable_bytes)} of host memory for streamed blocks; using pageable "
                "memory instead: each copy to the GPU goes through a staging buffer at about half the speed and holds "
                "the CPU until it is done, so copies hide less behind compute. Raise the locked-memory limit "
                "(`ulimit -l unlimited`, memlock in /etc/security/limits.conf, or docker --ulimit memlock=-1) or "
                "free host memory."), stacklevel=2)
        largest = max((h.numel() for h in self.host.values()), default=0)
        self.slots = [device.device_buffer(largest) for _ in range(N_SLOTS if largest else 0)]
        self.copied = [device.event() for _ in self.slots]  # recorded on the copy stream after each fill
        self.freed = [device.event() for _ in self.slots]  # recorded on the compute stream after each use
        self._filling = [False for _ in self.slots]  # a copy issued that the compute stream has not waited for

    # ---- packing: the host side ---------------------------------------------------------------------------------
    def _pack(self, block: nn.Module, sizes: list[int]) -> None:
        """Copy a loaded block into its place in the chunks (opening a chunk when pinned_layout does); the block
        then points there and the memory it was loaded into is freed, or handed back to its file's map."""
        layout, size = _layout(block)
        sizes.append(size)
        places, chunk_bytes = pinned_layout(sizes, self._count)
        for nbytes in chunk_bytes[len(self.chunks):]:
            self.chunks.append(self._host_chunk(nbytes))
        chunk, offset = places[-1]
        host = self.chunks[chunk][offset:offset + size]
        for t in layout:
            loaded = getattr(t.owner, t.leaf)
            host[t.offset:t.offset + t.nbytes].copy_(_bytes_of(loaded))
            t.point_into(host)
            if self._views is not None:
                self._views.release(loaded)
        self.layout[id(block)], self.host[id(block)] = layout, host

    def _host_chunk(self, nbytes: int) -> torch.Tensor:
        pin = self.device.pins and not self.pageable_bytes  # once pinning failed, do not retry for every chunk
        if pin:
            try:
                return self.device.host_buffer(nbytes, pin=True)
            except RuntimeError:
                pass
        if self.device.pins:
            self.pageable_bytes += nbytes
        return self.device.host_buffer(nbytes, pin=False)

    # ---- figures the placement checks against the plan ----------------------------------------------------------
    @property
    def slot_bytes(self) -> int:
        """Device bytes of all slots together."""
        return sum(s.numel() for s in self.slots)

    @property
    def transfer_bytes(self) -> int:
        """Bytes copied to the device per pass over the blocks."""
        return sum(h.numel() for h in self.host.values())

    @property
    def host_bytes(self) -> int:
        """Host bytes of the chunks (pinned unless `pageable_bytes`)."""
        return sum(c.numel() for c in self.chunks)

    # ---- a pass ---------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """End the current pass after the block that is computing: the rest are skipped."""
        self._stopped = True

    @contextmanager
    def run(self) -> Iterator[Iterator[nn.Module]]:
        if self._closed:
            raise RuntimeError("this streamer was closed at the end of its stage; place the model again")
        if self._running:
            raise RuntimeError("a pass over the blocks is already running")
        self._stopped, self._running = False, True
        blocks = self._iterate()
        try:
            yield blocks
        finally:
            blocks.close()  # runs the pass's own finally: the current block back to the host, copies drained
            self._running = False

    def _iterate(self) -> Iterator[nn.Module]:
        streamed = [b for b in self.order if id(b) in self.host]
        k = 0
        try:
            if streamed:
                self._prefetch(streamed[0], 0)
            for block in self.order:
                if self._stopped:
                    return
                if id(block) not in self.host:
                    yield block
                    continue
                slot = k % N_SLOTS
                if k + 1 < len(streamed):
                    self._prefetch(streamed[k + 1], 1 - slot)  # overlaps with this block's compute
                self._acquire(block, slot)
                try:
                    yield block
                finally:
                    self._release(block, slot)
                k += 1
        finally:
            self._drain()

    def _prefetch(self, block: nn.Module, slot: int) -> None:
        host = self.host[id(block)]
        self.device.wait(self.freed[slot], "copy")  # the slot's previous block has finished computing
        self.device.copy(self.slots[slot][:host.numel()], host)
        self.device.record(self.copied[slot], "copy")
        self._filling[slot] = True

    def _acquire(self, block: nn.Module, slot: int) -> None:
        self.device.wait(self.copied[slot], "compute")  # the block's bytes have landed
        self._filling[slot] = False
        self.device.compute_on(self.slots[slot])
        for t in self.layout[id(block)]:
            t.point_into(self.slots[slot])

    def _release(self, block: nn.Module, slot: int) -> None:
        for t in self.layout[id(block)]:
            t.point_into(self.host[id(block)])
        self.device.compute_done(self.slots[slot])
        self.device.record(self.freed[slot], "compute")

    def _drain(self) -> None:
        """A pass that ended early may leave a prefetch in flight: the compute stream waits for it (no host sync),
        and hands the slot back."""
        for slot, filling in enumerate(self._filling):
            if filling:
                self.device.wait(self.copied[slot], "compute")
                self.device.record(self.freed[slot], "compute")
                self._filling[slot] = False

    # ---- the end of a stage -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the pinned chunks and the slots: streamed blocks are left on `meta`. The streamer cannot run again."""
        if self._running:
            raise RuntimeError("close() during a pass: leave the `with runner.run()` first")
        self.device.synchronize()
        for layout in self.layout.values():
            for t in layout:
                t.drop()
        self.host.clear()
        self.chunks.clear()
        self.slots.clear()
        self.copied.clear()
        self.freed.clear()
        self._closed = True
        self.device.release_host_cache()


class LazyBlocks(Resident):
    """CPU streaming: streamed blocks are materialised from the checkpoint just before use and dropped after, with
    the file's pages they viewed (memory.FileViews): the map outlives the block, and each block read through it
    would otherwise stay resident until the stage ends (the full-size Q4_K_M DiT at 256x256 under --ram 3GB, 32 of
    34 blocks streamed: 7.32-7.56 GiB RSS against a 2.32 GiB plan)."""

    def __init__(self, blocks: Sequence[nn.Module], streamed: Sequence[bool],
                 materialize: Callable[[nn.Module, FileViews], None]) -> None:
        super().__init__(blocks)
        self.streamed = {id(b) for b, s in zip(blocks, streamed, strict=True) if s}
        self.materialize = materialize

    def _iterate(self) -> Iterator[nn.Module]:
        for block in self.modules:
            if self._stopped:
                return
            if id(block) not in self.streamed:
                yield block
                continue
            views = FileViews()  # the maps read once for the block: its load and its drop
            try:
                with own_mappings():  # its cast copies go with it, not into the forward's heap (oneDNN's copies of
                    # int8 weights are made at their first call, in the heap: alike from block to block, reused)
                    self.materialize(block, views)
                yield block
            finally:
                for t in (*block.parameters(), *block.buffers()):
                    views.release(t)
                block.to("meta")  # drop the weights: the next streamed block reuses the memory

    def close(self) -> None:
        """Nothing is held between passes."""
