"""The one fixture module: tiny random checkpoints in the exact official file layout.

Everything is written by `zimage_lite.demo.write_checkpoint` (the same code that makes the demo model), with a
config small enough for fp32 CPU parity runs in a fraction of a second but with every mechanism of the real model:
two refiner blocks of each kind, GQA in the text encoder, a 3-axis RoPE, caption and image padding, four VAE levels.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from zimage_lite.config import DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig
from zimage_lite.demo import write_checkpoint

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


def make_lora(path: Path, cfg: DiTConfig = TINY.dit, seed: int = 0, rank: int = 4,
              targets: str | None = None) -> Path:
    """A random LoRA in the diffusers/PEFT form (`transformer.<module>.lora_A.weight` / `.lora_B.weight`) on every
    linear of the DiT of `cfg` whose name contains `targets` (default: all of them, embedders and final layer
    included, as diffusers can target them all). Scaled so that it moves a 4-step image by ~10-25%."""
    from safetensors.torch import save_file
    from torch import nn

    from zimage_lite.models.dit import ZImageDiT

    with torch.device("meta"):
        model = ZImageDiT(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (targets is None or targets in name):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * (
                0.3 / m.in_features**0.5)
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * (
                0.3 / rank**0.5)
    save_file(state, str(path))
    return path
