"""The streaming converter: source checkpoint → GGUF (or bitsandbytes safetensors), one tensor at a time.

Every size is known from the recipe before any weight is read, so the output is laid out first (GGUF header, KV
data and tensor infos through gguf-py's GGUFWriter streaming API, gguf_interop.md 4.1) and each tensor is then read,
quantized and appended in order. Memory stays at about one fused tensor (qkv: 11520 x 3840 fp32, 177 MB) above the
interpreter: the source's memory-mapped pages are handed back after every tensor (`release_pages`), since a mapped
page that was read stays in the process' resident set until the mapping goes away. Measured on the full DiT from
BF16 shards (BENCHMARKS.md, `--quantize`, 2 cores): Q8_0 in 69 s at 0.78 GB peak RSS, Q4_K_M in 268 s at 0.86 GB;
without the page release the peak grows with the checkpoint (2.6 GB for 2 of the 30 layers). The output goes to a
temporary file beside the target and is renamed at the end (output.write_atomic), so Ctrl-C, SIGTERM, a full disk or
an error leaves nothing behind.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import gguf
import torch
from tqdm import tqdm

from zimage_lite.components import REGISTRY
from zimage_lite.config import read_json
from zimage_lite.errors import CheckpointError, Interrupted, OptionError, UnsupportedQuantError, ZImageLiteError
from zimage_lite.output import check_output, write_atomic
from zimage_lite.quant.recipes import (
    INT8_TARGETS,
    TARGETS,
    Target,
    dit_linear_weights,
    dit_plan,
    dit_shapes,
    te_plan,
    te_shapes,
)
from zimage_lite.runtime.memory import peak_bytes, release_pages
from zimage_lite.runtime.units import format_si, gib
from zimage_lite.weights.components import LAYOUT_HINT, UNUSED, identify, open_component, tokenizer_in
from zimage_lite.weights.control_files import is_controlnet
from zimage_lite.weights.gguf_source import GGUFSource
from zimage_lite.weights.names import translate
from zimage_lite.weights.sources import RenamedSource

from . import bnb, convrot, recipes, writing
from .controlnet import convert_controlnet, open_controlnet
from .writing import (
    Result,
    SourceInput,
    digest,
    provenance,
    write_file,
    write_gguf,
)

READABLE = {"F32", "F16", "BF16"}
FILE_NAMES = {"dit": "z_image_turbo-{t}.gguf", "text_encoder": "Qwen3-4B-{t}.gguf",
              "controlnet": "Z-Image-Turbo-Fun-Controlnet-{t}.gguf"}
BNB_FOLDER = "z_image_turbo-{t}"
BNB_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the weights file of a bitsandbytes folder (diffusers' name)
COMPONENTS = {"dit": "dit", "text-encoder": "text_encoder", "text_encoder": "text_encoder", "all": "all",
              "controlnet": "controlnet"}


# ---- sources ---------------------------------------------------------------------------------------------------------


def _open(root: Path, component: str, tokenizer: Path) -> SourceInput:
    """Open through components.py (kind, config, stored tensors), then map every tensor the output needs to
    official names: the runtime's own source leaves out what it never runs (the text encoder's last layer and
    final norm), which a llama.cpp-family file must hold."""
    comp = open_component(root, component)
    expected = dit_shapes(comp.config) if component == "dit" else te_shapes(comp.config)
    names = [n for n in comp.stored.names() if not UNUSED.search(n)]
    _, mapping = translate(component, list(expected), names, str(root))
    raw = read_json(root / "config.json") if root.is_dir() and (root / "config.json").is_file() else None
    return SourceInput(component, comp.config, RenamedSource(comp.stored, mapping), root,
                       digest(root, comp.stored), raw, tokenizer if tokenizer.is_file() else None, expected)


def open_inputs(src: Path, component: str | None) -> list[SourceInput]:
    """The components to convert from `src`: the official model folder (DiT by default; `all`: DiT and text
    encoder), a component folder, or a single file in any layout names.py knows."""
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    wanted = COMPONENTS[component] if component else None
    if wanted == "controlnet":
        return [open_controlnet(src)]
    if src.is_dir() and any((src / REGISTRY[c].folder).is_dir() for c in ("dit", "text_encoder")):
        out = []
        for c in ["dit", "text_encoder"] if wanted == "all" else [wanted or "dit"]:
            if not (src / REGISTRY[c].folder).is_dir():
                raise CheckpointError(f"{src}: no {REGISTRY[c].folder}/ folder; {LAYOUT_HINT}")
            out.append(_open(src / REGISTRY[c].folder, c, src / "tokenizer" / "tokenizer.json"))
        return out
    comp = identify(src)
    if comp.kind is None:
        names = sorted(comp.stored.names())
        if is_controlnet(names):  # a Fun ControlNet file given without --component: read off its tensor names
            return [open_controlnet(src)]
        raise CheckpointError(f"{src}: unknown layout: not a Z-Image DiT or a Qwen3 text encoder in any known "
                              f"name layout (found {', '.join(names[:3]) or 'no tensors'}, ...)")
    label = {"dit": "a DiT", "text_encoder": "a text encoder", "vae": "a VAE"}[comp.kind]
    if comp.kind == "vae":
        raise OptionError(f"{src} holds a VAE; quantize writes the DiT and the text encoder (keep the FLUX VAE)")
    if wanted == "all":
        raise OptionError(f"--component all needs the model folder; {src} holds only {label}")
    if wanted and wanted != comp.kind:
        raise OptionError(f"--component {component}, but {src} holds {label}")
    # the tokenizer as the runtime finds it beside a single file (components.tokenizer_in), or in the model folder
    # above a component folder (text_encoder/ of the official layout)
    base = src if src.is_dir() else src.parent
    tok = tokenizer_in(base) or tokenizer_in(base.parent) or base.parent / "tokenizer" / "tokenizer.json"
    return [_open(src, comp.kind, tok)]


# ---- memory: hand back the source's mapped pages --------------------------------------------------------------------


# ---- reading ---------------------------------------------------------------------------------------------------------


def check_readable(inp: SourceInput, target: Target) -> None:
    """Refuse sources that are already quantized: quantizing Q8_0 data to Q4_K compounds two errors."""
    for name in inp.shapes:
        qtype = inp.source.qtype(name)
        if qtype not in READABLE:
            raise UnsupportedQuantError(
                f"{inp.source.where(name)}: tensor {name} is stored as {qtype}; re-quantizing already quantized "
                f"weights to {target.name} is refused (the error would compound): convert from the official "
                f"safetensors or a BF16/F16 GGUF")


# ---- writing ---------------------------------------------------------------------------------------------------------


def convert_dit(inp: SourceInput, target: Target, out: Path, force: bool) -> Result:
    plan = dit_plan(inp.shapes, target)
    recipe = f"{target.name}: ComfyUI-GGUF lcpp lumina2 mix (embedders, final layer, refiners BF16)"

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(int(target.ftype))
        w.add_name("Z-Image-Turbo")
        provenance(w, inp, recipe)

    return write_file(out, force, plan, lambda tmp, bar: write_gguf(tmp, "lumina2", plan, metadata, inp, bar))


def convert_text_encoder(inp: SourceInput, target: Target, out: Path, force: bool) -> Result:
    cfg, shapes = inp.config, inp.shapes
    plan = te_plan(shapes, target, cfg)
    recipe = f"{target.name}: llama.cpp llama_tensor_get_type mix for qwen3"
    if inp.tokenizer:
        tokens = recipes.tokenizer_metadata(inp.tokenizer, cfg.vocab_size, inp.raw_config)
    elif isinstance(getattr(inp.source, "inner", None), GGUFSource):  # a llama.cpp GGUF: keep its vocabulary
        tokens = recipes.copied_metadata(inp.root, "tokenizer.")
    else:
        tokens = None
    if tokens is None:
        print(f"note: no tokenizer/tokenizer.json beside {inp.root}: the GGUF carries no vocabulary "
              "(stable-diffusion.cpp and ComfyUI-GGUF do not need one; llama.cpp does)", file=sys.stderr)

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(int(target.ftype))
        w.add_name("Qwen3-4B")
        # the hyper-parameter keys llama.cpp's convert_hf_to_gguf writes for qwen3
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if tokens is not None:
            tokens(w)
        provenance(w, inp, recipe)

    return write_file(out, force, plan, lambda tmp, bar: write_gguf(tmp, "qwen3", plan, metadata, inp, bar))


def convert_bnb(inp: SourceInput, target: Target, out: Path, force: bool) -> Result:
    import json

    import zimage_lite
    from zimage_lite.config import config_to_dict

    shapes = inp.shapes
    linear = dit_linear_weights(inp.config)
    dtype = _storage_dtype(inp, linear)
    plan = bnb.bnb_plan(shapes, linear, target.name, dtype)
    config = dict(inp.raw_config) if inp.raw_config else {"_class_name": "ZImageTransformer2DModel",
                                                           **config_to_dict(inp.config)}
    config["quantization_config"] = bnb.quantization_config(target.name)
    metadata = {"format": "pt", "zimage_lite.source_sha256": inp.digest, "zimage_lite.version": zimage_lite.__version__,
                "zimage_lite.recipe": f"{target.name}: bitsandbytes, diffusers pre-quantized layout"}
    total = bnb.predicted_bnb_size(plan)
    start = time.perf_counter()

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

        def on_group(group: bnb.BnbGroup) -> None:
            release_pages(inp.root)
            bar.update(sum(e.nbytes for e in group.entries))

        bnb.write_safetensors(tmp / BNB_WEIGHTS, plan,
                              lambda name: writing.read(inp.source, name, shapes[name]), metadata, dtype, on_group)

    with tqdm(total=total, desc=out.name, unit="B", unit_scale=True, disable=None) as bar:
        write_atomic(out, write, force, folder=True, needed=total)
    size = sum(f.stat().st_size for f in out.iterdir())
    return Result(out, size, dict(Counter(g.kind for g in plan)), time.perf_counter() - start)


def convert_int8(inp: SourceInput, target: Target, out: Path, force: bool) -> Result:
    """A ComfyUI INT8 (ConvRot or plain rows) safetensors file of the DiT or text encoder (quantize/convrot.py)."""
    import zimage_lite

    groups, parts = convrot.int8_plan(inp.component, inp.shapes, target.name)
    fused = convrot.read_fused(lambda name, shape: writing.read(inp.source, name, shape), inp.shapes, parts)
    metadata = {"format": "pt", "zimage_lite.source_sha256": inp.digest, "zimage_lite.version": zimage_lite.__version__,
                "zimage_lite.recipe": f"{target.name}: ComfyUI int8_tensorwise, per-row scales"}
    total = bnb.predicted_bnb_size(groups)
    start = time.perf_counter()

    def write(tmp: Path) -> None:
        def on_group(group: bnb.BnbGroup) -> None:
            release_pages(inp.root)
            bar.update(sum(e.nbytes for e in group.entries))

        bnb.write_safetensors(tmp, groups, fused, metadata, "float32", on_group,
                              make=lambda g: convrot.make_group(g, fused))

    with tqdm(total=total, desc=out.name, unit="B", unit_scale=True, disable=None) as bar:
        write_atomic(out, write, force, needed=total)
    return Result(out, out.stat().st_size, convrot.histogram(groups), time.perf_counter() - start)


def _storage_dtype(inp: SourceInput, linear: set[str]) -> str:
    """The weights' storage dtype as torch names it (recorded in the nf4 quant state, as bitsandbytes does)."""
    name = next((n for n in inp.shapes if n in linear), None)
    kind = inp.source.qtype(name) if name else "F32"
    return {"BF16": "bfloat16", "F16": "float16"}.get(kind, "float32")


