"""The recipe table of models.md, computed (no weights needed): file sizes from the quantize recipes, memory from
the runtime's planner.

    python benchmarks/models_table.py
"""

from __future__ import annotations

import sys

from quantize.recipes import predicted_sizes
from zimage_lite.config import PRESETS, DiTConfig, TextEncoderConfig
from zimage_lite.errors import BudgetError
from zimage_lite.runtime.plan import plan_for
from zimage_lite.runtime.sizes import BNB, recipe_table, stored_bytes
from zimage_lite.runtime.units import GIB, gb, gib

RECIPES = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "int8", "nf4", "int8-convrot"]
GPU_TIERS = [4, 6, 8, 12, 16, 24]  # GiB cards
CPU_TIERS = [8, 16, 32]  # GiB of RAM


def _resident_tier(quant: str, device: str, tiers: list[int], text_quant: str) -> int | None:
    """Smallest tier where the DiT stays wholly resident at 1024x1024 (no streaming at all)."""
    for tier in tiers:
        try:
            plan = plan_for("turbo", quant, 1024, 1024, False, device, tier * GIB if device == "cuda" else None,
                            tier * GIB if device == "cpu" else None, "bf16", text_quant)
        except BudgetError:
            continue
        if not plan.stage("dit").streamed:
            return tier
    return None


def _peak(quant: str, size: int, device: str, budget: int, text_quant: str) -> str:
    try:
        plan = plan_for("turbo", quant, size, size, False, device, budget if device == "cuda" else None,
                        budget if device == "cpu" else None, "bf16", text_quant)
    except BudgetError:
        return "does not fit"
    return gib(plan.peak_bytes, unit=False)


def _recipe_bytes(cfg: DiTConfig | TextEncoderConfig, quant: str) -> int:
    """A recipe's weights of one component (a bitsandbytes folder, an INT8 safetensors file), tensor by tensor."""
    return sum(stored_bytes(shape, fmt) for shape, fmt in recipe_table(cfg, quant).values())


def table() -> str:
    dit, te = predicted_sizes("dit"), predicted_sizes("text_encoder")
    rows = ["| DiT recipe | DiT file GB | text encoder file GB (same recipe) | 4 GB GPU peak GiB, 512² / 1024² | "
            "resident peak GiB, 512² / 1024² | DiT fully resident from | CPU: DiT fully resident from |",
            "|---|---:|---:|---|---|---|---|"]
    for q in RECIPES:
        tq = "Q8_0" if q in BNB else q  # bitsandbytes folders are DiT-only: paired with a Q8_0 text encoder
        small = " / ".join(_peak(q, s, "cuda", 4 * GIB, tq) for s in (512, 1024))
        big = " / ".join(_peak(q, s, "cuda", 128 * GIB, tq) for s in (512, 1024))
        gpu = _resident_tier(q, "cuda", GPU_TIERS, tq)
        cpu = _resident_tier(q, "cpu", CPU_TIERS, tq)
        dit_gb = gb(dit[q] if q in dit else _recipe_bytes(PRESETS["turbo"].dit, q), unit=False)
        te_gb = gb(te[tq] if tq in te else _recipe_bytes(PRESETS["turbo"].text_encoder, tq), unit=False)
        rows.append(f"| {q} | {dit_gb} | {te_gb}{'' if tq == q else ' (Q8_0)'} | {small} | {big} | "
                    f"{f'{gpu} GB GPU' if gpu else 'streams on 24 GB'} | "
                    f"{f'{cpu} GB RAM' if cpu else 'streams on 32 GB'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
    sys.exit(0)
