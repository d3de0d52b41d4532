"""Block streaming: run a model whose blocks do not all fit where they compute.

A model's blocks (the DiT's 34, the text encoder's 35) are visited in execution order through a runner,
`runner(blocks) -> iterator of ready blocks`. The memory plan decides which blocks stay resident; the others:

- `CudaStreamer`: live in host memory, packed into one pinned buffer per block (still quantized, so a Q4_K block
  is 0.10 GB instead of 0.36 GB), and visit the GPU through two device slots. While block i computes on the
  current stream, block i+1 is copied into the other slot on a side stream; CUDA events order the two (the
  compute waits for its copy, a copy waits until the slot's previous block has finished computing). The plan is
  made once, so the same blocks are copied every step and a resident block is never copied again.
- `LazyBlocks` (CPU): stay unloaded (on the `meta` device) and are read from the memory-mapped checkpoint just
  before they run and dropped right after, so at most one streamed block is held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 64  # bytes; every tensor view inside a block buffer starts on this boundary


@dataclass(frozen=True)
class _Slot:
    owner: nn.Module
    leaf: str
    is_buffer: bool
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int


def _tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    out = []
    for module in block.modules():
        out += [(module, k, False, v) for k, v in module._parameters.items() if v is not None]
        out += [(module, k, True, v) for k, v in module._buffers.items() if v is not None]
    return out


def _assign(s: _Slot, buf: torch.Tensor) -> None:
    view = buf[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
    if s.is_buffer:
        s.owner._buffers[s.leaf] = view
    else:
        s.owner._parameters[s.leaf] = nn.Parameter(view, requires_grad=False)


def _pin(nbytes: int, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # pinning can fail when the OS limits locked memory: fall back to pageable memory
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


class CudaStreamer:
    """Resident blocks on the device; streamed blocks in pinned host buffers, through two device slots.

    Works on a CPU "device" too (copies are then synchronous), which is how its bookkeeping is tested without a GPU.
    """

    def __init__(self, blocks: Sequence[nn.Module], resident: Sequence[bool], device: torch.device,
                 pin: bool = True) -> None:
        self.device = device
        self.order = list(blocks)
        self._stopped = False
        self.cuda = device.type == "cuda"
        self.layout: dict[int, list[_Slot]] = {}
        self.host: dict[int, torch.Tensor] = {}
        for block, keep in zip(blocks, resident, strict=True):
            if keep:
                block.to(device)
                continue
            slots, size = [], 0
            for owner, leaf, is_buffer, t in _tensors(block):
                nbytes = t.numel() * t.element_size()
                slots.append(_Slot(owner, leaf, is_buffer, t.dtype, t.shape, size, nbytes))
                size += -(-nbytes // ALIGN) * ALIGN
            host = _pin(size, pin and self.cuda)
            for s, (_, _, _, t) in zip(slots, _tensors(block), strict=True):
                host[s.offset:s.offset + s.nbytes].copy_(t.detach().reshape(-1).view(torch.uint8))
                _assign(s, host)  # the block now points into the pinned buffer; the old copy is freed
            self.layout[id(block)], self.host[id(block)] = slots, host
        slot_bytes = max((h.numel() for h in self.host.values()), default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(2 if slot_bytes else 0)]
        if self.cuda and self.slots:
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event(), torch.cuda.Event()]
            self.freed = [torch.cuda.Event(), torch.cuda.Event()]

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per pass over the blocks."""
        return sum(h.numel() for h in self.host.values())

    def _prefetch(self, block: nn.Module, slot: int) -> None:
        host, dst = self.host[id(block)], self.slots[slot]
        if not self.cuda:
            dst[:host.numel()].copy_(host)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])  # the slot's previous block has finished computing
            dst[:host.numel()].copy_(host, non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def stop(self) -> None:
        self._stopped = True

    @contextmanager
    def run(self) -> Iterator[Iterator[nn.Module]]:
        self._stopped = False
        yield self._iterate()

    def _iterate(self) -> Iterator[nn.Module]:
        order = self.order
        streamed = [b for b in order if id(b) in self.host]
        if streamed:
            self._prefetch(streamed[0], 0)
        k = 0
        for block in order:
            if self._stopped:
                return
            if id(block) not in self.host:
                yield block
                continue
            slot = k % 2
            if k + 1 < len(streamed):
                self._prefetch(streamed[k + 1], 1 - slot)  # overlaps with this block's compute
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
            for s in self.layout[id(block)]:
                _assign(s, self.slots[slot])
            yield block
            if self.cuda:
                self.freed[slot].record(torch.cuda.current_stream(self.device))
            for s in self.layout[id(block)]:
                _assign(s, self.host[id(block)])
            k += 1


class LazyBlocks:
    """CPU streaming: streamed blocks are materialised from the checkpoint just before use and dropped after."""

    def __init__(self, blocks: Sequence[nn.Module], resident: Sequence[bool],
                 materialize: Callable[[nn.Module], None]) -> None:
        self.order = list(blocks)
        self.streamed = {id(b) for b, keep in zip(blocks, resident, strict=True) if not keep}
        self.materialize = materialize
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    @contextmanager
    def run(self) -> Iterator[Iterator[nn.Module]]:
        self._stopped = False
        yield self._iterate()

    def _iterate(self) -> Iterator[nn.Module]:
        for block in self.order:
            if self._stopped:
                return
            if id(block) not in self.streamed:
                yield block
                continue
            self.materialize(block)
            yield block
            block.to("meta")  # drop the weights: the next streamed block reuses the memory
