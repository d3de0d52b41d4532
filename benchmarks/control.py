"""What a ControlNet costs per step: DiT forwards without and with a random lite-2.1-shaped ControlNet, interleaved.

    python benchmarks/control.py --preset turbo --quant Q4_K_M --width 512 --height 512 --rounds 3 \
        --cache /work/main/.bench_cache --json benchmarks/results/cpu-control.json

One child process holds the DiT (our GGUF of `--quant`) and a ControlNet of the alibaba-pai lite 2.1 shape (3
control blocks + 2 control-refiner blocks, 33-channel input; `--blocks 15` for the full 2.1) with random BF16
weights, built in memory, resident. Each round runs one forward without control, then one with (the ControlNet's
pass inside the DiT's, as a run does); the report drops the first round and gives each mean step and the ratio.
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


def worker(spec: dict) -> dict:
    """In the child: the DiT and the ControlNet, `rounds` rounds of one forward without and one with control."""
    from zimage_lite.config import ControlNetConfig
    from zimage_lite.demo import meta_shapes, random_state
    from zimage_lite.models.controlnet import ZImageControlNet, controlled
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.sampling import get_noise
    from zimage_lite.weights.components import open_dit
    from zimage_lite.weights.load import load_module

    dtype = DTYPES[spec["dtype"]]
    cfg, src = open_dit(Path(spec["weights"]))
    with torch.device("meta"):
        dit = ZImageDiT(cfg)
    dit = load_module(dit, src, dtype, "cpu", "DiT")
    touch_weights(dit)
    n = spec["blocks"]
    ccfg = ControlNetConfig(control_layers_places=tuple(range(0, cfg.n_layers, cfg.n_layers // n))[:n],
                            control_refiner_layers_places=(0, 1), control_in_dim=33,
                            add_control_noise_refiner="control_noise_refiner", dim=cfg.dim, n_heads=cfg.n_heads,
                            n_kv_heads=cfg.n_kv_heads)
    net = ZImageControlNet(ccfg)
    net.load_state_dict({k: v.to(dtype) for k, v in random_state(meta_shapes(net), 0, dtype).items()})
    net = net.to(dtype).eval().requires_grad_(False)
    torch.manual_seed(0)
    latents = get_noise(0, 16, spec["height"], spec["width"]).to(dtype)
    context = torch.randn(1, 33, spec["height"] // 8, spec["width"] // 8).to(dtype)
    cap = torch.randn(CAPTION_TOKENS, cfg.cap_feat_dim).to(dtype)
    times: dict[str, list[float]] = {"none": [], "control": []}
    with torch.inference_mode():
        for i in range(spec["rounds"]):
            t = torch.tensor([0.1 + 0.1 * i])
            start = time.perf_counter()
            dit(latents, t, [cap])
            times["none"].append(time.perf_counter() - start)
            start = time.perf_counter()
            controlled(dit, net, context, 0.75, latents, t, [cap])
            times["control"].append(time.perf_counter() - start)
    return {"step_seconds": times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", choices=["demo", "turbo"])
    p.add_argument("--quant", default="Q4_K_M", help="the DiT's weight format")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--blocks", type=int, default=3, help="control blocks: 3 (lite 2.1) or 15 (2.1)")
    p.add_argument("--rounds", type=int, default=3, help="forwards of each (the first is dropped)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--json", help="append the row to this JSON file (a list)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    cache = Path(args.cache)
    folder = model_folder(args.preset, cache)
    weights, _ = weights_file(folder, args.quant, cache)
    width = args.width or (64 if args.preset == "demo" else 512)
    spec = {"device": "cpu", "width": width, "height": args.height or width, "dtype": args.dtype,
            "quant": args.quant, "blocks": args.blocks, "rounds": args.rounds, "weights": str(weights)}
    print(f"measuring the {args.quant} DiT without and with a {args.blocks}-block ControlNet ...", file=sys.stderr)
    result = child([sys.executable, __file__, "--worker", json.dumps(spec)])
    kept = {k: v[1:] or v for k, v in result["step_seconds"].items()}  # the first round: one-time costs
    means = {k: sum(v) / len(v) for k, v in kept.items()}
    row = {**spec, **result, "mean_step_seconds": means, "ratio": means["control"] / means["none"],
           "component": "controlnet", "preset": args.preset, "machine": machine(),
           "command": f"python benchmarks/control.py {' '.join(sys.argv[1:])}", "date": time.strftime("%Y-%m-%d")}
    row.pop("weights")
    emit(row, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
