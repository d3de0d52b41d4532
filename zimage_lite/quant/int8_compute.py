"""Integer matmuls for int8 weights with per-row scales (convrot.py): one entry point, `int8_linear`.

The activation rows are rotated like the weight was (ConvRot: each group of `groupsize` inputs times the Hadamard
block), quantized per row (symmetric, max|row| / 127; / 63 where `onednn_levels` says so), multiplied int8 x int8
with int32 accumulation, and the product scaled by the weight's row scale (one per output column) and the
activation's row scale.

Routes, chosen once per machine (`route_for`): on CUDA `torch._int_mm` (int8 tensor cores). On the CPU the fastest of
(oneDNN only by a margin: `choose_route`)
- "onednn": `torch.ops.onednn.qlinear_pointwise` over a weight prepacked once by `torch.ops.onednn.qlinear_prepack`
  (the non-deprecated oneDNN entry points torch's inductor uses; u8 activations with zero point 128 hold the signed
  int8 values, the weight's row scales go in as per-channel scales and the activation row scales are applied after,
  with activation scale 1). Without VNNI (AVX2) its kernel adds pairs of u8 x s8 products in 16 bits, saturating
  (two 255 x 127 products overflow: 12% error on random rows, measured on Zen 3): there the activations take 7 bits,
  -63..63 at zero point 64, as fbgemm's reduce_range does (`onednn_levels`, found by exact products);
- "int_mm": `torch._int_mm` (on some builds a naive loop on the CPU: the timing decides);
- "float": dequantize to the compute dtype and `F.linear`, as for every other packed type;
timed on a 1024 x 2048 @ 2048 x 2048 product (a 512x512 image's 1024 tokens) with the current thread count, and
remembered in the cache folder (`int8-route.json`, keyed by CPU, kernel instruction set, torch version and
threads). The deprecated quantized-tensor ops (`torch.ops.quantized.linear_dynamic`, fbgemm) quantize activations
per tensor, not per row, so they are not routes.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ZImageLiteError
from ..output import write_atomic
from .convrot import Int8Rows, rounded_rows
from .formats import dequantize

ROUTES = ("onednn", "int_mm", "float")
ROUTE_ENV = "ZIMAGE_LITE_INT8_ROUTE"  # forces a route (tests, benchmarks)
_BENCH = (1024, 2048, 2048)  # M, K, N of the timing product (8.6 GFLOP: ~0.15 s in fp32 on 2 cores)


def prepack(qweight: torch.Tensor) -> torch.Tensor:
    """The oneDNN blocked copy of an int8 weight [N, K] (CPU): made once per weight, reused by every call."""
    return torch.ops.onednn.qlinear_prepack(qweight.view(torch.int8), [1, qweight.shape[1]])


@dataclass(frozen=True)
class Int8Activations:
    """Activation rows rotated and quantized for one route: made once and shared by the int8 Linears that read the
    same input (attention's q, k and v; the FFN's two input projections: qlinear.shared_input)."""

    values: torch.Tensor  # [M', K]: int8 (int_mm; on CUDA at least 17 rows) or uint8 holding int8 + zero (onednn)
    scale: torch.Tensor  # fp32 [M, 1]
    rows: int  # M
    groupsize: int
    route: str
    zero: int  # the zero point of uint8 values: onednn_levels() + 1, else 0


def int8_activations(x: torch.Tensor, groupsize: int, route: str) -> Int8Activations:
    """x [..., K] for the integer `route`: rotated in groups of `groupsize` (0: not rotated), quantized per row."""
    if route not in ("onednn", "int_mm"):
        raise ValueError(f"int8 route {route!r}: expected onednn or int_mm")
    x2 = x.reshape(-1, x.shape[-1])
    levels = onednn_levels() if route == "onednn" else 127
    xq, xs = rounded_rows(x2, groupsize, levels)
    if route == "onednn":
        return Int8Activations(xq.add_(levels + 1).to(torch.uint8), xs, x2.shape[0], groupsize, route, levels + 1)
    values = xq.to(torch.int8)
    if x.is_cuda and values.shape[0] <= 16:  # cuBLASLt's int8 GEMM wants more than 16 rows
        values = F.pad(values, (0, 0, 0, 17 - values.shape[0]))
    return Int8Activations(values, xs, x2.shape[0], groupsize, route, 0)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, groupsize: int,
                bias: torch.Tensor | None = None, route: str | None = None,
                packed: torch.Tensor | None = None, given: Int8Activations | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) for W = int8 `qweight` [N, K] (uint8 bytes or int8) with fp32 row `scale` [N],
    stored rotated in groups of `groupsize` (0: not rotated). `route`: one of ROUTES (default: `route_for` the
    device); "onednn" uses `packed` (from `prepack`) when given; `given`: x already quantized for this groupsize
    and route (`int8_activations`). The result has x's dtype."""
    q = qweight.view(torch.int8)
    n, k = q.shape
    route = route_for_shape(route or route_for(x.device), x.device, n, k)
    if route == "float":  # the weight dequantized as every packed type is (formats.dequantize)
        w = dequantize(q.view(torch.uint8), Int8Rows(groupsize), (n, k), x.dtype, state=(scale.reshape(-1),))
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    if given is None or (given.groupsize, given.route) != (groupsize, route):
        given = int8_activations(x, groupsize, route)
    if route == "onednn":
        y = _onednn_mm(given.values, given.zero, packed if packed is not None else prepack(q), scale)
    else:
        y = torch._int_mm(given.values, q.t())[:given.rows].float().mul_(scale.reshape(1, n).float())
    y = y.mul_(given.scale)
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def route_for_shape(route: str, device: torch.device | str, n: int, k: int) -> str:
    """`route` for an N x K int8 weight on `device`: "float" where the integer kernel cannot take the shape (CUDA's
    cuBLASLt int8 GEMM wants N and K multiples of 8). Asked before the activations are quantized for it."""
    if route == "int_mm" and torch.device(device).type == "cuda" and (n % 8 or k % 8):
        return "float"
    return route


