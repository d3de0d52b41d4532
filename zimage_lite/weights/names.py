"""The one table of tensor-name layouts, and layout detection. Models always see official names.

Layouts (shared/reference/gguf_interop.md 1, 2.4, 8):
- DiT: official/diffusers (split to_q/to_k/to_v) and ComfyUI/"original" (fused `qkv`, `q_norm`, `out`, `x_embedder`,
  `final_layer`), the latter also with the `model.diffusion_model.` prefix that stable-diffusion.cpp writes.
- Text encoder: Hugging Face Qwen3 (with or without `model.`) and llama.cpp (`blk.N.attn_q`, `token_embd`, ...).
- VAE: diffusers AutoencoderKL (`decoder.up_blocks.0...`, `encoder.down_blocks.0...`) and the original FLUX
  `ae.safetensors` (`decoder.up.3.block.0...`, up blocks numbered the other way round, `encoder.down.0.block.0...`,
  1x1-conv attention projections). The encoder is optional: a file without one still decodes.

A translation maps each official name to (name in the file, part): part is None for a plain rename, or (i, n) for
rows i/n of a fused tensor (the ComfyUI qkv holds q, k and v as three row ranges).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import CheckpointError

Part = tuple[int, int] | None
Translation = dict[str, tuple[str, Part]]

# --- DiT --------------------------------------------------------------------------------------------------------
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# official → ComfyUI, as substring rewrites (applied in this order)
DIT_COMFY_RENAMES = [
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
]
QKV = {".attention.to_q.": 0, ".attention.to_k.": 1, ".attention.to_v.": 2}
DIT_IGNORED = re.compile(r"(^|\.)norm_final\.")  # a Lumina-2 leftover in ComfyUI files

# --- text encoder (llama.cpp ⇄ HF Qwen3, per decoder layer) ---------------------------------------------------------
LLAMA_CPP_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
LLAMA_CPP_GLOBAL = {"token_embd": "embed_tokens", "output_norm": "norm"}
TE_PREFIXES = ("model.", "text_encoders.llm.model.", "text_encoders.qwen3_4b.transformer.model.")

# --- VAE (original FLUX ae ⇄ diffusers), decoder and encoder -------------------------------------------------------
VAE_PREFIXES = ("first_stage_model.", "vae.")
VAE_ENCODER = "encoder."  # optional: a decoder-only file decodes; the encoder's tensors are mapped when present
FLUX_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# --- LoRA (DiT) -----------------------------------------------------------------------------------------------------
# Prefixes: diffusers `transformer.`, ai-toolkit/ComfyUI `diffusion_model.`, kohya/musubi-tuner `lora_unet_`
# (module path with every '.' written '_'); DiffSynth writes bare official names. Longest first.
LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
# Roles: PEFT A/B (diffusers, ai-toolkit, DiffSynth), kohya down/up (musubi-tuner, ComfyUI) and the dot form of
# Anime-Z; `.alpha` is kohya's per-module alpha. PEFT's adapter name (`lora_A.default.weight`) is dropped first.
LORA_ROLES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora.down.weight": "down",
              "lora_B.weight": "up", "lora_up.weight": "up", "lora.up.weight": "up", "alpha": "alpha"}
# Keys of text-encoder LoRAs (kohya `lora_te_`/`lora_te1_`, diffusers `text_encoder.`, ComfyUI `text_encoders.`)
LORA_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|text_encoders?\.|te\d?\.)")
# Adapters that are not a low-rank pair (a side path y += s·B(A·x) cannot compute them), by what names them
LORA_OTHER_KINDS = {"lokr_": "LoKr", "hada_": "LoHa", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA"}


# --- ControlNet -------------------------------------------------------------------------------------------------
# diffusers' ZImageControlNetModel names, which the alibaba-pai single files use too (control_files.py)
CONTROL_EMBEDDER = "control_all_x_embedder.2-1.weight"
CONTROL_PREFIXES = ("model.diffusion_model.",)
# names that give away a ControlNet of another family, checked in this order
OTHER_CONTROLNETS = (
    (("controlnet_cond_embedding.", "input_hint_block.", "zero_convs.", "control_model.", "down_blocks."),
     "an SD/SDXL (UNet) ControlNet"),
    (("controlnet_blocks.", "controlnet_x_embedder", "controlnet_single_blocks.", "double_blocks.",
      "single_transformer_blocks.", "transformer_blocks."), "a Flux ControlNet"),
)


def lora_module_key(module: str) -> str:
    """A module path with '.' and '_' alike: kohya's `layers_0_attention_to_q`, Anime-Z's `layers.0.attention.to.q`
    and the official `layers.0.attention.to_q` are one key."""
    return re.sub(r"[._]", "_", module)


def split_lora_key(key: str) -> tuple[str, str, str] | None:
    """(prefix, module, role) of a LoRA tensor name, role 'down', 'up' or 'alpha'; None for any other name."""
    bare = key.replace(".default.", ".")
    for suffix, role in LORA_ROLES.items():
        if bare.endswith("." + suffix):
            stem = bare[: -len(suffix) - 1]
            prefix = next((p for p in LORA_PREFIXES if stem.startswith(p)), "")
            return prefix, stem[len(prefix):], role
    return None


def lora_targets(linears: Iterable[str]) -> dict[str, tuple[tuple[str, Part], ...]]:
    """lora_module_key of every spelling of each official DiT linear (official and ComfyUI, through
    `dit_comfy_name`) → the linears it adapts with their part: one (name, None), or for the fused ComfyUI `qkv` the
    q, k and v rows ((to_q, (0, 3)), (to_k, (1, 3)), (to_v, (2, 3)))."""
    table: dict[str, list[tuple[str, Part]]] = {}
    for name in linears:
        comfy, part = dit_comfy_name(name + ".weight")
        for alias, p in ((name, None), (comfy.removesuffix(".weight"), part)):
            entry = table.setdefault(lora_module_key(alias), [])
            if (name, p) not in entry:
                entry.append((name, p))
    for key, entry in table.items():  # two linears under one spelling would make the '.'/'_' folding unsound
        if len(entry) > 1 and any(p is None for _, p in entry):
            raise AssertionError(f"LoRA module key {key} is ambiguous: {entry}")
    return {k: tuple(v) for k, v in table.items()}


def strip_prefix(names: Iterable[str], prefixes: Iterable[str]) -> tuple[str, list[str]]:
    """The longest of `prefixes` that every name carries ('' if none), and the names without it."""
    names = list(names)
    for p in sorted(prefixes, key=len, reverse=True):
        if names and all(n.startswith(p) for n in names):
            return p, [n[len(p):] for n in names]
    return "", names


def dit_comfy_name(official: str) -> tuple[str, Part]:
    """Official DiT name → (ComfyUI name, part)."""
    for key, i in QKV.items():
        if key in official:
            return official.replace(key, ".attention.qkv."), (i, 3)
    name = official
    for a, b in DIT_COMFY_RENAMES:
        name = name.replace(a, b)
    return name, None


def vae_flux_name(official: str, n_up: int) -> str:
    """diffusers VAE name (decoder or encoder) → original FLUX ae name."""
    m = re.match(r"(decoder|encoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)$", official)
    if m:
        part, kind, i, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(i) + 1}.{rest}"
        inverse = {v: k for k, v in FLUX_VAE_ATTN.items()}
        stem, leaf = rest.rsplit(".", 1)
        return f"{part}.mid.attn_1.{inverse[stem]}.{leaf}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", official)
    if m:
        idx = n_up - 1 - int(m.group(1))
        rest = m.group(4).replace("conv_shortcut.", "nin_shortcut.")
        if m.group(2) == "upsamplers":
            return f"decoder.up.{idx}.upsample.{rest}"
        return f"decoder.up.{idx}.block.{m.group(3)}.{rest}"
    # encoder down blocks keep their order (the decoder's up blocks are numbered from the latent side in FLUX)
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)$", official)
    if m:
        rest = m.group(4).replace("conv_shortcut.", "nin_shortcut.")
        if m.group(2) == "downsamplers":
            return f"encoder.down.{m.group(1)}.downsample.{rest}"
        return f"encoder.down.{m.group(1)}.block.{m.group(3)}.{rest}"
    return re.sub(r"^(decoder|encoder)\.conv_norm_out\.", r"\1.norm_out.", official)


def te_llama_cpp_name(official: str) -> str:
    """HF Qwen3 name without `model.` → llama.cpp name."""
    m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", official)
    if m:
        inverse = {v: k for k, v in LLAMA_CPP_LAYER.items()}
        return f"blk.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"
    stem, _, leaf = official.rpartition(".")
    inverse = {v: k for k, v in LLAMA_CPP_GLOBAL.items()}
    return f"{inverse.get(stem, stem)}.{leaf}"


def _translate(expected: Iterable[str], present: list[str], prefix: str, rename, component: str,
               layout: str, path: str) -> Translation:
    have = set(present)
    out: Translation = {}
    missing = []
    for name in expected:
        target, part = rename(name)
        if target not in have:
            missing.append(target)
            continue
        out[name] = (prefix + target, part)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: {component} in the {layout} layout, but tensor(s) {', '.join(missing[:5])}"
                              f"{more} are missing")
    return out


def translate(component: str, expected: Iterable[str], names: Iterable[str], path: str,
              n_up: int = 4) -> tuple[str, Translation]:
    """Detect the layout of a file's `names` and map each `expected` official name into it.

    Returns (layout name, translation). Raises CheckpointError naming the file and the names it looked for.
    """
    expected = list(expected)
    if component == "dit":
        prefix, bare = strip_prefix(names, DIT_PREFIXES)
        bare = [n for n in bare if not DIT_IGNORED.search(n)]
        if any(".attention.qkv." in n for n in bare):
            return "comfyui", _translate(expected, bare, prefix, dit_comfy_name, "DiT", "ComfyUI", path)
        if any(".attention.to_q." in n for n in bare):
            return "official", _translate(expected, bare, prefix, lambda n: (n, None), "DiT", "official", path)
        hint = "layers.0.attention.qkv.weight (ComfyUI) or layers.0.attention.to_q.weight (official/diffusers)"
    elif component == "text_encoder":
        prefix, bare = strip_prefix(names, TE_PREFIXES)
        if any(n.startswith("blk.") for n in bare):
            return "llama.cpp", _translate(expected, bare, prefix, lambda n: (te_llama_cpp_name(n), None),
                                           "text encoder", "llama.cpp", path)
        if any(n.startswith("layers.") for n in bare):
            return "transformers", _translate(expected, bare, prefix, lambda n: (n, None), "text encoder",
                                              "transformers", path)
        hint = "model.layers.0.self_attn.q_proj.weight (transformers) or blk.0.attn_q.weight (llama.cpp)"
    elif component == "vae":
        prefix, bare = strip_prefix(names, VAE_PREFIXES)
        if not any(n.startswith(VAE_ENCODER) for n in bare):
            expected = [n for n in expected if not n.startswith(VAE_ENCODER)]
        if any(n.startswith("decoder.up.") for n in bare):
            return "flux", _translate(expected, bare, prefix, lambda n: (vae_flux_name(n, n_up), None), "VAE",
                                      "FLUX ae", path)
        if any(n.startswith("decoder.up_blocks.") for n in bare):
            return "diffusers", _translate(expected, bare, prefix, lambda n: (n, None), "VAE", "diffusers", path)
        hint = "decoder.up_blocks.0.resnets.0.conv1.weight (diffusers) or decoder.up.0.block.0.conv1.weight (FLUX)"
    else:
        raise ValueError(component)
    found = ", ".join(sorted(names)[:4]) or "no tensors"
    raise CheckpointError(f"{path}: not a Z-Image {component.replace('_', ' ')} in any known layout: expected names "
                          f"like {hint}; found {found}, ...")


def detect_component(names: Iterable[str]) -> str | None:
    """Which component a set of tensor names belongs to, from the names alone (never the file name)."""
    names = list(names)
    bare = [strip_prefix([n], DIT_PREFIXES + TE_PREFIXES + VAE_PREFIXES)[1][0] for n in names]
    if any(n.startswith("cap_embedder.") for n in bare) and any(".attention." in n for n in bare):
        return "dit"
    if any(n.startswith(("blk.", "layers.")) and ("attn_q" in n or "self_attn" in n) for n in bare):
        return "text_encoder"
    if any(n.startswith("decoder.") for n in bare) and any("conv_in" in n for n in bare):
        return "vae"
    return None
