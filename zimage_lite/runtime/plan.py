"""The memory planner: which blocks stay on the device, which stream, and the peak of each stage, before anything
loads.

Pure arithmetic on the files' tensor tables (official name -> shape, stored type; or a preset's recipe) and the
models' own block schedules (sizes.py) and counts of what the VAE allocates (vae_plan.py); no weight is read. Sources:
zimage_spec.md §8 (activation formulas), lowvram_peers.md §10/§12 (two slots, resident set, one plan for every step).

Stages run one after another, so the run's peak is the largest stage peak (with `keep_loaded`, every stage also holds
the other components' weights). A stage's device peak is non-block weights + resident blocks + streaming slots +
dequantize scratch + activations. On cuda blocks live on the card packed (quantized) and stream from pinned host
chunks through two slots (copy block i+1 while block i computes). On cpu the weights stay in the memory map (file
pages the OS may drop), so the plan bounds how many blocks are held in the compute dtype; the streamed ones are read
from the map each time they run. Each stage also states the host memory it holds: on cpu its peak; on cuda the pinned
chunks of the streamed blocks, the host-only tensors and what placement stages through the host (file pages of the
memory map are not counted: the OS may drop them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import MAX_TEXT_TOKENS, PRESETS, SEQ_MULTI_OF, ModelConfig
from ..errors import BudgetError, OptionError
from ..options import check_size, grid_of
from ..quant.chunks import DEVICE_CHUNK, DEVICE_CHUNK_TEMP_BYTES, MAX_WORKERS
from ..quant.formats import DEQUANT_CHUNK_WEIGHTS
from .budget import device_kind, resolve_dtype, usable_budget
from .residency import ALONE, Beside, BlockCost, BlockStage, NoFit, floor, place
from .sizes import (
    DTYPE_BYTES,
    FLOATS,
    QUANT_LADDER,
    ComponentBytes,
    TensorTable,
    bits_per_weight,
    component_bytes,
    format_rank,
    normalize_format,
    recipe_table,
    vae_largest_weight,
)
from .units import format_option_size, format_size
from .vae_plan import vae_passes

F32 = 4
TRANSIENT = ("vae_encode", "enhance")  # stages whose model is loaded for that stage only, even with keep_loaded


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on. `budget` is what tensors may use, after any headroom was taken off."""

    config: ModelConfig
    budget: int
    quant: str = "Q4_K_M"  # DiT: the recipe planned when `dit_tensors` is None, else the file's label
    text_quant: str = "BF16"  # text encoder: likewise with `text_tensors`
    width: int = 1024
    height: int = 1024
    cfg: bool = False
    device: str = "cuda"  # "cuda" or "cuda:N" plans VRAM, "cpu" plans RAM
    dtype: str = "bf16"  # compute dtype: bf16 | fp16 | fp32
    caption_tokens: int = MAX_TEXT_TOKENS  # the worst case unless the prompt is known
    headroom: int = 0  # bytes taken off the user's figure before `budget` (CUDA context); shown in messages
    model_name: str = "custom"
    # The files' typed tensor tables (official name -> (shape, stored type): sizes.source_table); None plans the
    # files `zimage-lite quantize` writes for `quant` / `text_quant` (sizes.recipe_table).
    dit_tensors: TensorTable | None = field(default=None, repr=False, hash=False)
    text_tensors: TensorTable | None = field(default=None, repr=False, hash=False)
    keep_loaded: bool = False  # every component stays loaded between images: each stage holds the others' weights
    # LoRA side paths on the DiT (loras.py `Loras.table`: name -> (shape, compute dtype)), counted with their blocks
    adapter_tensors: TensorTable | None = field(default=None, repr=False, hash=False)
    # a ControlNet (its config, its tensor table): its blocks run within the DiT's steps, placed beside the DiT's
    control: tuple[Any, TensorTable] | None = field(default=None, repr=False, hash=False)
    # the components ("dit", "text_encoder") whose int8 rows are GGUF Linears converted at load (--int8-compute):
    # copies of their own, not views of the files
    converted: frozenset[str] = field(default=frozenset(), hash=False)

    @property
    def kind(self) -> str:
        """The device type: `cuda` for `cuda:1` too."""
        return device_kind(self.device)
    encode: bool = False  # also plan the VAE encoder's stage (an input image to encode)
    enhance_tokens: int = 0  # the prompt enhancer's context (prompt + new tokens): plan its stage first; 0: none


