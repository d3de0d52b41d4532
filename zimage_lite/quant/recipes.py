"""Recipes: which GGML type each tensor gets for a target such as Q4_K_M, by name and shape alone.

One table of per-tensor types, read by the quantize tool (which writes files by it) and by the memory planner
(which sizes a preset's blocks by it). A plan is the ordered list of tensors a GGUF file will hold (name in the file,
shape, type, and the official source tensors it is made of), so sizes are known before any weight is read.

DiT (arch `lumina2`, ComfyUI names): the mix of ComfyUI-GGUF's patched llama-quantize (tools/lcpp.patch,
`img_tensor_get_type` and the LLM_ARCH_LUMINA2 keep-list; shared/reference/gguf_interop.md 3.1), which produced the
community files (jayn7/Z-Image-Turbo-GGUF, same sizes as moonbox-dev's):
- 1-D tensors, pad tokens and tensors of at most 1024 weights: F32 (ComfyUI-GGUF tools/convert.py; diffusers and
  ComfyUI cannot use a quantized or BF16 norm or pad token, gguf_interop.md 6 and 3.3).
- t_embedder, x_embedder, final_layer, cap_embedder and both refiners: BF16 (the lumina2 keep-list).
- main `layers.N` 2-D weights: the target's base type, except the fused `attention.qkv` (Q3_K_M -> Q4_K,
  Q4_K_M -> Q5_K, Q5_K_M -> Q6_K) and `feed_forward.w2` (Q3_K_M -> Q4_K, Q4_K_S -> Q5_K, Q4_K_M and Q5_K_M -> Q6_K,
  Q4_0 -> Q4_1). The image patch applies these to every layer: its `layer_info` / use_more_bits pattern is a TODO
  there, and the community sizes (Q4_K_M 4.98 GB) need w2 at Q6_K in all 30 layers.
Text encoder (arch `qwen3`, llama.cpp names): llama.cpp's `llama_tensor_get_type_impl` (src/llama-quant.cpp) for
the types offered here, including the use_more_bits layer pattern for attn_v and ffn_down.
Both: a row that does not fit the chosen block falls back as llama.cpp's `tensor_type_fallback` (formats.fallback_type).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..config import DiTConfig, TextEncoderConfig
from ..weights.names import dit_comfy_name, te_llama_cpp_name
from .formats import fallback_type, quant_bytes

Q = GGMLQuantizationType
F = LlamaFileType
SMALL_TENSOR = 1024  # ComfyUI-GGUF convert.py QUANTIZATION_THRESHOLD: tensors this small stay F32


@dataclass(frozen=True)
class Target:
    """A `--type` value: the default tensor type and the llama.cpp file type it is named after."""

    name: str
    base: GGMLQuantizationType | None  # None for the bitsandbytes formats
    ftype: LlamaFileType | None

    @property
    def is_gguf(self) -> bool:
        return self.base is not None


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("BF16", Q.BF16, F.MOSTLY_BF16), Target("Q8_0", Q.Q8_0, F.MOSTLY_Q8_0),
    Target("Q6_K", Q.Q6_K, F.MOSTLY_Q6_K), Target("Q5_K_M", Q.Q5_K, F.MOSTLY_Q5_K_M),
    Target("Q5_K_S", Q.Q5_K, F.MOSTLY_Q5_K_S), Target("Q4_K_M", Q.Q4_K, F.MOSTLY_Q4_K_M),
    Target("Q4_K_S", Q.Q4_K, F.MOSTLY_Q4_K_S), Target("Q4_0", Q.Q4_0, F.MOSTLY_Q4_0),
    Target("Q3_K_M", Q.Q3_K, F.MOSTLY_Q3_K_M), Target("Q3_K_S", Q.Q3_K, F.MOSTLY_Q3_K_S),
    Target("Q2_K", Q.Q2_K, F.MOSTLY_Q2_K), Target("int8", None, None), Target("nf4", None, None),
    Target("int8-convrot", None, None), Target("int8-rowwise", None, None),  # ComfyUI int8 (quantize/convrot.py)
]}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output: `parts` (official names) are read, concatenated along dim 0, written as `qtype`."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    parts: tuple[str, ...]
    wanted: GGMLQuantizationType | None = None  # the recipe's type before a row that does not fit fell back

    @property
    def fell_back(self) -> bool:
        return self.wanted is not None and self.wanted != self.qtype

    @property
    def nbytes(self) -> int:
        return quant_bytes(self.qtype, self.shape)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """(..., bytes per row): the uint8 layout formats.quantize returns and add_tensor_info takes."""
        block, size = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block * size)


def _natural(name: str) -> list:
    """Sort key: layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ---- DiT (lumina2) -----------------------------------------------------------------------------------------------

