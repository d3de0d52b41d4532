"""The memory plan of the prompt enhancer's stage: the text encoder run as a causal LM (enhance.py).

Decoding runs every weight once per token, so a packed weight would be dequantized at every token (Q4_K: ~1.4 G
weights/s on 2 CPU cores, 2.5 s a token at 4B). On the CPU the layers are first planned in their decoding form
(`decode_table`: int4 from Q4_K and int8 rows else with the weight-only kernels of quant/decode_linear.py, the compute
dtype without them), converted once at load (enhance.unpack_layers), and kept so when every layer then stays
resident; else the stored table, dequantized at each token. The output head is the tied embedding table, held as
`head_form` says. The enhancer runs this very plan (ZImagePipeline.enhance_stage), and `plan --enhance` prints it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..quant.decode_linear import decode_route, plan_type
from .plan import F32, PlanRequest, StagePlan, block_stage, stage_plan, tensor_tables
from .residency import ALONE, Beside, NoFit
from .sizes import DTYPE_BYTES, DTYPE_TYPES, FLOATS, TensorTable, component_bytes, kv_cache_bytes, stored_bytes


def enhance_stage(req: PlanRequest, beside: Beside = ALONE) -> StagePlan:
    """The enhancer's stage (every layer and the final norm: text_tensors must hold them), beside `beside`: on the
    CPU in the decoding form when every layer then stays resident, else as stored; NoFit when neither fits."""
    if req.kind == "cpu":
        decoding = replace(req, text_tensors=decode_table(tensor_tables(req)[1], req.dtype, req.device))
        try:
            stage = _enhance_stage(decoding, beside, unpacked=True)
            if not stage.streamed:
                return stage
        except NoFit:
            pass
    return _enhance_stage(req, beside, unpacked=False)


def decode_table(table: TensorTable, dtype: str, device: str) -> TensorTable:
    """The text encoder's table as the enhancer holds it converted for decoding: each packed 2-D decoder weight in
    the form quant/decode_linear.py makes of it (int4 from Q4_K, int8 rows else) with the packed decode route, in
    the compute dtype with the float one; the layers' floats in the compute dtype; the rest as stored."""
    packed = decode_route(device) == "packed"

    def held(name: str, shape: tuple[int, ...], fmt: str) -> str:
        if not name.startswith("layers."):
            return fmt
        return plan_type(shape, fmt) if packed and fmt not in FLOATS and len(shape) == 2 else DTYPE_TYPES[dtype]

    return {n: (shape, held(n, shape, fmt)) for n, (shape, fmt) in table.items()}


def head_form(table: TensorTable, kind: str, dtype: str, device: str) -> str:
    """How the enhancer holds its output head, the tied embedding table: "view" (on the CPU, the host table stored in
    the compute dtype), "int8" (int8 rows made once, as `decode_table` holds a packed layer weight: a quantized table
    on the CPU with the packed decode route), else `dtype` (a copy, dequantized once)."""
    stored = table["embed_tokens.weight"][1]
    if kind == "cpu" and stored == DTYPE_TYPES[dtype]:
        return "view"
    return "int8" if kind == "cpu" and stored not in FLOATS and decode_route(device) == "packed" else dtype


def _enhance_stage(req: PlanRequest, beside: Beside, unpacked: bool) -> StagePlan:
    """Activations: the KV cache for the whole context, the prompt's pass (as the text stage's), the fp32 logits
    and probabilities, the head as `head_form` holds it and, on the CPU, the mapped table it is read from."""
    c, elem, seq = req.config.text_encoder, DTYPE_BYTES[req.dtype], req.enhance_tokens
    table = tensor_tables(req)[1]
    sizes = component_bytes(c, table, req.dtype, f"the {req.text_quant} text encoder", lm=True,
                            kind=req.kind)
    kv = kv_cache_bytes(c, seq, elem)
    q, k = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    prompt = seq * max(2 * c.hidden_size + 3 * c.intermediate_size, 2 * c.hidden_size + 2 * q + 2 * k) * elem
    head = head_form(table, req.kind, req.dtype, req.device)
    vocab = (c.vocab_size, c.hidden_size)
    held = 0 if head == "view" else stored_bytes(vocab, "int8") if head == "int8" else math.prod(vocab) * elem
    # On the CPU every page of the mapped table is read (into the head, or as it, every token): resident beside it.
    if req.kind == "cpu":
        held += stored_bytes(vocab, table["embed_tokens.weight"][1])
    act = kv + prompt + 2 * c.vocab_size * F32 + held
    stage = block_stage("enhance", sizes, act, c.num_attention_heads, seq, replace(req, cfg=False))
    return replace(stage_plan(stage, sizes, req, beside), unpacked=unpacked, head=head)
