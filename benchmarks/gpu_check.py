"""The GPU acceptance check of issue 9: one run on a bare GPU machine, JSON rows for BENCHMARKS.md's GPU tables.

    benchmarks/gpu_check.sh [OUTDIR]              # on the GPU machine: installs .whl/, then runs this
    benchmarks/gpu_check.sh --cpu-smoke OUTDIR    # the same code paths on the CPU, demo model, in seconds (CI)

Parts, each failing soft (its error becomes a row and the others still run), within DEADLINE seconds:
- tests: `pytest -m cuda` (the CUDA tests: budgets that really stream, the race amplifier);
- weights: the full-size Turbo checkpoint with random weights in BF16 (benchmarks/run.py's `model_folder`), then
  the DiT and the text encoder to Q4_K_M by our converter, its K-quant kernels running on the GPU (same recipe, same
  writer as `zimage-lite quantize`; the CPU needs minutes for what the GPU does in seconds). The tests run meanwhile;
- runs, each in a fresh process (benchmarks/run.py --worker): our pipeline at 1024x1024 under a 4 GiB cap
  (`set_per_process_memory_fraction`) with `--vram 4GB`, ours fully resident, and diffusers' ZImageTransformer2DModel
  on the same GGUF with block-level group offloading (side stream) under the same cap: s/step, device peaks
  (allocated, reserved) and host peaks per stage, pinned host bytes, and the plan's figures beside them;
- targets: pass/fail of the issue's targets (PEAK_LIMIT, STEP_RATIO, FASTER below) and whether the host memory the
  plan states holds, then a summary. The exit code is 1 when a part failed (a CUDA test failing included), not
  when a target is missed: the rows say which.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import dit_figures, host_against_plan, stage_figures  # noqa: E402
from benchmarks.run import append_rows, child, machine, model_folder, run_process  # noqa: E402
from zimage_lite.weights.sources import TensorSource  # noqa: E402

GIB = 2**30
QUANT = "Q4_K_M"  # the 4 GB recipe of the README: DiT and text encoder
CAP = "4GiB"  # the card: what the caching allocator may take (set_per_process_memory_fraction)
VRAM = "4GB"  # our --vram, as the owner of a 4 GB card types it
PEAK_LIMIT = 3.6 * GIB
STEP_RATIO = 1.25  # capped DiT step over resident
FASTER = 3.0  # diffusers' group-offloaded step over ours
DEADLINE = 450  # seconds for all parts; the shell script's wheel install comes before (8 minutes in all)
TESTS_LIMIT = 240
RUN_LIMIT = 150
RUN_MIN = 30  # a run is not started with less time than this left
# The smoke run's budget passes through the same options; ample for the demo, so that planner changes cannot make it
# too small (streaming itself is tests/test_streaming.py's to test)
SMOKE_RAM = "1GB"


@dataclasses.dataclass(frozen=True)
class Mode:
    preset: str
    device: str
    dtype: str
    size: int
    steps: int  # the first step warms up (kernel choice, first touch of pinned chunks); s/step is over the rest
    budget: dict  # the capped run's options
    tests: tuple[str, ...]  # what pytest -m cuda collects from


GPU = Mode("turbo", "cuda", "bf16", 1024, 4, {"cap": CAP, "vram": VRAM}, ("tests",))
# The smoke run collects one small file (the whole suite imports every reference library: seconds), whose `cuda`
# test checks that the marker selects and, without a GPU, skips
SMOKE = Mode("demo", "cpu", "fp32", 64, 2, {"ram": SMOKE_RAM}, ("tests/test_benchmarks.py",))


class OnDevice(TensorSource):
    """A tensor source whose tensors arrive on `device`, so the converter's K-quant kernels run there."""

    def __init__(self, source: TensorSource, device: str) -> None:
        self.source, self.device, self.path = source, device, source.path

    def names(self):
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def qtype(self, name: str) -> str:
        return self.source.qtype(name)

    def where(self, name: str) -> Path:
        return self.source.where(name)

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(name).to(self.device)


# ---- the parts --------------------------------------------------------------------------------------------------
def cuda_tests(mode: Mode, out: Path, timeout: float) -> dict:
    """pytest -m cuda; counts from its JUnit report, which also comes back in OUTDIR."""
    xml = out / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *mode.tests]
    start = time.perf_counter()
    code, stdout, stderr = run_process(cmd, timeout, cwd=ROOT)
    sys.stderr.write(stdout[-4000:] + stderr[-2000:])
    if not xml.is_file():
        raise RuntimeError(f"pytest wrote no report (exit code {code})")
    suites = ET.parse(xml).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    row = {"component": "gpu_tests", "pytest_command": " ".join(cmd[1:]), "exit_code": code, "passed": passed,
           **counts, "failed_tests": failed, "seconds": time.perf_counter() - start}
    if failed:
        row["error"] = f"{len(failed)} CUDA test(s) failed"
    elif torch.cuda.is_available() and not passed:
        row["error"] = "no CUDA test ran: mark each with @pytest.mark.cuda"
    return row