@dataclass(frozen=True)
class StagePlan:
    """One stage. Block names are in execution order; a resident block is copied once and never again."""

    name: str  # "text_encoder" | "dit" | "vae"
    blocks: tuple[str, ...]
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    weight_bytes: int  # non-block weights on the device (embedders, final layer; the whole VAE decoder)
    resident_bytes: int  # resident blocks: packed when quantized, else in the compute dtype
    slot_bytes: int  # all streaming slots together: n_slots x the largest streamed block as streamed, 0 if none
    n_slots: int
    scratch_bytes: int  # dequantizing the largest packed Linear: its output buffer + the chunks' temporaries
    activation_bytes: int  # activation peak at this resolution, attention scores included
    transfer_bytes: int  # streamed bytes per run of the blocks (per DiT step, per prompt for the text encoder)
    attention: str | None = None  # "sdpa" | "chunked"
    attention_chunk: int | None = None  # query rows per chunk when chunked
    tiled: bool = False
    tile: int | None = None  # latent cells per tile side
    host_bytes: int = 0  # peak host RAM the stage holds: on cpu the stage peak, on cuda the parts below
    pinned_bytes: int = 0  # cuda: pinned host chunks of the streamed blocks, as memory.pinned_layout packs them
    host_weight_bytes: int = 0  # cuda: host-only tensors (Qwen3's embedding table) when cast copies, not map views
    staging_bytes: int = 0  # cuda: read through the host while placing (one tensor and its cast copy; VAE: + image)
    kept_bytes: int = 0  # keep_loaded: the other components' weights, resident blocks and slots on the device
    kept_host_bytes: int = 0  # keep_loaded, cuda: the other components' pinned chunks and host-only tensors
    tile_host_bytes: int = 0  # cuda, tiled VAE: the full feature maps it keeps in host memory
    partner_bytes: int = 0  # DiT <-> ControlNet: what the other model of the denoising steps keeps on the device
    unpacked: bool = False  # enhance, cpu: the decoder layers converted once for decoding (enhance_plan.py)
    head: str = ""  # enhance: the output head's form (enhance_plan.head_form): "view", "int8" or the dtype
    adapter_bytes: int = 0  # LoRA side paths: in the blocks' bytes on cuda (their host copy, made for placement, in
    # staging_bytes), in weight_bytes on cpu (the loaded blocks' tensors are views of the one host copy)

    @property
    def peak_bytes(self) -> int:
        return (self.weight_bytes + self.resident_bytes + self.slot_bytes + self.scratch_bytes + self.activation_bytes
                + self.kept_bytes + self.partner_bytes)

    @property
    def loaded_bytes(self) -> int:
        """What stays on the device while the component is loaded: weights, resident blocks, slots."""
        return self.weight_bytes + self.resident_bytes + self.slot_bytes


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
    def host_peak_bytes(self) -> int:
        return max(s.host_bytes for s in self.stages)

    @property
    def transfer_per_step(self) -> int:
        """Bytes copied host->device (cuda) or read from the memory map (cpu) per DiT step; CFG's batch of
        two goes through each block together, so it is the same with CFG."""
        control = self.request.control
        twice = control is not None and control[0].add_control_noise_refiner == "control_layers"  # 2.0: two passes
        return sum(s.transfer_bytes * (2 if twice and s.name == "controlnet" else 1) for s in self.stages
                   if s.name in ("dit", "controlnet"))


def tensor_tables(req: PlanRequest) -> tuple[TensorTable, TensorTable]:
    """The DiT's and the text encoder's tensor tables: the files', or the recipes' for a preset."""
    c = req.config
    dit = req.dit_tensors if req.dit_tensors is not None else recipe_table(c.dit, req.quant)
    text = req.text_tensors if req.text_tensors is not None else recipe_table(c.text_encoder, req.text_quant)
    return dit, text


