"""The machine's GEMM roofs: GFLOP/s of one DiT-sized matmul per compute route torch offers on this CPU.

    python benchmarks/roofs.py --threads 2 --json benchmarks/results/cpu-roofs.json

The shape is the full-size DiT's FFN up-projection at 512x512 (1088 rows: 1024 image tokens and a 64-token
caption; 3840 -> 10240), the issue's reference shape. Routes: fp32 and bf16 `F.linear`; int8 through
oneDNN's quantized linear (u8 activations x s8 per-channel weights, weights prepacked once) by its deprecated
quantized-tensor entry (`quantized.linear_dynamic`, engine onednn) and by the inductor's `onednn.qlinear_pointwise`;
and `torch._int_mm` (s8 x s8 -> s32) for contrast. Each route: one warm-up call, then calls until `--repeats` or
`--budget` seconds; the best call gives the roof (the machine is shared: the best is the least disturbed).

Attention at the full-size DiT's 1024x1024 shape (30 heads, 4128 tokens: 4096 image and a 32-token caption, 128 per
head) is measured beside them (component "attention"): torch's SDPA in fp32 and bf16, and the CPU bf16 route of
models/layers.py (bf16 matmuls per head and chunk of query rows), whatever this CPU's bf16 is.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import append_rows, machine  # noqa: E402
from zimage_lite.models.layers import CPU_BF16_ROWS, _cpu_bf16_attention  # noqa: E402

M, K, N = 1088, 3840, 10240
HEADS, TOKENS, HEAD_DIM = 30, 4128, 128


def _timed(fn: Callable[[], object], repeats: int, budget: float) -> list[float]:
    """Seconds per call of fn after one warm-up call (kernel choice, packing caches)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def routes(m: int, k: int, n: int) -> dict[str, Callable[[], Callable[[], object]]]:
    """Per route, a builder that prepares its operands (packing is not timed) and returns the call to time."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5

    def fp32():
        return lambda: F.linear(x, w)

    def bf16():
        xb, wb = x.bfloat16(), w.bfloat16()
        return lambda: F.linear(xb, wb)

    def onednn_dynamic():
        torch.backends.quantized.engine = "onednn"
        scales = w.abs().amax(1) / 127
        qw = torch.quantize_per_channel(w, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda: torch.ops.quantized.linear_dynamic(x, packed, True)  # reduce_range: u8 in [0, 127]

    def onednn_qlinear():
        scales = (w.abs().amax(1) / 127).float()
        wq = torch.round(w / scales[:, None]).to(torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(wq, [m, k])
        xs = float(x.abs().max() / 127)  # the activations as u8 with zero point 128: one per-tensor scale
        xq = (torch.round(x / xs) + 128).clamp(0, 255).to(torch.uint8)
        zeros = torch.zeros(n, dtype=torch.long)
        return lambda: torch.ops.onednn.qlinear_pointwise(xq, xs, 128, packed, scales, zeros, None, 1.0, 0,
                                                          torch.float32, "none", [], "")

    def int_mm():
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
        return lambda: torch._int_mm(a, b)

    return {"fp32 F.linear": fp32, "bf16 F.linear": bf16,
            "int8 oneDNN quantized.linear_dynamic (u8 x s8, per-channel, prepacked)": onednn_dynamic,
            "int8 oneDNN onednn.qlinear_pointwise (u8 x s8, per-channel, prepacked)": onednn_qlinear,
            "int8 torch._int_mm (s8 x s8 -> s32)": int_mm}


def attention_routes(h: int, s: int, d: int) -> dict[str, Callable[[], Callable[[], object]]]:
    """Per attention route, a builder of the call to time on (1, h, s, d) queries, keys and values."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, generator=g) for _ in range(3))

    def sdpa(dtype: torch.dtype) -> Callable[[], Callable[[], object]]:
        def build():
            qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
            return lambda: F.scaled_dot_product_attention(qd, kd, vd)
        return build

    def bf16_route():
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        return lambda: _cpu_bf16_attention(qb, kb, vb, CPU_BF16_ROWS)

    return {"fp32 SDPA": sdpa(torch.float32), "bf16 SDPA": sdpa(torch.bfloat16),
            f"bf16 matmuls per head, {CPU_BF16_ROWS} query rows (layers._cpu_bf16_attention)": bf16_route}


def measure(threads: int, repeats: int, budget: float, shape: tuple[int, int, int] = (M, K, N),
            attention: tuple[int, int, int] = (HEADS, TOKENS, HEAD_DIM)) -> list[dict]:
    """One row per route, GEMMs (component "roofs") then attention ("attention"): the best and median GFLOP/s, or
    the error where this torch lacks the route."""
    torch.set_num_threads(threads)
    m, k, n = shape
    h, s, d = attention
    return (_rows("roofs", routes(m, k, n), list(shape), 2 * m * k * n, threads, repeats, budget)
            + _rows("attention", attention_routes(h, s, d), list(attention), 4 * h * s * s * d, threads, repeats,
                    budget))


def int8_roof(threads: int, repeats: int = 5, budget: float = 5.0, shape: tuple[int, int, int] = (M, K, N)) -> dict:
    """The int8 roof of the machine as it is now (benchmarks/sdcpp.py measures it just before each run that computes
    in int8): the best GFLOP/s of the int8 routes on the reference shape, and that route's name."""
    torch.set_num_threads(threads)
    m, k, n = shape
    int8 = {name: build for name, build in routes(m, k, n).items() if name.startswith("int8")}
    rows = [r for r in _rows("roofs", int8, list(shape), 2 * m * k * n, threads, repeats, budget) if "gflops" in r]
    best = max(rows, key=lambda r: r["gflops"])
    return {"int8_roof_gflops": best["gflops"], "int8_roof_route": best["route"]}


def _rows(component: str, builders: dict[str, Callable[[], Callable[[], object]]], shape: list[int], flops: int,
          threads: int, repeats: int, budget: float) -> list[dict]:
    rows = []
    for name, build in builders.items():
        row: dict = {"component": component, "route": name, "shape": shape, "threads": threads}
        try:
            with torch.inference_mode():
                times = sorted(_timed(build(), repeats, budget))
        except (RuntimeError, AttributeError, NotImplementedError) as e:  # a route this build of torch lacks
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            row.update(seconds=times, gflops=flops / times[0] / 1e9, gflops_median=flops / times[len(times) // 2]
                       / 1e9)
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per route at most (after one call)")
    p.add_argument("--json", help="append the rows to this JSON file (a list)")
    p.add_argument("--note", default="2-core VM shared with other jobs", help="what else ran on the machine")
    args = p.parse_args()
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "command": f"python benchmarks/roofs.py {shlex.join(sys.argv[1:])}",
            "note": f"{args.note}; each figure is the best of its calls"}
    rows = [{**info, **r} for r in measure(args.threads, args.repeats, args.budget)]
    if args.json:
        append_rows(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
