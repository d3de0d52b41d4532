"""Dequantizing one full-size DiT weight (10240x3840, the FFN's w1) to bf16 on the CPU, per weight format.

    python benchmarks/dequant.py --json benchmarks/results/dequant.json

Two ways, on the same bytes: `whole` makes one pass over the whole tensor (a GGML kernel, then the cast to bf16, as
`dequantize` did before it worked in chunks; for int8/nf4 `dequantize` with a single chunk); `runtime` is what a
QLinear does now: `formats.dequantize` in chunks on worker threads into its reused buffer. Milliseconds are the
median of 7 calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import append_rows, machine  # noqa: E402
from zimage_lite.quant import formats  # noqa: E402
from zimage_lite.quant.chunks import Temps  # noqa: E402

SHAPE = (10240, 3840)
TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "int8", "nf4")


def _ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _packed(name: str, w: torch.Tensor, out: torch.Tensor):
    """(runtime, whole): the two ways to dequantize `w` packed as `name` to bf16, as functions of no argument."""
    if name in ("int8", "nf4"):
        import bitsandbytes.functional as bnbf

        if name == "int8":
            q, scb, _ = bnbf.int8_vectorwise_quant(w.half())
            raw, qtype, state = q.view(torch.uint8), formats.INT8, (scb,)
        else:
            raw, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            qtype = formats.BnbType("nf4", 64, qs.state2.blocksize)
            state = (qs.absmax, qs.code, qs.state2.absmax, qs.state2.code, qs.offset.reshape(1))

        def whole():  # the same kernels with one chunk covering the tensor
            old = formats.DEQUANT_CHUNK_WEIGHTS
            formats.DEQUANT_CHUNK_WEIGHTS = w.numel()
            try:
                return formats.dequantize(raw, qtype, SHAPE, torch.bfloat16, state=state)
            finally:
                formats.DEQUANT_CHUNK_WEIGHTS = old

    else:
        qtype, state = GGMLQuantizationType[name], ()
        raw = torch.from_numpy(formats.quantize(w, qtype))
        size = GGML_QUANT_SIZES[qtype][1]

        def whole():
            blocks = raw.view(-1, size)
            x = torch.empty(blocks.shape[0], GGML_QUANT_SIZES[qtype][0])
            formats.KERNELS[qtype](blocks, x, Temps(x.device, keep=False))
            return x.to(torch.bfloat16)

    def runtime():
        return formats.dequantize(raw, qtype, SHAPE, torch.bfloat16, state=state, out=out)

    return runtime, whole


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--json", help="append the rows to this JSON file (a list)")
    args = p.parse_args()
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02
    out = torch.empty(w.numel(), dtype=torch.bfloat16)
    rows, info = [], {"command": f"python benchmarks/dequant.py {' '.join(sys.argv[1:])}", "machine": machine(),
                      "date": time.strftime("%Y-%m-%d")}
    with torch.inference_mode():
        for name in args.types.split(","):
            runtime, whole = _packed(name, w, out)
            row = {"component": "dequant", "quant": name, "shape": list(SHAPE), "whole_ms": _ms(whole),
                   "runtime_ms": _ms(runtime), "threads": torch.get_num_threads(), **info}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        append_rows(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
