"""What LoRA side paths cost: DiT steps with 0, 1 and 4 random rank-32 LoRAs, interleaved in one process.

    python benchmarks/lora.py --preset turbo --quant Q4_K_M --width 512 --height 512 --rounds 4 \
        --json benchmarks/results/cpu-lora.json

One child process holds three DiTs built from the same file (the packed weights are views of one memory map, so
they share memory): without LoRA, with one, with four. Each round runs one forward of each, in that order, so all
three see the same machine drift; the report drops the first round (one-time costs) and gives each count's mean step
and the cost per LoRA, (mean with n / mean without - 1) / n. The LoRAs are random, in the diffusers/PEFT form, in
bf16, on every linear of the DiT (the most a LoRA can touch: attention, FFN, adaLN of every block, the embedders
and the final layer); written once into the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import (  # noqa: E402
    CAPTION_TOKENS,
    DEFAULT_CACHE,
    DTYPES,
    child,
    emit,
    machine,
    model_folder,
    touch_weights,
    weights_file,
)

COUNTS = (0, 1, 4)  # LoRAs per model, in the order each round runs them


def lora_files(preset: str, rank: int, n: int, cache: Path) -> list[Path]:
    """n random LoRAs of `rank` on every linear of the `preset` DiT, written once into the cache."""
    from safetensors.torch import save_file
    from torch import nn

    from zimage_lite.config import PRESETS
    from zimage_lite.models.dit import ZImageDiT

    out = []
    for i in range(n):
        path = cache / f"lora-{preset}-r{rank}-{i}.safetensors"
        if not path.is_file():
            with torch.device("meta"):
                model = ZImageDiT(PRESETS[preset].dit)
            g = torch.Generator().manual_seed(i)
            state = {}
            for name, m in model.named_modules():
                if isinstance(m, nn.Linear):
                    a = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
                    state[f"transformer.{name}.lora_A.weight"] = a.bfloat16()
                    state[f"transformer.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g)
                                                                  * 0.01).bfloat16()
            tmp = path.with_suffix(".tmp")
            save_file(state, str(tmp))
            tmp.rename(path)
        out.append(path)
    return out


def worker(spec: dict) -> dict:
    """In the child: the three DiTs, `rounds` rounds of one forward each; step seconds per LoRA count."""
    from zimage_lite.loras import Loras
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.sampling import get_noise
    from zimage_lite.weights.components import open_dit
    from zimage_lite.weights.load import load_module

    dtype = DTYPES[spec["dtype"]]
    models = {}
    for n in COUNTS:
        cfg, src = open_dit(Path(spec["weights"]))
        with torch.device("meta"):
            model = ZImageDiT(cfg)
        if n:
            src = Loras.read([(p, 1.0) for p in spec["loras"][:n]], cfg).attach(model, src, dtype)
        models[n] = load_module(model, src, dtype, "cpu", "DiT")
        touch_weights(models[n])
    torch.manual_seed(0)
    latents = get_noise(0, 16, spec["height"], spec["width"]).to(dtype)
    cap = torch.randn(CAPTION_TOKENS, spec["cap_dim"]).to(dtype)
    times: dict[str, list[float]] = {str(n): [] for n in COUNTS}
    with torch.inference_mode():
        for i in range(spec["rounds"]):
            for n, model in models.items():
                t = time.perf_counter()
                model(latents, torch.tensor([0.1 + 0.1 * i]), [cap])
                times[str(n)].append(time.perf_counter() - t)
    return {"step_seconds": times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", choices=["demo", "turbo"])
    p.add_argument("--quant", default="Q4_K_M", help="the DiT's weight format")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="forwards of each model (the first is dropped)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--json", help="append the row to this JSON file (a list)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from zimage_lite.config import PRESETS

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.preset, cache)
    weights, _ = weights_file(folder, args.quant, cache)
    width = args.width or (64 if args.preset == "demo" else 512)
    spec = {"device": "cpu", "width": width, "height": args.height or width, "dtype": args.dtype,
            "quant": args.quant, "rank": args.rank, "rounds": args.rounds, "weights": str(weights),
            "loras": [str(f) for f in lora_files(args.preset, args.rank, max(COUNTS), cache)],
            "cap_dim": PRESETS[args.preset].dit.cap_feat_dim}
    print(f"measuring 0, 1 and 4 LoRAs on the {args.quant} DiT, interleaved ...", file=sys.stderr)
    row = {**spec, **child([sys.executable, __file__, "--worker", json.dumps(spec)]), "component": "lora",
           "preset": args.preset, "command": f"python benchmarks/lora.py {' '.join(sys.argv[1:])}",
           "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    for key in ("weights", "loras", "cap_dim"):
        row.pop(key)
    emit(row, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
