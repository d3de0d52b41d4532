"""The benchmark harness's smoke run (`--preset demo --steps 1`) and the report generated from its rows."""

from __future__ import annotations

import json
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
