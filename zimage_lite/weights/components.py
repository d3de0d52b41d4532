"""Where each component's weights and config come from, in whatever layout the user has.

`--model` is the official folder (transformer/, text_encoder/, tokenizer/, vae/), a folder of single files
(`z_image_turbo-Q4_K_M.gguf`, `qwen_3_4b.safetensors`, `ae.safetensors`, ...), or one file; `--dit`,
`--text-encoder` and `--vae` override one component each. Which file holds which component, and in which name
layout, is read from the tensor names (names.py), never from file names. A single file has no config.json: the
config is read off the tensor shapes, the rest taken from the turbo preset. A folder whose config.json carries a
bitsandbytes `quantization_config` (as `zimage-lite quantize --type int8|nf4` and diffusers write it) opens through
sources.BnbSource: official names, int8/nf4 weights packed. Every component is opened (headers only) and checked
while the model is resolved, on its own and against the others (checks.py), so a wrong, cut or unreadable file, or
parts of two different models, fail before any work. Opens are cached with their
index (names, shapes, types, config) but no memory map: a source maps its files when a tensor is read and unmaps
them at `close()`, which the pipeline calls when a stage ends (TensorSource.close).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..components import COMPONENTS, REGISTRY, TOKENIZER_FOLDER
from ..config import PRESETS, DiTConfig, SchedulerConfig, TextEncoderConfig, VAEConfig, read_json, validate_config
from ..errors import CheckpointError, UnsupportedQuantError
from ..quant.convrot import INT8_ROWS_NAMES
from ..quant.formats import SUPPORTED_TYPES
from .checks import check_compatible, check_file, check_path
from .comfy_quant import ComfyQuantSource, has_comfy_quant
from .gguf_source import GGUFSource
from .names import detect_component, translate
from .sources import BnbSource, RenamedSource, SafetensorsSource, TensorSource

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".gguf")
LAYOUT_HINT = ("a model folder holds transformer/, text_encoder/, tokenizer/ and vae/ "
               "(the Tongyi-MAI/Z-Image-Turbo layout), or one single file per component")
# Language-model heads a text encoder file may carry; Z-Image never reads them.
UNUSED = re.compile(r"(^|\.)(lm_head|output)\.weight$")
# Storage types a file may use: the dequant table's, bitsandbytes' (fp4 has a kernel but no memory plan yet), plus
# float types torch casts directly (safetensors).
READABLE = {t.name for t in SUPPORTED_TYPES} | {"int8", "nf4"} | {"F64", "F8_E4M3", "F8_E5M2"} | INT8_ROWS_NAMES


@dataclass(frozen=True)
class ModelFiles:
    name: str
    dit: Path
    text_encoder: Path
    tokenizer: Path  # tokenizer.json
    vae: Path
    scheduler: Path | None  # scheduler_config.json, when present
    model: str = ""  # --model as the user gave it: "demo" or an absolute path (what an image records)
    overridden: tuple[str, ...] = ()  # the components given by --dit, --text-encoder or --vae


@dataclass(frozen=True)
class Component:
    """What a path holds: its kind ('dit', 'text_encoder', 'vae'; None if unknown), name layout and config, and
    the tensors under official names (`source`) and as stored (`stored`)."""

    path: Path
    kind: str | None
    layout: str | None
    config: Any
    source: RenamedSource | None
    stored: TensorSource


# --- opening --------------------------------------------------------------------------------------------------


def _signature(path: Path) -> tuple:
    """Changes whenever the files behind `path` change, so cached opens never serve stale headers."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def _quantization_config(folder: Path) -> dict[str, Any] | None:
    """config.json's `quantization_config` when it names bitsandbytes; None without one. Other methods (torchao,
    quanto, ...) keep weights in forms zimage-lite does not read: refused here, by name."""
    config = folder / "config.json"
    qc = read_json(config).get("quantization_config") if config.is_file() else None
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "bitsandbytes":
        raise UnsupportedQuantError(f"{config}: quantization_config.quant_method is {method!r}; zimage-lite reads "
                                    f"bitsandbytes int8/nf4 folders and GGUF files")
    return qc


