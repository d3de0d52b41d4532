"""The benchmark harness's smoke run (`--preset demo --steps 1`) and the report generated from its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"component", "quant", "device", "width", "height", "steps", "step_seconds", "total_seconds",
          "peak_rss_bytes", "peak_device_bytes", "load_seconds", "machine"}


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="the harness measures peak RSS with GNU time")
def test_demo_smoke_run_writes_rows_and_report(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--preset", "demo", "--steps", "1",
                    "--cache", str(tmp_path / "cache"), "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert FIELDS <= set(row) and row["impl"] == "zimage-lite" and row["component"] == "dit"
    assert row["step_seconds"] > 0 and row["peak_rss_bytes"] > 50 * 2**20
    assert {"cpu", "cores", "gpu", "torch"} <= set(row["machine"])
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert "## DiT, cpu, 64x64, 1 step(s)" in report and "python benchmarks/run.py --preset demo" in report


def test_pipeline_memory_rows_put_each_stage_beside_its_plan(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_memory.py"), "--preset", "demo", "--width",
                    "64", "--steps", "1", "--dtype", "fp32", "--cache", str(tmp_path / "cache"), "--json", str(out)],
                   check=True, capture_output=True)
    [row] = json.loads(out.read_text())
    assert row["component"] == "pipeline" and Path(row["weights"]).suffix == Path(row["text_encoder"]).suffix == ".gguf"
    assert [e["stage"] for e in row["events"]] == ["encoded", "step", "decoded"]
    assert set(row["plan"]) == {"text_encoder", "dit", "vae"} and row["baseline_rss_bytes"] > 0
    if Path("/proc/self/smaps").exists():  # running the stages' kernels pages library code in; the heap is there
        assert row["events"][-1]["code_rss_bytes"] > row["baseline_code_rss_bytes"] > 0
        assert min(e["heap_rss_bytes"] for e in row["events"]) > 0
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert "## Whole pipeline per stage against the plan: demo, DiT and text encoder Q4_K_M, cpu, 64x64" in report
    stages = [ln.split("|") for ln in report.splitlines() if ln.startswith("| default budget |")]
    assert len(stages) == 3  # one per stage, with the code and heap growth where /proc tells them
    assert all(cell.strip().lstrip("-").isdigit() == Path("/proc/self/smaps").exists()
               for cells in stages for cell in cells[10:12])


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="the harness measures peak RSS with GNU time")
def test_interleaved_run_times_both_on_shared_weights(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--preset", "demo", "--steps", "1",
                    "--peers", "diffusers", "--interleaved", "3", "--cache", str(tmp_path / "cache"),
                    "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())
    assert [r["component"] for r in rows] == ["interleaved", "dit", "dit"]
    times = rows[0]["step_seconds"]
    assert set(times) == {"zimage-lite", "diffusers"} and all(len(t) == 3 and min(t) > 0 for t in times.values())
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert "interleaved" in report and "| zimage-lite | 3 |" in report and "| diffusers | 3 |" in report


def test_dequant_benchmark_rows_and_report(tmp_path):
    out = tmp_path / "dequant.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dequant.py"), "--types", "Q8_0,Q4_K", "--json",
                    str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())
    assert [r["quant"] for r in rows] == ["Q8_0", "Q4_K"] and all(r["whole_ms"] > 0 < r["runtime_ms"] for r in rows)
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert "## Dequantizing one 10240x3840 weight to bf16 on the CPU" in report and "| Q4_K |" in report


@pytest.mark.cuda
def test_cuda_marker_runs_only_with_a_gpu():
    """`@pytest.mark.cuda` alone skips a test where there is no GPU (tests/conftest.py), and `pytest -m cuda` selects
    it: benchmarks/gpu_check.sh runs the CUDA tests so. The CPU smoke run below collects this one."""
    import torch

    assert torch.cuda.is_available()


def test_gpu_check_cpu_smoke_runs_every_part_and_reports(tmp_path):
    """benchmarks/gpu_check.sh --cpu-smoke: the GPU acceptance script's code paths on the CPU with the demo model."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", str(out)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (out / "gpu_check.log").read_text()
    assert all(f"part {p}: ok" in log for p in ("tests", "weights", "runs", "targets")), log[-3000:]
    rows = json.loads((out / "gpu_check.json").read_text())
    by = {r["component"]: r for r in rows}
    assert by["gpu_tests"]["tests"] >= 1 and by["gpu_tests"]["skipped"] == by["gpu_tests"]["tests"]  # no GPU here
    assert by["gpu_weights"]["dit_bytes"] > 0 and by["gpu_weights"]["text_encoder_bytes"] > 0
    runs = {r["settings"]: r for r in rows if r["component"] == "gpu_run"}
    assert set(runs) == {"capped", "resident", "group offload"}
    for r in (runs["capped"], runs["resident"]):
        stages = [e["stage"] for e in r["events"]]
        assert stages.count("step") == 2 and stages[-1] == "decoded" and r["plan"]["dit"]["peak_bytes"] > 0
        assert all(e["host_peak_bytes"] > 50 * 2**20 for e in r["events"]) and r["baseline_rss_bytes"] > 50 * 2**20
    assert runs["capped"]["ram"] == "1GB" and "budget: --ram 1GB" in runs["capped"]["plan_text"]
    assert len(runs["group offload"]["step_times"]) == 2 and runs["group offload"]["offload"] == "group"
    assert all(t["met"] is not None for t in by["gpu_targets"]["targets"][:4])
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out / "gpu_check.json")],
                            check=True, capture_output=True, text=True).stdout
    for title in ("CUDA tests", "the weights", "DiT Q4_K_M, cpu, 64x64, 2 steps", "targets"):
        assert f"## GPU check: {title}" in report
    assert "| diffusers | group offload, block level |" in report and "| capped | step |" in report


