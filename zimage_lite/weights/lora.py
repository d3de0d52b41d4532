"""Reading LoRA files: every key layout diffusers' Z-Image LoRA loader reads, into one canonical form.

A file is read whole (LoRAs are megabytes, not gigabytes) into one `Adapter` per official DiT linear: the low-rank
pair as stored and the file's alpha, never folded in, so the runtime computes `scale_user · (alpha/rank) · B(A·x)`,
what diffusers computes after `set_adapters(..., adapter_weights=scale_user)` (it folds alpha/rank into A and B).
Layouts (the key table is `names.lora_targets` / `split_lora_key`):

| format     | written by                         | keys                                                         |
|------------|------------------------------------|--------------------------------------------------------------|
| diffusers  | diffusers/PEFT `save_lora_weights` | `transformer.<official>.lora_A.weight`, alpha in the header  |
| ai-toolkit | ai-toolkit                         | `diffusion_model.<official>.lora_A.weight`                   |
| diffsynth  | DiffSynth-Studio                   | `<official>.lora_A.default.weight` (bare, PEFT adapter name)  |
| kohya      | musubi-tuner, sd-scripts style     | `lora_unet_layers_0_attention_to_q.lora_down.weight`, `.alpha` |
| comfyui    | musubi-tuner's convert to ComfyUI  | fused `attention_qkv` (B split by rows, A shared), `attention_out` |
| dot        | Anime-Z and similar                | `layers.0.attention.to.q.lora.down.weight`; redundant qkv/out |

Decisions: a key that maps onto no DiT linear is listed in `skipped` and the rest applies (partial match); a file
where nothing maps is refused, naming the count and three keys. Text-encoder keys, LoKr, LoHa and DoRA are refused
by name (zimage-lite adapts the DiT's linears with low-rank pairs only).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import DiTConfig
from ..errors import CheckpointError, ShapeError
from .checks import check_file
from .names import LORA_OTHER_KINDS, LORA_TEXT_ENCODER, Part, lora_module_key, lora_targets, split_lora_key

PEFT_METADATA = "lora_adapter_metadata"  # diffusers' safetensors header entry: the LoraConfig as JSON
EXAMPLES = 3


@dataclass(frozen=True)
class Adapter:
    """One low-rank pair on one linear of the DiT: delta W = scale · up @ down."""

    down: torch.Tensor  # (rank, in_features), the "A" / lora_down, as stored
    up: torch.Tensor  # (out_features, rank), the "B" / lora_up; for a fused qkv, its rows of q, k or v
    alpha: float | None  # the file's alpha for this module; None when the file has none

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank, or 1.0 without alpha: what multiplies up @ down."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str  # diffusers, ai-toolkit, diffsynth, kohya, comfyui, dot (see the module docstring)
    adapters: dict[str, Adapter]  # official DiT linear name without ".weight" → its adapter
    skipped: tuple[str, ...]  # keys of the file that map onto nothing in the DiT (applied without them)
    sha256: str  # of the file bytes, full hex
    duplicates: tuple[str, ...] = ()  # keys of a fused qkv / bare `out` next to the split ones: redundant, unused
    keys: dict[str, str] = field(default_factory=dict)  # official name → the file's key of its down, for messages


@functools.lru_cache(maxsize=8)
def linear_shapes(dit: DiTConfig) -> dict[str, tuple[int, int]]:
    """Official name → (out, in) of every Linear of the DiT for `dit`, read off a build on `meta` (no memory)."""
    from ..models.dit import ZImageDiT  # the model module imports the quant layers; only this needs it

    with torch.device("meta"):
        model = ZImageDiT(dit)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@functools.lru_cache(maxsize=8)
def _targets(dit: DiTConfig) -> dict[str, tuple[tuple[str, Part], ...]]:
    return lora_targets(linear_shapes(dit))


def _examples(keys: list[str]) -> str:
    return ", ".join(sorted(keys)[:EXAMPLES])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the header metadata of a safetensors file; CheckpointError for anything else."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        raise CheckpointError(f"{path}: a GGUF file; LoRAs are read from .safetensors files (as trainers write "
                              f"them): use the LoRA's .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header, torch's for a cut file
        raise CheckpointError(f"{path}: not a safetensors file, or a truncated one ({e}); LoRAs are read from "
                              f".safetensors files (pickled .ckpt/.pt/.bin are not loaded)") from None


def _refuse_other_kinds(path: Path, keys: list[str]) -> None:
    text = [k for k in keys if LORA_TEXT_ENCODER.match(k)]
    if text:
        raise CheckpointError(f"{path}: {len(text)} text-encoder LoRA key(s) ({_examples(text)}); zimage-lite "
                              f"applies LoRAs to the DiT only: use a LoRA trained on the DiT alone")
    for tag, kind in LORA_OTHER_KINDS.items():
        hits = [k for k in keys if tag in k]
        if hits:
            raise CheckpointError(f"{path}: a {kind} adapter ({len(hits)} keys such as {_examples(hits)}), not a "
                                  f"LoRA of low-rank pairs; zimage-lite applies plain LoRAs only")


def _metadata_alpha(path: Path, metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) of diffusers' LoraConfig in the header (PEFT scales by lora_alpha / rank, and
    diffusers loads a pipeline-saved LoRA with it); (None, {}) when the file has none."""
    raw = metadata.get(PEFT_METADATA)
    if not raw:
        return None, {}
    try:
        config = json.loads(raw)
        config = {k.removeprefix("transformer."): v for k, v in config.items()}
        alpha = config.get("lora_alpha")
        pattern = {k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: header entry {PEFT_METADATA} is not diffusers' LoRA config ({e}); save "
                              f"the LoRA again") from None
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: a DoRA adapter (use_dora in {PEFT_METADATA}); zimage-lite applies plain "
                              f"LoRAs only")
    if config.get("use_rslora"):
        raise CheckpointError(f"{path}: an rsLoRA (use_rslora in {PEFT_METADATA}), scaled by alpha/sqrt(rank); "
                              f"zimage-lite reads alpha/rank LoRAs only")
    return (None if alpha is None else float(alpha)), pattern


