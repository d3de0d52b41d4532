"""The one fixture module: tiny random checkpoints in the exact official file layout.

Everything is written by `zimage_lite.demo.write_checkpoint` (the same code that makes the demo model), with a
config small enough for fp32 CPU parity runs in a fraction of a second but with every mechanism of the real model:
two refiner blocks of each kind, GQA in the text encoder, a 3-axis RoPE, caption and image padding, four VAE levels.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import mmap
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_lite.config import DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig
from zimage_lite.demo import write_checkpoint
from zimage_lite.runtime.memory import map_entries

TINY = ModelConfig(
    dit=DiTConfig(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=48,
                  axes_dims=(8, 12, 12)),
    text_encoder=TextEncoderConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16),
    vae=VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
)

PROMPTS = {
    "en": "a red fox in the snow, soft morning light",
    "cjk": "一只小狐狸在雪地里，柔和的晨光",
}


def make_checkpoint(folder: Path, cfg: ModelConfig = TINY, seed: int = 0, **kwargs) -> Path:
    """The official layout: transformer F32 sharded, text encoder BF16 sharded, VAE BF16, tokenizer, scheduler."""
    return write_checkpoint(folder, cfg, seed=seed, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: the figure the parity tolerances are stated in."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# TINY with a 256-wide DiT, so the K-quants apply: every Linear row of the main blocks is 256 long (qkv, out, w1,
# w3, adaLN), except w2's 682 (int(256 / 3 * 8)), which falls back as llama.cpp does. TINY's 64-wide rows all fall
# back. Used by the quantize and interop tests.
KQUANT = ModelConfig(
    dit=DiTConfig(dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=48,
                  axes_dims=(32, 48, 48)),
    text_encoder=TINY.text_encoder,
    vae=TINY.vae,
)

# TINY with a 256-wide text encoder (intermediate 512, heads of 64), so the K-quants apply to every text-encoder
# weight: a Q4_K_M GGUF of it holds a Q6_K token_embd and Q4_K Linears, Q6_K for attn_v/ffn_down in layer 2 of the
# 3 used (llama.cpp's use_more_bits pattern for 4 layers); TINY's 48-wide rows all fall back and never reach a
# K-quant. The vocabulary stays Qwen's (the chat template's special tokens sit at 151643+): 39 M embedding weights,
# 78 MB in BF16, written in ~2 s and quantized in ~3 s.
KQ_TEXT = ModelConfig(
    dit=dataclasses.replace(TINY.dit, cap_feat_dim=256),
    text_encoder=dataclasses.replace(TINY.text_encoder, hidden_size=256, intermediate_size=512, head_dim=64,
                                      num_hidden_layers=4),
    vae=TINY.vae,
)


def optional(name: str) -> tuple[ModuleType | None, pytest.MarkDecorator]:
    """(the module, or None when it cannot be imported; a skip mark for the tests that need it).

    A module-level `pytest.importorskip` would skip every test of a file, those that never touch the library too;
    mark the ones that do.
    """
    try:
        with warnings.catch_warnings():  # as importorskip: a library's import-time deprecations are not ours
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except ImportError:
        module = None
    return module, pytest.mark.skipif(module is None, reason=f"needs {name}, which is not installed")


def load_model(cls, opener, path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """A component's model `cls` built on `meta` and loaded from the files `opener` reads at `path`, as the runtime
    places it (weights/load.load_module)."""
    from zimage_lite.weights.load import load_module

    cfg, src = opener(path)
    with torch.device("meta"):
        model = cls(cfg)
    return load_module(model, src, dtype, device, cls.__name__)


def allocated_peak(fn) -> int:
    """Peak bytes live through torch's CPU allocator while fn runs, above what was live before it (torch.profiler's
    memory events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def resident_bytes_of(path: Path) -> int:
    """This process's resident bytes in memory maps of `path` (/proc/self/smaps)."""
    target = str(path.resolve())
    return sum(kb.get("Rss", 0) for _, _, p, kb in map_entries() if p == target) * 1024


