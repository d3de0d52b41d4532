"""The memory planner: which blocks stay on the device, which stream, and the peak of each stage, from configs alone.

Pure arithmetic; no weights are read. Sources: zimage_spec.md §8 (parameter counts, activation formulas), the VAE's
own counts of what it allocates (vae_plan.py), gguf_interop.md §3.1 and llama.cpp `llama-quant.cpp` (which tensor a
K-quant mix gives which type), lowvram_peers.md §10/§12 (two slots, resident set, one plan for every step).

Stages run one after another, so the run's peak is the largest stage peak. A stage peak is
non-block weights + resident blocks + streaming slots + dequantize scratch + activations. On cuda blocks live on the
card packed (quantized) and stream from the host through two slots (copy block i+1 while block i computes). On cpu
the weights stay in the memory map (file pages the OS may drop), so the plan bounds how many blocks are held
dequantized in the compute dtype; the streamed ones are dequantized into one reused buffer each time they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..config import MAX_TEXT_TOKENS, PRESETS, SEQ_MULTI_OF, ModelConfig
from ..errors import BudgetError, OptionError
from .budget import (
    FLOATS,
    GIB,
    QUANT_LADDER,
    Tensors,
    cpu_has_bf16,
    dit_tensors,
    format_option_size,
    format_rank,
    format_size,
    normalize_format,
    qwen_layer_tensors,
    usable_budget,
)
from .vae_plan import vae_passes

F32 = 4
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
STREAM_SLOTS = {"cuda": 2, "cpu": 1}  # cuda: copy the next block while one computes; cpu: one block read at a time
MIN_ATTENTION_CHUNK = 64  # query rows per chunk below which chunked attention stops paying its loop overhead


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on. `budget` is what tensors may use, after any headroom was taken off."""

    config: ModelConfig
    budget: int
    quant: str = "Q4_K_M"  # DiT weight format
    text_quant: str = "BF16"
    width: int = 1024
    height: int = 1024
    cfg: bool = False
    device: str = "cuda"  # "cuda" plans VRAM, "cpu" plans RAM
    dtype: str = "bf16"  # compute dtype: bf16 | fp16 | fp32
    caption_tokens: int = MAX_TEXT_TOKENS  # the worst case unless the prompt is known
    headroom: int = 0  # bytes taken off the user's figure before `budget` (CUDA context); shown in messages
    model_name: str = "custom"
    encode: bool = False  # also plan the VAE encoder's stage (an input image to encode)


@dataclass(frozen=True)
class StagePlan:
    """One stage. Block names are in execution order; a resident block is copied once and never again."""

    name: str  # "text_encoder" | "dit" | "vae"
    blocks: tuple[str, ...]
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    weight_bytes: int  # non-block weights on the device (embedders, final layer; the whole VAE decoder)
    resident_bytes: int  # resident blocks: packed when quantized, else in the compute dtype
    slot_bytes: int  # all streaming slots together: n_slots x the largest streamed block, 0 if none streams
    n_slots: int
    scratch_bytes: int  # one Linear weight dequantized to the compute dtype just before F.linear (cuda)
    activation_bytes: int  # activation peak at this resolution, attention scores included
    transfer_bytes: int  # streamed bytes per run of the blocks (per DiT step, per prompt for the text encoder)
    attention: str | None = None  # "sdpa" | "chunked"
    attention_chunk: int | None = None  # query rows per chunk when chunked
    tiled: bool = False
    tile: int | None = None  # latent cells per tile side
    tile_host_bytes: int = 0  # cuda, tiled: the full feature maps the VAE keeps in host memory (VAEMemory.host)

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.resident_bytes + self.slot_bytes + self.scratch_bytes + self.activation_bytes


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    stages: tuple[StagePlan, ...]

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def transfer_per_step(self) -> int:
        """Bytes copied host->device (cuda) or read from the memory map (cpu) per DiT step; CFG's batch of
        two goes through each block together, so it is the same with CFG."""
        return self.stage("dit").transfer_bytes


@dataclass(frozen=True)
class _Block:
    name: str
    device: int  # bytes while held on the device
    moved: int  # bytes copied or dequantized each time it streams


class _NoFit(Exception):
    """A stage that cannot fit even at its smallest setting; `parts` is its smallest need, itemised."""

    def __init__(self, stage: str, parts: str):
        super().__init__(stage)
        self.stage, self.parts = stage, parts


