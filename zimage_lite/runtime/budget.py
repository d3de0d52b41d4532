"""Memory budgets and what the hardware offers: how much a device has free (`cuda:1` asks device 1), what a run may
use under `--vram` / `--ram`, and which compute dtype the hardware runs natively.

Sizes are parsed and formatted in units.py; what each tensor weighs is in sizes.py.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from ..errors import OptionError
from .units import GIB, KIB

# The CUDA context (kernels, cuBLAS/cuDNN handles: 0.3-0.5 GB, zimage_spec.md §11) and the caching allocator's
# fragmentation live on the card but outside the tensors the plan counts, so they come off every VRAM figure.
CUDA_HEADROOM = int(0.4 * GIB)
# On the host the OS, the page cache behind the weight memory map and the Python process itself need room too.
CPU_HEADROOM = 1 * GIB
DEVICE_KINDS = ("cuda", "cpu")
BF16_CAPABILITY = (8, 0)  # Ampere: the first CUDA cards with bf16 arithmetic (torch emulates it on older ones)


def device_kind(device: str) -> str:
    """`cuda` for `cuda` and `cuda:1`, `cpu` for `cpu`; OptionError for anything else."""
    kind, _, index = device.partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise OptionError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return kind


def resolve_device(device: Any) -> Any:
    """`auto`, `cpu`, `cuda` or `cuda:N` (or a torch.device) as a torch device; OptionError for a device this machine
    does not have. Imports torch (the planner's other functions do not)."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise OptionError(f"device={device!r}: give 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_kind(device) == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: no CUDA GPU is visible to torch (use --device cpu or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def _mem_available() -> int | None:
    """Host memory the kernel says can be had without swapping: MemAvailable, else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB  # the kernel writes kB meaning KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX). Without it torch emulates bf16 matmuls, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16(device: str = "cuda") -> bool:
    """Native bf16 arithmetic on `device`: compute capability 8.0 or later. `torch.cuda.is_bf16_supported()` says
    yes on older cards too, where torch emulates bf16 (slower than fp16). True when no GPU is visible: a plan for a
    GPU this machine lacks is made for a current card."""
    import torch

    if not torch.cuda.is_available():
        return True
    return tuple(torch.cuda.get_device_capability(torch.device(device))) >= BF16_CAPABILITY


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bf16 where `device` has it natively; else fp16 on CUDA cards, fp32 on CPUs."""
    if dtype != "auto":
        return dtype
    if device_kind(device) == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def device_budget(device: str) -> int | None:
    """Bytes the run may use on `device` ("cpu", "cuda", "cuda:1"): what it reports free, minus headroom.

    None when the device is absent (no CUDA GPU) or cannot say (no /proc/meminfo nor sysconf).
    """
    if device_kind(device) == "cuda":
        import torch  # here, not at module level: `zimage-lite plan` with an explicit --vram never asks a GPU

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return max(free - CUDA_HEADROOM, 0)
    available = _mem_available()
    return None if available is None else max(available - CPU_HEADROOM, 0)


def usable_budget(device: str, vram: int | None, ram: int | None) -> tuple[int, int]:
    """(bytes tensors may use, headroom taken off) for a run on `device` with the user's `--vram` / `--ram`.

    `--vram` counts the whole card, so the CUDA context comes off it; `--ram` is what the run may use. Without one,
    ask the device (`cuda:1`: device 1). `ram` does not bound a cuda run (the plan reports its host memory).
    """
    kind = device_kind(device)
    if kind == "cuda" and vram is not None:
        return vram - CUDA_HEADROOM, CUDA_HEADROOM
    if kind == "cuda":
        budget = device_budget(device)
        if budget is None:
            raise OptionError("no CUDA GPU is visible: pass --vram SIZE to plan for a GPU this machine does not have")
        return budget, 0
    budget = ram if ram is not None else device_budget(device)
    if budget is None:
        raise OptionError("cannot tell how much RAM is free here: pass --ram SIZE")
    return budget, 0
