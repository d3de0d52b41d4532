"""ComfyUI INT8 safetensors files (`--type int8-convrot`, `--type int8-rowwise`): DiT or Qwen3 text encoder.

One safetensors file in the layout ComfyUI's own loader reads (zimage_lite/quant/convrot.py has the conventions and
their sources): each quantized Linear `M` becomes `M.weight` int8 [out, in], `M.weight_scale` fp32 [out, 1] and
`M.comfy_quant` (uint8 bytes of `{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256}`; without
the two convrot fields for int8-rowwise, or for a layer whose input width 256 does not divide). Which tensors are
quantized: quant/recipes.py `int8_quantized` (what Comfy-Org's z_image_turbo_int8_convrot.safetensors holds). The
rest is kept float: F32 in the DiT (as in that file), BF16 for the text encoder's 2-D tensors (its 0.39 G-weight
embedding table would double in F32; no published INT8 Qwen3 file was readable to follow) and F32 for its norms.
Names: the DiT in ComfyUI's layout (fused `attention.qkv`, as the GGUF recipes write it), the text encoder under
`model.` as the official folder and ComfyUI's qwen_3_4b.safetensors name it. The header metadata holds only
provenance; ComfyUI needs none (the per-layer `comfy_quant` tensors are its format tags). Written through
bnb.write_safetensors, streaming one tensor at a time into a temporary file renamed at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from zimage_lite.quant.convrot import CONVROT, ROWWISE, Int8Rows, comfy_quant_bytes, quantize_weight
from zimage_lite.quant.recipes import TARGETS, dit_plan, int8_quantized

from .bnb import BnbGroup, StEntry

FILE_NAMES = {"dit": "z_image_turbo_{t}.safetensors", "text_encoder": "qwen_3_4b_{t}.safetensors"}
TE_PREFIX = "model."


def layer_type(target: str, shape: tuple[int, ...]) -> Int8Rows:
    """ConvRot when asked for and the row splits into groups of 256 (else plain rows, as ComfyUI's writers do)."""
    if target == "int8-convrot" and shape[-1] % CONVROT.groupsize == 0:
        return CONVROT
    return ROWWISE


def int8_plan(component: str, shapes: dict[str, tuple[int, ...]], target: str
              ) -> tuple[list[BnbGroup], dict[str, tuple[str, ...]]]:
    """The groups of the output file and, per group, the official tensors read (concatenated along rows) for it."""
    if component == "dit":
        tensors: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = [
            (tp.name, tp.shape, tp.parts) for tp in dit_plan(shapes, TARGETS["BF16"])]
    else:
        tensors = [(TE_PREFIX + name, shape, (name,)) for name, shape in shapes.items()]
    groups, parts = [], {}
    for name, shape, sources in tensors:
        parts[name] = sources
        if int8_quantized(sources[0], shape):
            module = name.removesuffix(".weight")
            tag = comfy_quant_bytes(layer_type(target, shape))
            groups.append(BnbGroup(name, layer_type(target, shape).name, (
                StEntry(name, "I8", shape), StEntry(f"{module}.weight_scale", "F32", (shape[0], 1)),
                StEntry(f"{module}.comfy_quant", "U8", (len(tag),)))))
        else:
            kind = "BF16" if component == "text_encoder" and len(shape) == 2 else "F32"
            groups.append(BnbGroup(name, kind, (StEntry(name, kind, shape),)))
    return groups, parts


def make_group(group: BnbGroup, read: Callable[[str], torch.Tensor]) -> list[np.ndarray]:
    """The arrays of `group` from its (fused) float tensor `read(group.source)`."""
    w = read(group.source)
    if group.kind == "F32":
        return [w.detach().float().contiguous().numpy()]
    if group.kind == "BF16":
        return [w.detach().to(torch.bfloat16).contiguous().view(torch.uint16).numpy()]
    qtype = CONVROT if group.kind == CONVROT.name else ROWWISE
    q, scale = quantize_weight(w, qtype)
    return [q.numpy(), scale.numpy(), np.frombuffer(comfy_quant_bytes(qtype), dtype=np.uint8)]


def histogram(groups: list[BnbGroup]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in groups:
        out[g.kind] = out.get(g.kind, 0) + 1
    return out


def read_fused(read: Callable[[str, tuple[int, ...]], torch.Tensor], shapes: dict[str, tuple[int, ...]],
               parts: dict[str, tuple[str, ...]]) -> Callable[[str], torch.Tensor]:
    """name in the file -> its float tensor: the official parts read and stacked along rows (q, k, v)."""
    def fused(name: str) -> torch.Tensor:
        pieces = [read(p, shapes[p]) for p in parts[name]]
        return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]

    return fused
