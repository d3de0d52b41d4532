"""One benchmark harness: DiT steps and quantization, ours and peers', one JSON row per measurement.

    python benchmarks/run.py --preset demo --steps 1 --json out.json          # seconds: the CI smoke test
    python benchmarks/run.py --preset turbo --quant BF16,Q8_0,Q4_K_M --width 512 --height 512 --steps 1 \
        --peers diffusers --quantize --json benchmarks/results/cpu-512.json

`--preset turbo` builds the full-size model with random weights once into a cache folder (same shapes and bytes as
the real checkpoint, no download; the transformer is stored in BF16 rather than the official F32 to halve the disk
and the build time: the runtime casts to the compute dtype either way) and reuses it. Every measurement runs in a
fresh child process, so peak RSS (VmHWM, which counts memory-mapped file pages that were touched) is that run's.
Quantized files are written by our own `zimage-lite quantize`. Peers run in the same invocation, on the same weights.
The GPU acceptance check (benchmarks/gpu_check.py) runs its measurements through the same --worker children; its
"pipeline" worker runs our whole pipeline, prompt to image, through the public API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's zimage_lite, also when run as a script or a --worker child
DEFAULT_CACHE = ROOT / ".bench_cache"
CAPTION_TOKENS = 100  # a typical prompt with the chat template
# The pipeline runs' prompt: with the random checkpoints' small tokenizer it is 100 tokens with the chat template,
# as long as the caption the DiT-only runs feed (CAPTION_TOKENS)
PROMPT = ("a lighthouse on a cliff at dusk, oil painting, dramatic clouds, warm light, highly detailed, 35mm "
          "photograph, golden hour, waves crashing on the rocks below")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
GNU_TIME = "/usr/bin/time"


# The CPU features that decide bf16/int8 speed (native bf16 dot products, AMX tiles, VNNI): rows from machines
# that differ in them are not comparable.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def machine() -> dict:
    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        have = set(next(line.split(":", 1)[1].split() for line in info if line.startswith("flags")))
        flags = [f for f in CPU_FLAGS if f in have]
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    row = {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__}
    from zimage_lite.quant.int8_compute import isa_limits

    limits = isa_limits()  # kernels held below what the CPU has (an AVX2 machine emulated)
    return {**row, "isa_limits": limits} if limits else row


def append_rows(path: Path, rows: list[dict]) -> None:
    """Add rows to the JSON list in `path` (created if missing)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(old + rows, indent=1) + "\n")


def emit(row: dict, json_path: str | Path | None) -> None:
    """A measured row: printed as a JSON line, and added to `json_path` when one is given (row by row, so that a
    failure later keeps what was measured)."""
    print(json.dumps(row), flush=True)
    if json_path:
        append_rows(Path(json_path), [row])


# ---- the weights ------------------------------------------------------------------------------------------------
def model_folder(preset: str, cache: Path) -> Path:
    """The official-layout folder for `preset`, written once into the cache."""
    from zimage_lite.config import PRESETS
    from zimage_lite.demo import demo_path, write_checkpoint

    if preset == "demo":
        return demo_path()
    folder = cache / preset
    if not (folder / "model_index.json").is_file():
        tmp = cache / f"{preset}.tmp"
        print(f"building full-size random weights in {folder} (once)", file=sys.stderr)
        write_checkpoint(tmp, PRESETS[preset], seed=0, shards=3, transformer_dtype=torch.bfloat16)
        tmp.rename(folder)
    return folder


def weights_file(folder: Path, quant: str, cache: Path, component: str = "dit") -> tuple[Path, dict | None]:
    """A component's weights for `quant`: the folder itself for BF16, else our GGUF or, for ComfyUI's int8 types,
    safetensors (written and measured once)."""
    from zimage_lite.quant.recipes import INT8_TARGETS

    if quant.upper() == "BF16":
        return folder / ("transformer" if component == "dit" else component.replace("-", "_")), None
    out = cache / f"{folder.name}-{component}-{quant}{'.safetensors' if quant in INT8_TARGETS else '.gguf'}"
    row = None
    if not out.is_file():
        cmd = [sys.executable, "-m", "zimage_lite", "quantize", str(folder), "--type", quant, "--component",
               component, "--out", str(out)]
        row = {"component": "quantize", "impl": "zimage-lite", "quant": quant, **child(cmd),
               "file_bytes": out.stat().st_size, "tool_command": " ".join(cmd[1:]),
               "command": f"python benchmarks/run.py {' '.join(sys.argv[1:])}"}
    return out, row