def _scratch(sizes: ComponentBytes, req: PlanRequest) -> int:
    """Dequantizing the largest packed Linear: its weights in the compute dtype (the output buffer, reused from Linear
    to Linear) + the temporaries of the chunks in flight (quant/chunks.py): one chunk of DEVICE_CHUNK weights on a GPU,
    up to MAX_WORKERS chunks of DEQUANT_CHUNK_WEIGHTS on the CPU's worker threads. Both run the same kernels, so
    DEVICE_CHUNK_TEMP_BYTES bounds a weight's temporaries on either."""
    n = sizes.largest_packed
    in_flight = DEVICE_CHUNK if req.kind == "cuda" else MAX_WORKERS * DEQUANT_CHUNK_WEIGHTS
    return n * DTYPE_BYTES[req.dtype] + min(n, in_flight) * DEVICE_CHUNK_TEMP_BYTES


def _scores_fn(req: PlanRequest, batch: int, heads: int, seq: int) -> Callable[[int | None], int]:
    """Attention scores, fp32. CUDA SDPA (flash / memory-efficient) never materialises them; torch's CPU SDPA may
    fall back to the math path, which holds heads x rows x S, so cpu plans count that (chunked: rows = chunk). The
    CPU bf16 route (models/layers.attention) holds less: one head's 512 rows x S, scores and probabilities in bf16."""
    if req.kind == "cuda":
        return lambda chunk: 0
    return lambda chunk: batch * heads * (chunk or seq) * seq * F32


def block_stage(name: str, sizes: ComponentBytes, act: int, heads: int, seq: int, req: PlanRequest) -> BlockStage:
    """A block stage's needs. On cuda a streamed block is copied as it is held (packed or cast), its LoRA side paths
    with it; on cpu it is read from the memory map as stored, the host-only tensors are device memory like the rest,
    and the side paths stay in the one host copy that every placed block views."""
    cuda = req.kind == "cuda"
    side = sum(b.adapters for b in sizes.blocks) if cuda else 0  # cuda: in the blocks' bytes; the rest with weights
    return BlockStage(name, [BlockCost(b.name, b.held + b.adapters, b.held + b.adapters) if cuda else
                             BlockCost(b.name, b.held, b.stored, b.streaming) for b in sizes.blocks],
                      sizes.other + sizes.adapters - side + (0 if cuda else sizes.host_only), _scratch(sizes, req),
                      act, _scores_fn(req, 2 if req.cfg else 1, heads, seq), seq)


def stage_plan(st: BlockStage, sizes: ComponentBytes, req: PlanRequest, beside: Beside = ALONE) -> StagePlan:
    r = place(st, req.kind, req.budget, beside)
    cuda = req.kind == "cuda"
    return StagePlan(
        name=st.name, blocks=tuple(b.name for b in st.blocks), resident=r.resident, streamed=r.streamed,
        weight_bytes=st.weights, resident_bytes=r.resident_bytes, slot_bytes=r.slot_bytes, n_slots=r.n_slots,
        scratch_bytes=st.scratch, activation_bytes=r.activation_bytes, transfer_bytes=r.transfer_bytes,
        attention="sdpa" if r.chunk is None else "chunked", attention_chunk=r.chunk, pinned_bytes=r.pinned_bytes,
        host_weight_bytes=sizes.host_only if cuda else 0,
        staging_bytes=sizes.largest_read + sizes.adapters if cuda else 0, adapter_bytes=sizes.adapters)


def _text_stage(req: PlanRequest) -> tuple[BlockStage, ComponentBytes]:
    c, elem, batch = req.config.text_encoder, DTYPE_BYTES[req.dtype], 2 if req.cfg else 1
    sizes = component_bytes(c, tensor_tables(req)[1], req.dtype, f"the {req.text_quant} text encoder", kind=req.kind,
                            converted="text_encoder" in req.converted)
    seq, q, kv = req.caption_tokens, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mlp = seq * (2 * c.hidden_size + 3 * c.intermediate_size) * elem  # residual, normed, gate, up, act(gate)*up
    attn = seq * (2 * c.hidden_size + 2 * q + 2 * kv) * elem  # residual, normed, q, k, v, attention output
    # The embedding table stays on the host; only the prompt's rows come over (and the features go back).
    act = batch * (max(mlp, attn) + seq * c.hidden_size * elem)
    return block_stage("text_encoder", sizes, act, c.num_attention_heads, seq, req), sizes


