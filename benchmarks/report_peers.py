"""BENCHMARKS.md tables of the CPU comparisons added with issues 13-15 (report.py renders them): stable-diffusion.cpp
beside ours, the GEMM roofs, INT8 against BF16, and the ControlNet's step cost and memory plan."""

from __future__ import annotations

from zimage_lite.runtime.units import gib


def gib_cell(n: float | None) -> str:
    """A GiB table cell; empty where nothing was measured."""
    return gib(n, unit=False) if n else ""


def sdcpp_table(rows: list[dict]) -> list[str]:
    """Whole images, ours and sd.cpp's in run order; each of ours against sd.cpp's on the same DiT file and round,
    or on its Q8_0 file for a format sd.cpp cannot run on the CPU (INT8 ConvRot), marked so."""
    peer = {(r["quant"], r["round"]): r for r in rows if r["impl"] == "stable-diffusion.cpp"}
    steps = rows[0]["steps"]
    roofs = [f"{r['int8_roof_gflops']:.0f}" for r in rows if r.get("int8_roof_gflops")]
    out = ["| round | impl | DiT file (+ text encoder, where named) | compute | load s | text encoder s | s/step | "
           "VAE s | "
           f"whole image s ({steps} step{'s' * (steps > 1)}) | est. 8 steps s | peak RSS GiB | DiT GFLOP/s | "
           + "step ÷ (FLOPs ÷ int8 roof) | " * bool(roofs) + "÷ sd.cpp: text encoder, step, VAE, whole, RSS |",
           "|---:|---|---|---|" + "---:|" * (8 + bool(roofs)) + "---|"]
    for r in rows:
        step = sum(r["step_times"]) / len(r["step_times"])
        whole = r["total_seconds"]
        other = None if r["impl"] == "stable-diffusion.cpp" else (peer.get((r["quant"], r["round"]))
                                                                  or peer.get(("Q8_0", r["round"])))
        ratios, rate = "", f"{r['dit_step_flops'] / step / 1e9:.0f}" if r.get("dit_step_flops") else ""
        bound = (f"{step * r['int8_roof_gflops'] * 1e9 / r['dit_step_flops']:.2f} | "
                 if r.get("dit_step_flops") and r.get("int8_roof_gflops") else " | ") if roofs else ""
        if other:
            pairs = [(r["text_encoder_seconds"], other["text_encoder_seconds"]),
                     (step, sum(other["step_times"]) / len(other["step_times"])),
                     (r["vae_seconds"], other["vae_seconds"]), (whole, other["total_seconds"]),
                     (r["peak_rss_bytes"], other["peak_rss_bytes"])]
            ratios = ", ".join(f"{a / b:.2f}" if a else "n/a" for a, b in pairs)  # n/a: a figure not measured
            ratios += f" (vs its {other['quant']})" if other["quant"] != r["quant"] else ""
        files = r["dit_file"] + (f" + {r['text_encoder_file']}" if r.get("text_encoder_file") else "")
        mark = "*" if r["impl"] != "stable-diffusion.cpp" and not r.get("loads_apart") else ""
        out.append(f"| {r['round']} | {r['impl']} | {files} | {r['dtype']} | {r['load_seconds']:.0f} | "
                   f"{r['text_encoder_seconds']:.1f}{mark} | {step:.1f} | {r['vae_seconds']:.1f}{mark} | {whole:.0f} | "
                   f"{whole + (8 - steps) * step:.0f} | {gib_cell(r['peak_rss_bytes'])} | {rate} | {bound}"
                   f"{ratios} |")
    if any(r["impl"] != "stable-diffusion.cpp" and not r.get("loads_apart") for r in rows):
        out += ["", "\\*: placing the text encoder's (the VAE's) weights included, as our runs measured before "
                "benchmarks/sdcpp.py took it out (`Event.load_seconds`); sd.cpp's log times each stage without "
                "loading, which it does first for every model."]
    loads = [f"{r['load_average_before']:.1f}-{r['load_average_after']:.1f}" for r in rows
             if "load_average_before" in r]
    if loads:
        out += ["", f"Load average (1 min) before-after each run, in order: {', '.join(loads)}."]
    flops = sorted({r["dit_step_flops"] for r in rows if r.get("dit_step_flops")})
    if flops:
        out += ["", f"DiT GFLOP/s: one forward's FLOPs ({', '.join(f'{f / 1e12:.2f}' for f in flops)} TFLOP: the "
                "blocks' Linears at 2 per weight per token and attention's two S x S x dim products, "
                "benchmarks/sdcpp.py `dit_step_flops`) over the measured s/step; compare with the GEMM roofs "
                "below."]
    if roofs:
        out += ["", "step ÷ (FLOPs ÷ int8 roof): s/step over the time those FLOPs take at the machine's int8 roof, the "
                "best int8 route of benchmarks/roofs.py on its 1088 x 3840 x 10240 product, measured by the benchmark "
                f"just before it starts each int8 run ({', '.join(roofs)} GFLOP/s, in order)."]
    qwen = sorted({r["tokens"] for r in rows if r.get("tokens") and r.get("tokenizer") == "qwen"})
    small = sorted({r["tokens"] for r in rows if r.get("tokens") and r.get("tokenizer") != "qwen"})
    if qwen:
        out += ["", f"Caption tokens, ours: {', '.join(map(str, qwen))}, tokenized with Qwen's own merges rebuilt "
                "from sd.cpp's source (benchmarks/qwen_tokenizer.py) and the same chat template: what sd.cpp "
                "encodes (it does not log the count)."]
    if small:  # the random checkpoint's tokenizer is small: more tokens than the real vocabulary gives
        out += ["", f"Caption tokens, ours: {', '.join(map(str, small))} (the random checkpoint's small "
                "tokenizer). sd.cpp tokenizes the same prompt with its built-in Qwen vocabulary and does not log the "
                "count: fewer tokens, so its text encoder (and, slightly, its DiT) does less work than ours here."]
    return out