DIT_KEEP = ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.", "noise_refiner.")
DIT_QKV = {"Q3_K_M": Q.Q4_K, "Q4_K_M": Q.Q5_K, "Q5_K_M": Q.Q6_K}
DIT_W2 = {"Q3_K_M": Q.Q4_K, "Q4_K_S": Q.Q5_K, "Q4_K_M": Q.Q6_K, "Q5_K_M": Q.Q6_K, "Q4_0": Q.Q4_1}


def dit_tensor_type(name: str, shape: tuple[int, ...], target: Target, fallback: bool = True) -> GGMLQuantizationType:
    """GGML type of DiT tensor `name` (ComfyUI layout) of torch `shape` in a `target` file (`fallback=False`: the
    recipe's type, even where the row does not fit its block)."""
    if len(shape) < 2 or name.endswith("pad_token") or math.prod(shape) <= SMALL_TENSOR:
        return Q.F32
    if target.base == Q.BF16 or name.startswith(DIT_KEEP) or len(shape) != 2:
        return Q.BF16
    qtype = target.base
    if name.endswith(".attention.qkv.weight"):
        qtype = DIT_QKV.get(target.name, qtype)
    elif name.endswith(".feed_forward.w2.weight"):
        qtype = DIT_W2.get(target.name, qtype)
    return fallback_type(qtype, shape[-1]) if fallback else qtype