def open_stored(path: Path) -> TensorSource:
    """The tensors of a single file (GGUF by its magic, else safetensors) or a component folder, as stored;
    a bitsandbytes folder with its quantized weights folded into packed tensors."""
    path = Path(path)
    if path.is_dir():
        stored = SafetensorsSource.from_folder(path)
        qc = _quantization_config(path)
        if qc is not None:
            return BnbSource(stored, qc)
        return ComfyQuantSource(stored) if has_comfy_quant(stored) else stored
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF" or path.suffix.lower() == ".gguf"  # a bad magic is GGUFSource's to report
    if not is_gguf and path.suffix.lower() not in (".safetensors", ".sft"):
        raise CheckpointError(f"{path}: neither a GGUF nor a safetensors file; zimage-lite reads "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)} files (pickled .ckpt/.bin/.pt are not loaded)")
    if is_gguf:
        return GGUFSource(path)
    stored = SafetensorsSource([path])
    return ComfyQuantSource(stored) if has_comfy_quant(stored) else stored  # ComfyUI's int8 (ConvRot) layers


def _count(names: list[str], pattern: str) -> int:
    """1 + the largest block index the pattern's group captures (layers.N., blk.N., ...), 0 if none."""
    found = {int(m.group(1)) for n in names if (m := re.search(pattern, n))}
    return max(found) + 1 if found else 0


def _probe(kind: str, stored: TensorSource, names: list[str], path: Path, official: list[str],
           n_up: int = 4) -> dict[str, tuple[int, ...]]:
    """Shapes of a few official tensors, found through the file's own layout."""
    _, mapping = translate(kind, official, names, str(path), n_up)
    view = RenamedSource(stored, mapping)
    return {n: view.shape(n) for n in official}


def _meta_float(stored: TensorSource, key: str, default: float) -> float:
    value = stored.meta(key) if isinstance(stored, GGUFSource) else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise CheckpointError(f"{stored.path}: metadata {key} is {value!r}, not a number; convert the file again")
    # GGUF stores FLOAT32: 1e-6 comes back as 9.99999997e-07. Seven significant digits recover what was written.
    return default if value is None else float(f"{float(value):.7g}")