# ---- child processes --------------------------------------------------------------------------------------------
def run_process(cmd: list[str], timeout: float | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of cmd, run in its own process group so that a timeout ends it together with
    anything it started (a RuntimeError then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{' '.join(cmd[:4])} ... did not finish within {timeout:.0f} s") from None
    return proc.returncode, stdout, stderr


def child(cmd: list[str], timeout: float | None = None, keep_stdout: bool = False) -> dict:
    """Run cmd, under GNU time where there is one: wall time, peak RSS, the JSON it printed last, stdout if kept.

    GNU time, not our own wait4: a child forked from this (large) process would inherit our high-water mark. Without
    GNU time (a bare GPU machine) the peak RSS is the one a --worker child reports of itself (VmHWM), the same figure.
    """
    start = time.perf_counter()
    timed = os.path.exists(GNU_TIME)
    code, stdout, stderr = run_process([GNU_TIME, "-f", "maxrss_kb=%M", *cmd] if timed else cmd, timeout)
    lines = stderr.splitlines()
    sys.stderr.write("\n".join(ln for ln in lines[-20:] if not ln.startswith("maxrss_kb=")) + "\n")
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}: {lines[-1] if lines else ''}")
    result: dict = {"total_seconds": time.perf_counter() - start} | ({"stdout": stdout} if keep_stdout else {})
    out = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if out:
        result.update(json.loads(out[-1]))
    if timed:
        rss = next(int(ln.split("=")[1]) for ln in reversed(lines) if ln.startswith("maxrss_kb="))
        result["peak_rss_bytes"] = rss * 1024
    elif "host_peak_bytes" in result:
        result["peak_rss_bytes"] = result["host_peak_bytes"]
    return result


def worker(spec: dict) -> dict:
    """In the child: load one DiT (ours or a peer's), run `steps` forwards, report times and memory; or, with
    impl "pipeline", our whole pipeline through its public API (`_pipeline`)."""
    from zimage_lite.sampling import get_noise

    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    cap = spec.get("cap") or spec.get("vram")
    if device.type == "cuda" and cap:  # emulate a small card: the same cap for us and for peers
        from zimage_lite.runtime.units import parse_size

        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(cap, "--vram") / total), device)
    if spec["impl"] == "interleaved":
        return _interleaved(spec, device, dtype)
    if spec["impl"] == "pipeline":
        return _pipeline(spec, device)
    t0 = time.perf_counter()
    if spec["impl"] == "zimage-lite":
        forward, model = _ours(spec, device, dtype)
    else:
        forward, model = _diffusers(spec, device, dtype)
    touch_weights(model)
    load_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    latents = get_noise(0, 16, spec["height"], spec["width"]).to(device, dtype)
    cap = torch.randn(CAPTION_TOKENS, spec["cap_dim"]).to(device, dtype)
    times, out = [], None
    with torch.inference_mode():
        for i in range(spec["steps"]):
            t = time.perf_counter()
            out = forward(latents, torch.tensor([0.1 + 0.1 * i], device=device), cap)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    if spec.get("save"):
        torch.save(out.float().cpu(), spec["save"])
    return {"load_seconds": load_seconds, "step_seconds": sum(times) / len(times), "step_times": times,
            **memory_figures(device)}


def memory_figures(device: torch.device) -> dict:
    """Peaks since the process started (or since the device's last reset): allocated and reserved device bytes,
    pinned host bytes held by torch's host allocator (0 where this torch cannot say), and the peak RSS."""
    from zimage_lite.runtime.memory import peak_bytes

    out = {"peak_device_bytes": 0, "peak_reserved_bytes": 0, "pinned_bytes": 0, "pinned_peak_bytes": 0,
           "host_peak_bytes": peak_bytes(torch.device("cpu"))}
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        stats = getattr(torch.cuda, "host_memory_stats", dict)()  # torch >= 2.7
        out["pinned_bytes"] = stats.get("allocated_bytes.current", 0)
        out["pinned_peak_bytes"] = stats.get("allocated_bytes.peak", 0)
    return out


