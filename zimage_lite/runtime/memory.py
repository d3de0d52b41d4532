"""Peak-memory bookkeeping for the per-stage figures the CLI prints."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HOST_MMAP_THRESHOLD = 1 * 2**20  # blocks from this size up get their own mapping, returned to the OS when freed


@functools.cache
def map_large_host_blocks() -> bool:
    """Have glibc give every host block of 1 MiB or more its own memory mapping, unmapped when freed, for the rest
    of the process (outside a DiT forward: `reused_heap`). By default glibc raises this threshold each time such a
    block is freed (up to 32 MiB), after which large freed blocks stay in its heap: the next stage's allocations
    then land beside them and RSS grows past what the plan counts (measured on the demo model at 512 px, fp32: VAE
    decode after an encode 49.5 MiB against 27.5 planned; with the fixed threshold 28.9, and the encode stage 26.42
    against 26.41). The cost is a page fault per page of each large allocation: a fifth of a ConvRot DiT step, which
    is why DiT forwards run inside `reused_heap`. True where it applied (glibc). `trim_host` gives back the smaller
    blocks at each stage's end."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))


def trim_host() -> None:
    """At a stage's end (and after each DiT forward: `reused_heap`), give the OS the heap pages the stage freed
    (blocks under the mapping threshold, which glibc keeps) and the GEMM buffers MKL keeps for its next call (made
    again by the next fp32 GEMM: ~10 MiB), so the next stage starts from what is live (a few ms; the full-size
    pipeline at 512x512, fp32: MKL held 5.0 MiB after the text encoder, 10.7 after the DiT and 13.9 after the VAE,
    all counted above the plan of the stages after; none with this)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
    mkl = mkl_service()
    if mkl is not None:
        mkl.mkl_serv_free_buffers()


@functools.cache
def mkl_service() -> ctypes.CDLL | None:
    """torch's CPU library when MKL is linked into it (the x86 Linux wheels; its memory manager's calls are
    exported there as mkl_serv_*), else None."""
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not lib.is_file():
        return None
    try:
        mkl = ctypes.CDLL(str(lib))
        mkl.mkl_serv_free_buffers  # noqa: B018 (must exist)
    except (OSError, AttributeError):
        return None
    return mkl


M_MMAP_MAX = -4  # glibc's mallopt parameter: how many blocks may be mappings at once
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter: a free leaving more than this at the heap's top gives it back
NO_TRIM = -1  # M_TRIM_THRESHOLD's value that turns the trimming on free off (mallopt(3))
# glibc's defaults (a fixed mapping threshold turns off its sliding trim threshold), unless the environment set others
GLIBC_DEFAULTS = {M_MMAP_MAX: ("MALLOC_MMAP_MAX_", 65536), M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 128 * 1024)}
_heap_lock = threading.Lock()
_heap_users = 0  # forwards inside reused_heap now (threads may run two pipelines)
_own_users = 0  # blocks being read inside own_mappings now: mappings stay on until the last one is read


def _environment_setting(param: int) -> int:
    """The mallopt `param` as the environment set it for this process (glibc reads MALLOC_..._ at start), else
    glibc's default; held to what mallopt's int argument carries."""
    name, default = GLIBC_DEFAULTS[param]
    value = os.environ.get(name, "")
    return min(int(value), 2**31 - 1) if value.isdigit() else default


@contextmanager
def reused_heap(device: torch.device | str = "cpu") -> Iterator[None]:
    """Within: every host block comes from glibc's heap, none from a fresh mapping, so that the many same-sized
    activations of a DiT forward on the CPU reuse the memory the previous block freed instead of faulting in new
    zeroed pages (full-size ConvRot DiT at 512x512, 2 cores, one process alternating: 37.8-40.5 s a step with
    mappings, 30.5-32.6 s without; fp32 Q4_K_M 119 -> 108-112 s); and a free never trims the heap's top (else glibc
    gives back each freed 44 MB FFN activation there and faults it in again for the next: 28.7-31.7 -> 26.0-28.1 s
    a ConvRot step). When the last user leaves: both settings as they were (mappings again above
    `map_large_host_blocks`' threshold, trimming on free) and the heap trimmed, so what the forward freed goes back
    to the OS and the next stage starts from what is live. The forward's peak RSS also holds the heap's gaps
    between reused blocks (ConvRot fp32 at 512x512: 6.22 GiB above the process's baseline against the DiT stage's
    6.30 planned). For a `device` other than the CPU, or without glibc, nothing changes."""
    global _heap_users
    libc = glibc()
    if libc is None or torch.device(device).type != "cpu":
        yield
        return
    with _heap_lock:
        _heap_users += 1
        if _heap_users == 1:
            if _own_users == 0:
                libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                for param in GLIBC_DEFAULTS:
                    libc.mallopt(param, _environment_setting(param))
                trim_host()


@contextmanager
def own_mappings() -> Iterator[None]:
    """Within a `reused_heap` forward, for memory held longer than the activations around it and freed all at once:
    large host blocks get their own mappings again, unmapped when freed. A CPU-streamed block's weights cast at each
    use (the DiT's bf16 refiners as fp32 copies, 0.67 GiB) otherwise leave a hole in the heap when the block is
    dropped that the next blocks' smaller buffers only partly fill: the rest stays resident, above the plan (full-size
    Q4_K_M DiT at 256x256, --ram 3GB: 0.74 GiB of freed heap resident through the step). Outside a forward, or
    without glibc, nothing changes."""
    global _own_users
    libc = glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        _own_users += 1
        if _own_users == 1 and _heap_users > 0:
            libc.mallopt(M_MMAP_MAX, _environment_setting(M_MMAP_MAX))
    try:
        yield
    finally:
        with _heap_lock:
            _own_users -= 1
            if _own_users == 0 and _heap_users > 0:
                libc.mallopt(M_MMAP_MAX, 0)


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """The process's C library, opened once (madvise, and glibc's allocator settings); None where ctypes cannot open
    it (Windows)."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return None


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim); None elsewhere (musl, macOS, Windows), whose
    allocators are left as they are."""
    libc = c_library()
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


# ---- pinned host memory --------------------------------------------------------------------------------------------
# torch's pinned host allocator rounds every allocation up to a power of two and keeps what it freed cached, so
# streamed blocks are packed into large power-of-two chunks (nothing lost to rounding but the chunks' unused tails)
# rather than pinned one by one (1.14x to 1.48x per full-size block). The planner counts exactly these chunks;
# placement allocates exactly these chunks.
PINNED_CHUNK = 64 * 2**20  # the smallest chunk
MAX_CHUNK_DOUBLINGS = 5  # chunk sizes tried: the first block's power of two, up to 32 times that
ALIGN = 64  # bytes; every tensor (and every block) inside a host or device buffer starts on this boundary


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _first_fit(sizes: list[int], chunk: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Blocks in order into chunks of `chunk` bytes (a block that does not fit the open chunk opens the next; a
    larger block gets a chunk of its own power of two)."""
    places: list[tuple[int, int]] = []
    chunks: list[int] = []
    used = 0
    for size in sizes:
        if not chunks or used + size > chunks[-1]:
            chunks.append(max(chunk, _pow2(size)))
            used = 0
        places.append((len(chunks) - 1, used))
        used += size
    return places, chunks