def _run_row(settings: str, steps: list[float], reserved: list[float], host_planned: float | None = 0.6) -> dict:
    """A pipeline run row as benchmarks/run.py's worker writes it: reserved GiB per event (encode, steps, decode);
    1 GiB host peak in every stage over a 0.5 GiB baseline, against `host_planned` GiB in the DiT's plan."""
    stages = ["encoded"] + ["step"] * len(steps) + ["decoded"]
    events = [{"stage": s, "seconds": t, "wall_seconds": t, "peak_device_bytes": int(r * 2**30) - 2**20,
               "peak_reserved_bytes": int(r * 2**30), "host_peak_bytes": 2**30}
              for s, t, r in zip(stages, [1.0, *steps, 1.0], reserved, strict=True)]
    plan = {"dit": {"peak_bytes": 3 * 2**30, **({"host_bytes": int(host_planned * 2**30)} if host_planned else {})}}
    return {"component": "gpu_run", "impl": "zimage-lite", "settings": settings, "events": events, "plan": plan,
            "baseline_rss_bytes": 2**29}


def _diffusers_row(steps: list[float], reserved: float) -> dict:
    return {"component": "gpu_run", "impl": "diffusers", "settings": "group offload", "step_times": steps,
            "peak_device_bytes": int(reserved * 2**30) - 2**20, "peak_reserved_bytes": int(reserved * 2**30),
            "host_peak_bytes": 2**30, "load_seconds": 1.0}


def test_gpu_targets_pass_fail_and_unmeasured():
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check import targets

    # the first step (9 s: warm-up) never counts; steady capped 1.0 s/step
    resident = _run_row("resident", [9.0, 0.9, 0.9], [20.0] * 5)
    met = [t["met"] for t in targets([_run_row("capped", [9.0, 1.0, 1.0], [3.0, 3.5, 3.5, 3.5, 2.0]), resident,
                                      _diffusers_row([9.0, 3.1, 3.1], 3.6)])]
    assert met == [True] * 6
    # over 3.6 GiB in one stage only (decode); 1.43x resident; diffusers only 2.9x slower, at a lower peak; 0.5 GiB
    # above the baseline against 0.4 GiB planned
    checks = targets([_run_row("capped", [9.0, 1.0, 1.0], [3.0, 3.5, 3.5, 3.5, 3.7], 0.4),
                      _run_row("resident", [9.0, 0.7, 0.7], [20.0] * 5), _diffusers_row([9.0, 2.9, 2.9], 3.4)])
    assert [t["met"] for t in checks] == [False] * 6
    assert abs(checks[2]["value"] - 1.0 / 0.7) < 1e-9 and abs(checks[3]["value"] - 2.9) < 1e-9
    assert abs(checks[5]["value"] - 1.25) < 1e-6  # 0.4 GiB rounded to whole bytes
    # a run that failed measures nothing, nor does a plan without host figures: neither met nor missed
    failed = {**_diffusers_row([1.0], 1.0), "error": "out of memory"}
    unmeasured = targets([_run_row("capped", [9.0, 1.0, 1.0], [3.0] * 5, None), resident, failed])
    assert [t["met"] for t in unmeasured] == [True, True, True, None, None, None]


def test_lora_run_times_three_models_interleaved(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora.py"), "--preset", "demo", "--rank", "4",
                    "--rounds", "2", "--cache", str(tmp_path / "cache"), "--json", str(out)], check=True,
                   capture_output=True)
    [row] = json.loads(out.read_text())
    assert row["component"] == "lora" and row["quant"] == "Q4_K_M" and row["rank"] == 4
    assert set(row["step_seconds"]) == {"0", "1", "4"} and all(len(t) == 2 for t in row["step_seconds"].values())
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert "## LoRA side paths: the Q4_K_M DiT, cpu, 64x64, bf16 compute, random rank-4 LoRAs" in report
    assert len([ln for ln in report.splitlines() if ln.startswith("| 4 | 1 |")]) == 1