def resident_bytes_under(t: torch.Tensor) -> int:
    """This process's resident bytes in the pages under tensor `t` (/proc/self/pagemap: bit 63 of each page's
    entry), whatever maps them."""
    page = mmap.PAGESIZE
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = lo // page, -(-hi // page)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders (dangling links too) with its size and mtime: what a refused run must leave as it
    found it."""
    state = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            st = p.lstat()
            state[str(p)] = (st.st_size, st.st_mtime_ns)
    return state


def refused(capsys, argv: list[str], *names: str, watch: tuple[Path, ...] = (), code: int = 2) -> str:
    """Run the CLI in-process on bad input and hold the promise: exit `code`, an `error:` line on stderr that names
    every one of `names` (the file, tensor or option, and what to do), no traceback, and the `watch` folders exactly
    as they were (no new file, no partial file, nothing changed). Returns stderr for further checks."""
    from zimage_lite.cli import main

    before = snapshot(*watch)
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, f"exit {got}, expected {code}; stderr: {err}"
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, f"{name!r} not in: {err}"
    assert snapshot(*watch) == before, "the refused run changed the watched folders"
    return err


# LoRA key layouts, spelled out here by hand (not through zimage_lite/weights/names.py, so the reader is checked
# against an independent writer): official DiT linear name → file key stem, and the pair's role names.
LORA_FORMATS = ("diffusers", "ai-toolkit", "diffsynth", "kohya", "comfyui", "dot")


def write_lora(path: Path, cfg: DiTConfig, fmt: str, rank: int = 4, seed: int = 0, modules: list[str] | None = None,
               alpha: float | None = None, gain: float | None = None) -> Path:
    """A random LoRA on `modules` (default: every linear of the DiT for `cfg`) in the key layout `fmt`:

    - diffusers: `transformer.<name>.lora_A.weight`; alpha as diffusers saves it, in the header's LoraConfig
    - ai-toolkit: `diffusion_model.<name>.lora_A.weight` (+ `.alpha`); diffsynth: `<name>.lora_A.default.weight`
    - kohya (musubi-tuner): `lora_unet_<name with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`
    - comfyui (musubi-tuner's conversion): kohya names, q/k/v fused into `attention_qkv` (downs stacked, up
      block-diagonal, alpha x3 for the 3x rank), `to_out.0` as `attention_out`; needs whole q/k/v triples
    - dot (Anime-Z): `diffusion_model.<name>.lora.down.weight` with `to.q`, plus redundant random `attention.qkv`
      and `attention.out` pairs next to the split ones (readers skip them); no alpha
    """
    import json

    from safetensors.torch import save_file

    from zimage_lite.weights.lora import linear_shapes

    shapes = linear_shapes(cfg)
    modules = list(shapes) if modules is None else modules
    gen = torch.Generator().manual_seed(seed)
    # entries 1/rank; with `gain`, down ~ gain/sqrt(in) and up ~ gain/sqrt(rank): a LoRA that moves a few-step image
    # by 10-25% instead of dominating it (what the rendering tests want)
    down_std = {n: gain / shapes[n][1] ** 0.5 if gain else 1 / rank for n in modules}
    up_std = gain / rank**0.5 if gain else 1 / rank
    pairs = {n: (torch.randn(rank, shapes[n][1], generator=gen) * down_std[n],
                 torch.randn(shapes[n][0], rank, generator=gen) * up_std) for n in modules}
    out: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}

    def put(stem: str, down_key: str, up_key: str, down: torch.Tensor, up: torch.Tensor, a: float | None) -> None:
        out[f"{stem}.{down_key}"], out[f"{stem}.{up_key}"] = down.contiguous(), up.contiguous()
        if a is not None:
            out[f"{stem}.alpha"] = torch.tensor(float(a))

    if fmt == "comfyui":
        for n in [m for m in modules if m.endswith(".attention.to_q")]:
            block = n.removesuffix(".to_q")
            qkv = [pairs.pop(f"{block}.to_{p}") for p in "qkv"]
            up = torch.block_diag(*[u for _, u in qkv])
            put("lora_unet_" + block.replace(".", "_") + "_qkv", "lora_down.weight", "lora_up.weight",
                torch.cat([d for d, _ in qkv]), up, None if alpha is None else 3 * alpha)
    for n, (down, up) in pairs.items():
        if fmt == "diffusers":
            put(f"transformer.{n}", "lora_A.weight", "lora_B.weight", down, up, None)
        elif fmt == "ai-toolkit":
            put(f"diffusion_model.{n}", "lora_A.weight", "lora_B.weight", down, up, alpha)
        elif fmt == "diffsynth":
            put(n, "lora_A.default.weight", "lora_B.default.weight", down, up, alpha)
        elif fmt in ("kohya", "comfyui"):
            stem = n.replace(".attention.to_out.0", ".attention.out") if fmt == "comfyui" else n
            put("lora_unet_" + stem.replace(".", "_"), "lora_down.weight", "lora_up.weight", down, up, alpha)
        elif fmt == "dot":
            stem = n.replace(".to_q", ".to.q").replace(".to_k", ".to.k").replace(".to_v", ".to.v")
            put(f"diffusion_model.{stem}", "lora.down.weight", "lora.up.weight", down, up, None)
            if n.endswith((".to_q", ".to_out.0")):  # the redundant fused copies Anime-Z files carry
                block, what = n.rsplit(".attention.", 1)
                rows = 3 * up.shape[0] if what == "to_q" else up.shape[0]
                put(f"diffusion_model.{block}.attention.{'qkv' if what == 'to_q' else 'out'}", "lora.down.weight",
                    "lora.up.weight", torch.randn(down.shape, generator=gen), torch.randn(rows, rank, generator=gen),
                    None)
        else:
            raise ValueError(fmt)
    if fmt == "diffusers" and alpha is not None:
        metadata["lora_adapter_metadata"] = json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha,
                                                        "transformer.target_modules": sorted(modules)})
    save_file(out, str(path), metadata=metadata)
    return path


def make_lora(path: Path, cfg: DiTConfig = TINY.dit, seed: int = 0, rank: int = 4,
              targets: str | None = None) -> Path:
    """`write_lora` in the diffusers/PEFT form on every linear of the DiT of `cfg` whose name contains `targets`
    (default: all of them, embedders and final layer included, as diffusers can target them all)."""
    from zimage_lite.weights.lora import linear_shapes

    modules = [n for n in linear_shapes(cfg) if targets is None or targets in n]
    return write_lora(path, cfg, "diffusers", rank, seed, modules, gain=0.3)
    return path


def load_dequantized(transformer: torch.nn.Module, dit_file: Path) -> None:
    """Give diffusers' transformer a quantized DiT file's weights, dequantized to fp32 (official names): the
    reference for runs on that file."""
    from zimage_lite.weights.components import open_component

    src = open_component(dit_file, "dit").source
    state = {}
    for name in src.names():
        t = src.get(name)
        state[name] = (t.dequantize() if hasattr(t, "dequantize") else t).float()
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    assert not unexpected and all("pad_token" not in m for m in missing) and len(missing) < 3, (missing, unexpected)


# --- ControlNets --------------------------------------------------------------------------------------------------

CONTROL_KINDS = {  # the three refiner modes of ZImageControlNetModel on TINY's DiT (2 layers, 2 refiner layers)
    "1.0": {"control_in_dim": 16, "add_control_noise_refiner": None, "control_refiner_layers_places": []},
    "2.1": {"control_in_dim": 33, "add_control_noise_refiner": "control_noise_refiner",
            "control_refiner_layers_places": [0, 1]},
    "2.0": {"control_in_dim": 33, "add_control_noise_refiner": "control_layers",
            "control_refiner_layers_places": [0, 1]},
}


def make_controlnet(folder: Path, kind: str, dit: DiTConfig = TINY.dit, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random ControlNet for `dit`, twice from the same weights: a diffusers ZImageControlNetModel folder
    (config.json + safetensors) and an alibaba-pai single file (the same names, no config; 2.0's carries unused
    control-refiner blocks whose before_proj is all zero, as diffusers' loader expects). Returns (folder, file).
    Weights as the demo model's (so hints are not zero, unlike a freshly initialised ControlNet)."""
    from safetensors.torch import save_file

    from zimage_lite.config import ControlNetConfig
    from zimage_lite.demo import meta_shapes, random_state
    from zimage_lite.models.controlnet import ZImageControlNet

    config = {"control_layers_places": list(range(dit.n_layers)), "dim": dit.dim, "n_heads": dit.n_heads,
              "n_kv_heads": dit.n_kv_heads, "n_refiner_layers": dit.n_refiner_layers, "norm_eps": dit.norm_eps,
              "qk_norm": True, "all_patch_size": [2], "all_f_patch_size": [1], **CONTROL_KINDS[kind]}
    cfg = ControlNetConfig.from_dict(config)
    with torch.device("meta"):
        shapes = meta_shapes(ZImageControlNet(cfg))
    state = random_state(shapes, seed, torch.float32)
    out = folder / f"controlnet-{kind}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"_class_name": "ZImageControlNetModel", **config}))
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
    single = dict(state)
    if kind == "2.0":
        with torch.device("meta"):
            extra = meta_shapes(ZImageControlNet(dataclasses.replace(cfg, add_control_noise_refiner=CONTROL_KINDS[
                "2.1"]["add_control_noise_refiner"])))
        refiner = {n: s for n, s in extra.items() if n.startswith("control_noise_refiner.")}
        single.update({n: torch.zeros(t.shape) if "before_proj" in n else t
                       for n, t in random_state(refiner, seed, torch.float32).items()})
    path = folder / f"Z-Image-Turbo-Fun-Controlnet-{kind}.safetensors"
    save_file(single, str(path))
    return out, path


