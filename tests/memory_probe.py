"""Run the demo model under the smallest --ram (or --vram) the planner accepts, twice, and print per stage the
peak memory measured above the run's own starting point against the plan's stage peak, as JSON lines. The runs are
image-to-image at strength 1 (every step runs), so that every stage is measured: the VAE encoder's too.

A fresh process (tests/test_memory_plan.py runs this file) so that no other test's allocations sit in the heap.
The first run pays one-time costs that are no tensor of the plan (oneDNN primitives and kernels built per shape,
thread pools, the allocator's arenas); the second run is what the plan counts.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

import zimage_lite
from zimage_lite.runtime.memory import peak_bytes, reset_peak
from zimage_lite.runtime.plan import minimum_budget

STAGES = {"image_encoded": "vae_encode", "encoded": "text_encoder", "step": "dit", "decoded": "vae"}


def main(size: int, dtype: str, device: str) -> None:
    dev = torch.device(device)
    option = "vram" if dev.type == "cuda" else "ram"  # the budget that applies on this device
    probe = zimage_lite.load("demo", device=device, dtype=dtype, **{option: "64GB"})
    request = probe.make_plan(size, size, 0.0, 40, image=True).request
    least = minimum_budget(replace(request, budget=1))
    budget = least + request.headroom  # --vram counts the CUDA context too
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    pipe = zimage_lite.load("demo", device=device, dtype=dtype, **{option: budget})
    for run in range(2):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        else:  # give the heap the previous run freed back to the OS, so that reusing it cannot hide a stage's need
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        reset_peak(dev)
        base = peak_bytes(dev)
        for event in pipe.generate("a lighthouse on a cliff at dusk", steps=2, seed=1, image=picture, strength=1.0):
            stage = pipe.plan.stage(STAGES[event.stage])
            row = {"run": run, "stage": stage.name, "planned": stage.peak_bytes, "budget": least,
                   "measured": event.peak_bytes - base}
            if dev.type == "cuda":
                row["reserved"] = torch.cuda.max_memory_reserved(dev)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
