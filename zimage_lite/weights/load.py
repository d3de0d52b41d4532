"""Filling a model built on the `meta` device from a lazy tensor source, one tensor at a time.

Each tensor is read, checked against the shape the config implies, cast and assigned in place of the meta parameter,
so the peak is one tensor above the result: the official DiT, stored in fp32 (24.6 GB), never exists twice. A tensor
that is a view of its file's memory map and gets copied (cast to the compute dtype, dequantized, moved to a GPU)
hands the map's pages under it back right after (runtime/memory.py `FileViews`): the plan counts the copy alone, and
the map lives until the stage ends (full-size Q4_K_M DiT, --ram 3GB on the CPU: its bf16 refiner blocks' pages, 1.35
GiB, stayed resident beside their fp32 copies through every step).

Source names are official names (name translation happens in the source, see names.py); tensors the model does not
use (the text encoder's last layer and final norm, ComfyUI's `norm_final`) are never read.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, ShapeError
from ..quant.qlinear import QEmbedding, QLinear, QTensor, packed_module
from ..runtime.memory import FileViews
from .sources import TensorSource

PACKED = (QLinear, QEmbedding)


def tensor_names(module: nn.Module) -> list[str]:
    """Every weight a module needs: its parameters and the packed weights of its QLinear/QEmbedding layers."""
    return list(module.state_dict(keep_vars=True))


def check_names(names: list[str], source: TensorSource, component: str) -> None:
    missing = [n for n in names if n not in source]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source.path}: the {component} is missing tensor(s) {', '.join(missing[:5])}{more}")


def load_tensor(source: TensorSource, name: str, expected: torch.Size) -> torch.Tensor | QTensor:
    """Read one tensor, accepting a stored shape that differs only by size-1 axes ([dim] for [1, dim])."""
    shape = tuple(source.shape(name))
    if shape != tuple(expected):
        squeeze = tuple(d for d in shape if d != 1) == tuple(d for d in expected if d != 1)
        if not squeeze:
            raise ShapeError(f"{source.where(name)}: tensor {name} has shape {list(shape)}, "
                             f"expected {list(expected)}")
    return source.get(name).reshape(expected)


def load_module(module: nn.Module, source: TensorSource, dtype: torch.dtype, device: torch.device | str,
                component: str, only: list[str] | None = None, views: FileViews | None = None) -> nn.Module:
    """Replace every meta parameter of `module` by the source's tensor, cast to dtype, on device.

    Quantized weights of Linear and Embedding layers stay packed (the layer becomes a QLinear/QEmbedding);
    any other quantized tensor (norms, pad tokens, as stable-diffusion.cpp writes them) is dequantized here.
    `only` limits loading to those names (the rest stay on `meta`, to be loaded later). `views`: the file maps as the
    caller read them, to hand back the pages under copied tensors with (a streamed block's runner reads them once for
    its load and its drop); else they are read at the first copy, and only if there is one.
    """
    state = module.state_dict(keep_vars=True)
    names = list(state) if only is None else only
    check_names(names, source, component)
    # The modules a model keeps on the host (HOST_ONLY: Qwen3's embedding table) keep their stored float dtype: the
    # forward casts only the rows it looks up, so the table stays a view of the file, not a copy (1.6 GB in fp32).
    as_stored = tuple(f"{m}." for m in getattr(module, "HOST_ONLY", ()))
    off_host = torch.device(device).type != "cpu"  # packed weights stay views on the CPU, and are copies elsewhere

    def hand_back(read: torch.Tensor) -> None:
        nonlocal views
        views = views or FileViews()
        views.release(read)

    for name in names:
        current = state[name]
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        shape = owner.shape if isinstance(owner, PACKED) and leaf == "weight" else current.shape
        t = load_tensor(source, name, shape)
        read = t.data if isinstance(t, QTensor) else t  # what views the file's map, when anything does
        if isinstance(t, QTensor):
            into = owner if isinstance(owner, PACKED) and leaf == "weight" else None  # a streamed block, again
            if into is None and leaf == "weight" and owner_name:
                into = packed_module(owner, t)
                if into is not None:
                    parent, _, child = owner_name.rpartition(".")
                    setattr(module.get_submodule(parent) if parent else module, child, into)
            if into is not None:
                into.assign(t, device)
                if off_host:
                    hand_back(read)
                continue
            t = t.dequantize(torch.float32)
        elif name.startswith(as_stored):
            owner._parameters[leaf] = nn.Parameter(t.to(device=device), requires_grad=False)
            continue
        loaded = t.to(device=device, dtype=dtype)
        owner._parameters[leaf] = nn.Parameter(loaded, requires_grad=False)
        if loaded is not read:  # a copy: the pages it was read from are no longer used
            hand_back(read)
    return module.eval().requires_grad_(False)