def roofs_table(rows: list[dict], shape_label: str = "M x K x N") -> list[str]:
    fp32 = next((r["gflops"] for r in rows if r["route"].startswith("fp32") and "gflops" in r), None)
    out = [f"| route | {shape_label} | threads | GFLOP/s (best) | GFLOP/s (median) | ÷ fp32 |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        shape = " x ".join(map(str, r["shape"]))
        if "error" in r:
            out.append(f"| {r['route']} | {shape} | {r['threads']} | not available: {r['error'][:120]} | | |")
            continue
        ratio = f"{r['gflops'] / fp32:.2f}" if fp32 else ""
        out.append(f"| {r['route']} | {shape} | {r['threads']} | {r['gflops']:.0f} | {r['gflops_median']:.0f} | "
                   f"{ratio} |")
    return out


def control_table(rows: list[dict]) -> list[str]:
    out = ["| ControlNet blocks | DiT | forwards kept | s/forward without | s/forward with | with ÷ without |",
           "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        m = r["mean_step_seconds"]
        out.append(f"| {r['blocks']} | {r['quant']}, {r['dtype']} | {len(r['step_seconds']['none']) - 1} | "
                   f"{m['none']:.1f} | {m['control']:.1f} | {r['ratio']:.2f} |")
    return out


def control_plan_table(rows: list[dict]) -> list[str]:
    out = ["| release | control blocks | ControlNet GiB | DiT resident / streamed | ControlNet resident / streamed | "
           "device peak GiB | host peak GiB | copied per step GiB |", "|---|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        d, c = r["dit"], r["controlnet"]
        out.append(f"| {r['release']} | {r['control_blocks']} | {gib_cell(r['control_bytes'])} | {d['resident']} / "
                   f"{d['streamed']} | {c['resident']} / {c['streamed']} | {gib_cell(r['peak_device'])} | "
                   f"{gib_cell(r['peak_host'])} | {gib_cell(r['transfer_per_step'])} |")
    return out


def int8_quality_table(rows: list[dict]) -> list[str]:
    out = ["| DiT file | relative error vs BF16 (one forward) | step s | run s (load included) |",
           "|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['dit']} | {r['rel_err_vs_bf16']:.4f} | {r['step_s']:.1f} | {r['wall_s']:.0f} |")
    return out