def _pipeline(spec: dict, device: torch.device) -> dict:
    """Our pipeline, prompt to image, through the public API only (`load`, `generate`, `plan`): per event its
    seconds, the wall time since the previous event (which includes loading the stage's weights), device peaks
    (`generate` resets them as each stage starts) and the host peak since the previous event; the RSS before any
    weight is read; and the plan, every numeric field of each stage as the planner has them (host memory too)."""
    import dataclasses

    import zimage_lite
    from zimage_lite.runtime.memory import code_and_heap_rss, peak_bytes, reset_peak

    try:  # its own module since issue 9
        from zimage_lite.runtime.plan_format import format_plan
    except ImportError:
        from zimage_lite.runtime.plan import format_plan

    host = torch.device("cpu")
    t0 = time.perf_counter()
    te = Path(spec["text_encoder"]) if spec.get("text_encoder") else None
    pipe = zimage_lite.load(spec["model"], dit=Path(spec["weights"]), text_encoder=te, device=spec["device"],
                            dtype=spec["dtype"], vram=spec.get("vram"), ram=spec.get("ram"),
                            int8_compute=spec.get("int8_compute", False))
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context's host memory belongs to the baseline, not to a stage
    reset_peak(host)
    baseline = peak_bytes(host)  # RSS before any weight is read: the interpreter, torch, the CUDA context
    growth = code_and_heap_rss()
    events, last = [], time.perf_counter()
    open_seconds = last - t0
    for e in pipe.generate(PROMPT, width=spec["width"], height=spec["height"], steps=spec["steps"], seed=0):
        now = time.perf_counter()
        events.append({"stage": e.stage, "step": e.step, "seconds": e.seconds, "wall_seconds": now - last,
                       "load_seconds": e.load_seconds,
                       "tokens": e.info.get("tokens"), **memory_figures(device), **code_and_heap_rss()})
        reset_peak(host)  # the next event's host peak starts here
        last = time.perf_counter()
    plan = {s.name: {**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                        if type(getattr(s, f.name)) is int},
                     "peak_bytes": s.peak_bytes, "n_streamed": len(s.streamed), "n_resident": len(s.resident)}
            for s in pipe.plan.stages}
    return {"open_seconds": open_seconds, "total_generate_seconds": time.perf_counter() - t0 - open_seconds,
            "events": events, "plan": plan, "plan_text": format_plan(pipe.plan), "baseline_rss_bytes": baseline,
            "host_peak_bytes": max(e["host_peak_bytes"] for e in events),
            **{f"baseline_{k}": v for k, v in growth.items()}}