# ---- entry point -----------------------------------------------------------------------------------------------------


def _bnb_output(folder: Path) -> bool:
    """Whether `folder` is a bitsandbytes folder this tool wrote: its two files and nothing else, the config with a
    quantization_config. Any other folder (a source, a project) is a parent to write into, never replaced."""
    try:
        names = {p.name for p in folder.iterdir()}
        config = read_json(folder / "config.json") if names == {"config.json", BNB_WEIGHTS} else {}
    except (OSError, ZImageLiteError):
        return False
    return "quantization_config" in config


def output_paths(inputs: list[SourceInput], target: Target, out: Path | None) -> list[Path]:
    """Where each component goes: the community file names, in `out` when it is a folder (or with `all`)."""
    names = [convrot.FILE_NAMES[i.component].format(t=target.name.replace("-", "_"))
             if target.name in INT8_TARGETS else BNB_FOLDER.format(t=target.name) if not target.is_gguf
             else FILE_NAMES[i.component].format(t=target.name) for i in inputs]
    folder_output = not target.is_gguf and target.name not in INT8_TARGETS
    if len(inputs) == 1 and folder_output and out is not None and _bnb_output(out):
        return [out]  # an earlier bitsandbytes output: replaced with --force, refused without (not written into)
    if len(inputs) > 1 or out is None or out.is_dir():
        folder = out or Path.cwd()
        if not folder.is_dir():
            raise OptionError(f"--out {folder}: with --component all, --out must be an existing folder")
        return [folder / n for n in names]
    # a file name says its format: one that says another is refused (it would not load as what its name says)
    suffix, kind = (".gguf", "a GGUF file") if target.is_gguf else (".safetensors", "a safetensors file") \
        if target.name in INT8_TARGETS else ("", "a diffusers folder")
    if out.suffix.lower() != suffix and (suffix or out.suffix.lower() in (".gguf", ".safetensors")):
        want = f"a name ending in {suffix}" if suffix else "a folder name without a file extension"
        raise OptionError(f"--out {out}: --type {target.name} writes {kind}; give {want}, or an existing folder "
                          f"for the community name ({names[0]})")
    return [out]