def quantize_on(folder: Path, component: str, device: str, out: Path) -> float:
    """Write `component` of `folder` as QUANT to `out`, the K-quant kernels on `device`; the seconds it took."""
    from quantize.convert import TARGETS, convert_dit, convert_text_encoder, open_inputs

    start = time.perf_counter()
    inp = open_inputs(folder, component)[0]
    inp = dataclasses.replace(inp, source=OnDevice(inp.source, device))
    convert = convert_dit if component == "dit" else convert_text_encoder
    convert(inp, TARGETS[QUANT], out, True)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def build_weights(mode: Mode, cache: Path) -> dict:
    """The checkpoint (written once into `cache`) and its QUANT DiT and text encoder files."""
    start = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    folder = model_folder(mode.preset, cache)
    row = {"component": "gpu_weights", "preset": mode.preset, "quant": QUANT, "quantize_device": mode.device,
           "model": str(folder), "checkpoint_seconds": time.perf_counter() - start}
    for component in ("dit", "text_encoder"):
        path = cache / f"{mode.preset}-{component}-{QUANT}.gguf"
        row[f"{component}_seconds"] = quantize_on(folder, component, mode.device, path) if not path.is_file() else 0
        row[component], row[f"{component}_bytes"] = str(path), path.stat().st_size
    return row


def runs(mode: Mode, weights: dict, left: Callable[[], float]) -> list[dict]:
    """Ours capped, ours resident, diffusers group-offloaded: one fresh process each, one row each."""
    from zimage_lite.config import PRESETS

    base = {"device": mode.device, "dtype": mode.dtype, "width": mode.size, "height": mode.size, "steps": mode.steps,
            "preset": mode.preset, "quant": QUANT, "model": weights["model"], "weights": weights["dit"],
            "text_encoder": weights["text_encoder"], "cap_dim": PRESETS[mode.preset].dit.cap_feat_dim}
    specs = [("capped", {**base, "impl": "pipeline", **mode.budget}),
             ("resident", {**base, "impl": "pipeline"}),
             ("group offload", {**base, "impl": "diffusers", "offload": "group", "cap": mode.budget.get("cap")})]
    rows = []
    for settings, spec in specs:
        row = {"component": "gpu_run", "settings": settings, **{k: v for k, v in spec.items() if k != "model"}}
        row["impl"] = "diffusers" if spec["impl"] == "diffusers" else "zimage-lite"
        if left() < RUN_MIN:
            rows.append({**row, "error": f"not run: {left():.0f} s left"})
            continue
        print(f"run: {row['impl']} {settings} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--worker", json.dumps(spec)]
        try:
            rows.append({**row, **child(cmd, min(RUN_LIMIT, left()))})
        except Exception as e:  # fail soft: the next run still goes
            rows.append({**row, "error": str(e)})
    return rows


