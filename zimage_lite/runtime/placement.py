"""Placement: a model built on `meta`, its weight source and its stage plan in; the loaded model with its runner out.

The model's own block schedule (`model.schedule()`: name, module, tensors) is what gets placed; the plan names, for
each of those blocks, whether it stays resident or streams, and the two must list the same blocks. Then:

- on a GPU (or any `devices.Device`): the non-block weights and the resident blocks are read from the source straight
  onto the device, tensor by tensor; Qwen3's embedding table stays on the host (only the prompt's rows move). The
  streamed blocks are read one at a time and copied into their place in the pinned host chunks (`streamer.Streamer`),
  so the component never exists whole in host RAM. The placed figures are then checked against the plan.
- on the CPU: everything but the streamed blocks is loaded (the weights stay in the memory map where they can);
  the streamed blocks stay on `meta` and are read at each use (`streamer.LazyBlocks`).

`place` returns the model with `model.runner` set; the pipeline calls `model.runner.close()` (when it has one) at the
end of the stage to free the pinned memory.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import OptionError
from ..models.layers import Block
from ..weights.load import load_module, tensor_names
from ..weights.sources import RenamedSource, TensorSource
from .devices import Device, device_for
from .memory import FileViews
from .plan import StagePlan
from .streamer import LazyBlocks, Streamer
from .units import format_size


class PlanMismatchWarning(UserWarning):
    """What placement allocated differs from what the plan counted: the plan's memory figures are off."""


def place(model: nn.Module, source: TensorSource, stage: StagePlan | None, device: torch.device | Device,
          dtype: torch.dtype, label: str) -> nn.Module:
    """Load `model` (built on `meta`) from `source` as `stage` plans it, on `device`, float weights in `dtype`.

    `stage` None keeps every block resident. Returns the model, with `model.runner` set to a `Streamer` on a device,
    to `LazyBlocks` on the CPU when blocks stream (else the model's own resident runner). OptionError when the plan
    names other blocks than the model's schedule.
    """
    schedule = model.schedule()
    streamed = streamed_blocks(schedule, stage, label)
    if isinstance(device, torch.device) and device.type == "cpu":
        return _place_on_cpu(model, source, schedule, streamed, dtype, label)
    dev = device if isinstance(device, Device) else device_for(device)
    _load_outside_blocks(model, source, schedule, dev.torch_device, dtype, label)
    by_module = {id(b.module): b for b in schedule}
    for block in schedule:
        if block.name not in streamed:
            _load_block(block, source, dtype, dev.torch_device, label)
    model.runner = Streamer([b.module for b in schedule], [b.name in streamed for b in schedule], dev,
                            load=lambda m, views: _load_block(by_module[id(m)], source, dtype, "cpu", label, views))
    if stage is not None:
        check_against_plan(model.runner, stage, label)
    return model


def streamed_blocks(schedule: list[Block], stage: StagePlan | None, label: str) -> set[str]:
    """The names of the blocks `stage` streams, after checking that it plans exactly the schedule's blocks."""
    if stage is None:
        return set()
    names, planned = {b.name for b in schedule}, set(stage.blocks)
    unknown, unplanned = sorted(planned - names), sorted(names - planned)
    if unknown or unplanned:
        what = (f"names block(s) {', '.join(unknown)} that the {label} does not have" if unknown else
                f"leaves out the {label}'s block(s) {', '.join(unplanned)}")
        raise OptionError(f"the {stage.name} plan {what}: it was made for another configuration; make the plan "
                          "from this model's config")
    resident, streamed = set(stage.resident), set(stage.streamed)
    if resident & streamed or resident | streamed != planned:
        raise OptionError(f"the {stage.name} plan must list each block once, as resident or streamed")
    return streamed


def check_against_plan(runner: Streamer, stage: StagePlan, label: str) -> list[str]:
    """Compare what placement allocated with what the plan counted; warn (PlanMismatchWarning) naming the stage
    and both figures when they differ. Returns the differences."""
    figures = [("streaming slots", runner.slot_bytes, stage.slot_bytes),
               ("bytes copied per pass", runner.transfer_bytes, stage.transfer_bytes),
        ("pinned host memory", runner.host_bytes, stage.pinned_bytes)]
    diffs = [f"{what} {format_size(got)} ({got} B) placed, {format_size(want)} ({want} B) planned"
             for what, got, want in figures if got != want]
    if diffs:
        warnings.warn(PlanMismatchWarning(
            f"{label} ({stage.name} stage): the memory placed differs from the plan: {'; '.join(diffs)}. "
            "The figures `zimage-lite plan` printed are off for this model; please report it."), stacklevel=3)
    return diffs


def _place_on_cpu(model: nn.Module, source: TensorSource, schedule: list[Block], streamed: set[str],
                  dtype: torch.dtype, label: str) -> nn.Module:
    lazy = [b for b in schedule if b.name in streamed]
    skip = {n for b in lazy for n in b.tensors}
    load_module(model, source, dtype, "cpu", label, only=[n for n in tensor_names(model) if n not in skip])
    if lazy:
        by_module = {id(b.module): b for b in lazy}
        model.runner = LazyBlocks([b.module for b in schedule], [b.name in streamed for b in schedule],
                                  lambda m, views: _load_block(by_module[id(m)], source, dtype, "cpu", label, views))
    return model


def _load_outside_blocks(model: nn.Module, source: TensorSource, schedule: list[Block], device: torch.device,
                         dtype: torch.dtype, label: str) -> None:
    """The non-block weights (embedders, final layer, norms) onto `device`; the model's HOST_ONLY modules (Qwen3's
    0.4 G-param embedding table: only the prompt's rows move) onto the host."""
    in_blocks = {n for b in schedule for n in b.tensors}
    names = [n for n in tensor_names(model) if n not in in_blocks]
    host_only = getattr(model, "HOST_ONLY", ())
    host = [n for n in names if n.split(".", 1)[0] in host_only]
    load_module(model, source, dtype, "cpu", label, only=host)
    load_module(model, source, dtype, device, label, only=[n for n in names if n not in host])


def _load_block(block: Block, source: TensorSource, dtype: torch.dtype, device: torch.device | str,
                label: str, views: FileViews | None = None) -> None:
    """Read one block's tensors from the source (under the block's own names) onto `device` (`views`: the file maps
    as the caller read them, for load_module)."""
    prefix = block.name + "."
    view = RenamedSource(source, {n[len(prefix):]: n for n in block.tensors})
    load_module(block.module, view, dtype, device, f"{label} block {block.name}", views=views)