def convert(src: Path, type_name: str, component: str | None = None, out: Path | None = None,
            force: bool = False) -> list[Result]:
    """Convert `src` to `type_name` (a key of recipes.TARGETS). Returns one Result per file written."""
    if type_name not in TARGETS:
        raise OptionError(f"--type {type_name}: expected one of {', '.join(TARGETS)}")
    target = TARGETS[type_name]
    inputs = open_inputs(Path(src), component)
    int8 = target.name in INT8_TARGETS
    if int8 and any(i.component == "controlnet" for i in inputs):
        raise UnsupportedQuantError(f"--type {type_name}: INT8 files are written for the DiT and the text encoder; "
                                    "for a ControlNet choose a GGUF type such as Q8_0 or Q4_K_M")
    if not target.is_gguf and not int8 and any(i.component != "dit" for i in inputs):
        raise UnsupportedQuantError(f"--type {type_name}: bitsandbytes files are written for the DiT only; for the "
                                    "text encoder choose a GGUF type such as Q8_0 or Q4_K_M")
    for inp in inputs:
        check_readable(inp, target)
    paths = output_paths(inputs, target, Path(out) if out else None)
    for p in paths:  # refuse before any work: an existing output without --force, a missing or read-only folder
        check_output(p, force, folder=not target.is_gguf and not int8)
    results: list[Result] = []
    try:
        for inp, path in zip(inputs, paths, strict=True):
            fn = (convert_int8 if int8 else convert_bnb if not target.is_gguf else
                  {"dit": convert_dit, "controlnet": convert_controlnet}.get(inp.component, convert_text_encoder))
            try:
                results.append(fn(inp, target, path, force))
            finally:
                inp.source.close()  # unmap the input: the opens stay cached (components.identify), the maps need not
    except (KeyboardInterrupt, ZImageLiteError) as e:
        if not results:
            raise
        written = tuple(str(r.path) for r in results)  # --component all: say what is complete, not "nothing"
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(getattr(e, "signal_name", "SIGINT"), written) from None
        raise type(e)(f"{e}; {', '.join(written)} was written in full before the error") from None
    return results


def summary(r: Result) -> str:
    """The line printed per file written: size, tensors per type, time, peak memory; and, where rows too short for
    the recipe's block made tensors fall back to other types, a note saying which and how many."""
    hist = ", ".join(f"{k} {v}" for k, v in sorted(r.histogram.items()))
    peak = peak_bytes(torch.device("cpu"))
    line = f"{r.path}  ({format_si(r.nbytes)}; tensors: {hist}; {r.seconds:.1f} s, peak memory {gib(peak)})"
    if r.fallbacks:
        moved = ", ".join(f"{a} -> {b} {n}" for (a, b), n in sorted(r.fallbacks.items()))
        rows = " or ".join(filter(None, [", ".join(map(str, r.short_rows[:-1])), str(r.short_rows[-1])]))
        line += (f"\n  note: {sum(r.fallbacks.values())} tensors fell back to other types, as llama.cpp does: their "
                 f"rows ({rows} weights long) do not fit the recipe's block: {moved}")
    return line
