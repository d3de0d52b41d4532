"""Prompt-enhancer speed on the full-size text encoder: prefill and generation tokens/s, load time, peak RSS.

    python benchmarks/enhance_speed.py --text-encoder .bench_cache/turbo-text-encoder-Q4_K_M.gguf \
        [--llama-bench PATH] --json benchmarks/results/cpu-enhance.json

--llama-bench adds llama.cpp as a peer on the same file. Its build (once, into the cache; never in CI):
`pip download --no-deps --no-binary :all: llama-cpp-python`, unpack, then in its vendor/llama.cpp
`cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target
llama-bench -j 2`; the tool is build/bin/llama-bench.

The model is the benchmark cache's random full-size turbo folder (run.py builds it) with the given text encoder file.
Random weights never end their answer, so each run generates exactly --new tokens (no stop token). The prompt is our
system prompt and a short request, cut to --prompt-tokens (the cache's small tokenizer spends about three times the
tokens Qwen's would on the same text; ~280 with Qwen's). Two modes, each in its own child process (its own peak
RSS): `unpacked`, the decoder layers converted once for decoding (what the enhancer does on the CPU when they fit
the budget), and `packed`, every quantized weight dequantized again at each token (when they do not).
--decode-route picks how `unpacked` holds the layers (quant/decode_linear.py): "packed" (int4/int8 weight-only
kernels, the CPU default) or "float" (dequantized to the compute dtype); --head how the output head is held, int8
rows or a copy in the compute dtype (the plan's by default: int8 rows with the packed route when the table is stored
quantized); each row records both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import DEFAULT_CACHE, child, emit, machine, model_folder  # noqa: E402
from zimage_lite.quant.decode_linear import ROUTE_ENV, decode_route  # noqa: E402

REQUEST = "a cat on a chair by the window, morning"
MODES = ("unpacked", "packed")


def worker(spec: dict) -> dict:
    import zimage_lite
    from zimage_lite.enhance import encode_chat, generate, hold_for_decoding
    from zimage_lite.enhance_options import CONTEXT, system_prompt
    from zimage_lite.models.qwen3 import Qwen3Encoder
    from zimage_lite.runtime.placement import place
    from zimage_lite.weights.components import open_language_model

    if spec.get("decode_route"):
        os.environ[ROUTE_ENV] = spec["decode_route"]
    te = Path(spec["text_encoder"])
    pipe = zimage_lite.load(spec["model"], text_encoder=te, device="cpu", dtype=spec["dtype"])
    cfg, source = open_language_model(te)
    ids = encode_chat(pipe.tokenizer.tokenizer, system_prompt(), REQUEST, CONTEXT)[0][:spec["prompt_tokens"]]
    stage = pipe.enhance_stage(cfg, source, len(ids) + spec["new"])
    if spec["mode"] == "unpacked" and not stage.unpacked:
        raise SystemExit("the plan does not hold the layers converted for decoding under this budget")
    head = {"copy": spec["dtype"]}.get(spec.get("head"), spec.get("head")) or stage.head
    stage = replace(stage, unpacked=spec["mode"] == "unpacked", head=head)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Qwen3Encoder(cfg, lm=True)
    model = place(model, source, stage, pipe.device, pipe.dtype, "text encoder (enhancer)")
    hold_for_decoding(model, stage, pipe.dtype, te)
    model.head  # noqa: B018  (made once, before timing: loading, not prefill)
    load = time.perf_counter() - t0
    new, prefill, decode = generate(model, ids, spec["new"], set(), pipe.device, pipe.dtype)
    with open("/proc/self/status") as f:
        hwm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    return {"prompt_tokens": len(ids), "new_tokens": len(new), "load_seconds": load,
            "prefill_seconds": prefill, "prefill_tokens_per_second": len(ids) / prefill,
            "generate_seconds": decode, "tokens_per_second": (len(new) - 1) / decode,
            "head": stage.head, "resident_blocks": len(stage.resident), "streamed_blocks": len(stage.streamed),
            "host_peak_bytes": hwm}


def llama_bench(tool: Path, text_encoder: Path, prompt: int, new: int) -> dict:
    """llama.cpp on the same file, 2 threads, each test twice: the prompt's prefill (-p), then `new` tokens generated
    with `prompt` tokens already in the context (-d), as ours are; peak RSS of the larger run."""
    def run(*test: str) -> tuple[dict, int]:
        cmd = [str(tool), "-m", str(text_encoder), "-t", "2", "-r", "2", "-o", "json", *test]
        out = child(cmd, keep_stdout=True)
        return json.loads(out["stdout"])[0], out.get("peak_rss_bytes", 0)

    (pp, pp_rss), (tg, tg_rss) = run("-p", str(prompt), "-n", "0"), run("-p", "0", "-n", str(new), "-d", str(prompt))
    where = next((part for part in tool.parts if part.startswith("llama_cpp_python-")), str(tool))
    return {"impl": "llama.cpp", "version": f"llama.cpp {pp['build_commit']} ({where})", "repack": pp["repack"],
            "prompt_tokens": prompt, "prefill_tokens_per_second": pp["avg_ts"], "new_tokens": new,
            "tokens_per_second": tg["avg_ts"], "peak_rss_bytes": max(pp_rss, tg_rss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-encoder", type=Path, default=DEFAULT_CACHE / "turbo-text-encoder-Q4_K_M.gguf")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--preset", default="turbo", help="turbo (default) or demo (a seconds-long smoke run)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new", type=int, default=32, help="tokens generated in the unpacked mode (packed: a quarter)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--decode-route", choices=("packed", "float"), help="default: the CPU's (decode_route)")
    p.add_argument("--head", choices=("int8", "copy"),
                   help="how the output head is held: int8 rows or a copy in the compute dtype (default: the plan's, "
                        "enhance_plan.head_form)")
    p.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench (built as the module docstring says): "
                   "a row for it on the same file, before ours")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.llama_bench:
        row = {"component": "enhance", "mode": "llama.cpp", "quant": args.text_encoder.name, "dtype": "ggml",
               "load_average": os.getloadavg(), **llama_bench(args.llama_bench, args.text_encoder,
                                                               args.prompt_tokens, args.new),
               "command": " ".join(sys.argv), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
        emit(row, args.json)
    for mode in filter(None, args.modes.split(",")):
        spec = {"mode": mode, "model": str(model_folder(args.preset, args.cache)), "dtype": args.dtype,
                "text_encoder": str(args.text_encoder.resolve()), "prompt_tokens": args.prompt_tokens,
                "new": args.new if mode == "unpacked" else max(2, args.new // 4),
                "decode_route": args.decode_route or decode_route("cpu"), "head": args.head}
        result = child([sys.executable, __file__, "--worker", json.dumps(spec)])
        row = {"component": "enhance", "mode": mode, "decode_route": spec["decode_route"],
               "quant": args.text_encoder.name, "dtype": args.dtype, "load_average": os.getloadavg(),
               **result, "command": " ".join(sys.argv), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
        emit(row, args.json)


if __name__ == "__main__":
    main()
