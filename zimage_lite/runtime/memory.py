"""Peak-memory bookkeeping for the per-stage figures the CLI prints."""

from __future__ import annotations

import resource
import sys

import torch


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError
    (torch raises a plain RuntimeError when malloc fails: "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        try:  # Linux lets a process reset its own peak RSS (VmHWM) by writing 5 to clear_refs
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_bytes(device: torch.device) -> int:
    """Peak device memory allocated (CUDA) or peak resident set size (CPU) since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ---- pinned host memory --------------------------------------------------------------------------------------------
# torch's pinned host allocator rounds every allocation up to a power of two and keeps what it freed cached, so
# streamed blocks are packed into large power-of-two chunks (no rounding lost) rather than pinned one by one (1.14x to
# 1.48x per full-size block). The planner counts exactly these chunks; placement allocates exactly these chunks.
PINNED_CHUNK = 64 * 2**20
ALIGN = 64  # bytes; every tensor (and every block) inside a host or device buffer starts on this boundary


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pinned_layout(sizes: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Pack blocks of `sizes` bytes, in order, into pinned chunks: ((chunk, offset) per block, bytes per chunk).

    A block never straddles two chunks. Chunks are PINNED_CHUNK bytes; a block larger than that gets a chunk of its
    own, of the next power of two (what the host allocator would round it to anyway).
    """
    places: list[tuple[int, int]] = []
    chunks: list[int] = []
    used = 0
    for size in sizes:
        size = aligned(size)
        if size > PINNED_CHUNK:
            chunks.append(1 << (size - 1).bit_length())
            places.append((len(chunks) - 1, 0))
            used = chunks[-1]  # full: the next block opens a new chunk
            continue
        if not chunks or used + size > chunks[-1]:
            chunks.append(PINNED_CHUNK)
            used = 0
        places.append((len(chunks) - 1, used))
        used += size
    return places, chunks
