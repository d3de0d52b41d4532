"""Run the demo model under the smallest --ram (or --vram) the planner accepts, twice, and print per stage the
peak memory measured above the run's own starting point against the plan's stage peak, as JSON lines. The runs are
image-to-image at strength 1 (every step runs), so that every stage is measured: the VAE encoder's too; then the
prompt enhancer (its text encoder as a causal LM, our system prompt, ENHANCE_TOKENS new tokens), its own stage.

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
from zimage_lite.enhance import encode_chat
from zimage_lite.enhance_options import CONTEXT, system_prompt
from zimage_lite.runtime.memory import peak_bytes, reset_peak
from zimage_lite.runtime.plan import minimum_budget

ENHANCE_TOKENS = 16
PROMPT = "a lighthouse on a cliff at dusk"
STAGES = {"image_encoded": "vae_encode", "encoded": "text_encoder", "step": "dit", "decoded": "vae"}


def main(size: int, dtype: str, device: str) -> None:
    dev = torch.device(device)
    option = "vram" if dev.type == "cuda" else "ram"  # the budget that applies on this device
    probe = zimage_lite.load("demo", device=device, dtype=dtype, **{option: "64GB"})
    chat = len(encode_chat(probe.tokenizer.tokenizer, system_prompt(), PROMPT, CONTEXT)[0])
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    # the image and the enhancer each under the smallest budget for its own stages (--vram counts the CUDA context)
    image_req = probe.make_plan(size, size, 0.0, 40, image=True).request
    text_req = probe.make_plan(size, size, 0.0, 40, enhance_tokens=chat + ENHANCE_TOKENS).request
    image_least = minimum_budget(replace(image_req, budget=1))
    text_least = minimum_budget(replace(text_req, budget=1, enhance_tokens=chat + ENHANCE_TOKENS))
    pipe = zimage_lite.load("demo", device=device, dtype=dtype, **{option: image_least + image_req.headroom})
    enhancer = zimage_lite.load("demo", device=device, dtype=dtype, **{option: text_least + text_req.headroom})
    for run in range(2):
        trim(dev)
        reset_peak(dev)
        base = peak_bytes(dev)
        for event in pipe.generate(PROMPT, steps=2, seed=1, image=picture, strength=1.0):
            report(run, pipe.plan.stage(STAGES[event.stage]), image_least, event.peak_bytes - base, dev)
        trim(dev)
        reset_peak(dev)
        base = peak_bytes(dev)
        enhanced = enhancer.enhance(PROMPT, max_tokens=ENHANCE_TOKENS)
        assert enhanced.prompt_tokens == chat and enhanced.new_tokens == ENHANCE_TOKENS  # random weights: no stop
        stage = enhancer.make_plan(size, size, 0.0, enhance_tokens=chat + ENHANCE_TOKENS).stage("enhance")
        report(run, stage, text_least, peak_bytes(dev) - base, dev)


def trim(dev: torch.device) -> None:
    """Give back what the last stage freed: the CUDA cache, or the heap to the OS (so that reusing it cannot hide a
    stage's need)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def report(run: int, stage, budget: int, measured: int, dev: torch.device) -> None:
    row = {"run": run, "stage": stage.name, "planned": stage.peak_bytes, "budget": budget, "measured": measured}
    if dev.type == "cuda":
        row["reserved"] = torch.cuda.max_memory_reserved(dev)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