def _held(tensors: Tensors, req: PlanRequest) -> tuple[int, int]:
    """(bytes while on the device, bytes as stored) of a block or of the non-block tensors."""
    elem = DTYPE_BYTES[req.dtype]
    # Float checkpoints are cast once to the compute dtype; quantized ones stay packed (on the GPU, or on the CPU in
    # the memory map) and each Linear is dequantized just before its matmul.
    return tensors.nbytes(floats_as={2: "BF16", 4: "F32"}[elem]), tensors.nbytes()


def _scratch(groups: list[Tensors], req: PlanRequest) -> int:
    """Largest quantized Linear dequantized to the compute dtype: the one transient of packed weights."""
    return max((r * c for t in groups for _, r, c, f in t.linear if f not in FLOATS), default=0) * (
        DTYPE_BYTES[req.dtype])


def _order_for_residency(blocks: list[_Block], k: int) -> tuple[set[str], list[_Block]]:
    """The k blocks to keep: the largest (small slots, least traffic); among equal blocks the streamed ones are spread
    evenly, so each copy hides behind the compute of the resident blocks before it."""
    by_size = sorted(blocks, key=lambda b: -b.device)
    keep = {b.name for b in by_size[:k]}
    if 0 < k < len(blocks):
        edge = by_size[k - 1].device  # the size group cut by the boundary
        group = [b for b in blocks if b.device == edge]
        n_stream = sum(1 for b in group if b.name not in keep)
        keep -= {b.name for b in group}
        spread = {int((i + 0.5) * len(group) / n_stream) for i in range(n_stream)}
        keep |= {b.name for i, b in enumerate(group) if i not in spread}
    return keep, [b for b in blocks if b.name not in keep]


def _block_stage(name: str, blocks: list[_Block], weights: int, scratch: int, act: int, scores, req: PlanRequest,
                 seq: int) -> StagePlan:
    """Attention first (SDPA unless its scores cannot fit), then as many resident blocks as the rest allows."""
    n_slots = STREAM_SLOTS[req.device]
    options = []  # (kept names, resident bytes, slot bytes) for k = 0..n resident blocks
    for k in range(len(blocks) + 1):
        keep, streamed = _order_for_residency(blocks, k)
        slots = n_slots * max((b.device for b in streamed), default=0)
        options.append((keep, sum(b.device for b in blocks if b.name in keep), slots))
    # Not always k = 0: one large block kept resident can need less than two slots of its size.
    best = min(options, key=lambda o: o[1] + o[2])
    least = best[1] + best[2]
    chunks = [None] + [c for c in (2**p for p in range(20, 5, -1)) if MIN_ATTENTION_CHUNK <= c < seq and scores(c)]
    for chunk in chunks:
        fixed = weights + scratch + act + scores(chunk)
        if fixed + least <= req.budget:
            break
    else:
        slot_words = "two streaming slots" if n_slots == 2 else "one streamed block"
        parts = [f"{len(best[0])} resident blocks {format_size(best[1])}" if best[0] else "",
                 f"{slot_words} {format_size(best[2])}" if best[2] else "",
                 f"activations {format_size(act + scores(chunk))}"
                 + (f" with attention in chunks of {chunk}" if chunk else ""),
                 f"non-block weights {format_size(weights)}" if weights else "",
                 f"dequantize scratch {format_size(scratch)}" if scratch else ""]
        raise _NoFit(name, " + ".join(p for p in parts if p))
    # The most resident blocks that fit; with the attention settled, more budget never keeps fewer.
    keep, resident, slots = next(o for o in reversed(options) if fixed + o[1] + o[2] <= req.budget)
    names = tuple(b.name for b in blocks)
    return StagePlan(
        name=name, blocks=names, resident=tuple(n for n in names if n in keep),
        streamed=tuple(n for n in names if n not in keep), weight_bytes=weights, resident_bytes=resident,
        slot_bytes=slots, n_slots=n_slots if slots else 0, scratch_bytes=scratch,
        activation_bytes=act + scores(chunk), transfer_bytes=sum(b.moved for b in blocks if b.name not in keep),
        attention="sdpa" if chunk is None else "chunked", attention_chunk=chunk)


def _scores_fn(req: PlanRequest, batch: int, heads: int, seq: int):
    """Attention scores, fp32. CUDA SDPA (flash / memory-efficient) never materialises them; torch's CPU SDPA may
    fall back to the math path, which holds heads x rows x S, so cpu plans count that (chunked: rows = chunk)."""
    if req.device == "cuda":
        return lambda chunk: 0
    return lambda chunk: batch * heads * (chunk or seq) * seq * F32


