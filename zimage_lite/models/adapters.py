"""Low-rank side paths on a model's linears: y = W x + U (D x), the base weight left as it is.

A linear that carries adapters holds them as its child module `lora` (`LowRank`: `down` (R, in), `up` (out, R)), so
their tensors are named under the linear and its block (`layers.3.attention.to_q.lora.down`): the block schedule
lists them with the block's weights, and whatever moves a block (placement, the streamer's pinned chunks and slots,
the CPU's lazy blocks) moves them with it. A float linear becomes an `AdaptedLinear`; when its weight turns out to be
quantized, loading swaps it for a `QLinear` that takes the same `lora` child over (quant/qlinear.py packed_module).
Several LoRAs on one linear arrive already folded into one pair (loras.py), so the cost is one pair of thin matmuls
per linear whatever their number.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

LORA = "lora"  # the child module's name: adapter tensors are `<linear>.lora.down` and `<linear>.lora.up`


def adapter_names(linear: str) -> tuple[str, str]:
    """The state-dict names of the (down, up) pair on the linear named `linear` ("layers.0.attention.to_q")."""
    return f"{linear}.{LORA}.down", f"{linear}.{LORA}.up"


class LowRank(nn.Module):
    """One low-rank pair: `add_to(y, x)` adds up @ (down @ x) to the linear's output y in place."""

    def __init__(self, rank: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features), requires_grad=False)
        self.up = nn.Parameter(torch.empty(out_features, rank), requires_grad=False)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # addmm_ accumulates into y: no second output-sized tensor (an FFN's is ffn_dim wide per token), and the
        # transient is the (tokens, rank) product alone
        h = F.linear(x, self.down)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.up.t())
        return y

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}"


class AdaptedLinear(nn.Linear):
    """A float linear with a side path: F.linear(x, W, b) + up (down x)."""

    lora: LowRank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora.add_to(super().forward(x), x)


def attach(model: nn.Module, shapes: Mapping[str, tuple[int, int, int]]) -> None:
    """Give each linear named in `shapes` (name -> (rank, in, out)) a side path of that rank, on the model built on
    `meta` before it loads: its tensors then belong to the model's state dict and to their block."""
    for name, (rank, n_in, n_out) in shapes.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (n_in, n_out):
            raise ValueError(f"{name} is not a {n_in} -> {n_out} linear of this model: {old}")
        with torch.device("meta"):
            new = AdaptedLinear(n_in, n_out, bias=old.bias is not None)
            new.lora = LowRank(rank, n_in, n_out)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