def _interleaved(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Our DiT and diffusers' in one process on the very same weight tensors (ours takes diffusers' parameters by
    name), forwards alternating: both see the same memory and the same machine drift, so the ratio of their step
    times is steadier than across processes (a 2-core VM drifts by a few percent from run to run)."""
    from zimage_lite.config import PRESETS
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.sampling import get_noise

    theirs, model = _diffusers(spec, device, dtype)
    with torch.device("meta"):
        dit = ZImageDiT(PRESETS[spec["preset"]].dit)
    dit.load_state_dict(model.state_dict(), strict=True, assign=True)  # official names on both sides
    dit.eval()
    touch_weights(model)
    torch.manual_seed(0)
    latents = get_noise(0, 16, spec["height"], spec["width"]).to(device, dtype)
    cap = torch.randn(CAPTION_TOKENS, spec["cap_dim"]).to(device, dtype)
    forwards = {"zimage-lite": lambda x, t, c: dit(x, t, [c]), "diffusers": theirs}
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for i in range(spec["steps"]):
            for name, forward in forwards.items():
                t = time.perf_counter()
                forward(latents, torch.tensor([0.1 + 0.1 * i], device=device), cap)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    return {"step_seconds": times}


def touch_weights(model: torch.nn.Module) -> None:
    """Read one value per 4 KiB page of every weight, so that weights still in a memory map are paged in now
    (counted as loading) and not during the first step (which would count disk/page-cache reads as compute)."""
    with torch.inference_mode():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.numel():
                flat = t.detach().as_subclass(torch.Tensor).reshape(-1)  # raw storage, also of GGUF parameters
                float(flat[:: max(1, 4096 // t.element_size())].float().sum())


def _ours(spec: dict, device: torch.device, dtype: torch.dtype):
    import zimage_lite
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.weights.components import open_dit
    from zimage_lite.weights.load import load_module

    if spec.get("vram"):  # the real runtime path: plan, resident blocks, streaming
        pipe = zimage_lite.load(spec["model"], dit=Path(spec["weights"]), device=spec["device"], dtype=spec["dtype"],
                                vram=spec["vram"])
        pipe.plan = pipe.make_plan(spec["width"], spec["height"], 0.0, CAPTION_TOKENS)
        dit = pipe._load("dit")
    else:
        cfg, src = open_dit(Path(spec["weights"]))
        with torch.device("meta"):
            dit = ZImageDiT(cfg)
        dit = load_module(dit, src, dtype, device, "DiT")
    return (lambda x, t, cap: dit(x, t, [cap])), dit


def _diffusers(spec: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    if spec["weights"].endswith(".gguf"):
        model = ZImageTransformer2DModel.from_single_file(
            spec["weights"], config=str(Path(spec["model"]) / "transformer"),
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), torch_dtype=dtype)
    else:
        model = ZImageTransformer2DModel.from_pretrained(spec["weights"], torch_dtype=dtype)
    offload = spec.get("offload")
    if offload == "model":
        model.to(device)  # a single model: model offloading keeps it whole on the device while it runs
    elif offload == "group":
        # a side stream prefetches the next block on CUDA; the CPU smoke run (benchmarks/gpu_check.py) has none
        model.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=device.type == "cuda")
    elif offload == "sequential":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=device)
    else:
        model.to(device)
    model.eval()

    def forward(x, t, cap):
        return model(list(x.unsqueeze(2)), t, [cap], return_dict=False)[0][0].squeeze(1)[None]  # (1, C, H, W)

    return forward, model


# ---- the harness ------------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> Iterator[dict]:
    from zimage_lite.config import PRESETS

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.preset, cache)
    cfg = PRESETS[args.preset]
    width = args.width or (64 if args.preset == "demo" else 512)
    height = args.height or width
    base = {"device": args.device, "width": width, "height": height, "steps": args.steps, "preset": args.preset,
            "dtype": args.dtype, "model": str(folder), "cap_dim": cfg.dit.cap_feat_dim}
    for quant in args.quant.split(","):
        weights, qrow = weights_file(folder, quant, cache)
        if qrow and args.quantize:
            yield {**base, **qrow, "steps": 0}
        runs = [("zimage-lite", None)]
        if "diffusers" in args.peers.split(","):
            if quant.upper() == "BF16":
                runs.append(("diffusers", None))
                if args.device == "cuda":
                    runs += [("diffusers", "model"), ("diffusers", "group"), ("diffusers", "sequential")]
            else:
                runs.append(("diffusers", "gguf"))
        if args.interleaved and quant.upper() == "BF16":
            spec = {**base, "impl": "interleaved", "quant": quant, "weights": str(weights), "steps": args.interleaved}
            print(f"measuring zimage-lite and diffusers {quant}, interleaved ...", file=sys.stderr)
            row = {**spec, **child([sys.executable, __file__, "--worker", json.dumps(spec)]),
                   "component": "interleaved", "command": f"python benchmarks/run.py {' '.join(sys.argv[1:])}"}
            for key in ("model", "cap_dim", "impl"):
                row.pop(key, None)
            yield row
        for impl, offload in runs:
            spec = {**base, "impl": impl, "quant": quant, "weights": str(weights), "vram": args.vram,
                    "offload": offload if offload != "gguf" else None,
                    "save": str(_output_file(cache, impl, quant, offload)) if args.quality else None}
            cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
            print(f"measuring {impl} {quant} {offload or ''} ...", file=sys.stderr)
            row = {**spec, "component": "dit", **child(cmd), "settings": offload or "resident",
                   "command": f"python benchmarks/run.py {' '.join(sys.argv[1:])}"}
            for key in ("save", "model", "cap_dim"):
                row.pop(key, None)
            if args.quality:
                _quality(row, cache)
            yield row


def _output_file(cache: Path, impl: str, quant: str, settings: str | None) -> Path:
    """Where a measured forward's output is kept for the quality comparison."""
    return cache / f"out-{impl}-{quant}-{settings or 'resident'}.pt"


def _quality(row: dict, cache: Path) -> None:
    """Relative error (L2) of one DiT forward against our BF16 forward on the same weights (measured first)."""
    ref_path = _output_file(cache, "zimage-lite", "BF16", None)
    out_path = _output_file(cache, row["impl"], row["quant"], row["settings"])
    if ref_path.is_file() and out_path.is_file():
        ref, out = torch.load(ref_path), torch.load(out_path)
        row["rel_error_vs_bf16"] = float((out - ref).norm() / ref.norm())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", choices=["demo", "turbo"])
    p.add_argument("--quant", default="BF16", help="comma-separated DiT formats: BF16,Q8_0,Q4_K_M,...")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--vram", help="run ours through the planner and streamer under this budget (e.g. 4GB)")
    p.add_argument("--peers", default="", help="comma-separated peers to measure alongside: diffusers")
    p.add_argument("--quantize", action="store_true", help="also report the time and RAM of writing each GGUF")
    p.add_argument("--quality", action="store_true", help="relative error of each recipe's forward vs BF16")
    p.add_argument("--interleaved", type=int, default=0, metavar="N",
                   help="with --peers diffusers: also N forwards each of ours and diffusers' BF16 DiT, alternating "
                        "in one process on the same weight tensors")
    p.add_argument("--image-quality", action="store_true",
                   help="instead of timing: image difference per recipe on the tiny K-quant test fixture")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--json", help="append the rows to this JSON file (a list)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    rows = measure(args)
    if args.image_quality:
        from benchmarks.image_quality import image_quality

        rows = image_quality(args)
    for row in rows:
        emit({**row, **info}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
