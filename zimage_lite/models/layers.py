"""Building blocks shared by the DiT and the text encoder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.budget import cpu_has_bf16


@dataclass(frozen=True)
class Block:
    """One entry of a model's block schedule: what the planner sizes and placement keeps or streams."""

    name: str  # module path in the model: "layers.3"
    module: nn.Module
    tensors: tuple[str, ...]  # its tensors' names in the model's state dict ("layers.3.attention.to_q.weight")


def schedule_of(model: nn.Module, lists: Sequence[str]) -> list[Block]:
    """The blocks of the ModuleLists named in `lists`, in that order: the model's execution order."""
    out = []
    for attr in lists:
        for i, module in enumerate(getattr(model, attr)):
            name = f"{attr}.{i}"
            out.append(Block(name, module, tuple(f"{name}.{k}" for k in module.state_dict(keep_vars=True))))
    return out


class Runner(Protocol):
    """Hands a model its blocks, ready to compute, in schedule order.

    `with runner.run() as blocks:` yields an iterator over the block modules; leaving the `with` (at the end, on an
    exception, or after `stop()`) always puts every block back where it lives between passes. `stop()` ends the
    iteration early: the remaining blocks are skipped safely (step caching, early exit).
    """

    def run(self) -> AbstractContextManager[Iterator[nn.Module]]: ...

    def stop(self) -> None: ...


class Resident:
    """The trivial runner: every block already lives where it computes. Runners that move blocks override
    `_iterate` (its `finally` puts a block back); `run` closes the iteration however the pass ends."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self._stopped = False

    @contextmanager
    def run(self) -> Iterator[Iterator[nn.Module]]:
        self._stopped = False
        blocks = self._iterate()
        try:
            yield blocks
        finally:
            blocks.close()  # runs the iteration's own finally at once, not when it is garbage-collected

    def _iterate(self) -> Iterator[nn.Module]:
        for module in self.modules:
            if self._stopped:
                return
            yield module

    def stop(self) -> None:
        self._stopped = True


class RMSNorm(nn.Module):
    """RMSNorm with the statistics in fp32: in bf16 they drift by about 1.5% (zimage_spec.md 4.4)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x²) + eps) * w in fp32; in place on one fp32 copy (the same values as out of place, with
        # two fewer passes over the activations)
        h = x.to(torch.float32, copy=True)
        h.mul_(torch.rsqrt(h.square().mean(-1, keepdim=True).add_(self.eps)))
        return h.mul_(self.weight.float()).to(x.dtype)


# Query rows per product of the CPU bf16 route: one head's 512 x S scores and their softmax (4 MB each at S = 4128)
# stay in the L3 cache; 512 rows measured 8% faster than 256 on a 2-core Zen 5, 768 no faster.
CPU_BF16_ROWS = 512


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              chunk: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, S, D) tensors; grouped KV heads are expanded here.

    `chunk` splits the queries so that at most chunk x S scores exist at once, for budgets where even the
    memory-efficient kernels would materialise too much (the CPU math fallback does). bf16 on a CPU with native
    bf16 takes `_cpu_bf16_attention` (non-causal: the DiT), which never holds more than one head's chunk of scores.
    """
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    if cpu_bf16_route(q.device.type, q.dtype, causal):
        return _cpu_bf16_attention(q, k, v, min(chunk or CPU_BF16_ROWS, CPU_BF16_ROWS))
    if chunk is None or chunk >= q.shape[2] or causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v)
                      for i in range(0, q.shape[2], chunk)], dim=2)


def cpu_bf16_route(q_device: str, dtype: torch.dtype, causal: bool = False) -> bool:
    """Whether `attention` takes `_cpu_bf16_attention` (the memory counts ask too)."""
    return q_device == "cpu" and dtype == torch.bfloat16 and not causal and cpu_has_bf16()


def cpu_bf16_route_bytes(heads: int, queries: int, keys: int, dim: int) -> int:
    """What `_cpu_bf16_attention` allocates besides its output through torch's allocator: the scaled queries and
    one chunk's scores and probabilities, in bf16 (oneDNN's matmul scratch is not in it)."""
    return 2 * (heads * queries * dim + 2 * min(CPU_BF16_ROWS, queries) * keys)


def _cpu_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """Attention in bf16 matmuls on the CPU: per head and chunk of query rows, scores = (q / sqrt(D)) k^T, softmax
    in fp32, rounded to bf16, times v. torch's CPU SDPA computes its bf16 products in fp32 (199 GFLOP/s on 2 Zen 5
    cores, fp32 200); these products use the CPU's bf16 dot products: 674 GFLOP/s there at S = 4128, 30 heads of
    128 (benchmarks/roofs.py; 419 with 256 rows, an fp32 softmax and new score tensors per chunk). The scores are
    rounded to bf16 before the softmax, as a bf16 GEMM returns them (torch has no bf16 x bf16 -> fp32 matmul on the
    CPU): 2-5x SDPA's bf16 error on one attention against fp64, growing with the logits, and a few percent more
    error in a whole bf16 DiT forward (tests/test_attention.py)."""
    out = torch.empty(q.shape, dtype=q.dtype)
    scaled = (q * q.shape[-1] ** -0.5).flatten(0, 1)
    # two buffers for every head and chunk: no fresh 4 MB allocation (a mapping and its page faults) per product
    scores, probs = (torch.empty(min(rows, q.shape[2]), k.shape[2], dtype=q.dtype) for _ in range(2))
    for qh, kh, vh, oh in zip(scaled, k.flatten(0, 1), v.flatten(0, 1), out.flatten(0, 1), strict=True):
        for i in range(0, qh.shape[0], rows):
            n = min(rows, qh.shape[0] - i)
            torch.mm(qh[i:i + n], kh.t(), out=scores[:n])
            torch.softmax(scores[:n], -1, out=probs[:n])  # fp32 inside, written as bf16 (no fp32 copy)
            torch.mm(probs[:n], vh, out=oh[i:i + n])
    return out
