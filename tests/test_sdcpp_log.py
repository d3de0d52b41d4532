"""benchmarks/sdcpp.py's reading of sd-cli's log, and the report's tables for its rows and the GEMM roofs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import render  # noqa: E402
from benchmarks.sdcpp import labelled_files, parse_runs, parse_sdcpp_log  # noqa: E402
from zimage_lite.models.layers import CPU_BF16_ROWS  # noqa: E402

# The tail of sd-cli's stdout (stable-diffusion-cpp-python 0.4.7's vendored sd.cpp, Z-Image Turbo Q4_K_M, 256x256,
# 2 steps), as captured: progress lines rewritten with carriage returns and an erase-line escape.
LOG = (
    "\r  |=======================================>          | 863/1095 - 356.29MB/s\x1b[K"
    "\r  |==================================================| 1095/1095 - 350.46MB/s\x1b[K\n"
    "[INFO ] model.cpp:993  - loading tensors completed, taking 20.61s (process: 0.00s, read: 17.10s, memcpy: "
    "0.00s, convert: 2.56s, copy_to_backend: 0.00s)\n"
    "[INFO ] stable-diffusion.cpp:942  - running in FLOW mode\n"
    "[INFO ] stable-diffusion.cpp:3367 - generate_image 256x256\n"
    "[INFO ] stable-diffusion.cpp:2814 - sampling using Euler method\n"
    "[INFO ] stable-diffusion.cpp:3168 - get_learned_condition completed, taking 17.97s\n"
    "[INFO ] stable-diffusion.cpp:3401 - generating image: 1/1 - seed 0\n"
    "\r  |=========================>                        | 1/2 - 128.25s/it\x1b[K"
    "\r  |==================================================| 2/2 - 129.78s/it\x1b[K\n"
    "[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 259.59s\n"
    "[INFO ] stable-diffusion.cpp:3450 - generating 1 latent images completed, taking 260.55s\n"
    "[INFO ] stable-diffusion.cpp:3208 - latent 1 decoded, taking 77.45s\n"
    "[INFO ] stable-diffusion.cpp:3212 - decode_first_stage completed, taking 77.45s\n"
    "[INFO ] stable-diffusion.cpp:3591 - generate_image completed in 356.35s\n"
)


def test_sdcpp_log_gives_stage_seconds_and_each_step_from_the_running_mean():
    r = parse_sdcpp_log(LOG)
    assert (r["load_seconds"], r["text_encoder_seconds"], r["vae_seconds"]) == (20.61, 17.97, 77.45)
    # the second step: 2 x 129.78 - 128.25; the progress line's two decimals: exact to ~0.01 s (tolerance 1e-6
    # covers float rounding only)
    assert r["step_times"] == pytest.approx([128.25, 131.31], abs=1e-6)
    # the running mean is rounded: the steps' sum misses the log's sampling total by 0.03 s here (tolerance 0.05)
    assert sum(r["step_times"]) == pytest.approx(r["sampling_seconds"], abs=0.05)
    # the loading bar's "MB/s" is no step; fast steps print it/s
    fast = LOG.replace("128.25s/it", "2.00it/s").replace("129.78s/it", "1.00it/s")
    assert parse_sdcpp_log(fast)["step_times"] == pytest.approx([0.5, 1.5])


def test_sdcpp_log_without_a_stage_says_which():
    with pytest.raises(ValueError, match="vae_seconds"):
        parse_sdcpp_log(LOG.replace("decode_first_stage", "decode"))


def test_runs_spec():
    assert parse_runs("ours:Q4_K_M:fp32,sdcpp:Q8_0,ours:int8-convrot") == [
        ("ours", "Q4_K_M", "fp32"), ("sdcpp", "Q8_0", "ggml"), ("ours", "int8-convrot", "fp32")]
    with pytest.raises(SystemExit, match="sdcpp:Q8_0:fp32"):
        parse_runs("sdcpp:Q8_0:fp32")


def test_labelled_files_are_checked_against_the_runs(tmp_path):
    """--dit / --te LABEL=FILE: a value without '=', a label no run has and a missing file each end the benchmark
    with one line, before anything runs."""
    f = tmp_path / "te.safetensors"
    f.write_bytes(b"x")
    assert labelled_files([f"int8-convrot={f}"], "--te", {"int8-convrot", "Q8_0"}) == {"int8-convrot": str(f)}
    for value, said in ((str(f), "expected LABEL=FILE"), (f"Q4_K_M={f}", "no run in --runs has the label 'Q4_K_M'"),
                        ("Q8_0=missing.gguf", "no file missing.gguf")):
        with pytest.raises(SystemExit, match=said):
            labelled_files([value], "--te", {"int8-convrot", "Q8_0"})


def _row(impl: str, quant: str, step: float, rss: int) -> dict:
    return {"component": "sdcpp", "impl": impl, "quant": quant, "dtype": "fp32", "round": 1, "steps": 2,
            "width": 512, "height": 512, "threads": 2, "dit_file": f"turbo-dit-{quant}.gguf", "load_seconds": 5.0,
            "text_encoder_seconds": 10.0, "step_times": [step, step], "vae_seconds": 20.0,
            "total_seconds": 35.0 + 2 * step, "peak_rss_bytes": rss, "command": "python benchmarks/sdcpp.py",
            "date": "2026-12-02", "note": "shared machine",
            "machine": {"cpu": "x", "flags": ["avx2"], "cores": 2, "gpu": None, "torch": "2"}}


def test_report_puts_ours_beside_sdcpp_on_the_same_file_and_the_roofs():
    ours = {**_row("zimage-lite", "Q4_K_M", 50.0, 2**30), "dit_step_flops": 5e12, "tokens": 44, "tokenizer": "qwen",
            "loads_apart": True}
    rows = [ours, _row("stable-diffusion.cpp", "Q4_K_M", 100.0, 2**31),
            {"component": "roofs", "route": "fp32 F.linear", "shape": [4, 8, 16], "threads": 2, "gflops": 100.0,
             "gflops_median": 90.0, "command": "python benchmarks/roofs.py", "date": "2026-12-02",
             "machine": {"cpu": "x", "cores": 2, "gpu": None, "torch": "2"}},
            {"component": "roofs", "route": "int8 x", "shape": [4, 8, 16], "threads": 2, "gflops": 250.0,
             "gflops_median": 240.0, "command": "python benchmarks/roofs.py", "date": "2026-12-02",
             "machine": {"cpu": "x", "cores": 2, "gpu": None, "torch": "2"}}]
    md = render(rows)
    assert "## stable-diffusion.cpp beside ours: whole images, cpu, 512x512, 2 step(s), 2 threads" in md
    assert "Note: shared machine" in md
    # ours: whole 135 s, est. 8 steps 135 + 6 x 50, 5 TFLOP in 50 s; against sd.cpp: text encoder 1, step 0.5, VAE 1,
    # whole 135/235
    assert "| 1 | zimage-lite | turbo-dit-Q4_K_M.gguf | fp32 | 5 | 10.0 | 50.0 | 20.0 | 135 | 435 | 1.00 | 100 | " \
           "1.00, 0.50, 1.00, 0.57, 0.50 |" in md
    assert "one forward's FLOPs (5.00 TFLOP" in md and "Caption tokens, ours: 44, tokenized with Qwen's own" in md
    assert "| int8 x | 4 x 8 x 16 | 2 | 250 | 240 | 2.50 |" in md
    # a format sd.cpp cannot run on the CPU is set beside sd.cpp's Q8_0 and says so
    # with its int8 roof measured before it: 5 TFLOP at 250 GFLOP/s take 20 s, the step 25 s
    convrot = {**_row("zimage-lite", "int8-convrot", 25.0, 2**30), "dit_file": "c.safetensors",
               "dit_step_flops": 5e12, "int8_roof_gflops": 250.0}
    md = render([convrot, _row("stable-diffusion.cpp", "Q8_0", 100.0, 2**31)])
    assert "| 1 | zimage-lite | c.safetensors | fp32 | 5 | 10.0* | 25.0 | 20.0* | 85 | 235 | 1.00 | 200 | 1.25 | " \
           "1.00, 0.25, 1.00, 0.36, 0.50 (vs its Q8_0) |" in md
    assert "measured by the benchmark just before it starts each int8 run (250 GFLOP/s, in order)" in md
    assert "| DiT GFLOP/s | step ÷ (FLOPs ÷ int8 roof) | ÷ sd.cpp" in md
    assert "| turbo-dit-Q8_0.gguf | fp32 | 5 | 10.0 | 100.0 | 20.0 | 235 | 835 | 2.00 |  |  |  |" in md  # a cell each
    assert "\\*: placing the text encoder's (the VAE's) weights included" in md  # a row measured before the split


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="the harness measures peak RSS with GNU time")
def test_our_run_row_has_stage_times_and_the_whole_runs_peak(tmp_path):
    """Ours alone on the demo model (no sd-cli needed): the row a ConvRot or any other DiT file of ours gets."""
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sdcpp.py"), "--preset", "demo", "--width", "64",
                    "--steps", "2", "--runs", "ours:Q4_K_M:fp32", "--cache", str(tmp_path / "cache"), "--json",
                    str(out)], check=True, capture_output=True)
    [row] = json.loads(out.read_text())
    assert row["impl"] == "zimage-lite" and len(row["step_times"]) == 2 and row["text_encoder_seconds"] > 0
    assert row["vae_seconds"] > 0 and row["tokens"] > 0 and row["total_seconds"] > row["load_seconds"]
    # the run's peak is not the last stage's: the DiT and text encoder weights (GGUF, mapped) were resident before
    assert row["peak_rss_bytes"] >= max(row["stage_peak_bytes"].values()) > 50 * 2**20


def test_dit_step_flops_counts_the_blocks_linears_and_attention():
    """The FLOPs behind the report's DiT GFLOP/s: torch's FLOP counter on one demo step sees the blocks' Linears
    (matmuls); the formula's remainder is attention's 4 x S^2 x dim per layer, restated here (the CPU's SDPA kernel
    is not counted by torch)."""
    import re

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import zimage_lite
    from benchmarks.sdcpp import dit_step_flops

    pipe = zimage_lite.load("demo", device="cpu", dtype="fp32")
    with FlopCounterMode(display=False) as counter:
        events = list(pipe.generate("a lighthouse on a cliff at dusk", width=256, height=256, steps=1, seed=0,
                                    cfg=0.0))
    tokens = next(e.info["tokens"] for e in events if e.stage == "encoded")
    blocks = re.compile(r"ZImageDiT\.(layers|noise_refiner|context_refiner)\.\d+")
    linear = sum(v.get(torch.ops.aten.mm, 0) for k, v in counter.get_flop_counts().items() if blocks.fullmatch(k))
    cfg, pad = pipe.dit_config, 32
    image, text = (256 // 16) ** 2, -(-tokens // pad) * pad
    attention = 4 * cfg.dim * (cfg.n_layers * (image + text) ** 2 + cfg.n_refiner_layers * (image ** 2 + text ** 2))
    assert linear > 0 and dit_step_flops(cfg, (256, 256), tokens) == linear + attention


def test_our_stage_seconds_say_which_part_placed_the_weights(monkeypatch):
    """sd.cpp's log times its text encoder and VAE without loading them (it loads every model first); ours places
    each stage's weights inside the stage: `Event.load_seconds` says how much of `seconds` that was, and
    benchmarks/sdcpp.py counts it as loading. A placement slowed by 0.5 s shows up there and nowhere else."""
    import time

    import zimage_lite

    pipe = zimage_lite.load("demo", device="cpu", dtype="fp32")
    load = pipe._load

    def slow(which):
        if which not in pipe._models:
            time.sleep(0.5)
        return load(which)

    monkeypatch.setattr(pipe, "_load", slow)
    events = {e.stage: e for e in pipe.generate("a fox", width=128, height=128, steps=1, seed=0)}
    for stage in ("encoded", "decoded"):
        e = events[stage]
        assert 0.5 <= e.load_seconds < e.seconds and e.seconds - e.load_seconds < 0.5, (stage, e)


def test_int8_roof_is_the_best_int8_route_now(monkeypatch):
    """sdcpp.py's same-run roof: the fastest of roofs.py's int8 routes (here calls that sleep 2 and 20 ms; a float
    route, faster still, is not one), its GFLOP/s from its best call."""
    import time

    import torch

    from benchmarks import roofs

    def sleeper(seconds):
        return lambda: lambda: time.sleep(seconds)

    monkeypatch.setattr(roofs, "routes", lambda m, k, n: {"fp32 F.linear": sleeper(0.0), "int8 slow": sleeper(0.02),
                                                         "int8 fast": sleeper(0.002)})
    roof = roofs.int8_roof(torch.get_num_threads(), 2, 1.0, shape=(10, 10, 10))  # it sets the count: the suite's
    assert roof["int8_roof_route"] == "int8 fast"
    assert 2 * 1000 / 0.004 / 1e9 < roof["int8_roof_gflops"] <= 2 * 1000 / 0.002 / 1e9


def test_roofs_measure_attention_beside_the_gemms_and_the_report_shows_them():
    """roofs.py's rows on tiny shapes: the GEMM routes as "roofs", the attention routes (SDPA fp32 and bf16, the
    CPU bf16 route) as "attention", each with 4 x heads x tokens^2 x dim over its best call; the report titles the
    attention table by its shape."""
    import torch

    from benchmarks.roofs import measure

    threads = torch.get_num_threads()  # measure sets the thread count: the suite's own
    rows = measure(threads, 2, 1.0, shape=(8, 32, 16), attention=(2, 40, 16))
    attention = [r for r in rows if r["component"] == "attention"]
    assert [r["route"] for r in attention] == ["fp32 SDPA", "bf16 SDPA", f"bf16 matmuls per head, {CPU_BF16_ROWS} "
                                               "query rows (layers._cpu_bf16_attention)"]
    assert {r["component"] for r in rows} == {"roofs", "attention"} and len(rows) - len(attention) >= 2
    for r in attention:
        assert r["shape"] == [2, 40, 16] and r["gflops"] == pytest.approx(4 * 2 * 40 * 40 * 16 / r["seconds"][0] / 1e9)
    info = {"command": "python benchmarks/roofs.py", "date": "2026-12-04",
            "machine": {"cpu": "x", "cores": 2, "gpu": None, "torch": "2"}}
    md = render([{**info, **r} for r in rows if "gflops" in r])
    assert "## Attention on the CPU: 2 heads x 40 tokens x 16 per head" in md
    assert "| route | heads x tokens x dim | threads |" in md and f"| fp32 SDPA | 2 x 40 x 16 | {threads} |" in md