def _pattern_alpha(name: str, pattern: dict[str, float], default: float | None) -> float | None:
    """PEFT's alpha_pattern: a key matches a module whose name is it or ends with '.' + it."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def _tensor(path: Path, key: str, t: torch.Tensor, dims: int) -> torch.Tensor:
    if not t.is_floating_point() or t.dim() != dims and not (dims == 0 and t.numel() == 1):
        what = "a number" if dims == 0 else f"a {dims}-D float matrix"
        raise ShapeError(f"{path}: {key} is {t.dtype} of shape {tuple(t.shape)}, not {what}; the LoRA is damaged")
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{path}: {key} holds NaN or infinite values; the LoRA is damaged (a diverged "
                              f"training run?): use another checkpoint of it")
    return t


def _style(key: str) -> str:
    """How a key names its pair: PEFT's lora_A/lora_B, kohya's lora_down/lora_up, or the dot form lora.down/up."""
    if ".lora.down." in key or ".lora.up." in key:
        return "dot"
    return "kohya" if ".lora_down." in key or ".lora_up." in key else "peft"


def _format(prefixes: set[str], styles: set[str], fused: bool) -> str:
    if "dot" in styles:
        return "dot"
    if fused:
        return "comfyui"
    if "kohya" in styles:
        return "kohya" if "lora_unet_" in prefixes else "comfyui"
    if "transformer." in prefixes:
        return "diffusers"
    return "ai-toolkit" if prefixes & {"diffusion_model.", "model.diffusion_model."} else "diffsynth"


def _split_fused(down: torch.Tensor, up: torch.Tensor, part: tuple[int, int], alpha: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Rows i/n of a fused up, with the down it shares. Rank columns that are zero in those rows add nothing and are
    dropped (ComfyUI's qkv is block-diagonal: rank 3r → r), alpha scaled so that alpha/rank stays what it was."""
    i, n = part
    rows = up.shape[0] // n
    up = up[i * rows:(i + 1) * rows]
    keep = up.abs().sum(0) != 0
    kept = int(keep.sum())
    if 0 < kept < up.shape[1]:
        alpha = None if alpha is None else alpha * kept / up.shape[1]
        return down[keep].contiguous(), up[:, keep].contiguous(), alpha
    return down, up.contiguous(), alpha


