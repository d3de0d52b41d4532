"""The memory plan of a run under a ControlNet: the DiT's steps with the ControlNet's blocks beside the DiT's.

The ControlNet is a block stage of its own ("controlnet": resident or streamed blocks, slots, scratch) that runs
inside each DiT forward (models/controlnet.py), so both models are on the device for the whole denoising: each of
the two stages counts what the other keeps (`partner_bytes`, or with keep_loaded the other components' weights as
every stage does). The DiT is placed first (it runs most blocks), beside the least the ControlNet needs; then the
ControlNet beside what the DiT keeps. Activations: the ControlNet's blocks need what the DiT's need (the same
width), plus its streams (c, and the unified c and x: three sequences) and its hints (one sequence per control
block, held until the DiT's main layers have added them); the DiT's main layers hold the hints beside their own.
"""

from __future__ import annotations

from dataclasses import replace

from .enhance_plan import enhance_stage
from .plan import (
    PlanRequest,
    StagePlan,
    block_stage,
    finish_stages,
    stage_plan,
    vae_beside,
    vae_floor,
)
from .residency import Beside, BlockStage, floor
from .sizes import DTYPE_BYTES, ComponentBytes, component_bytes

CONTROL_STREAMS = 3  # c on the image tokens, then c and x over the unified sequence


def control_stages(req: PlanRequest, text_in: BlockStage, text_sizes: ComponentBytes, dit_in: BlockStage,
                   dit_sizes: ComponentBytes) -> tuple[StagePlan, ...]:
    """The stages of a controlled run: (enhance), (vae_encode: the control image), text encoder, DiT, ControlNet,
    VAE. The enhancer and the encoder are loaded for their stage only (beside what the others keep, keep_loaded)."""
    cfg, table = req.control
    sizes = component_bytes(cfg, table, req.dtype, "the ControlNet", kind=req.kind)
    sequence = (2 if req.cfg else 1) * dit_in.seq * cfg.dim * DTYPE_BYTES[req.dtype]
    hints = len(cfg.control_layers_places) * sequence
    dit_in = replace(dit_in, activations=dit_in.activations + hints)
    control_in = block_stage("controlnet", sizes, dit_in.activations + CONTROL_STREAMS * sequence, cfg.n_heads,
                             dit_in.seq, req)
    control_kept, control_transient = floor(control_in, req.kind)
    encode: tuple[StagePlan, ...] = ()
    if not req.keep_loaded:
        dit = stage_plan(dit_in, dit_sizes, req, Beside(control_kept, control_transient))
        control = stage_plan(control_in, sizes, req,
                             Beside(dit.loaded_bytes, dit.scratch_bytes + dit.activation_bytes))
        dit, control = (replace(dit, partner_bytes=control.loaded_bytes),
                        replace(control, partner_bytes=dit.loaded_bytes))
        text = stage_plan(text_in, text_sizes, req)
        vae = vae_beside(req)
        if req.encode:
            encode = (vae_beside(req, encode=True),)
        enhance = (enhance_stage(req),) if req.enhance_tokens else ()
    else:  # as plan._stages with keep_loaded, the ControlNet kept beside the others
        text_kept, text_transient = floor(text_in, req.kind)
        vae_weights, vae_transient = vae_floor(replace(req, budget=0, control=None))
        transient = max(text_transient, vae_transient, control_transient)
        dit = stage_plan(dit_in, dit_sizes, req, Beside(text_kept + vae_weights + control_kept, transient))
        dit_transient = dit.scratch_bytes + dit.activation_bytes
        control = stage_plan(control_in, sizes, req, Beside(dit.loaded_bytes + text_kept + vae_weights,
                                                            max(dit_transient, text_transient, vae_transient)))
        text = stage_plan(text_in, text_sizes, req, Beside(dit.loaded_bytes + control.loaded_bytes + vae_weights,
                                                           max(dit_transient, vae_transient)))
        loaded = dit.loaded_bytes + control.loaded_bytes + text.loaded_bytes
        vae = vae_beside(req, loaded)
        if req.encode:
            encode = (vae_beside(req, loaded + vae.loaded_bytes, encode=True),)
        enhance = (enhance_stage(req, Beside(loaded + vae.loaded_bytes, 0)),) if req.enhance_tokens else ()
    stages = finish_stages((*enhance, *encode, text, dit, control, vae), req)
    if req.keep_loaded or req.kind != "cuda":  # kept host memory counted by finish_stages; on cpu the peak: all
        return stages
    # cuda: each of the two holds the other's pinned chunks (and host-only tensors) on the host too
    host = {s.name: s.pinned_bytes + s.host_weight_bytes for s in stages}
    other = {"dit": "controlnet", "controlnet": "dit"}
    return tuple(replace(s, kept_host_bytes=host[other[s.name]], host_bytes=s.host_bytes + host[other[s.name]])
                 if s.name in other else s for s in stages)