# ---- the targets ------------------------------------------------------------------------------------------------
def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets on the run rows; `met` is None where a run is missing (its part failed)."""
    by = {r["settings"]: r for r in rows if "error" not in r}
    capped, resident, theirs = by.get("capped"), by.get("resident"), by.get("group offload")
    stages = stage_figures(capped["events"]).values() if capped else []
    ours = dit_figures(capped) if capped else {}
    alone = dit_figures(resident) if resident else {}
    other = dit_figures(theirs) if theirs else {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    checks = [  # (target, value, limit, unit, the limit is a lower bound)
        (f"peak allocated <= {PEAK_LIMIT / GIB:.1f} GiB in every stage (GiB)",
         max((s["peak_device_bytes"] for s in stages), default=None), PEAK_LIMIT, GIB, False),
        (f"peak reserved <= {PEAK_LIMIT / GIB:.1f} GiB in every stage (GiB)",
         max((s["peak_reserved_bytes"] for s in stages), default=None), PEAK_LIMIT, GIB, False),
        (f"DiT step <= {STEP_RATIO}x resident (capped / resident s/step)",
         ratio(ours.get("step_seconds"), alone.get("step_seconds")), STEP_RATIO, 1, False),
        (f">= {FASTER:.0f}x faster than diffusers group offloading (their / our s/step)",
         ratio(other.get("step_seconds"), ours.get("step_seconds")), FASTER, 1, True),
        ("at the same or lower peak (our / their DiT peak reserved)",
         ratio(ours.get("peak_reserved_bytes"), other.get("peak_reserved_bytes")), 1.0, 1, False),
        ("plan honesty: host RSS above the baseline / planned host bytes, worst stage",
         max(host_against_plan(capped).values(), default=None) if capped else None, 1.0, 1, False),
    ]
    out = []
    for name, value, limit, unit, at_least in checks:
        met = None if value is None else value >= limit if at_least else value <= limit
        out.append({"target": name, "value": None if value is None else value / unit, "limit": limit / unit,
                    "met": met})
    return out


# ---- the run ----------------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json, cuda-tests.xml")
    p.add_argument("--cache", help="where the weights are built (default: /tmp/zimage-gpu-check, smoke: OUT/cache)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code paths on the CPU with the demo model")
    p.add_argument("--deadline", type=float, default=DEADLINE, help="seconds for all parts")
    args = p.parse_args()
    mode = SMOKE if args.cpu_smoke else GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache or (out / "cache" if args.cpu_smoke else "/tmp/zimage-gpu-check"))
    rows_file = out / "gpu_check.json"
    rows_file.unlink(missing_ok=True)
    start = time.perf_counter()
    left = lambda: args.deadline - (time.perf_counter() - start)  # noqa: E731
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": mode.device,
            "command": "benchmarks/gpu_check.sh" + (" --cpu-smoke" if args.cpu_smoke else "")}
    status: dict[str, str] = {}
    lock = threading.Lock()  # the weights' thread records too

    def record(part: str, rows: list[dict], began: float) -> None:
        rows = [{**r, **info} for r in rows]
        errors = [r["error"] for r in rows if "error" in r]
        took = f"{time.perf_counter() - began:.0f} s, ended at {time.perf_counter() - start:.0f} s"
        with lock:
            append_rows(rows_file, rows)  # as they come: a later failure keeps what was measured
            status[part] = (f"FAILED ({took}): " + "; ".join(errors)) if errors else f"ok ({took})"

    def soft(part: str, fn: Callable[[], list[dict]]) -> None:
        began = time.perf_counter()
        try:
            record(part, fn(), began)
        except Exception as e:
            traceback.print_exc()
            record(part, [{"component": "gpu_error", "part": part, "error": f"{type(e).__name__}: {e}"}], began)

    # The weights build on the CPU (and quantize on the GPU) while the CUDA tests run.
    built: dict = {}
    builder = threading.Thread(target=lambda: soft("weights", lambda: [built.setdefault("row", build_weights(
        mode, cache))]), daemon=True)
    builder.start()
    soft("tests", lambda: [cuda_tests(mode, out, min(TESTS_LIMIT, left()))])
    builder.join(max(0.0, left() - 3 * RUN_MIN))
    if builder.is_alive():
        record("weights", [{"component": "gpu_error", "part": "weights", "error": "not built in time"}], start)
    if "row" in built:
        soft("runs", lambda: runs(mode, built["row"], left))
        run_rows = [r for r in _read(rows_file) if r["component"] == "gpu_run"]
        soft("targets", lambda: [{"component": "gpu_targets", "targets": targets(run_rows)}])
    print(summary(_read(rows_file), status, time.perf_counter() - start))
    return 0 if all(s.startswith("ok") for s in status.values()) else 1


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def summary(rows: list[dict], status: dict[str, str], seconds: float) -> str:
    """The closing lines (the `run` tool returns the end of the output)."""
    lines = ["", f"== gpu_check: {seconds:.0f} s"]
    lines += [f"part {part}: {s}" for part, s in status.items()]
    for r in rows:
        if r["component"] == "gpu_tests":
            lines.append(f"cuda tests: {r['passed']} passed, {r['failures']} failed, {r['errors']} errors, "
                         f"{r['skipped']} skipped" + (f" ({', '.join(r['failed_tests'])})" if r["failed_tests"]
                                                      else ""))
        elif r["component"] == "gpu_run" and "error" not in r:
            d = dit_figures(r)
            lines.append(f"{r['impl']} {r['settings']}: {d['step_seconds']:.3f} s/step, DiT peak allocated "
                         f"{d['peak_device_bytes'] / GIB:.2f} GiB, reserved {d['peak_reserved_bytes'] / GIB:.2f} "
                         f"GiB, host peak {r['host_peak_bytes'] / GIB:.2f} GiB")
        elif r["component"] == "gpu_targets":
            for t in r["targets"]:
                value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
                met = {True: "PASS", False: "FAIL", None: "----"}[t["met"]]
                lines.append(f"{met} {t['target']}: {value} (limit {t['limit']:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