def check_shapes(lora: LoraFile, dit: DiTConfig) -> None:
    """Every adapter fits its linear in the DiT for `dit`: ShapeError naming the file's key and both shapes."""
    shapes = linear_shapes(dit)
    for name, a in lora.adapters.items():
        out_f, in_f = shapes[name]
        if a.up.shape[0] != out_f or a.down.shape[1] != in_f:
            raise ShapeError(f"{lora.path}: {lora.keys[name]} (for {name}) is {a.up.shape[0]}x{a.down.shape[1]} "
                             f"(out x in: up {tuple(a.up.shape)}, down {tuple(a.down.shape)}), but the model's "
                             f"{name}.weight is {out_f}x{in_f}: a LoRA for another model or size; use one made for it")


def read_lora(path: Path | str, dit: DiTConfig | None = None) -> LoraFile:
    """Read a LoRA file in any supported layout. With `dit`, check every adapter's shapes against that DiT; the
    names are always mapped onto the Z-Image DiT (`dit`, or the Turbo preset's layer count).

    Raises CheckpointError (ShapeError for shapes) naming the file and the key at fault."""
    path = check_file(path)
    tensors, metadata = _load(path)
    keys = list(tensors)
    _refuse_other_kinds(path, keys)
    targets = _targets(dit or DiTConfig())
    groups: dict[str, dict[str, str]] = {}  # lora_module_key → role → the file's key
    prefixes, styles, skipped = set(), set(), []
    for key in keys:
        parsed = split_lora_key(key)
        module = None if parsed is None else lora_module_key(parsed[1])
        if module not in targets:
            skipped.append(key)
            continue
        prefix, _, role = parsed
        prefixes.add(prefix)
        if role != "alpha":
            styles.add(_style(key))
        group = groups.setdefault(module, {})
        if role in group:
            raise CheckpointError(f"{path}: {group[role]} and {key} are both the {role} of one module; the LoRA "
                                  f"holds two copies of it: keep one")
        group[role] = key
    if not groups:
        what = ("none of its keys is a LoRA tensor (lora_A/lora_B, lora_down/lora_up): a model checkpoint?"
                if not any(split_lora_key(k) for k in keys) else
                "none of them maps onto the Z-Image DiT: a LoRA for another model (SDXL, Flux, ...)?")
        raise CheckpointError(f"{path}: {len(keys)} keys ({_examples(keys) or 'none'}), but {what} Use a Z-Image "
                              f"LoRA")
    meta_alpha, pattern = _metadata_alpha(path, metadata)
    plain = {targets[m][0][0] for m in groups if targets[m][0][1] is None}  # linears adapted by their own keys
    adapters: dict[str, Adapter] = {}
    duplicates: list[str] = []
    keys: dict[str, str] = {}
    # official spellings first: next to `to_out.0`, a bare ComfyUI `out` is the redundant copy (as diffusers reads it)
    for module, group in sorted(groups.items(), key=lambda mg: lora_module_key(targets[mg[0]][0][0]) != mg[0]):
        missing = [r for r in ("down", "up") if r not in group]
        if missing:
            have = ", ".join(group.values())
            raise CheckpointError(f"{path}: {have} has no {' and no '.join(missing)} matrix to pair with; the "
                                  f"LoRA is incomplete: use a complete copy")
        down = _tensor(path, group["down"], tensors[group["down"]], 2)
        up = _tensor(path, group["up"], tensors[group["up"]], 2)
        if down.shape[0] != up.shape[1]:
            raise ShapeError(f"{path}: rank mismatch: {group['down']} {tuple(down.shape)} has rank {down.shape[0]} "
                             f"but {group['up']} {tuple(up.shape)} has rank {up.shape[1]}; the LoRA is damaged")
        alpha = float(_tensor(path, group["alpha"], tensors[group["alpha"]], 0)) if "alpha" in group else None
        linears = targets[module]
        if linears[0][1] is not None:
            if any(name in plain for name, _ in linears):  # split keys next to it: diffusers skips the fused one too
                duplicates += group.values()
                continue
            if up.shape[0] % len(linears):
                raise ShapeError(f"{path}: {group['up']} {tuple(up.shape)} is a fused q/k/v, but its {up.shape[0]} "
                                 f"rows do not split in {len(linears)}; the LoRA is damaged")
        for name, part in linears:
            if name in adapters:  # `out` next to `to_out.0`: the same linear twice, keep the first
                duplicates += group.values()
                continue
            a = alpha if alpha is not None else _pattern_alpha(name, pattern, meta_alpha)
            d, u, a = (down, up, a) if part is None else _split_fused(down, up, part, a)
            adapters[name] = Adapter(d, u, a)
            keys[name] = group["down"]
    fused = any(targets[m][0][1] is not None for m in groups)
    lora = LoraFile(path, _format(prefixes, styles, fused), adapters, tuple(skipped), file_sha256(path),
                    tuple(duplicates), keys)
    if dit is not None:
        check_shapes(lora, dit)
    return lora