def make_lm_checkpoint(folder: Path, cfg: ModelConfig = KQ_TEXT, seed: int = 0) -> Path:
    """A checkpoint whose text encoder, run as a causal LM (the prompt enhancer), says varied things in the tiny
    tokenizer's words. With the demo's random scales a tiny Qwen3 repeats one token forever (the embedding, std 1,
    swamps what the layers add; the tied head then maps the state back to one row), which would hide a cache or
    position bug; so the table is scaled by 0.1 and the layers' output projections by 4. The rows of ids that are no
    word of the tiny tokenizer (past its ~600 BPE tokens), but for the chat's first three specials, are zeroed: their
    logit is 0, below the best word's, so answers decode to text. The official layout (BF16 shards, config.json)."""
    import json

    from safetensors.torch import load_file, save_file

    from zimage_lite.demo import FIRST_SPECIAL_ID

    root = make_checkpoint(folder, cfg, seed=seed)
    te = root / "text_encoder"
    vocab = json.loads((root / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    words = max(i for i in vocab.values() if i < FIRST_SPECIAL_ID) + 1
    for shard in sorted(te.glob("*.safetensors")):
        state = load_file(shard)
        for name, t in state.items():
            if name.endswith("embed_tokens.weight"):
                t = t.float() * 0.1
                t[words:FIRST_SPECIAL_ID] = t[FIRST_SPECIAL_ID + 3:] = 0  # keep <|endoftext|>, <|im_start|>, <|im_end|>
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                t = t.float() * 4
            state[name] = t.to(torch.bfloat16).contiguous()
        save_file(state, str(shard), metadata={"format": "pt"})
    return root


# --- input pictures ---------------------------------------------------------------------------------------------

def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth test picture (gradients and a disc): an init image whose VAE posterior is not pure noise, a control
    map stand-in with an edge map's structure."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    r = np.clip(255 * x / w + rng.normal(0, 8, (h, w)), 0, 255)
    g = np.clip(255 * y / h, 0, 255)
    b = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2, 230, 40)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB")


def mask_picture(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w), np.uint8)
    arr[h // 4: 3 * h // 4, w // 8: w // 2] = 255  # white: repaint
    return Image.fromarray(arr, "L")