def _dit_config(stored: TensorSource, names: list[str], path: Path) -> DiTConfig:
    base = PRESETS["turbo"].dit
    x_emb = f"all_x_embedder.{base.embedder_key}.weight"
    s = _probe("dit", stored, names, path, ["cap_embedder.1.weight", "layers.0.attention.norm_q.weight",
                                            "layers.0.attention.to_k.weight", x_emb])
    dim, cap_feat_dim = s["cap_embedder.1.weight"]
    head_dim = s["layers.0.attention.norm_q.weight"][0]
    # RoPE axes split head_dim as the turbo model does (32:48:48 of 128)
    axes = tuple(d * head_dim // base.head_dim for d in base.axes_dims)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise CheckpointError(f"{path}: head_dim {head_dim} (from q_norm) does not split into RoPE axes like "
                              f"{base.axes_dims}; put the DiT in a folder with its config.json")
    return dataclasses.replace(
        base, dim=dim, n_layers=_count(names, r"(?:^|\.)layers\.(\d+)\."),
        n_refiner_layers=_count(names, r"(?:^|\.)noise_refiner\.(\d+)\."), n_heads=dim // head_dim,
        n_kv_heads=s["layers.0.attention.to_k.weight"][0] // head_dim, cap_feat_dim=cap_feat_dim,
        in_channels=s[x_emb][1] // (base.patch_size ** 2 * base.f_patch_size), axes_dims=axes)


def _text_encoder_config(stored: TensorSource, names: list[str], path: Path) -> TextEncoderConfig:
    base = PRESETS["turbo"].text_encoder
    probe = ["embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
             "layers.0.self_attn.q_norm.weight", "layers.0.mlp.gate_proj.weight"]
    s = _probe("text_encoder", stored, names, path, probe)
    vocab, hidden = s["embed_tokens.weight"]
    head_dim = s["layers.0.self_attn.q_norm.weight"][0]
    arch = (stored.meta("general.architecture") if isinstance(stored, GGUFSource) else None) or "qwen3"
    # A GGUF cut for image generation (no last layer) still says how many layers the model has: the image path
    # reads the second-to-last of those, not of the ones stored.
    block_count = stored.meta(f"{arch}.block_count") if isinstance(stored, GGUFSource) else None
    n_layers = max(_count(names, r"(?:^|\.)(?:layers|blk)\.(\d+)\."),
                   block_count if isinstance(block_count, int) and not isinstance(block_count, bool) else 0)
    if n_layers < 2:
        raise CheckpointError(f"{path}: the text encoder has {n_layers} layer(s); Z-Image reads the output of the "
                              f"second-to-last, so at least 2 are needed")
    return dataclasses.replace(
        base, hidden_size=hidden, intermediate_size=s["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=n_layers, num_attention_heads=s["layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=s["layers.0.self_attn.k_proj.weight"][0] // head_dim, head_dim=head_dim,
        vocab_size=vocab, rope_theta=_meta_float(stored, f"{arch}.rope.freq_base", base.rope_theta),
        rms_norm_eps=_meta_float(stored, f"{arch}.attention.layer_norm_rms_epsilon", base.rms_norm_eps))


def _vae_config(stored: TensorSource, names: list[str], path: Path) -> VAEConfig:
    base = PRESETS["turbo"].vae
    n_up = _count(names, r"decoder\.up(?:_blocks)?\.(\d+)\.")
    ups = [f"decoder.up_blocks.{i}.resnets.0.conv2.weight" for i in range(n_up)]
    s = _probe("vae", stored, names, path, ["decoder.conv_in.weight", "decoder.conv_out.weight", *ups], n_up)
    chans = tuple(reversed([s[u][0] for u in ups]))
    # GroupNorm's group count is not in the weights: FLUX's 32, which must divide every width.
    if any(c % base.norm_num_groups for c in chans):
        raise CheckpointError(f"{path}: VAE widths {list(chans)} are not multiples of {base.norm_num_groups} "
                              f"GroupNorm groups; put the VAE in a folder with its config.json")
    return dataclasses.replace(
        base, block_out_channels=chans, latent_channels=s["decoder.conv_in.weight"][1],
        out_channels=s["decoder.conv_out.weight"][0],
        layers_per_block=_count(names, r"decoder\.up(?:_blocks)?\.0\.(?:resnets|block)\.(\d+)\.") - 1,
        mid_block_add_attention=any(re.search(r"decoder\.mid(?:_block)?\.(?:attn_1|attentions)\.", n)
                                    for n in names))


DERIVE = {"dit": _dit_config, "text_encoder": _text_encoder_config, "vae": _vae_config}


def official_names(kind: str, config: Any) -> list[str]:
    """The tensors the runtime's models for `config` read (built on `meta`: no memory); for the VAE, the decoder's
    and the encoder's (names.translate maps the encoder only where the file has one)."""
    with torch.device("meta"):
        return [n for cls in REGISTRY[kind].models for n, _ in cls(config).named_parameters()]


@functools.lru_cache(maxsize=16)
def _identify(path: Path, signature: tuple) -> Component:
    stored = open_stored(path)
    try:
        return _describe(path, stored)
    finally:
        stored.close()  # the cache keeps the index, not the maps: a stage maps what it reads, and unmaps it


def _describe(path: Path, stored: TensorSource) -> Component:
    names = [n for n in stored.names() if not UNUSED.search(n)]
    kind = detect_component(names)
    if kind is None:
        return Component(path, None, None, None, None, stored)
    if path.is_dir():
        config = REGISTRY[kind].config.from_dict(read_json(path / "config.json"), path / "config.json")
    else:
        config = validate_config(DERIVE[kind](stored, names, path), path)
    n_up = len(config.block_out_channels) if kind == "vae" else 4
    layout, mapping = translate(kind, official_names(kind, config), names, str(path), n_up)
    return Component(path, kind, layout, config, RenamedSource(stored, mapping), stored)


def identify(path: Path) -> Component:
    """Open a file or component folder (headers only; cached while the files stay unchanged) and say what it is."""
    path = check_path(path, folder_ok=True)  # before any open: a FIFO would block it
    return _identify(path, _signature(path))


def open_component(path: Path, kind: str, option: str | None = None) -> Component:
    """`identify`, then check that `path` holds a `kind` whose tensors zimage-lite can all read."""
    comp = identify(path)
    via = f" ({option})" if option else ""
    if comp.kind is None:
        names = [n for n in comp.stored.names() if not UNUSED.search(n)]
        translate(kind, [], names, f"{path}{via}")  # raises, listing the names each layout has
        raise CheckpointError(f"{path}{via}: not a Z-Image {REGISTRY[kind].label} in any known layout")
    if comp.kind != kind:
        raise CheckpointError(f"{path} holds a {REGISTRY[comp.kind].label}, not a {REGISTRY[kind].label}{via}")
    for name, (stored_name, _) in comp.source.mapping.items():
        qtype = comp.source.qtype(name)
        if qtype not in READABLE:
            raise UnsupportedQuantError(
                f"{comp.source.where(name)}: tensor {stored_name} is {qtype}, a type zimage-lite cannot read "
                f"(it reads {', '.join(sorted(READABLE))}); use a file quantized to one of those")
    return comp


def open_dit(path: Path) -> tuple[DiTConfig, TensorSource]:
    comp = open_component(path, "dit")
    return comp.config, comp.source


def open_text_encoder(path: Path) -> tuple[TextEncoderConfig, TensorSource]:
    comp = open_component(path, "text_encoder")
    return comp.config, comp.source


def _lm_names(comp: Component) -> list[str]:
    with torch.device("meta"):
        return [n for n, _ in REGISTRY["text_encoder"].model(comp.config, lm=True).named_parameters()]


def lm_lacks(comp: Component) -> list[str]:
    """What a text encoder lacks to run as the enhancer's causal LM (the final norm, the last layer); [] if nothing."""
    expected, names = _lm_names(comp), [n for n in comp.stored.names() if not UNUSED.search(n)]
    last = f"layers.{comp.config.num_hidden_layers - 1}."
    lacks = []
    for what, group in (("the final norm (norm.weight)", ["norm.weight"]),
                        (f"the last layer ({last[:-1]})", [n for n in expected if n.startswith(last)])):
        try:
            translate("text_encoder", group, names, str(comp.path))
        except CheckpointError:
            lacks.append(what)
    return lacks


def open_language_model(path: Path, option: str = "--text-encoder") -> tuple[TextEncoderConfig, RenamedSource]:
    """The text encoder as the whole causal LM the prompt enhancer runs: every layer and the final norm, under
    official names (the output head is the tied embedding table). CheckpointError naming what the file lacks (files
    cut for image generation drop the last layer and the final norm) and which file has it."""
    comp = open_component(path, "text_encoder", option)
    expected, names = _lm_names(comp), [n for n in comp.stored.names() if not UNUSED.search(n)]
    lacks = lm_lacks(comp)
    if lacks:
        raise CheckpointError(
            f"{path} ({option}) cannot enhance prompts: it lacks {' and '.join(lacks)}, which image generation never "
            f"reads and some text-encoder files leave out. Enhance with the official text_encoder/ folder "
            f"(Tongyi-MAI/Z-Image-Turbo) or a GGUF written from it by `zimage-lite quantize`")
    return comp.config, RenamedSource(comp.stored, translate("text_encoder", expected, names, str(path))[1])


def open_vae(path: Path) -> tuple[VAEConfig, TensorSource]:
    comp = open_component(path, "vae")
    return comp.config, comp.source


def scheduler_config(files: ModelFiles) -> SchedulerConfig:
    if files.scheduler is None:
        return SchedulerConfig()
    return SchedulerConfig.from_dict(read_json(files.scheduler), files.scheduler)


# --- resolving --model and the overrides ----------------------------------------------------------------------


def single_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES)


def _found_in(root: Path) -> dict[str, list[Path]]:
    """Component kind → candidate paths under `--model`: official sub-folders first, then single files."""
    found: dict[str, list[Path]] = {k: [] for k in COMPONENTS}
    if root.is_file() or (root / "config.json").is_file():  # one file, or one component's folder
        comp = identify(root)
        if comp.kind is None:
            some = ", ".join(sorted(comp.stored.names())[:4]) or "no tensors"
            raise CheckpointError(f"--model {root}: not a Z-Image DiT, text encoder or VAE in any known layout "
                                  f"(found {some}, ...); {LAYOUT_HINT}")
        found[comp.kind].append(root)
        return found
    for kind in COMPONENTS:
        if (root / REGISTRY[kind].folder).is_dir():
            found[kind].append(root / REGISTRY[kind].folder)
    for f in single_files(root):
        kind = identify(f).kind  # files of no known component (a LoRA, say) are left alone
        if kind is not None and not (root / REGISTRY[kind].folder).is_dir():
            found[kind].append(f)
    return found


def _gguf_tokenizer(path: Path) -> Path | None:
    """tokenizer.json rebuilt from a GGUF text encoder's metadata, cached next to the demo model."""
    from ..demo import cache_dir

    stored = identify(path).stored
    if not isinstance(stored, GGUFSource):
        return None
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "tokenizers" / f"{path.stem}-{key}.json"
    if out.is_file():
        return out
    try:
        text = stored.tokenizer_json()
    finally:
        stored.close()  # the metadata was read through a map
    if text is None:
        return None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot store the tokenizer read from {path} ({e}); set ZIMAGE_LITE_CACHE "
                              f"to a writable folder") from None
    return out