@functools.lru_cache(maxsize=4)
def _zero_points(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64, device=device)


def _onednn_mm(values: torch.Tensor, zero: int, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 activations [M, K] at zero point `zero` x a prepacked int8 weight with per-channel `scale` [N]: fp32
    [M, N] (activation scale 1: the row scales are applied after)."""
    return torch.ops.onednn.qlinear_pointwise(values, 1.0, zero, packed, scale.float(),
                                              _zero_points(scale.numel(), values.device), None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.cache
def onednn_levels() -> int:
    """The activation levels of the onednn route on this CPU: 127 where its u8 x s8 kernel sums exactly (VNNI, AMX:
    32-bit sums), 63 where pairs of products saturate at 16 bits (AVX2's vpmaddubsw: with u8 activations up to 127
    no pair exceeds 2 x 127 x 127 < 2^15), 0 where even that is not exact (`route_for` then takes the best other
    route). Found by products whose sums are exact in fp32: all-255 (then all-127) rows of 32 x 64 against weights
    of 127."""
    k, n = 64, 8
    packed = prepack(torch.full((n, k), 127, dtype=torch.int8))
    for top, levels in ((255, 127), (127, 63)):
        y = _onednn_mm(torch.full((32, k), top, dtype=torch.uint8), 0, packed, torch.ones(n))
        if bool((y == top * 127 * k).all()):
            return levels
    return 0


# ---- choosing the route, once per machine


def route_for(device: torch.device | str) -> str:
    """The route int8 weights run by on `device`: $ZIMAGE_LITE_INT8_ROUTE, else int_mm on CUDA, else the CPU's
    measured choice (`cpu_route`)."""
    forced = os.environ.get(ROUTE_ENV)
    if forced:
        from ..errors import OptionError

        if forced not in ROUTES:
            raise OptionError(f"${ROUTE_ENV}={forced!r}: expected one of {', '.join(ROUTES)}")
        if forced == "onednn" and torch.device(device).type != "cpu":
            raise OptionError(f"${ROUTE_ENV}=onednn: oneDNN's int8 kernel runs on the CPU only, not on {device}; "
                              "use int_mm or float")
        if forced == "onednn" and not onednn_levels():  # its activations would have no levels: NaN everywhere
            raise OptionError(f"${ROUTE_ENV}=onednn: this CPU's oneDNN int8 kernel does not multiply exactly even "
                              "at 7 bits; use int_mm or float")
        return forced
    if torch.device(device).type == "cuda":
        return "int_mm"
    route = cpu_route()["route"]
    if route == "onednn" and not onednn_levels():  # the fastest, but inexact: the best of the others
        return choose_route({r: g for r, g in cpu_route()["gflops"].items() if r != "onednn"})
    return route


def _machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    # the kernels' instruction set: torch's dispatch level and the limits set in the environment
    isa = torch.backends.cpu.get_cpu_capability() + "".join(f" {v}={w}" for v, w in isa_limits().items())
    return f"{cpu} | {isa} | torch {torch.__version__} | {torch.get_num_threads()} threads"


# Environment variables that hold the kernels below the CPU's instruction set (an AVX2 machine emulated on a newer
# one): torch's dispatch level, oneDNN's and MKL's limits
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_limits() -> dict[str, str]:
    """The ISA_LIMITS set in this process's environment."""
    return {v: os.environ[v] for v in ISA_LIMITS if os.environ.get(v)}


def _cache_file() -> Path:
    from ..demo import cache_dir

    return cache_dir() / "int8-route.json"


# A route this many times slower than the fastest after the first timed round (the warm-up round's calls included) is
# timed no more: it cannot be chosen, and the naive `_int_mm` of an AVX2 CPU takes 1.4 s a call (Zen 3: a process
# timing the routes took 9.7 s with four calls of it, 7.0-7.5 s with two)
OUT_OF_RACE = 8


def time_routes(shape: tuple[int, int, int] = _BENCH, reps: int = 3) -> dict[str, float]:
    """GFLOP/s of each CPU route (float: dequantize + fp32 F.linear) on an M x K @ K x N product, best of `reps`,
    the routes interleaved so that a noisy neighbour slows them alike; a route OUT_OF_RACE times slower than the
    fastest after the warm-up round and the first timed one keeps its figure from those. A route that fails scores
    0."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=gen), torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale, packed = torch.rand(n, generator=gen) + 0.5, None
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "float": lambda: int8_linear(x, w, scale, 256, route="float"),
        "onednn": lambda: int8_linear(x, w, scale, 256, route="onednn", packed=packed),
        "int_mm": lambda: int8_linear(x, w, scale, 256, route="int_mm"),
    }
    best = dict.fromkeys(calls, float("inf"))
    try:
        packed = prepack(w)
    except (RuntimeError, AttributeError):
        best["onednn"] = float("nan")
    out: set[str] = set()
    for round_ in range(reps + 1):  # the first round warms up (oneDNN builds its kernels)
        for name, call in calls.items():
            if best[name] != best[name] or name in out:  # nan: failed before
                continue
            try:
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
            except (RuntimeError, AttributeError):
                best[name] = float("nan")
        if round_ >= 1:
            fastest = min((t for t in best.values() if t == t), default=float("inf"))
            out |= {name for name, t in best.items() if t > OUT_OF_RACE * fastest}
    flops = 2 * m * k * n
    return {name: 0.0 if t != t else round(flops / t / 1e9, 1) for name, t in best.items()}


# oneDNN holds a blocked copy of every int8 weight, made at load (qlinear.prepare_resident: a resident weight's file
# pages go back then; a streamed block's or a converted weight's stay beside it, runtime/sizes.py) and a conversion
# each time a streamed block comes back: it must beat the best route without a copy by this much to be chosen
# (measured on AVX512-VNNI: 254 against int_mm's 238 GFLOP/s on the timing product, yet a 512x512 ConvRot step took
# 74 s against int_mm's 37 s, at twice the peak RSS then; on AVX2 machines int_mm is a naive loop, ~40x slower)
ONEDNN_MARGIN = 1.5


def choose_route(gflops: dict[str, float]) -> str:
    """The CPU route from `time_routes`' figures: the fastest ("float" included: an integer route must beat
    dequantizing), oneDNN only when ONEDNN_MARGIN times faster than the best of the others."""
    others = {r: g for r, g in gflops.items() if r != "onednn"}
    best = max(others, key=lambda r: others[r])
    return "onednn" if gflops.get("onednn", 0.0) > ONEDNN_MARGIN * others[best] else best


@functools.cache
def cpu_route() -> dict:
    """{"route", "gflops": {route: GFLOP/s}, "machine"}: read from the cache folder, else timed (`time_routes`,
    a few seconds) and written there; the route is `choose_route` of the figures."""
    key, path = _machine_key(), _cache_file()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(key)
    figures = entry.get("gflops") if isinstance(entry, dict) else None
    if (isinstance(figures, dict) and set(figures) == set(ROUTES)
            and all(type(g) in (int, float) for g in figures.values())):  # else (another version's file): timed again
        return entry | {"route": choose_route(entry["gflops"])}  # the rule below applies to earlier timings too
    gflops = time_routes()
    entry = {"route": choose_route(gflops), "gflops": gflops, "machine": key}
    text = json.dumps(known | {key: entry}, indent=1) + "\n"
    try:  # a temporary file renamed over the old one: a run killed mid-write, or two at once, leave a whole file
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True, option="the route cache")
    except (OSError, ZImageLiteError):
        pass  # a read-only cache: measured again next run
    return entry


def describe_route(device: torch.device | str = "cpu") -> str:
    """One line for `info` and `plan`: the route int8 weights take on `device` and why."""
    try:
        route = route_for(device)
    except ZImageLiteError as e:  # a forced route that cannot run here: reported, as the run would refuse it
        return f"none: {e}"
    cpu = torch.device(device).type == "cpu"
    narrow = "7-bit activations: the CPU's u8 x s8 kernel saturates" if route == "onednn" and cpu \
        and onednn_levels() < 127 else ""
    if not cpu or os.environ.get(ROUTE_ENV):
        return f"{route} ({narrow})" if narrow else route
    g = cpu_route()["gflops"]
    figures = ", ".join(f"{r} {g[r]:g}" for r in ROUTES)
    return f"{route} (measured GFLOP/s: {figures}{'; ' + narrow if narrow else ''})"
