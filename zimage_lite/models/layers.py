"""Building blocks shared by the DiT and the text encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              chunk: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, S, D) tensors; grouped KV heads are expanded here.

    `chunk` splits the queries so that at most chunk x S scores exist at once, for budgets where even the
    memory-efficient kernels would materialise too much (the CPU math fallback does).
    """
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    if chunk is None or chunk >= q.shape[2] or causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v)
                      for i in range(0, q.shape[2], chunk)], dim=2)
