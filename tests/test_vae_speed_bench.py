"""benchmarks/vae_speed.py's smoke run on the demo VAE (a cache folder whose turbo/ is the demo model) and the table
benchmarks/report.py renders from its rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from zimage_lite.demo import demo_path

ROOT = Path(__file__).resolve().parent.parent


def _demo_decoder_flops(h: int, w: int) -> float:
    """The demo decoder's FLOPs (channels 32, 32, 16, 8 up the path, 2 resnets a level), by hand."""
    def conv(cin, cout, n, k=3):
        return 2 * cin * cout * k * k * n

    n = h * w
    total = conv(16, 32, n) + 4 * conv(32, 32, n) + 4 * 2 * n * 32 * 32 + 4 * n * n * 32  # conv_in, mid
    for cin, cout in ((32, 32), (32, 32), (32, 16), (16, 8)):
        total += conv(cin, cout, n) + 3 * conv(cout, cout, n) + (conv(cin, cout, n, 1) if cin != cout else 0)
        if cout != 8:
            n *= 4
            total += conv(cout, cout, n)  # the upsampling's conv on the 2x map
    return total + conv(8, 3, n)


def test_vae_speed_rows_and_report(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "turbo").symlink_to(demo_path())
    out = tmp_path / "vae.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vae_speed.py"), "--cache", str(tmp_path / "cache"),
                    "--width", "64", "--height", "48", "--dtypes", "fp32", "--json", str(out)], check=True,
                   capture_output=True)
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["upsampled", "phases NCHW", "phases"]
    for r in rows:
        assert len(r["seconds"]) == 2 and r["flops"] > 0 and r["conv_roof_gflops"] > 0 and r["ops_seconds"]["conv"] > 0
    assert rows[0]["flops"] == rows[1]["flops"] == rows[2]["flops"] == _demo_decoder_flops(6, 8)
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert "## VAE decode, full-size FLUX VAE, cpu, 64x48" in report and "| fp32 | phases |" in report


def test_vae_speed_encode_rows_and_report(tmp_path):
    """--encode: the encoder on NCHW maps and on the runtime's, the same FLOPs, rendered as an encode table."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "turbo").symlink_to(demo_path())
    out = tmp_path / "vae.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vae_speed.py"), "--cache", str(tmp_path / "cache"),
                    "--width", "64", "--height", "48", "--dtypes", "fp32", "--encode", "--json", str(out)],
                   check=True, capture_output=True)
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["encode NCHW", "encode"]
    assert rows[0]["flops"] == rows[1]["flops"] > 0 and all(len(r["seconds"]) == 2 for r in rows)
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert "## VAE encode, full-size FLUX VAE, cpu, 64x48" in report and "| fp32 | encode NCHW |" in report
    assert "| 1.000 |" in report.split("| fp32 | encode NCHW |")[1].splitlines()[0]  # the first variant's ratio