def dit_plan(shapes: Mapping[str, tuple[int, ...]], target: Target) -> list[TensorPlan]:
    """The DiT file for official tensor `shapes`: ComfyUI names, q/k/v fused into qkv, pad tokens as [1, dim]."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for official in shapes:
        comfy, part = dit_comfy_name(official)
        groups.setdefault(comfy, []).append((part[0] if part else 0, official))
    plan = []
    for comfy in sorted(groups, key=_natural):
        parts = tuple(n for _, n in sorted(groups[comfy]))
        first = tuple(shapes[parts[0]])
        shape = (sum(shapes[p][0] for p in parts), *first[1:]) if len(parts) > 1 else first
        if comfy.endswith("pad_token"):
            shape = (1, math.prod(shape))  # as ComfyUI and diffusers declare them (nn.Parameter (1, dim))
        plan.append(TensorPlan(comfy, shape, dit_tensor_type(comfy, shape, target), parts,
                               dit_tensor_type(comfy, shape, target, fallback=False)))
    return plan


def control_plan(shapes: Mapping[str, tuple[int, ...]], target: Target) -> list[TensorPlan]:
    """A ControlNet file under its own (diffusers) names, each tensor typed as the DiT recipe types its DiT
    counterpart: the control embedder and the control-refiner blocks as the DiT's embedders and refiners (kept
    BF16), the control blocks' linears as the main layers' (q/k/v as the fused qkv; before/after_proj as any
    other linear)."""
    plan = []
    for name in sorted(shapes, key=_natural):
        shape, twin = tuple(shapes[name]), dit_comfy_name(name.removeprefix("control_"))[0]
        plan.append(TensorPlan(name, shape, dit_tensor_type(twin, shape, target), (name,),
                               dit_tensor_type(twin, shape, target, fallback=False)))
    return plan


# ---- text encoder (qwen3) ----------------------------------------------------------------------------------------


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pattern for the extra bits of attn_v / ffn_down: the first and last eighth, and every
    third layer in between. llama.cpp counts tensors in file order; we write layers in order, so that is i_layer."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def te_tensor_type(name: str, shape: tuple[int, ...], target: Target, n_layers: int,
                   n_gqa: int, fallback: bool = True) -> GGMLQuantizationType:
    """GGML type of text-encoder tensor `name` (llama.cpp layout), as llama-quantize picks it for `target`
    (`fallback=False`: the recipe's type, even where the row does not fit its block)."""
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith("weight"):
        return Q.F32  # convert_hf_to_gguf writes norms and 1-D tensors as F32; llama-quantize keeps them
    if target.base == Q.BF16:
        return Q.BF16
    t, qtype = target.name, target.base
    m = re.match(r"blk\.(\d+)\.", name)
    i = int(m.group(1)) if m else 0
    if name == "token_embd.weight":
        # Qwen3-4B ties the output to the token embedding (no output.weight), so llama.cpp gives token_embd
        # the output tensor's rule: Q8_0 if the row does not fit the base block, else Q6_K unless already Q8_0.
        if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.Q8_0
        elif qtype != Q.Q8_0:
            qtype = Q.Q6_K
    elif name.endswith("attn_v.weight"):
        if t == "Q2_K":
            qtype = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif t == "Q3_K_M":
            qtype = Q.Q5_K if i < 2 else Q.Q4_K
        elif t in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            qtype = Q.Q6_K
        elif t == "Q4_K_S" and i < 4:
            qtype = Q.Q5_K
    elif name.endswith("ffn_down.weight"):
        if t == "Q2_K":
            qtype = Q.Q3_K
        elif t == "Q3_K_M":
            qtype = Q.Q5_K if i < n_layers // 16 else Q.Q4_K
        elif t in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            qtype = Q.Q6_K
        elif t == "Q4_K_S" and i < n_layers // 8:
            qtype = Q.Q5_K
    elif name.endswith("attn_output.weight"):
        qtype = {"Q2_K": Q.Q3_K, "Q3_K_M": Q.Q4_K}.get(t, qtype)
    return fallback_type(qtype, shape[-1]) if fallback else qtype


def te_plan(shapes: Mapping[str, tuple[int, ...]], target: Target, cfg: TextEncoderConfig) -> list[TensorPlan]:
    """The text-encoder file for official (HF Qwen3, no `model.`) tensor `shapes`, in llama.cpp's order:
    token_embd, blk.0 .. blk.N, output_norm. `lm_head` is left out: Qwen3-4B ties it to the embedding."""
    n_gqa = max(1, cfg.num_attention_heads // cfg.num_key_value_heads)
    rows = []
    for official, shape in shapes.items():
        if official.startswith("lm_head."):
            continue
        name = te_llama_cpp_name(official)
        order = (0,) if name.startswith("token_embd") else (2,) if name.startswith("output") else (1,)
        rows.append((order, _natural(name), name, official, tuple(shape)))
    return [TensorPlan(name, shape, te_tensor_type(name, shape, target, cfg.num_hidden_layers, n_gqa), (official,),
                       te_tensor_type(name, shape, target, cfg.num_hidden_layers, n_gqa, fallback=False))
            for _, _, name, official, shape in sorted(rows)]


# ---- shapes without weights -----------------------------------------------------------------------------------


def _meta_dit(cfg: DiTConfig):
    import torch

    from ..models.dit import ZImageDiT

    with torch.device("meta"):
        return ZImageDiT(cfg)


def dit_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor names and shapes of a DiT of `cfg`, from the model built on the meta device."""
    return {n: tuple(p.shape) for n, p in _meta_dit(cfg).named_parameters()}


def dit_linear_weights(cfg: DiTConfig) -> set[str]:
    """Official names of the DiT's nn.Linear weights (the tensors bitsandbytes quantizes)."""
    from torch import nn

    return {f"{n}.weight" for n, m in _meta_dit(cfg).named_modules() if isinstance(m, nn.Linear)}


def te_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Official names and shapes of the whole Qwen3 checkpoint (every layer and the final norm, which Z-Image
    never runs but llama.cpp-family readers expect)."""
    h, kv, hd, ffn = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
        "self_attn.v_proj.weight": (kv * hd, h), "self_attn.o_proj.weight": (h, cfg.num_attention_heads * hd),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
    }
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def file_type_name(file_type: int) -> str | None:
    """The recipe a GGUF `general.file_type` names (`Q4_K_M`, `Q8_0`, `BF16`), or None for a value gguf-py does
    not know. llama.cpp's own file types beyond the targets here (Q3_K_L, IQ4_XS) keep their llama.cpp name."""
    try:
        ftype = LlamaFileType(file_type)
    except ValueError:
        return None
    if ftype == LlamaFileType.GUESSED:
        return None
    known = next((name for name, t in TARGETS.items() if t.ftype == ftype), None)
    return known or ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")


# ---- INT8 (ComfyUI int8_tensorwise, with or without ConvRot): which tensors are quantized

INT8_BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")  # DiT blocks and Qwen3 layers (official names)
INT8_TARGETS = ("int8-convrot", "int8-rowwise")


def int8_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """True for the weights an int8 file stores as int8: every 2-D `.weight` inside a block (DiT layers and both
    refiners, Qwen3 layers: their Linears; norms are 1-D). Z-Image's published z_image_turbo_int8_convrot.safetensors
    has 857 tensors = the 453 of the ComfyUI layout + (weight_scale, comfy_quant) for 202 layers: exactly these
    (34 blocks x 6 Linears, minus the context refiner's two adaLN Linears); the embedders and the final layer stay
    float (F32 there: the file holds only F32, I8 and U8)."""
    return name.endswith(".weight") and len(shape) == 2 and name.startswith(INT8_BLOCKS)