def implied_dit(lora: LoraFile) -> DiTConfig:
    """The DiT a LoRA was made for, as far as its shapes tell: the width its attention and feed-forward inputs
    share (most often), caption width and latent channels where it adapts the embedders; the Turbo preset
    otherwise. Heads do not change a linear's shape: one head of the whole width keeps the config buildable."""
    dims = Counter(a.down.shape[1] for n, a in lora.adapters.items()
                   if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "w1", "w3"))
    dims.update(a.up.shape[0] for n, a in lora.adapters.items() if n.endswith(("to_out.0", ".w2")))
    base = DiTConfig()
    dim = dims.most_common(1)[0][0] if dims else base.dim
    if dim == base.dim:
        heads, axes = base.n_heads, base.axes_dims
    else:
        third = dim // 3 // 2 * 2
        heads, axes = 1, (dim - 2 * third, third, third)
    cap = lora.adapters.get("cap_embedder.1")
    x_emb = lora.adapters.get(f"all_x_embedder.{base.embedder_key}")
    patch = base.patch_size ** 2 * base.f_patch_size
    return DiTConfig(dim=dim, n_heads=heads, n_kv_heads=heads, axes_dims=axes,
                     cap_feat_dim=cap.down.shape[1] if cap else base.cap_feat_dim,
                     in_channels=x_emb.down.shape[1] // patch if x_emb and x_emb.down.shape[1] % patch == 0
                     else base.in_channels)


def summary(lora: LoraFile) -> dict[str, object]:
    """What `info` shows of a LoRA: format, ranks, alphas, modules touched by kind, what did not map."""
    kinds: Counter[str] = Counter()
    for name in lora.adapters:
        leaf = name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "out"
        where = "refiner " if name.startswith(("noise_refiner.", "context_refiner.")) else ""
        if ".attention." in name:
            kinds[f"{where}attention {leaf.removeprefix('to_')}"] += 1
        elif ".feed_forward." in name:
            kinds[f"{where}feed_forward"] += 1
        elif "adaLN_modulation" in name:
            kinds[f"{where}adaLN"] += 1
        else:
            kinds["embedders and final layer"] += 1
    ranks = Counter(a.rank for a in lora.adapters.values())
    alphas = Counter(a.alpha for a in lora.adapters.values())
    return {"format": lora.format, "sha256": lora.sha256, "adapters": len(lora.adapters),
            "ranks": dict(sorted(ranks.items())), "alphas": {str(k): v for k, v in alphas.items()},
            "modules": dict(sorted(kinds.items())), "skipped": list(lora.skipped),
            "duplicates": list(lora.duplicates), "all_keys_map": not lora.skipped,
            "params": sum(a.down.numel() + a.up.numel() for a in lora.adapters.values())}


def is_lora(names: list[str]) -> bool:
    """Whether tensor names are those of a LoRA (or of another adapter kind `read_lora` refuses by name)."""
    return any(split_lora_key(n) or any(tag in n for tag in LORA_OTHER_KINDS) for n in names)

