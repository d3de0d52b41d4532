"""INT8 (ConvRot and plain rows) against BF16, Q8_0 and Q4_K_M on the full-size DiT: error of one forward, step time.

One DiT step of the pipeline per DiT file, same prompt, seed and text encoder (so the caption features are the same
for every row but the --int8-compute ones): the step's latents are noise + (sigma_1 - sigma_0) * prediction, so the
relative L2 error of (latents - noise) against the BF16 DiT's is the relative error of the DiT forward. Each DiT
computes in fp32 on the CPU (BF16 streamed and cast as the planner decides); int8 files run on the integer route
`info` names, and `--int8-compute` rows convert the GGUF file at load (and, as the option does, the Q4_K_M text
encoder: their caption features differ from the other rows' by that conversion). Full-size weights: run under
the shared lock, e.g.

    flock /work/wt/fullsize.lock nice -n 5 python -m benchmarks.int8_quality --cache /work/main/.bench_cache

Adds to benchmarks/results/int8-quality.json (one row per DiT, each with the machine, as report.py reads them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import zimage_lite
from benchmarks.run import append_rows, machine
from zimage_lite.quant.int8_compute import describe_route
from zimage_lite.sampling import get_noise

PROMPT = "a red fox in the snow, soft morning light"
SEED = 11
OUT = Path(__file__).parent / "results" / "int8-quality.json"


def one_step(cache: Path, dit: Path | None, size: int, int8_compute: bool = False) -> tuple[torch.Tensor, float]:
    """The latents after the first of 8 steps, and that step's seconds."""
    pipe = zimage_lite.load(cache / "turbo", dit=dit, text_encoder=cache / "turbo-text-encoder-Q4_K_M.gguf",
                            device="cpu", dtype="fp32", int8_compute=int8_compute)
    events = pipe.generate(PROMPT, width=size, height=size, steps=8, seed=SEED)
    for event in events:
        if event.stage == "step":
            events.close()  # the rest of the run (and the VAE) is not needed
            return event.latents.float().clone(), event.seconds
    raise AssertionError("no step event")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/main/.bench_cache"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=None, help="row names to run (default: all whose files exist)")
    args = ap.parse_args()
    c = args.cache
    rows_wanted = {"BF16": (None, False), "int8-convrot": (c / "turbo-dit-int8-convrot.safetensors", False),
                   "int8-rowwise": (c / "turbo-dit-int8-rowwise.safetensors", False),
                   "Q8_0": (c / "turbo-dit-Q8_0.gguf", False), "Q8_0 --int8-compute": (c / "turbo-dit-Q8_0.gguf", True),
                   "Q4_K_M": (c / "turbo-dit-Q4_K_M.gguf", False),
                   "Q4_K_M --int8-compute": (c / "turbo-dit-Q4_K_M.gguf", True)}
    h = w = args.size // 8
    noise = get_noise(torch.Generator("cpu").manual_seed(SEED), 16, args.size, args.size).float()
    assert noise.shape[-2:] == (h, w)
    ref, rows = None, []
    for name, (dit, convert) in rows_wanted.items():
        if (args.only and name not in args.only and name != "BF16") or (dit is not None and not dit.is_file()):
            continue
        start = time.perf_counter()
        latents, step_s = one_step(c, dit, args.size, convert)
        delta = latents - noise
        ref = delta if ref is None else ref
        err = float((delta - ref).norm() / ref.norm())
        rows.append({"dit": name, "file": str(dit) if dit else str(c / "turbo" / "transformer"), "size": args.size,
                     "rel_err_vs_bf16": round(err, 5), "step_s": round(step_s, 1),
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    common = {"component": "int8_quality", "machine": machine(), "threads": torch.get_num_threads(),
              "int8_route": describe_route("cpu"), "prompt": PROMPT, "seed": SEED, "date": time.strftime("%Y-%m-%d"),
              "command": f"python -m benchmarks.int8_quality {shlex.join(sys.argv[1:])}".strip()}
    append_rows(OUT, [{**common, **r} for r in rows])


if __name__ == "__main__":
    main()