def tokenizer_in(home: Path) -> Path | None:
    """The tokenizer.json a model folder holds: in tokenizer/ (the official layout) or loose; None: neither is
    there (anything at the path counts: a folder or a FIFO there is refused by name, not passed over)."""
    return next((c for c in (home / TOKENIZER_FOLDER / "tokenizer.json", home / "tokenizer.json") if c.exists()), None)


def _tokenizer(home: Path, text_encoder: Path, override: Path | None) -> Path:
    if override is not None:
        tok = Path(override) / "tokenizer.json" if Path(override).is_dir() else Path(override)
        return check_file(tok, "tokenizer")
    if (cand := tokenizer_in(home)) is not None:
        return check_file(cand)
    from_gguf = _gguf_tokenizer(text_encoder) if text_encoder.is_file() else None
    if from_gguf is not None:
        return from_gguf
    why = f"; {text_encoder} carries no tokenizer metadata" if text_encoder.suffix.lower() == ".gguf" else ""
    raise CheckpointError(f"{home}: no tokenizer found: zimage-lite needs Qwen3's tokenizer.json; put "
                          f"tokenizer/tokenizer.json (from Tongyi-MAI/Z-Image-Turbo) into {home}, or point "
                          f"--model at the official folder{why}")


def resolve_model(model: str | Path, dit: Path | None = None, text_encoder: Path | None = None,
                  vae: Path | None = None, tokenizer: Path | None = None) -> ModelFiles:
    """`model`: the official folder, a folder of single files, one file, or 'demo'; the other arguments override
    one component each. Every component is opened and checked here (headers only)."""
    if str(model) == "demo":
        from ..demo import demo_path

        root, name = demo_path(), "demo"
    else:
        root = Path(model)
        name = root.stem if root.is_file() else root.name
    if not root.exists():
        raise CheckpointError(f"--model {root}: not found; {LAYOUT_HINT}")
    check_path(root, "--model", folder_ok=True)
    overrides = {"dit": dit, "text_encoder": text_encoder, "vae": vae}
    single = root.is_file() or (root / "config.json").is_file()
    home = root.parent if single else root  # where tokenizer/ and scheduler/ may be
    found = _found_in(root)
    paths: dict[str, Path] = {}
    configs: dict[str, Any] = {}
    for kind in COMPONENTS:
        c = REGISTRY[kind]
        if overrides[kind] is not None:
            paths[kind] = check_path(overrides[kind], c.option, folder_ok=True)
            configs[kind] = open_component(paths[kind], kind, c.option).config
            continue
        candidates = found[kind]
        if not candidates:
            if single:
                raise CheckpointError(f"--model {root} holds only one component: pass the {c.label} with "
                                      f"{c.option} FILE")
            raise CheckpointError(f"{root}: no {c.folder}/ folder and no single {c.label} file "
                                  f"({', '.join(SINGLE_FILE_SUFFIXES)}) in it; {LAYOUT_HINT}, or pass "
                                  f"{c.option} FILE")
        if len(candidates) > 1:
            raise CheckpointError(f"{root}: {', '.join(x.name for x in candidates)} all hold a {c.label}; "
                                  f"keep one, or choose with {c.option}")
        paths[kind] = candidates[0]
        configs[kind] = open_component(paths[kind], kind).config
    check_compatible(*((paths[k], configs[k]) for k in ("dit", "text_encoder", "vae")))
    tok = _tokenizer(home, paths["text_encoder"], tokenizer)
    sched = home / "scheduler" / "scheduler_config.json"
    return ModelFiles(name, paths["dit"], paths["text_encoder"], tok, paths["vae"], sched if sched.is_file() else None,
                      model="demo" if str(model) == "demo" else os.path.abspath(root),
                      overridden=tuple(k for k in COMPONENTS if overrides[k] is not None))
