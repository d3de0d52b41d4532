"""The memory plan for people: what `zimage-lite plan` prints and an out-of-memory error shows.

One section per stage: its blocks (resident and streamed, as ranges), weights, activations, the device peak and the
host memory it holds; then the run's peaks and the DiT's traffic per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..quant.convrot import INT8_ROWS_NAMES
from ..quant.recipes import INT8_TARGETS
from .units import format_option_size, gib

if TYPE_CHECKING:
    from .plan import Plan, StagePlan


def _ranges(names: tuple[str, ...]) -> str:
    """`layers.0, layers.1, layers.2, layers.5` -> `layers.0-2,5`; prefixes kept in execution order."""
    groups: dict[str, list[int]] = {}
    for name in names:
        prefix, index = name.rsplit(".", 1)
        groups.setdefault(prefix, []).append(int(index))
    parts = []
    for prefix, indices in groups.items():
        runs, start = [], indices[0]
        for a, b in zip(indices, indices[1:] + [None], strict=True):
            if b != a + 1:
                runs.append(f"{start}-{a}" if a > start else f"{a}")
                start = b
        parts.append(f"{prefix}.{','.join(runs)}")
    return " ".join(parts) or "none"


def _listed(parts: list[tuple[str, int]]) -> str:
    return ", ".join(f"{label} {gib(n)}" for label, n in parts if n)


def _host(s: StagePlan, cuda: bool) -> str:
    """The stage's host memory: on cpu its peak; on cuda itemised."""
    if not cuda:
        return f"  host memory: {gib(s.host_bytes)} (the stage peak: on the CPU the weights are in RAM)"
    parts = _listed([("pinned chunks", s.pinned_bytes), ("host-only tensors", s.host_weight_bytes),
                     ("placement staging", s.staging_bytes), ("kept components", s.kept_host_bytes)])
    return f"  host memory: {gib(s.host_bytes)}" + (f" ({parts})" if parts else "")


def format_plan(plan: Plan) -> str:
    """The plan for people: one section per stage, each with its peaks, then the run's peaks and DiT traffic."""
    r = plan.request
    cuda = r.kind == "cuda"
    size = format_option_size(r.budget + r.headroom)  # a byte count without a unit: measured, not given
    given = (f"{'--vram' if cuda else '--ram'} {size}" if not size.isdigit()
             else "free GPU memory" if cuda else "available RAM")
    budget = (f"{given} ({gib(r.budget + r.headroom)}) - {gib(r.headroom)} CUDA context headroom = "
              f"{gib(r.budget)} for tensors" if r.headroom else f"{given} = {gib(r.budget)} for tensors")
    lines = [(f"plan: {r.model_name}, DiT {r.quant}, text encoder {r.text_quant}, {r.width}x{r.height}, "
              f"cfg {'on' if r.cfg else 'off'}, caption <= {r.caption_tokens} tokens, {r.device} {r.dtype}"
              + (", all components kept loaded" if r.keep_loaded else "")
              + (f", ControlNet {r.control[0].version}" if r.control else "")),
             f"budget: {budget}"]
    if {r.quant, r.text_quant} & (INT8_ROWS_NAMES | set(INT8_TARGETS)):  # ComfyUI int8 weights: how they multiply
        from ..quant.int8_compute import describe_route

        lines.append(f"int8 matmuls: {describe_route(r.kind)}")
    moved = "copied to the GPU" if cuda else "read from the memory map"
    where = "on the GPU" if cuda else "in RAM"
    for s in plan.stages:
        lines.append("")
        if s.blocks:
            lines.append(f"{s.name}: {len(s.blocks)} blocks, {len(s.resident)} resident ({where}), "
                         f"{len(s.streamed)} streamed")
            lines.append(f"  resident: {_ranges(s.resident)}")
            lines.append(f"  streamed: {_ranges(s.streamed)}")
            slots = (f"{s.n_slots} slot{'s' if s.n_slots > 1 else ''} of {gib(s.slot_bytes // s.n_slots)}"
                     if s.n_slots else "none")
            lines.append(f"  weights: resident blocks {gib(s.resident_bytes)}, streaming {slots}"
                         + (f", non-block {gib(s.weight_bytes)}" if s.weight_bytes else "")
                         + (f", dequantize scratch {gib(s.scratch_bytes)}" if s.scratch_bytes else ""))
            if s.adapter_bytes:
                lines.append(f"  LoRA side paths: {gib(s.adapter_bytes)}, "
                             + ("with their blocks (resident or streamed); staged through the host" if cuda
                                else "in RAM with the non-block weights (the blocks view them)"))
            chunk = f" in chunks of {s.attention_chunk} queries" if s.attention_chunk else ""
            lines.append(f"  activations: {gib(s.activation_bytes)}, attention {s.attention}{chunk}")
        else:
            h, w = r.height // r.config.vae.scale, r.width // r.config.vae.scale
            how = (f"tiled, {s.tile}-cell tiles ({s.tile * r.config.vae.scale} px), {-(-w // s.tile)}x"
                   f"{-(-h // s.tile)}" if s.tiled else "untiled")
            lines.append(f"{s.name}: {'encode' if s.name == 'vae_encode' else 'decode'} {how}")
            lines.append(f"  weights: {gib(s.weight_bytes)}, activations {gib(s.activation_bytes)}"
                         + (f", full maps in host memory {gib(s.tile_host_bytes)}" if s.tile_host_bytes else ""))
        if s.partner_bytes:  # the DiT and the ControlNet run together, every step
            other = "ControlNet" if s.name == "dit" else "DiT"
            lines.append(f"  beside it, every step: the {other}'s {gib(s.partner_bytes)} {where}")
        if s.kept_bytes:
            lines.append(f"  kept loaded beside it: {gib(s.kept_bytes)} of the other components {where}")
        lines.append(f"  stage peak: {gib(s.peak_bytes)} {where}")
        lines.append(_host(s, cuda))
        if s.name in ("text_encoder", "enhance"):
            per = "prompt" if s.name == "text_encoder" else "token generated"
            lines.append(f"  transfer per {per}: {gib(s.transfer_bytes)} ({moved})")
        if s.name == "enhance":
            layers = ("converted once for decoding" if s.unpacked
                      else "dequantized at each token where packed, as the image path runs them")
            head = {"view": "a view of the host embedding table", "int8": "int8 rows made once"}.get(
                s.head, f"{s.head} copy of the embedding table made once")
            lines.append(f"  decoding: layers {layers}; output head {head}")
    top = max(plan.stages, key=lambda s: s.peak_bytes)
    host = max(plan.stages, key=lambda s: s.host_bytes)
    lines += ["", f"peak device memory: {gib(plan.peak_bytes)} ({top.name})",
              f"peak host memory: {gib(plan.host_peak_bytes)} ({host.name})",
              f"transfer per step: {gib(plan.transfer_per_step)} ({moved} per DiT step; the same with CFG)"]
    return "\n".join(lines)
