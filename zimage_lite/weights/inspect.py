"""`zimage-lite info`: what a file or folder holds, and which tools will load it.

`describe` opens headers only (no tensor is read) and returns plain data: per component the name layout, the
quant-type histogram (count and bytes per type, as ComfyUI-GGUF logs it after loading), parameters, bytes, GGUF
metadata, and a verdict for zimage-lite, stable-diffusion.cpp, ComfyUI(-GGUF) and diffusers/transformers by the
rules of shared/reference/gguf_interop.md section 7 (with 2.4, 3.2 and 6 for the text encoder and the VAE).
`format_info` renders it for the terminal.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from gguf import LlamaFileType

from ..components import REGISTRY
from ..config import DiTConfig
from ..errors import ZImageLiteError
from ..runtime.units import format_si
from .checks import check_path
from .comfy_quant import ComfyQuantSource
from .components import Component, identify, lm_lacks, open_component, open_stored, single_files
from .control_files import describe_controlnet, is_controlnet
from .gguf_source import GGUFSource
from .lora import check_shapes, implied_dit, is_lora, read_lora, summary
from .names import DIT_PREFIXES, TE_PREFIXES, VAE_PREFIXES, strip_prefix
from .sources import BnbSource

PREFIXES = {"dit": DIT_PREFIXES, "text_encoder": TE_PREFIXES, "vae": VAE_PREFIXES}
PLAIN = {"F32", "F16"}  # what every reader uses as-is, including for norms and pad tokens
FLOAT = PLAIN | {"BF16"}
# Types with torch dequant kernels in ComfyUI-GGUF and diffusers (gguf_interop.md 3.3, 6); others are slow or fail.
TORCH_KERNELS = FLOAT | {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
                         "IQ4_XS"}
COMFY_IMAGE_ARCHS = {None, "lumina2", "pig", "cow"}  # None, pig, cow: detection from the tensor names
COMFY_TEXT_ARCHS = {"t5", "t5encoder", "llama", "qwen2vl", "qwen3", "qwen3vl"}
LONG_TEXT = 60
LAYOUTS = {"official": "official (diffusers)", "comfyui": "ComfyUI (fused qkv)", "transformers": "transformers",
           "llama.cpp": "llama.cpp", "diffusers": "diffusers", "flux": "FLUX ae"}


def _config_summary(comp: Component) -> str:
    c = comp.config
    if comp.kind == "dit":
        return (f"dim {c.dim}, {c.n_layers} layers + {c.n_refiner_layers} refiner layers, {c.n_heads} heads of "
                f"{c.head_dim}, caption features {c.cap_feat_dim}")
    if comp.kind == "text_encoder":
        return (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/"
                f"{c.num_key_value_heads} heads of {c.head_dim}, vocab {c.vocab_size}, rope theta {c.rope_theta:g}")
    return (f"channels {'/'.join(map(str, c.block_out_channels))}, {c.layers_per_block + 1} resnets per level, "
            f"latent {c.latent_channels}")


def _dit_verdicts(comp: Component, gguf: bool, arch: str | None) -> dict[str, str]:
    stored = comp.stored
    types = {n: stored.qtype(n) for n in stored.names()}
    shapes = {n: stored.shape(n) for n in stored.names()}
    pads = [n for n in types if n.endswith("pad_token")]
    one_d = [n for n in types if len(shapes[n]) == 1 and n not in pads]
    quant_1d = sorted({types[n] for n in one_d} - FLOAT)
    # ComfyUI-GGUF turns 1-D BF16 into F32 on load, nothing else (3.2); pad tokens are [1, dim] in ComfyUI
    pad_bad = sorted({types[n] for n in pads if types[n] not in PLAIN and not (types[n] == "BF16" and
                                                                               len(shapes[n]) == 1)})
    slow = sorted(set(types.values()) - TORCH_KERNELS)
    prefix, _ = strip_prefix(types, DIT_PREFIXES)
    used = {stored_name for stored_name, _ in comp.source.mapping.values()}
    extra = sorted(n for n in types if n not in used)
    out = {"stable-diffusion.cpp": "yes"}
    if comp.layout == "official":
        out["stable-diffusion.cpp"] = "no (split to_q/to_k/to_v: it loads only the fused qkv of the ComfyUI layout)"
    if gguf:
        if arch not in COMFY_IMAGE_ARCHS:
            why = f"general.architecture is {arch!r}, it accepts 'lumina2' or none"
        elif quant_1d:
            why = f"1-D tensors quantized: {', '.join(quant_1d)}"
        elif pad_bad:
            why = f"pad tokens stored as {', '.join(pad_bad)}"
        elif comp.layout == "official" and set(types.values()) - FLOAT:
            why = "official names: ComfyUI's qkv fusion does not work on quantized tensors"
        else:
            why = ""
        out["ComfyUI-GGUF"] = f"no ({why})" if why else (f"yes (slow numpy dequant for {', '.join(slow)})"
                                                          if slow else "yes")
    else:
        out["ComfyUI"] = "yes"
    if gguf and slow:
        out["diffusers"] = f"no ({', '.join(slow)} not among its GGUF types)"
    elif gguf and {types[n] for n in one_d + pads} - PLAIN:
        bad = ", ".join(sorted({types[n] for n in one_d + pads} - PLAIN))
        out["diffusers"] = f"no (norms or pad tokens stored as {bad}: it would compute with their raw bytes)"
    elif comp.layout == "official" and (prefix or extra):
        what = f"the prefix {prefix}" if prefix else f"extra tensors ({', '.join(extra[:3])})"
        out["diffusers"] = f"no (official names load only as the exact diffusers key set; this file has {what})"
    else:
        out["diffusers"] = "yes (copies the whole file into RAM)" if gguf else "yes"
    return out


def _verdicts(comp: Component, gguf: bool, arch: str | None) -> dict[str, str]:
    try:
        open_component(comp.path, comp.kind)
        mine = "yes"
    except ZImageLiteError as e:
        mine = f"no ({str(e).removeprefix(str(comp.path)).lstrip(': ')})"
    out = {"zimage-lite": mine}
    if comp.kind == "text_encoder" and mine == "yes":  # the prompt enhancer runs every layer and the final norm
        lacks = lm_lacks(comp)
        out["zimage-lite enhance"] = f"no (lacks {' and '.join(lacks)})" if lacks else "yes"
    if comp.path.is_dir():  # a sharded component folder: the diffusers/transformers layout, for those libraries
        lib = "transformers" if comp.kind == "text_encoder" else "diffusers"
        native = comp.layout in ("official", "transformers", "diffusers")
        how = "yes (from_pretrained" + (", with bitsandbytes installed)" if _bnb_types(comp.stored) else ")")
        return out | {"stable-diffusion.cpp": "n/a (loads single files)", "ComfyUI": "n/a (loads single files)",
                      lib: how if native else "not checked"}
    if comp.kind == "dit":
        return out | _dit_verdicts(comp, gguf, arch)
    if comp.kind == "text_encoder":
        out["stable-diffusion.cpp"] = "yes"  # HF and llama.cpp names both (2.4)
        if gguf:
            out["ComfyUI-GGUF"] = "yes" if arch in COMFY_TEXT_ARCHS else f"no (general.architecture {arch!r})"
            out["transformers"] = "yes (dequantized to full precision on load)"
        else:
            out["ComfyUI"] = "yes" if comp.layout == "transformers" else "not checked"
            out["transformers"] = "yes" if comp.layout == "transformers" else "no (llama.cpp names outside a GGUF)"
        return out
    out["stable-diffusion.cpp"] = "yes"  # FLUX ae names, diffusers names converted (2.4)
    if gguf:
        out["ComfyUI-GGUF"] = "no (it has no VAE loader)"
        out["diffusers"] = "not checked"
    else:
        out["ComfyUI"] = "yes" if comp.layout == "flux" else "not checked"
        out["diffusers"] = "yes" if comp.layout == "diffusers" else "yes (AutoencoderKL.from_single_file)"
    return out


def _metadata(stored: GGUFSource) -> dict[str, Any]:
    meta = {}
    for key, value in stored.metadata().items():
        if isinstance(value, str) and len(value) > LONG_TEXT:
            value = value[:LONG_TEXT] + "..."
        if key == "general.file_type" and isinstance(value, int):
            try:
                value = f"{value} ({LlamaFileType(value).name.removeprefix('MOSTLY_')})"
            except ValueError:
                pass
        meta[key] = value
    return meta


def _bnb_types(stored: object) -> str | None:
    """'int8' or 'nf4' (the types of a bitsandbytes folder's quantized weights), None for anything else."""
    if not isinstance(stored, BnbSource):
        return None
    types = sorted({stored.qtype(n) for n in stored.names()} & {"int8", "nf4", "fp4"})
    return "/".join(types) or "(no quantized weights)"


def _is_lora_file(path: Path) -> bool:
    """Whether a single file's tensor names (header only) are a LoRA's; False for what cannot be opened."""
    if not path.is_file():
        return False
    try:
        stored = open_stored(path)
    except ZImageLiteError:  # identify reports it
        return False
    try:
        return is_lora(list(stored.names()))
    finally:
        stored.close()


def describe_lora(path: Path) -> dict[str, Any]:
    """A LoRA file: format, ranks, alphas, modules touched by kind, whether every key maps, the width of DiT its
    shapes fit (checked against each other: a key off the others' shapes is an error), sha256."""
    out: dict[str, Any] = {"path": str(path), "component": "lora"}
    try:
        lora = read_lora(path)
        dit = implied_dit(lora)
        check_shapes(lora, dit)
    except ZImageLiteError as e:
        return out | {"error": str(e)}
    return out | summary(lora) | {"dit_dim": dit.dim, "turbo_dim": DiTConfig().dim}


def describe_component(path: Path) -> dict[str, Any]:
    """One file or component folder: component, layout, quant histogram, size, metadata, verdicts."""
    if _is_lora_file(path):  # before identify: a LoRA's names (cap_embedder, attention) look like a DiT's
        return describe_lora(path)
    out: dict[str, Any] = {"path": str(path)}
    try:
        comp = identify(path)
    except ZImageLiteError as e:  # a cut file, or one quantized in a way zimage-lite does not read
        return out | {"component": None, "error": str(e)}
    stored = comp.stored
    gguf = isinstance(stored, GGUFSource)
    hist: dict[str, dict[str, int]] = {}
    params = 0
    for name in stored.names():
        entry = hist.setdefault(stored.qtype(name), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += stored.nbytes(name)  # a bitsandbytes weight counts its scale tensors too
        params += math.prod(stored.shape(name))
    bnb = _bnb_types(stored)
    out |= {
        "format": "GGUF" if gguf else ("safetensors folder" if path.is_dir() else "safetensors"),
        # a bitsandbytes folder always has official names (diffusers saves them): its quantization is the news
        "component": comp.kind, "layout": f"bitsandbytes {bnb}" if bnb else comp.layout,
        "tensors": sum(h["count"] for h in hist.values()),
        "params": params, "bytes": sum(h["bytes"] for h in hist.values()),
        "qtypes": dict(sorted(hist.items(), key=lambda kv: -kv[1]["bytes"])),
    }
    if comp.kind is None and is_controlnet(list(stored.names())):  # not a part of a model: its own description
        try:
            out |= describe_controlnet(path)
        except ZImageLiteError as e:
            out["error"] = str(e)
    if comp.kind is not None:
        prefix, _ = strip_prefix(stored.names(), PREFIXES[comp.kind])
        out |= {"prefix": prefix, "config": dataclasses.asdict(comp.config), "summary": _config_summary(comp)}
    arch = stored.architecture if gguf else None
    if gguf:
        out["metadata"] = _metadata(stored)
        out["has_tokenizer"] = stored.meta("tokenizer.ggml.model") is not None
    if comp.kind is not None:
        out["loads_in"] = _verdicts(comp, gguf, arch)
    if isinstance(stored, ComfyQuantSource):  # ComfyUI int8 layers: how they run here; the HF libraries lack the tags
        from ..quant.int8_compute import describe_route

        out["int8_route"] = describe_route("cpu")
        lib = "diffusers" if comp.kind == "dit" else "transformers"
        out.setdefault("loads_in", {})[lib] = "no (ComfyUI int8_tensorwise layers: comfy_quant, weight_scale)"
        out["loads_in"]["stable-diffusion.cpp"] = "not checked (its int8 ConvRot reader is newer than our tests)"
    return out


def describe(path: str | Path) -> dict[str, Any]:
    """A file or folder: one section per component (official sub-folders, then single files)."""
    path = check_path(path, folder_ok=True)  # before any open: `info` on a FIFO must not block
    if path.is_file() or (path / "config.json").is_file():
        return {"path": str(path), "sections": [describe_component(path)]}
    parts = [path / c.folder for c in REGISTRY.values() if (path / c.folder).is_dir()]
    sections = [describe_component(p) for p in parts + single_files(path)]
    tok = next((str(t) for t in (path / "tokenizer" / "tokenizer.json", path / "tokenizer.json") if t.is_file()),
               None)
    if tok is None:
        tok = next((f"in {s['path']} (GGUF metadata)" for s in sections if s.get("has_tokenizer")), None)
    return {"path": str(path), "sections": sections, "tokenizer": tok or "none found"}


def _lora_lines(s: dict[str, Any]) -> list[str]:
    ranks = ", ".join(f"rank {r} ({n})" if len(s["ranks"]) > 1 else f"rank {r}" for r, n in s["ranks"].items())
    alphas = ", ".join("no alpha (scale 1)" if a == "None" else f"alpha {float(a):g}" for a in s["alphas"])
    fits = (f"a DiT {s['dit_dim']} wide" + ("" if s["dit_dim"] == s["turbo_dim"] else
                                             f" (Z-Image-Turbo is {s['turbo_dim']}: not for it)"))
    skipped = s["skipped"]
    keys = ("all keys map onto the Z-Image DiT" if not skipped else
            f"{len(skipped)} map onto nothing in the DiT and are skipped (the rest applies): "
            f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    lines = [f"  component    LoRA, {s['format']} layout",
             f"  adapters     {s['adapters']} linears, {ranks}, {alphas}, {format_si(s['params'], '')} params",
             f"  modules      {', '.join(f'{k} {n}' for k, n in s['modules'].items())}",
             f"  shapes       fit {fits}", f"  keys         {keys}"]
    if s["duplicates"]:
        lines.append(f"  redundant    {len(s['duplicates'])} keys (fused qkv/out next to the split ones), not used")
    return lines + [f"  sha256       {s['sha256'][:16]}"]


def format_info(desc: dict[str, Any]) -> str:
    """The terminal rendering of `describe`'s result."""
    lines = []
    for s in desc["sections"]:
        lines.append(s["path"])
        if s.get("error"):
            lines.append(f"  error        {s['error']}")
            continue
        if s["component"] == "lora":
            lines += _lora_lines(s)
            continue
        known = REGISTRY.get(s["component"])
        kind = known.label if known else "unknown (no Z-Image DiT, text encoder or VAE names)"
        layout = f", {LAYOUTS.get(s['layout'], s['layout'])} layout" if s.get("layout") else ""
        prefix = f", prefix {s['prefix']}" if s.get("prefix") else ""
        lines.append(f"  component    {kind}{layout}{prefix}")
        lines.append(f"  format       {s['format']}, {s['tensors']} tensors, {format_si(s['params'], '')} params, "
                     f"{format_si(s['bytes'])}")
        if s.get("summary"):
            lines.append(f"  config       {s['summary']}")
        hist = ", ".join(f"{t} {h['count']} ({format_si(h['bytes'])})" for t, h in s["qtypes"].items())
        lines.append(f"  quant types  {hist}")
        for key, value in (s.get("metadata") or {}).items():
            lines.append(f"  metadata     {key} = {value}")
        if s.get("metadata") == {}:
            lines.append("  metadata     none (no general.architecture either)")
        if s.get("int8_route"):
            lines.append(f"  int8 matmul  {s['int8_route']}")
        for i, (tool, verdict) in enumerate((s.get("loads_in") or {}).items()):
            lines.append(f"  {'loads in' if i == 0 else '':<12} {tool}: {verdict}")
    if "tokenizer" in desc:
        lines.append(f"tokenizer      {desc['tokenizer']}")
    return "\n".join(lines)