def _dit_stage(req: PlanRequest) -> tuple[BlockStage, ComponentBytes]:
    c, elem, batch = req.config.dit, DTYPE_BYTES[req.dtype], 2 if req.cfg else 1
    sizes = component_bytes(c, tensor_tables(req)[0], req.dtype, f"the {req.quant} DiT", req.adapter_tensors,
                            kind=req.kind, converted="dit" in req.converted)
    # a LoRA side path's (tokens, rank) product beside the linear's output
    rank = max((shape[0] for n, (shape, _) in (req.adapter_tensors or {}).items() if n.endswith(".down")), default=0)
    # Tokens (zimage_spec.md §4.3): image N = (H/16)(W/16) padded to 32; caption Lp <= 512 padded to 32; S = Np + Lp.
    cell = req.config.vae.scale * c.patch_size
    n_img = math.ceil((req.height // cell) * (req.width // cell) / SEQ_MULTI_OF) * SEQ_MULTI_OF
    n_cap = math.ceil(req.caption_tokens / SEQ_MULTI_OF) * SEQ_MULTI_OF
    seq = n_img + n_cap
    ffn = seq * (2 * c.dim + 3 * c.ffn_dim) * elem  # §8.2 "FFN-phase peak": residual, normed, three ffn-wide
    attn = seq * c.dim * (6 * elem + 2 * F32)  # residual, normed, q, k, v, out + q and k in fp32 for the RoPE
    rope = seq * (c.head_dim // 2) * 2 * F32  # complex64 table, shared by the CFG pair
    latent = 3 * c.in_channels * (req.height // req.config.vae.scale) * (req.width // req.config.vae.scale) * F32
    act = batch * (max(ffn, attn) + n_cap * c.cap_feat_dim * elem + seq * rank * elem) + rope + latent
    return block_stage("dit", sizes, act, c.n_heads, seq, req), sizes


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
    raise NoFit(name, f"weights {format_size(p.weights)} + {how} activations {format_size(p.activations)} + "
                 f"{'image' if encode else 'latent'} {format_size(p.beside)}")


def vae_beside(req: PlanRequest, beside: int = 0, encode: bool = False) -> StagePlan:
    """The VAE stage with `beside` bytes of other components kept loaded, and what it stages through the host on
    cuda: its largest weight as read (F32 at most) and cast, and the decoded image (uint8 tensor and PIL copy)."""
    try:
        stage = _vae_stage(replace(req, budget=req.budget - beside), encode)
    except NoFit as e:
        kept = f" + other components kept loaded {format_size(beside)}" if beside else ""
        raise NoFit(e.stage, e.parts + kept) from None
    staging = vae_largest_weight(req.config.vae) * 2 * F32 + 2 * 3 * req.width * req.height
    return replace(stage, staging_bytes=staging if req.kind == "cuda" else 0)


def _least(fits: Callable[[int], bool]) -> int:
    """The smallest budget for which `fits` holds (it is monotone in the budget)."""
    low, high = 1, 1
    while not fits(high):
        low, high = high, high * 2
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if not fits(mid) else (low, mid)
    return high


@functools.lru_cache(maxsize=32)
def vae_floor(req: PlanRequest) -> tuple[int, int]:
    """(VAE weights, least transient of its stage: smallest tile with the latent and the image)."""
    weights = _vae_stage(replace(req, budget=2**62)).weight_bytes

    def fits(budget: int) -> bool:
        try:
            _vae_stage(replace(req, budget=budget))
        except NoFit:
            return False
        return True

    return weights, _least(fits) - weights


def _stages(req: PlanRequest) -> tuple[StagePlan, ...]:
    from .enhance_plan import enhance_stage  # these build on this module's stage helpers

    (text_in, text_sizes), (dit_in, dit_sizes) = _text_stage(req), _dit_stage(req)
    if req.control is not None:
        from .control_plan import control_stages

        return control_stages(req, text_in, text_sizes, dit_in, dit_sizes)
    if not req.keep_loaded:
        encode = (vae_beside(req, encode=True),) if req.encode else ()
        enhance = (enhance_stage(req),) if req.enhance_tokens else ()
        return finish_stages((*enhance, *encode, stage_plan(text_in, text_sizes, req),
                              stage_plan(dit_in, dit_sizes, req), vae_beside(req)), req)
    # keep_loaded: after the first image all three stay loaded, so each stage runs beside the others' weights. The DiT
    # is placed first (it runs every step), then the text encoder, then the VAE, each beside what the placed ones
    # keep and the least the others need (their smallest weights, and room for their smallest transient).
    text_kept, text_transient = floor(text_in, req.kind)
    vae_weights, vae_transient = vae_floor(replace(req, budget=0))  # the same for every budget: cached
    dit = stage_plan(dit_in, dit_sizes, req, Beside(text_kept + vae_weights, max(text_transient, vae_transient)))
    dit_transient = dit.scratch_bytes + dit.activation_bytes
    text = stage_plan(text_in, text_sizes, req,
                      Beside(dit.loaded_bytes + vae_weights, max(dit_transient, vae_transient)))
    vae = vae_beside(req, dit.loaded_bytes + text.loaded_bytes)
    # the encoder is loaded for its stage only, beside everything the others keep after the first image
    loaded = dit.loaded_bytes + text.loaded_bytes + vae.loaded_bytes
    encode = (vae_beside(req, loaded, encode=True),) if req.encode else ()
    # the enhancer too, for its stage only, beside what the others keep
    kept = Beside(loaded, 0)
    enhance = (enhance_stage(req, kept),) if req.enhance_tokens else ()
    return finish_stages((*enhance, *encode, text, dit, vae), req)


def finish_stages(stages: tuple[StagePlan, ...], req: PlanRequest) -> tuple[StagePlan, ...]:
    """Each stage with what the others keep beside it (keep_loaded) and its host memory."""
    kept = [s.loaded_bytes if req.keep_loaded and s.name not in TRANSIENT else 0 for s in stages]
    kept_host = [s.pinned_bytes + s.host_weight_bytes if req.keep_loaded and s.name not in TRANSIENT else 0
                 for s in stages]
    return tuple(with_host(replace(s, kept_bytes=sum(kept) - own, kept_host_bytes=sum(kept_host) - own_host), req.kind)
                 for s, own, own_host in zip(stages, kept, kept_host, strict=True))


def with_host(s: StagePlan, kind: str) -> StagePlan:
    """The stage with its host memory: on cpu its peak; on cuda its pinned chunks, host-only tensors, staging, the
    tiled VAE's maps and what the other components keep in host memory."""
    host = (s.peak_bytes if kind == "cpu" else s.pinned_bytes + s.host_weight_bytes + s.staging_bytes
            + s.tile_host_bytes + s.kept_host_bytes)
    return replace(s, host_bytes=host)


def minimum_budget(req: PlanRequest) -> int:
    """The smallest `budget` for which `make_plan(req)` succeeds (everything streamed, smallest tiles and chunks)."""
    req = _checked(req)
    return _least(lambda budget: _fits(replace(req, budget=budget)))


def _fits(req: PlanRequest) -> bool:
    try:
        _stages(req)
    except NoFit:
        return False
    return True


def _checked(req: PlanRequest) -> PlanRequest:
    """`req` with canonical format names, or OptionError for a value no plan can use. A format names a recipe only
    where no tensor table is given; with one it is the file's label."""
    if req.dit_tensors is None:
        req = replace(req, quant=normalize_format(req.quant, "--quant"))
    if req.text_tensors is None:
        req = replace(req, text_quant=normalize_format(req.text_quant, "--text-quant"))
    device_kind(req.device)
    check_size(req.width, req.height, grid_of(req.config.dit, req.config.vae.scale))
    if req.dtype not in DTYPE_BYTES:
        raise OptionError(f"--dtype {req.dtype!r}: use auto, bf16, fp16 or fp32")
    if not 1 <= req.caption_tokens <= MAX_TEXT_TOKENS:
        raise OptionError(f"--prompt-tokens {req.caption_tokens}: give 1 to {MAX_TEXT_TOKENS} (the tokens of the "
                          "prompt the plan counts for)")
    return req


def make_plan(req: PlanRequest) -> Plan:
    """The plan for `req`; BudgetError (with the smallest budget and the alternatives that fit) when none exists."""
    req = _checked(req)
    try:
        return Plan(req, _stages(req))
    except NoFit:
        raise BudgetError(_too_small(req)) from None


def _too_small(req: PlanRequest) -> str:
    """Why no plan fits, the smallest budget that does, and the other settings that fit this budget."""
    option = "--vram" if req.kind == "cuda" else "--ram"
    need = minimum_budget(req)
    try:  # just below the minimum, the first stage to fail is the one that sets it
        _stages(replace(req, budget=need - 1))
    except NoFit as e:
        binding = e
    tries = [f"{option} {format_option_size(need + req.headroom, round_up=True)}"]
    dit_table = tensor_tables(req)[0]
    smaller = [q for q in QUANT_LADDER if format_rank(q, req.config.dit) < bits_per_weight(req.config.dit, dit_table)]
    quant = next((q for q in smaller if _fits(replace(req, quant=q, dit_tensors=None))), None)
    if quant:
        tries.append(f"a {quant} DiT file" if req.dit_tensors is not None else f"--quant {quant}")
    if binding.stage == "text_encoder" and req.text_quant in FLOATS:
        text = next((q for q in QUANT_LADDER if _fits(replace(req, text_quant=q, text_tensors=None))), None)
        if text:
            tries.append(f"a {text} text encoder")
    if req.keep_loaded and _fits(replace(req, keep_loaded=False)):
        tries.append("keep_loaded=False (each component loaded for its stage only)")
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


def plan_for(preset_or_config: str | ModelConfig, quant: str, width: int, height: int, cfg: bool, device: str,
             vram: int | None, ram: int | None, dtype: str = "auto", text_quant: str | None = None,
             caption_tokens: int = MAX_TEXT_TOKENS, dit_tensors: TensorTable | None = None,
             text_tensors: TensorTable | None = None, keep_loaded: bool = False,
             budget: tuple[int, int] | None = None, model_name: str | None = None, encode: bool = False,
             adapter_tensors: TensorTable | None = None, control: tuple[Any, TensorTable] | None = None,
             enhance_tokens: int = 0, converted: frozenset[str] = frozenset()) -> Plan:
    """The plan for a run as the CLI describes it. `vram` counts the whole card (the CUDA context comes off it);
    `ram` is what the run may use. Missing budgets come from the device (`cuda:1`: device 1); `ram` is ignored on
    cuda. `budget` = (bytes, headroom) as `usable_budget` gave them earlier, instead of asking again. With tensor
    tables, `quant` / `text_quant` are the files' labels (PlanRequest). `encode`: an init image is encoded first.
    `adapter_tensors`: the LoRAs' side paths on the DiT (loras.py `Loras.table`). `enhance_tokens`: plan the prompt
    enhancer's stage first, for that context. `converted`: as PlanRequest's."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise OptionError(f"--preset {preset_or_config!r}: use one of {', '.join(PRESETS)}")
        config, name = PRESETS[preset_or_config], preset_or_config
    else:
        config, name = preset_or_config, model_name or "custom"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    budget, headroom = budget or usable_budget(device, vram, ram)
    return make_plan(PlanRequest(
        config=config, budget=budget, quant=quant, text_quant=text_quant or "BF16", width=width, height=height,
        cfg=cfg, device=device, dtype=resolve_dtype(dtype, device), caption_tokens=caption_tokens,
        headroom=headroom, model_name=name, dit_tensors=dit_tensors, text_tensors=text_tensors,
        keep_loaded=keep_loaded, encode=encode, adapter_tensors=adapter_tensors, control=control,
        enhance_tokens=enhance_tokens, converted=converted))
