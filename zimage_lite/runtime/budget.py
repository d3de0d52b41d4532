"""Memory budgets and byte counts: parse `--vram` / `--ram`, format sizes, ask a device how much it has free, and
count what each block weighs in a weight format (BF16, Q8_0, a K-quant mix such as Q4_K_M, int8, nf4): the numbers
the planner (plan.py) works from.

Units, case-insensitive. A unit spelled with "B" after an SI prefix is decimal, as disk makers and accelerate's
`max_memory` count (1 GB = 10^9 B). The binary spellings are powers of two: GiB, and also the bare letter, as docker,
java and `ulimit`-style options read it (1 GiB = 1 G = 2^30 B). A number with no unit is bytes, and may use an
exponent (`2e9`). So `--vram 4GB` is 3.73 GiB, while `--vram 4G` and `--vram 4GiB` are 4 GiB.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass

import gguf

from ..config import DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig
from ..errors import OptionError

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12

UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": KIB, "kib": KIB, "kb": KB,
    "m": MIB, "mib": MIB, "mb": MB,
    "g": GIB, "gib": GIB, "gb": GB,
    "t": TIB, "tib": TIB, "tb": TB,
}

# The CUDA context (kernels, cuBLAS/cuDNN handles: 0.3-0.5 GB, zimage_spec.md §11) and the caching allocator's
# fragmentation live on the card but outside the tensors the plan counts, so they come off every VRAM figure.
CUDA_HEADROOM = int(0.4 * GIB)
# On the host the OS, the page cache behind the weight memory map and the Python process itself need room too.
CPU_HEADROOM = 1 * GIB

_SIZE = re.compile(r"^\s*(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_FORMS = "a number with an optional unit, e.g. 4GB (10^9 B), 4G or 4GiB (2^30 B), 3.5GiB, 512MB, 800M, 2e9 (bytes)"


def parse_size(text: str, option: str) -> int:
    """Bytes in a size such as `4GB`, `3.5GiB`, `800M` or `2e9`; `option` names the flag in the error message."""
    match = _SIZE.match(text or "")
    unit = match.group("unit").lower() if match else ""
    if match is None or unit not in UNITS:
        raise OptionError(f"{option} {text!r} is not a size: use {_FORMS}")
    value = float(match.group("num")) * UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise OptionError(f"{option} {text!r} must be at least one byte: use {_FORMS}")
    return int(value)


def format_size(n: int) -> str:
    """A byte count for people, in binary units: `3.42 GiB`, `512.00 MiB`, `17 B`."""
    for unit, scale in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_option_size(n: int, round_up: bool = False) -> str:
    """A byte count as an option value `parse_size` reads back (`4GB`, `4GiB`, `1.7GB`); `round_up` first rounds up
    to a tenth of a GB, or to a whole MB below that, for a figure to suggest."""
    if round_up:
        n = math.ceil(n / (GB // 10)) * (GB // 10) if n > GB // 10 else math.ceil(n / MB) * MB
    for unit, scale in (("GB", GB), ("GiB", GIB), ("GB", GB // 10), ("MB", MB), ("MiB", MIB)):
        if n % scale == 0:
            return f"{n / GB:g}GB" if scale == GB // 10 else f"{n // scale}{unit}"
    return str(n)


def _mem_available() -> int | None:
    """Host memory the kernel says can be had without swapping: MemAvailable, else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB  # the kernel writes kB meaning KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX). Without it torch emulates bf16 matmuls, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_budget(device: str) -> int | None:
    """Bytes the run may use on `device` ("cpu", "cuda", "cuda:1"): what it reports free, minus headroom.

    None when the device is absent (no CUDA GPU) or cannot say (no /proc/meminfo nor sysconf).
    """
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        import torch  # here, not at module level: `zimage-lite plan` with an explicit --vram never needs torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return max(free - CUDA_HEADROOM, 0)
    if kind == "cpu":
        available = _mem_available()
        return None if available is None else max(available - CPU_HEADROOM, 0)
    raise OptionError(f"--device {device!r} is not a device: use cpu or cuda")