def _text_stage(req: PlanRequest) -> StagePlan:
    c, elem, batch = req.config.text_encoder, DTYPE_BYTES[req.dtype], 2 if req.cfg else 1
    blocks, groups = [], []
    for i in range(c.layers_used):  # the last layer's output is never read (hidden_states[-2])
        tensors = qwen_layer_tensors(c, req.text_quant, i)
        device, stored = _held(tensors, req)
        blocks.append(_Block(f"layers.{i}", device, device if req.device == "cuda" else stored))
        groups.append(tensors)
    seq, q, kv = req.caption_tokens, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mlp = seq * (2 * c.hidden_size + 3 * c.intermediate_size) * elem  # residual, normed, gate, up, act(gate)*up
    attn = seq * (2 * c.hidden_size + 2 * q + 2 * kv) * elem  # residual, normed, q, k, v, attention output
    # The embedding table stays on the host; only the prompt's rows come over (and the features go back).
    act = batch * (max(mlp, attn) + seq * c.hidden_size * elem)
    return _block_stage("text_encoder", blocks, 0, _scratch(groups, req), act,
                        _scores_fn(req, batch, c.num_attention_heads, seq), req, seq)


def _dit_stage(req: PlanRequest) -> StagePlan:
    c, elem, batch = req.config.dit, DTYPE_BYTES[req.dtype], 2 if req.cfg else 1
    order = ([("noise_refiner", i) for i in range(c.n_refiner_layers)]
             + [("context_refiner", i) for i in range(c.n_refiner_layers)]
             + [("layers", i) for i in range(c.n_layers)])  # execution order, zimage_spec.md §4.3
    blocks, groups = [], []
    for kind, i in order:
        tensors = dit_tensors(c, req.quant, kind)
        device, stored = _held(tensors, req)
        blocks.append(_Block(f"{kind}.{i}", device, device if req.device == "cuda" else stored))
        groups.append(tensors)
    other = dit_tensors(c, req.quant, "other")
    weights, _ = _held(other, req)
    # Tokens (zimage_spec.md §4.3): image N = (H/16)(W/16) padded to 32; caption Lp <= 512 padded to 32; S = Np + Lp.
    cell = req.config.vae.scale * c.patch_size
    n_img = math.ceil((req.height // cell) * (req.width // cell) / SEQ_MULTI_OF) * SEQ_MULTI_OF
    n_cap = math.ceil(req.caption_tokens / SEQ_MULTI_OF) * SEQ_MULTI_OF
    seq = n_img + n_cap
    ffn = seq * (2 * c.dim + 3 * c.ffn_dim) * elem  # §8.2 "FFN-phase peak": residual, normed, three ffn-wide
    attn = seq * c.dim * (6 * elem + 2 * F32)  # residual, normed, q, k, v, out + q and k in fp32 for the RoPE
    rope = seq * (c.head_dim // 2) * 2 * F32  # complex64 table, shared by the CFG pair
    latent = 3 * c.in_channels * (req.height // req.config.vae.scale) * (req.width // req.config.vae.scale) * F32
    act = batch * (max(ffn, attn) + n_cap * c.cap_feat_dim * elem) + rope + latent
    return _block_stage("dit", blocks, weights, _scratch(groups + [other], req), act,
                        _scores_fn(req, batch, c.n_heads, seq), req, seq)


def _vae_stage(req: PlanRequest, encode: bool = False) -> StagePlan:
    """Decoding (or encoding an input image) with the largest VAE tiles that fit: the fewest tiles, the fastest."""
    name = "vae_encode" if encode else "vae"
    for p in vae_passes(req.config.vae, req.width, req.height, req.dtype, req.device, encode):
        if p.weights + p.beside + p.activations <= req.budget:
            return StagePlan(name=name, blocks=(), resident=(), streamed=(), weight_bytes=p.weights,
                             resident_bytes=0, slot_bytes=0, n_slots=0, scratch_bytes=0,
                             activation_bytes=p.beside + p.activations, transfer_bytes=0, tiled=p.tile is not None,
                             tile=p.tile, tile_host_bytes=p.host)
    how = f"{p.tile}-cell tiles" if p.tile else "untiled"
    raise _NoFit(name, f"weights {format_size(p.weights)} + {how} activations {format_size(p.activations)} + "
                 f"{'image' if encode else 'latent'} {format_size(p.beside)}")


def _stages(req: PlanRequest) -> tuple[StagePlan, ...]:
    encode = (_vae_stage(req, encode=True),) if req.encode else ()
    return *encode, _text_stage(req), _dit_stage(req), _vae_stage(req)


def minimum_budget(req: PlanRequest) -> int:
    """The smallest `budget` for which `make_plan(req)` succeeds (everything streamed, smallest tiles and chunks)."""
    req = _checked(req)
    low, high = 1, 1
    while not _fits(replace(req, budget=high)):
        low, high = high, high * 2
    while low < high:  # need(budget) is monotone, so bisect on it
        mid = (low + high) // 2
        low, high = (mid + 1, high) if not _fits(replace(req, budget=mid)) else (low, mid)
    return high


def _fits(req: PlanRequest) -> bool:
    try:
        _stages(req)
    except _NoFit:
        return False
    return True


def _checked(req: PlanRequest) -> PlanRequest:
    """`req` with canonical format names, or OptionError for a value no plan can use."""
    req = replace(req, quant=normalize_format(req.quant, "--quant"),
                  text_quant=normalize_format(req.text_quant, "--text-quant"))
    cell = req.config.vae.scale * req.config.dit.patch_size
    for option, value in (("--width", req.width), ("--height", req.height)):
        if value <= 0 or value % cell:
            raise OptionError(f"{option} {value} must be a positive multiple of {cell}")
    if req.dtype not in DTYPE_BYTES:
        raise OptionError(f"--dtype {req.dtype!r}: use auto, bf16, fp16 or fp32")
    if not 1 <= req.caption_tokens <= MAX_TEXT_TOKENS:
        raise OptionError(f"caption_tokens {req.caption_tokens} must be between 1 and {MAX_TEXT_TOKENS}")
    return req


def make_plan(req: PlanRequest) -> Plan:
    """The plan for `req`; BudgetError (with the smallest budget and the alternatives that fit) when none exists."""
    req = _checked(req)
    try:
        return Plan(req, _stages(req))
    except _NoFit:
        raise BudgetError(_too_small(req)) from None


def _too_small(req: PlanRequest) -> str:
    """Why no plan fits, the smallest budget that does, and the other settings that fit this budget."""
    option = "--vram" if req.device == "cuda" else "--ram"
    need = minimum_budget(req)
    try:  # just below the minimum, the first stage to fail is the one that sets it
        _stages(replace(req, budget=need - 1))
    except _NoFit as e:
        binding = e
    tries = [f"{option} {format_option_size(need + req.headroom, round_up=True)}"]
    smaller = [q for q in QUANT_LADDER if format_rank(q) < format_rank(req.quant)]
    quant = next((q for q in smaller if _fits(replace(req, quant=q))), None)
    if quant:
        tries.append(f"--quant {quant}")
    if binding.stage == "text_encoder" and req.text_quant in FLOATS:
        text = next((q for q in QUANT_LADDER if _fits(replace(req, text_quant=q))), None)
        if text:
            tries.append(f"a {text} text encoder")
    cell = req.config.vae.scale * req.config.dit.patch_size
    for quarters in (3, 2, 1):  # 3/4, 1/2, 1/4 of each side, on the model's size grid
        w, h = (max(cell, side * quarters // 4 // cell * cell) for side in (req.width, req.height))
        if _fits(replace(req, width=w, height=h)):
            tries.append(f"--width {w} --height {h}")
            break
    headroom = f" + {format_size(req.headroom)} CUDA context headroom" if req.headroom else ""
    alternatives = ", ".join(tries[:-1]) + " or " + tries[-1] if len(tries) > 1 else tries[0]
    return (f"{option} {format_option_size(req.budget + req.headroom)} is too small for {req.quant} at "
            f"{req.width}x{req.height}{' with CFG' if req.cfg else ''} on {req.device}: the smallest plan needs "
            f"{format_size(need + req.headroom)} ({binding.stage}: {binding.parts}{headroom}). Try {alternatives}.")


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bf16 where the hardware has it, fp16 on CUDA cards without bf16, fp32 on CPUs without native bf16."""
    if dtype != "auto":
        return dtype
    import torch

    if device == "cuda":
        return "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"
    return "bf16" if cpu_has_bf16() else "fp32"


def plan_for(preset_or_config: str | ModelConfig, quant: str, width: int, height: int, cfg: bool, device: str,
             vram: int | None, ram: int | None, dtype: str = "auto", text_quant: str | None = None,
             caption_tokens: int = MAX_TEXT_TOKENS) -> Plan:
    """The plan for a run as the CLI describes it. `vram` counts the whole card (the CUDA context comes off it);
    `ram` is what the run may use. Missing budgets come from the device; `ram` is ignored on cuda."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise OptionError(f"--preset {preset_or_config!r}: use one of {', '.join(PRESETS)}")
        config, name = PRESETS[preset_or_config], preset_or_config
    else:
        config, name = preset_or_config, "custom"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in STREAM_SLOTS:
        raise OptionError(f"--device {device!r}: use auto, cpu or cuda")
    budget, headroom = usable_budget(device, vram, ram)
    return make_plan(PlanRequest(
        config=config, budget=budget, quant=quant, text_quant=text_quant or "BF16", width=width, height=height,
        cfg=cfg, device=device, dtype=resolve_dtype(dtype, device), caption_tokens=caption_tokens,
        headroom=headroom, model_name=name))


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


def _gib(n: int) -> str:
    """X.XX GiB, with the exact size after it when that rounds to nothing (the demo model)."""
    return f"{n / GIB:.2f} GiB" + (f" ({format_size(n)})" if 0 < n < GIB // 100 else "")


def format_plan(plan: Plan) -> str:
    """The plan for people: one section per stage, each with its peak, then the run's peak and DiT traffic."""
    r = plan.request
    given = f"{'--vram' if r.device == 'cuda' else '--ram'} {format_option_size(r.budget + r.headroom)}"
    budget = (f"{given} ({_gib(r.budget + r.headroom)}) - {_gib(r.headroom)} CUDA context headroom = "
              f"{_gib(r.budget)} for tensors" if r.headroom else f"{given} = {_gib(r.budget)} for tensors")
    lines = [(f"plan: {r.model_name}, DiT {r.quant}, text encoder {r.text_quant}, {r.width}x{r.height}, "
              f"cfg {'on' if r.cfg else 'off'}, caption <= {r.caption_tokens} tokens, {r.device} {r.dtype}"),
             f"budget: {budget}"]
    moved = "copied to the GPU" if r.device == "cuda" else "read from the memory map"
    for s in plan.stages:
        lines.append("")
        if s.blocks:
            kept = "in RAM" if r.device == "cpu" else "on the GPU"
            lines.append(f"{s.name}: {len(s.blocks)} blocks, {len(s.resident)} resident ({kept}), "
                         f"{len(s.streamed)} streamed")
            lines.append(f"  resident: {_ranges(s.resident)}")
            lines.append(f"  streamed: {_ranges(s.streamed)}")
            slots = (f"{s.n_slots} slot{'s' if s.n_slots > 1 else ''} of {_gib(s.slot_bytes // s.n_slots)}"
                     if s.n_slots else "none")
            lines.append(f"  weights: resident blocks {_gib(s.resident_bytes)}, streaming {slots}"
                         + (f", non-block {_gib(s.weight_bytes)}" if s.weight_bytes else "")
                         + (f", dequantize scratch {_gib(s.scratch_bytes)}" if s.scratch_bytes else ""))
            chunk = f" in chunks of {s.attention_chunk} queries" if s.attention_chunk else ""
            lines.append(f"  activations: {_gib(s.activation_bytes)}, attention {s.attention}{chunk}")
        else:
            h, w = r.height // r.config.vae.scale, r.width // r.config.vae.scale
            how = (f"tiled, {s.tile}-cell tiles ({s.tile * r.config.vae.scale} px), {-(-w // s.tile)}x"
                   f"{-(-h // s.tile)}" if s.tiled else "untiled")
            lines.append(f"{s.name}: {'encode' if s.name == 'vae_encode' else 'decode'} {how}")
            lines.append(f"  weights: {_gib(s.weight_bytes)}, activations {_gib(s.activation_bytes)}"
                         + (f", full maps in RAM {_gib(s.tile_host_bytes)}" if s.tile_host_bytes else ""))
        lines.append(f"  stage peak: {_gib(s.peak_bytes)}")
        if s.name == "text_encoder":
            lines.append(f"  transfer per prompt: {_gib(s.transfer_bytes)} ({moved})")
    top = max(plan.stages, key=lambda s: s.peak_bytes)
    lines += ["", f"peak device memory: {_gib(plan.peak_bytes)} ({top.name})",
              f"transfer per step: {_gib(plan.transfer_per_step)} ({moved} per DiT step; the same with CFG)"]
    return "\n".join(lines)
