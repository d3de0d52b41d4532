"""Where streamed blocks compute, and how their bytes get there: the device interface the streamer is written against.

A `Device` offers host buffers (pinned where the device can copy from them asynchronously), device buffers, a copy
on a side stream, and events to order that stream against the compute stream (`record` an event on one stream,
`wait` for it on the other). Three implementations:

- `CudaDevice`: a side CUDA stream and CUDA events; host buffers pinned by torch's host allocator.
- `CpuDevice`: everything synchronous, nothing pinned (the streamer's bookkeeping on a machine without a GPU).
- `SimulatedDevice`: for tests. It runs on the CPU but is as late as a GPU may be: a copy happens only when the
  compute stream waits for an event recorded after it, and its destination reads as poison (0xFF bytes: NaN in
  every float dtype, NaN scales in every GGML block) from the copy's issue until then. It also checks each device
  buffer's life, free -> filling -> ready -> in use -> done -> free, and raises `SlotStateError` on a copy into a
  buffer that is not free (a prefetch into a slot still in use) or a compute on one that is not ready. So a
  streamer that forgets a wait fails on the CPU, every time.

`compute_on` / `compute_done` bracket the compute stream's use of a device buffer. CUDA has nothing to do there
(the events carry the ordering); they tell the simulator when "in use" begins and ends.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Stream = Literal["copy", "compute"]


class Device:
    """The operations the streamer needs; see the module docstring. Subclasses override all of them."""

    torch_device: torch.device
    pins = False  # whether host buffers are pinned (page-locked) for asynchronous copies

    def host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        """A uint8 host buffer; pinned when `pin` and the device pins. RuntimeError when pinning fails."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def event(self) -> Any:
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy host bytes `src` into device bytes `dst` on the copy stream (asynchronously where possible)."""
        dst.copy_(src)

    def record(self, event: Any, stream: Stream) -> None:
        """Mark the work issued so far on `stream`."""

    def wait(self, event: Any, stream: Stream) -> None:
        """Make later work on `stream` wait for the work marked by `event` (a no-op if it was never recorded)."""

    def compute_on(self, buf: torch.Tensor) -> None:
        """The compute stream starts using (a view of) device buffer `buf`."""

    def compute_done(self, buf: torch.Tensor) -> None:
        """The compute stream has issued all its work on `buf`."""

    def synchronize(self) -> None:
        """Both streams idle: no copy in flight."""

    def release_host_cache(self) -> None:
        """Give freed pinned host memory back to the OS (torch's host allocator keeps it cached otherwise)."""


class CpuDevice(Device):
    """Blocks compute on the CPU: copies are plain synchronous copies, nothing is pinned, events are not needed."""

    def __init__(self) -> None:
        self.torch_device = torch.device("cpu")


class CudaDevice(Device):
    """A CUDA GPU: copies on a side stream, ordered against the current (compute) stream by CUDA events."""

    pins = True
    _warned = False  # release_host_cache's warning, once per process

    def __init__(self, device: torch.device) -> None:
        self.torch_device = device
        self.copy_stream = torch.cuda.Stream(device)

    def host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def _stream(self, stream: Stream) -> torch.cuda.Stream:
        return self.copy_stream if stream == "copy" else torch.cuda.current_stream(self.torch_device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)

    def record(self, event: torch.cuda.Event, stream: Stream) -> None:
        event.record(self._stream(stream))

    def wait(self, event: torch.cuda.Event, stream: Stream) -> None:
        self._stream(stream).wait_event(event)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def release_host_cache(self) -> None:
        # torch's host allocator keeps freed pinned memory cached; recent torch releases it with
        # torch.accelerator.empty_host_cache. Without it the chunks stay pinned (and counted in RSS) until exit: say so.
        empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty is not None:
            empty()
        elif not CudaDevice._warned:
            CudaDevice._warned = True
            warnings.warn(f"torch {torch.__version__} cannot release cached pinned host memory "
                          "(no torch.accelerator.empty_host_cache): streamed blocks stay pinned until the process "
                          "exits; upgrade torch to free them after each stage", stacklevel=2)


def device_for(device: torch.device) -> Device:
    """The `Device` for a torch device: CUDA for cuda:N, the synchronous CPU one otherwise."""
    return CudaDevice(device) if device.type == "cuda" else CpuDevice()


# ---- the simulator ---------------------------------------------------------------------------------------------------
POISON = 0xFF  # 0xFFFF is NaN in fp16 and bf16, 0xFFFFFFFF in fp32; a GGML block with NaN scales dequantizes to NaN


class SlotStateError(AssertionError):
    """The simulator saw a device buffer used out of order: the streamer's events are wrong."""


@dataclass(eq=False)
class _Buffer:
    data: torch.Tensor
    index: int
    state: str = "free"  # free -> filling -> ready -> in use -> done -> free
    fills: int = 0  # generation: bumped by every copy into it, so a stale event releases nothing


@dataclass(eq=False)
class _Copy:
    dst: torch.Tensor | None  # None once landed: an event must not keep the host memory alive
    src: torch.Tensor | None
    buf: _Buffer
    fill: int


@dataclass(eq=False)
class SimEvent:
    recorded: bool = False
    copies: list[_Copy] = field(default_factory=list)  # recorded on the copy stream: the copies issued before it
    released: list[tuple[_Buffer, int]] = field(default_factory=list)  # on compute: buffers it had finished with


class SimulatedDevice(Device):
    """A GPU as late as it may be, on the CPU: deferred copies, poisoned destinations, checked buffer states."""

    pins = True  # it "pins" (a plain allocation), so tests can make pinning fail and see the fallback

    def __init__(self) -> None:
        self.torch_device = torch.device("cpu")
        self.buffers: list[_Buffer] = []
        self.pending: list[_Copy] = []  # issued on the copy stream, not yet executed
        self.bytes_copied = 0  # executed copies, for the per-pass transfer figure
        self._hosts: list[weakref.ref] = []

    def host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self._hosts.append(weakref.ref(buf))
        return buf

    @property
    def live_host_bytes(self) -> int:
        """Bytes of host buffers still referenced by anyone."""
        return sum(t.numel() for t in (r() for r in self._hosts) if t is not None)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        buf = torch.full((nbytes,), POISON, dtype=torch.uint8)
        self.buffers.append(_Buffer(buf, len(self.buffers)))
        return buf

    def _owner(self, view: torch.Tensor) -> _Buffer:
        ptr = view.untyped_storage().data_ptr()
        for b in self.buffers:
            if b.data.untyped_storage().data_ptr() == ptr:
                return b
        raise SlotStateError("not a view of a device buffer of this device")

    def event(self) -> SimEvent:
        return SimEvent()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type != "cpu" or any(b.data.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
                                           for b in self.buffers):
            raise SlotStateError("a copy must read host memory")
        buf = self._owner(dst)
        if buf.state != "free":
            raise SlotStateError(f"copy into device buffer {buf.index} while it is {buf.state}: the copy stream did "
                                 "not wait until the compute stream had finished with it")
        buf.state, buf.fills = "filling", buf.fills + 1
        dst.fill_(POISON)  # what a kernel reading it before the copy lands may see
        self.pending.append(_Copy(dst, src, buf, buf.fills))

    def record(self, event: SimEvent, stream: Stream) -> None:
        event.recorded = True
        if stream == "copy":
            event.copies, event.released = list(self.pending), []
        else:
            event.copies = []
            event.released = [(b, b.fills) for b in self.buffers if b.state in ("ready", "done")]

    def wait(self, event: SimEvent, stream: Stream) -> None:
        if not event.recorded:
            return  # as on CUDA: waiting for an event never recorded waits for nothing
        if stream == "compute":
            for c in event.copies:  # the copy stream runs in issue order: everything before the record lands
                self._land(c)
            return
        for buf, fill in event.released:
            if buf.fills == fill and buf.state in ("ready", "done"):
                buf.state = "free"
                buf.data.fill_(POISON)  # from now on the next copy may land at any moment

    def _land(self, c: _Copy) -> None:
        if c.src is not None:
            c.dst.copy_(c.src)
            self.bytes_copied += c.src.numel()
            c.src = c.dst = None
            self.pending.remove(c)
        if c.buf.fills == c.fill and c.buf.state == "filling":
            c.buf.state = "ready"

    def compute_on(self, buf: torch.Tensor) -> None:
        b = self._owner(buf)
        if b.state != "ready":
            raise SlotStateError(f"compute on device buffer {b.index} while it is {b.state}: the compute stream did "
                                 "not wait for its copy")
        b.state = "in use"

    def compute_done(self, buf: torch.Tensor) -> None:
        b = self._owner(buf)
        if b.state != "in use":
            raise SlotStateError(f"device buffer {b.index} ends a compute it never began (it is {b.state})")
        b.state = "done"

    def synchronize(self) -> None:
        for c in list(self.pending):
            self._land(c)

    @property
    def in_flight(self) -> int:
        """Device buffers with a copy issued that the compute stream has not waited for."""
        return sum(b.state == "filling" for b in self.buffers)
