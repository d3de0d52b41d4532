"""Our whole pipeline on full-size random weights, prompt to image, each stage's measured peaks against the plan.

    python benchmarks/pipeline_memory.py --quant Q4_K_M --width 512 --steps 2 \
        --json benchmarks/results/cpu-pipeline.json

One fresh process per run (benchmarks/run.py's `pipeline` worker): per stage its host peak RSS (and on a GPU its
allocated and reserved peaks) beside what `zimage-lite plan` says the stage holds. The DiT and the text encoder are
both read from `--quant` GGUF files written once by our `zimage-lite quantize` (benchmarks/run.py's cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import DEFAULT_CACHE, append_rows, child, machine, model_folder, weights_file  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="turbo", choices=["demo", "turbo"])
    p.add_argument("--quant", default="Q4_K_M", help="the DiT's and the text encoder's GGUF recipe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ram", help="--ram for the run (default: what the machine has free)")
    p.add_argument("--vram", help="--vram for the run, on a GPU")
    p.add_argument("--int8-compute", action="store_true", help="run with --int8-compute (GGUF linears to int8)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--json", help="append the row to this JSON file (a list)")
    args = p.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.preset, cache)
    files = {c: str(weights_file(folder, args.quant, cache, c)[0]) for c in ("dit", "text-encoder")}
    spec = {"impl": "pipeline", "preset": args.preset, "model": str(folder), "weights": files["dit"],
            "text_encoder": files["text-encoder"],
            "device": args.device, "dtype": args.dtype, "width": args.width, "height": args.height or args.width,
            "steps": args.steps, "ram": args.ram, "vram": args.vram, "int8_compute": args.int8_compute}
    row = {**{k: v for k, v in spec.items() if k != "model"}, "component": "pipeline", "impl": "zimage-lite",
           "quant": args.quant, "settings": " ".join([f"--ram {args.ram}" if args.ram else "default budget"]
                                 + ["--int8-compute"] * args.int8_compute),
           **child([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--worker", json.dumps(spec)]),
           "command": f"python benchmarks/pipeline_memory.py {' '.join(sys.argv[1:])}",
           "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        append_rows(Path(args.json), [row])
    print(row["plan_text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
