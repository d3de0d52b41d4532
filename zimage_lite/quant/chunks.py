"""One way to run a block-wise job over a large tensor: on CPU, consecutive chunks on worker threads.

Quantizing and dequantizing are elementwise per block, so chunks are independent and the result is the same bits
whatever the chunking. On CPU, chunks in parallel with single-threaded ops beat whole-tensor ops twice over:
- a chunk's fp32 temporaries (a few MB) stay in cache, where a whole-tensor pass (Q4_K 10240x3840: 157 MB a
  temporary) streams each of its ~6 passes through memory: dequantizing that weight to bf16 takes 30 ms this way
  against 130 ms whole (2-core AMD EPYC);
- mid-size ops pay OpenMP's per-op fork and join (up to 8 ms an op on a 2-core VM, against 0.07 ms of work).
torch releases the GIL inside ops, so the threads do run in parallel.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

MAX_WORKERS = 8  # worker threads, each holding one chunk's temporaries
# On a GPU, a weight is dequantized in chunks of this many weights into one reused output buffer, so the only
# transient beyond the output is one chunk's temporaries (the planner counts both: runtime/plan.py).
DEVICE_CHUNK = 1 << 20
# Temporaries per weight of a chunk while it dequantizes, an upper bound over every GGML type, int8 and nf4: measured
# 4.19 (Q8_0) to 7 (Q5_0) bytes, the fp32 kernel result included (tests/test_device_dequant.py).
DEVICE_CHUNK_TEMP_BYTES = 8

# Each thread's temporaries (Temps), by thread: cleared from any thread by release_temps at a stage's end.
_temps: dict[int, Temps] = {}


class Temps:
    """The temporaries of one chunk's job, carved from one buffer (the arena) a thread keeps from chunk to chunk. On
    the CPU a fresh multi-MB temporary is a fresh memory mapping (runtime/memory.map_large_host_blocks; not inside a
    DiT forward: `reused_heap`) whose page faults cost more than the arithmetic: Q4_K dequantized at 0.7 G weights/s
    with new temporaries, 1.4 without the mappings (benchmarks/dequant.py). The arena is sized by the chunks: a
    chunk whose temporaries do not fit gets new tensors (beside the arena, until the chunk ends), and the next chunk
    an arena as large as it asked for: once warm, an arena holds the largest chunk's temporaries a thread has met,
    within DEVICE_CHUNK_TEMP_BYTES a weight (the plan counts MAX_WORKERS of them). Without `keep` (a GPU, whose
    caching allocator reuses blocks already) every call is a new tensor."""

    ALIGN = 64

    def __init__(self, device: torch.device, keep: bool) -> None:
        self.device, self._keep = device, keep
        self._arena: torch.Tensor | None = None
        self._asked = 0  # bytes the current chunk has asked for

    def start(self) -> Temps:
        """A new chunk: the arena's bytes are free again, grown first to what the last chunk asked for."""
        arena = self._arena
        # an arena made in inference mode cannot be written outside it (a model run under no_grad)
        stale = arena is not None and arena.is_inference() and not torch.is_inference_mode_enabled()
        if self._keep and (arena is None or stale or arena.numel() < self._asked):
            self._arena = None  # the old arena goes before the new one exists
            self._arena = torch.empty(max(self._asked, 1), dtype=torch.uint8, device=self.device)
        self._asked = 0
        return self

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes, at = math.prod(shape) * dtype.itemsize, self._asked
        self._asked += -(-nbytes // self.ALIGN) * self.ALIGN
        if self._arena is None or self._asked > self._arena.numel():
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self._arena[at:at + nbytes].view(dtype).view(shape)


def temps(device: torch.device) -> Temps:
    """This thread's temporaries for a chunk about to start on `device` (the CPU's buffers kept, handed out from the
    first again)."""
    if device.type != "cpu":
        return Temps(device, keep=False).start()
    mine = _temps.get(threading.get_ident())
    if mine is None:
        mine = _temps[threading.get_ident()] = Temps(device, keep=True)
    return mine.start()


def release_temps() -> None:
    """Free every thread's kept temporaries (at a stage's end: the next stage's chunks may differ)."""
    _temps.clear()


# Pools live as long as the process: threads start once, not at every Linear, and keep their warm malloc arenas.
# Keyed by process too: a forked child inherits the dict but not the threads, and would wait on them forever.
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_worker = threading.local()


def _pool(workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), workers)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="zimage-lite-chunks",
                                             initializer=setattr, initargs=(_worker, "busy", True))
        return _pools[key]


def run_in_chunks(n: int, step: int, job: Callable[[int, int], None]) -> None:
    """Call job(start, stop) for the consecutive ranges of `step` items that cover range(n), on up to
    torch.get_num_threads() worker threads whose ops run single-threaded; in the caller's thread when there is
    one chunk or one thread, or when the caller is itself a worker. An exception in a job is raised here."""
    starts = range(0, n, step)
    threads = torch.get_num_threads()
    if len(starts) <= 1 or threads <= 1 or getattr(_worker, "busy", False):
        for start in starts:
            job(start, min(start + step, n))
        return

    # grad and inference mode are per thread: the workers take the caller's (writing into an inference tensor
    # made by the caller is an error outside inference mode)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(start: int) -> None:
        torch.set_num_threads(1)  # this thread's ops; also the default for threads that start meanwhile
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            job(start, min(start + step, n))

    try:
        for _ in _pool(min(threads, MAX_WORKERS)).map(run, starts):
            pass
    finally:
        torch.set_num_threads(threads)  # put the default back


def run_on(device: torch.device, n: int, step: int, job: Callable[[int, int], None],
           device_step: int | None = None) -> None:
    """job(start, stop) over range(n): on CPU by `run_in_chunks` in chunks of `step`; on a GPU in this thread, in
    chunks of `device_step` (to bound temporaries) or in one call when None, as each GPU op is parallel already."""
    if device.type == "cpu":
        run_in_chunks(n, step, job)
        return
    device_step = device_step or max(n, 1)
    for start in range(0, n, device_step):
        job(start, min(start + device_step, n))