def usable_budget(device: str, vram: int | None, ram: int | None) -> tuple[int, int]:
    """(bytes tensors may use, headroom taken off) for a run on `device` with the user's `--vram` / `--ram`.

    `--vram` counts the whole card, so the CUDA context comes off it; `--ram` is what the run may use. Without one,
    ask the device. `ram` does not bound a cuda run (host memory is not planned there).
    """
    if device == "cuda" and vram is not None:
        return vram - CUDA_HEADROOM, CUDA_HEADROOM
    if device == "cuda":
        budget = device_budget("cuda")
        if budget is None:
            raise OptionError("no CUDA GPU is visible: pass --vram SIZE to plan for a GPU this machine does not have")
        return budget, 0
    budget = ram if ram is not None else device_budget(device)
    if budget is None:
        raise OptionError("cannot tell how much RAM is free here: pass --ram SIZE")
    return budget, 0


# ---- Bytes of weights: the tensors of each block, and what a weight format makes of them ----------------------------
# Shapes as in zimage_spec.md §4.1 and §2 (DiT with fused qkv as GGUF files store it, Qwen3 layer), §6 (VAE).

FLOATS = frozenset({"F32", "F16", "BF16"})
BNB = frozenset({"int8", "nf4"})  # bitsandbytes LLM.int8 (fp32 scale per row) and NF4 (fp32 absmax per 64)
NF4_BLOCK = 64
# Types that only exist inside ggml's dot products or are integers, never a weight format.
_NOT_WEIGHTS = frozenset({"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"})
# The alternatives a BudgetError proposes, largest first.
QUANT_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
BLOCK_KINDS = ("noise_refiner.", "context_refiner.", "layers.")


def normalize_format(name: str, option: str) -> str:
    """The canonical spelling of a weight format (`q4_k_m` -> `Q4_K_M`), or OptionError naming `option`."""
    if name.lower() in BNB:
        return name.lower()
    from quantize.recipes import TARGETS  # the recipes import the runtime: import them late

    upper = name.upper()
    if upper in TARGETS or (upper in gguf.GGMLQuantizationType.__members__ and upper not in _NOT_WEIGHTS):
        return upper
    raise OptionError(f"{option} {name!r} is not a weight format: use BF16, F16, F32, Q8_0, Q6_K, Q5_K_M, Q5_0, "
                      "Q4_K_M, Q4_K_S, Q4_0, Q3_K_M, Q2_K (or another GGML type), int8 or nf4")