def pinned_layout(sizes: list[int], count: int | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """Pack blocks of `sizes` bytes, in order, into pinned chunks: ((chunk, offset) per block, bytes per chunk).

    `count` is how many blocks will be packed in all (default: len(sizes)); placement packs them one at a time as it
    reads them, so the layout of the first k blocks must not depend on the sizes still to come. The chunk size is
    therefore chosen from the first block and the count alone: the power of two (PINNED_CHUNK at least) that holds
    `count` blocks of the first one's size in the fewest bytes. Streamed blocks are alike (the DiT's 30 layers), so
    this fills the chunks: 18 Q4_K_M layers (112.5 MiB each) take 2 GiB, against 2.25 GiB in a chunk each.
    """
    sizes = [aligned(s) for s in sizes]
    if not sizes:
        return [], []
    n = count if count is not None else len(sizes)
    smallest = max(PINNED_CHUNK, _pow2(sizes[0]))
    candidates = [smallest << k for k in range(MAX_CHUNK_DOUBLINGS + 1)]
    chunk = min(candidates, key=lambda c: sum(_first_fit([sizes[0]] * n, c)[1]))  # ties: the smallest chunk
    return _first_fit(sizes, chunk)


# Pages of a file's memory map can be handed back (MADV_DONTNEED) and read again later from the page cache, as long
# as nothing wrote to them: Linux only.
RELEASES_FILE_PAGES = sys.platform.startswith("linux")
_MADV_DONTNEED = 4


@dataclass(frozen=True)
class FileMap:
    start: int
    end: int
    path: str
    written: bool  # shared and writable, or private with pages already written (copies the process owns)


def map_entries(source: str = "/proc/self/smaps") -> Iterator[tuple[str, str, str, dict[str, int]]]:
    """This process's memory maps as Linux lists them in `source` (/proc/self/smaps, or /proc/self/maps: no fields):
    per map its address range ("lo-hi", hex), permissions ("r-xp"), path ("" for an anonymous map; "[heap]" and
    the like as named) and its kB fields by name ("Rss", "Anonymous", "Swap", ...). OSError where there is none."""
    with open(source, encoding="utf-8", errors="replace") as f:
        entry: tuple[str, str, str, dict[str, int]] | None = None
        for line in f:
            fields = line.split(None, 5)
            if not fields:
                continue
            if "-" in fields[0] and not fields[0].endswith(":"):  # a map's first line: range, perms, ..., path
                if entry is not None:
                    yield entry
                entry = (fields[0], fields[1], fields[5].strip() if len(fields) == 6 else "", {})
            elif entry is not None and len(fields) > 1 and fields[1].isdigit():  # "Rss:  120 kB"
                entry[3][fields[0].rstrip(":")] = int(fields[1])
        if entry is not None:
            yield entry


def code_and_heap_rss() -> dict[str, int]:
    """Two parts of this process's RSS that are no stage's tensors, for the benchmarks' stage tables ({} where /proc
    has no smaps): the resident pages of executable file maps (library code: torch's kernels page theirs in when
    first run) and of the main malloc arena (`[heap]`: the main thread's blocks below the mapping threshold)."""
    try:
        maps = [(perms, path, kb.get("Rss", 0) * 1024) for _, perms, path, kb in map_entries()]
    except OSError:
        return {}
    return {"code_rss_bytes": sum(rss for perms, path, rss in maps if "x" in perms and path.startswith("/")),
            "heap_rss_bytes": sum(rss for _, path, rss in maps if path == "[heap]")}


def file_maps(detail: bool = False) -> list[FileMap]:
    """This process's memory maps of files, from /proc (empty elsewhere). `detail`: read /proc/self/smaps (~8 ms)
    to tell a private map whose pages were written to (its copy-on-write copies: Anonymous or Swap > 0); else
    /proc/self/maps (~0.5 ms), where only a shared writable map counts as written."""
    if not RELEASES_FILE_PAGES:
        return []
    try:
        entries = list(map_entries("/proc/self/smaps" if detail else "/proc/self/maps"))
    except OSError:
        return []
    maps: list[FileMap] = []
    for span, perms, path, kb in entries:
        if path.startswith("/"):
            lo, hi = (int(x, 16) for x in span.split("-"))
            written = (perms[1] == "w" and perms[3] == "s") or kb.get("Anonymous", 0) > 0 or kb.get("Swap", 0) > 0
            maps.append(FileMap(lo, hi, path, written))
    return maps


def _dontneed(lo: int, hi: int) -> bool:
    """Whether the kernel took the advice (Linux only: RELEASES_FILE_PAGES)."""
    return c_library().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0


def release_pages(root: Path) -> None:
    """Drop this process' resident pages of every memory map of a file under `root` (MADV_DONTNEED).

    Weights read through a file's mapping (safe_open maps private copy-on-write, GGUFReader read-only) keep their
    pages counted in RSS until unmapped, even once the tensor made from them (a cast, a converted copy) is all that
    is used: the quantize tool reading a whole checkpoint, the enhancer converting its layers. Dropping them is safe
    for sources nobody writes to (a copy-on-write page written to would be lost): a later access reads the page
    again from the page cache. Linux only.
    """
    root = Path(root)
    if not RELEASES_FILE_PAGES:
        return
    # the files themselves, resolved (a folder of linked shards maps their targets), matched exactly
    files = {str(p.resolve()) for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file()}
    for m in file_maps():
        if m.path in files and not m.written:
            _dontneed(m.start, m.end)


class FileViews:
    """Hands back the file pages under tensors that view a file's memory map once a copy of them is what computes:
    a weight cast at load (weights/load.py), a streamed block dropped after use (streamer.py), oneDNN's blocked copy
    of an int8 weight (quant/qlinear.py `prepare_resident`). The maps are read from smaps (~8 ms) when made, and again
    when a tensor lies in a file map mapped since (a source maps each file at its first read): a map with any page
    written to is left alone, as MADV_DONTNEED would drop the written copy. Only whole pages inside a tensor go (its
    first and last may hold a neighbour in use). Whatever reads the tensor later gets its pages again from the page
    cache: the tensor stays valid. Short-lived: made for one load or one pass over a placed model, as a map unmapped
    later could leave its addresses to anonymous memory."""

    def __init__(self) -> None:
        self.maps = file_maps(detail=True)
        self.page = mmap.PAGESIZE

    def _map_of(self, lo: int, hi: int) -> FileMap | None:
        return next((m for m in self.maps if m.start <= lo and hi <= m.end), None)

    def release(self, t: torch.Tensor) -> int:
        """Bytes of `t` (contiguous, on the CPU) handed back: 0 when it is not inside an unwritten file map."""
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if t.device.type != "cpu" or not t.is_contiguous():
            return 0
        first, last = -(-lo // self.page) * self.page, hi // self.page * self.page
        if last <= first:
            return 0
        found = self._map_of(lo, hi)
        if found is None and any(m.start <= lo and hi <= m.end for m in file_maps()):  # mapped since (~0.5 ms)
            self.maps = file_maps(detail=True)
            found = self._map_of(lo, hi)
        if found is None or found.written:
            return 0
        return last - first if _dontneed(first, last) else 0