def weight_bytes(rows: int, cols: int, fmt: str) -> int:
    """Bytes of a [rows, cols] weight stored as `fmt` (blocks run along cols, as in ggml-common.h)."""
    if fmt == "int8":
        return rows * cols + rows * 4
    if fmt == "nf4":
        return rows * cols // 2 + rows * (cols // NF4_BLOCK) * 4
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
    return rows * (cols // block) * type_size


@dataclass(frozen=True)
class Tensors:
    """A block (or a model's non-block tensors): 2-D weights with their formats; 1-D tensors (norms, biases, pad
    tokens) are stored F32 whatever the recipe, as every GGUF tool does (gguf_interop.md §8)."""

    linear: tuple[tuple[str, int, int, str], ...]  # (role, out_features, in_features, format)
    vector: int  # parameters in 1-D tensors

    @property
    def params(self) -> int:
        return sum(r * c for _, r, c, _ in self.linear) + self.vector

    def nbytes(self, floats_as: str | None = None) -> int:
        """Bytes as stored, or with the float-format weights cast to `floats_as` (the compute dtype)."""
        cast = (lambda f: floats_as if f in FLOATS else f) if floats_as else (lambda f: f)
        return sum(weight_bytes(r, c, cast(f)) for _, r, c, f in self.linear) + self.vector * 4


@functools.lru_cache(maxsize=32)
def _recipe(component: str, cfg: DiTConfig | TextEncoderConfig, fmt: str) -> tuple[tuple[str, tuple, str], ...]:
    """(name, shape, stored type) of every tensor a `fmt` file of `cfg` holds, by the quantize tool's own rules
    (quantize/recipes.py: one table of per-tensor types, shared by the writer and the planner)."""
    from quantize.recipes import TARGETS, Target, dit_plan, dit_shapes, te_plan, te_shapes

    target = TARGETS.get(fmt) or Target(fmt, gguf.GGMLQuantizationType[fmt], None)  # a plain type: all tensors
    if component == "dit":
        plan = dit_plan(dit_shapes(cfg), target)
    else:
        plan = te_plan(te_shapes(cfg), target, cfg)
    return tuple((t.name, t.shape, t.qtype.name) for t in plan)


def _tensors(rows: list[tuple[str, tuple, str]]) -> Tensors:
    linear = tuple((name, shape[0], math.prod(shape[1:]), fmt) for name, shape, fmt in rows
                   if len(shape) == 2 and not name.endswith("pad_token"))
    vector = sum(math.prod(shape) for name, shape, _ in rows if len(shape) != 2 or name.endswith("pad_token"))
    return Tensors(linear, vector)


def dit_tensors(c: DiTConfig, fmt: str, kind: str) -> Tensors:
    """One DiT block (`kind` = noise_refiner | context_refiner | layers) or the non-block tensors (`other`).

    GGUF formats are typed as `zimage-lite quantize` writes them (ComfyUI-GGUF's convention: refiners, embedders
    and final layer BF16). bitsandbytes formats quantize every block Linear and keep the rest BF16.
    """
    prefix = f"{kind}.0." if kind != "other" else None
    in_block = (lambda n: n.startswith(prefix)) if prefix else (lambda n: not n.startswith(BLOCK_KINDS))
    if fmt in BNB:
        rows = [(n, s, fmt if prefix and len(s) == 2 else "BF16") for n, s, _ in _recipe("dit", c, "BF16")]
    else:
        rows = list(_recipe("dit", c, fmt))
    return _tensors([r for r in rows if in_block(r[0])])


def qwen_layer_tensors(c: TextEncoderConfig, fmt: str, i: int) -> Tensors:
    """Qwen3 decoder layer `i`, typed as `zimage-lite quantize` (following llama.cpp's rules) writes it."""
    rows = _recipe("text_encoder", c, "BF16" if fmt in BNB else fmt)
    return _tensors([r for r in rows if r[0].startswith(f"blk.{i}.")])


def vae_decoder_params(c: VAEConfig) -> int:
    """Parameters of the FLUX AE decoder (zimage_spec.md §6): conv_in, mid block, up blocks, norm and conv_out."""
    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k + cout

    def resnet(cin: int, cout: int) -> int:  # two GroupNorms, two 3x3 convs, a 1x1 shortcut when widths differ
        return 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + (conv(cin, cout, 1) if cin != cout else 0)

    widths = list(reversed(c.block_out_channels))
    top = widths[0]
    n = conv(c.latent_channels, top) + 2 * resnet(top, top)
    if c.mid_block_add_attention:
        n += 2 * top + 4 * (top * top + top)  # GroupNorm + Linear q, k, v, out with bias
    prev = top
    for level, width in enumerate(widths):
        n += sum(resnet(prev if j == 0 else width, width) for j in range(c.layers_per_block + 1))
        n += conv(width, width) if level < len(widths) - 1 else 0  # upsampler
        prev = width
    return n + 2 * widths[-1] + conv(widths[-1], c.out_channels)


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, to check against zimage_spec.md §8.1."""
    dit, te = config.dit, config.text_encoder
    counts = {"dit_modulated_block": dit_tensors(dit, "BF16", "layers").params,
              "dit_context_block": dit_tensors(dit, "BF16", "context_refiner").params,
              "dit_other": dit_tensors(dit, "BF16", "other").params,
              "text_layer": qwen_layer_tensors(te, "BF16", 0).params,
              "text_embedding": te.vocab_size * te.hidden_size,
              "vae_decoder": vae_decoder_params(config.vae)}
    counts["dit_total"] = (counts["dit_modulated_block"] * (dit.n_layers + dit.n_refiner_layers)
                           + counts["dit_context_block"] * dit.n_refiner_layers + counts["dit_other"])
    counts["text_total"] = (counts["text_layer"] * te.num_hidden_layers + counts["text_embedding"]
                            + te.hidden_size)  # + the final norm
    return counts


def format_rank(fmt: str) -> float:
    """Bits per weight of a full-size DiT main block in `fmt`, to order formats by size."""
    block = dit_tensors(DiTConfig(), fmt, "layers")
    return block.nbytes() * 8 / block.params
