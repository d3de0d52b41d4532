"""The memory plan of a full-size Turbo run under a Fun ControlNet Union, from shapes alone (no weights read).

    python benchmarks/control_plan.py --json benchmarks/results/control-plan.json

For the lite 2.1 (3 control blocks after main layers 0, 10, 20, plus 2 control-refiner blocks) and the full 2.1
(15 control blocks after every second main layer, plus 2): the ControlNet's tensor table as the alibaba-pai files
store it (BF16), the DiT from our Q4_K_M recipe, 1024x1024 under `--vram 4GB` on cuda, as `zimage-lite plan
--control FILE --preset turbo --quant Q4_K_M --vram 4GB --device cuda` prints it for those files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import append_rows, machine  # noqa: E402

RELEASES = {"lite 2.1": (0, 10, 20), "2.1": tuple(range(0, 30, 2))}


def control_table(places: tuple[int, ...]) -> tuple:
    """(ControlNetConfig, tensor table name -> (shape, "BF16")) of a full-size 2.1-family ControlNet."""
    import torch

    from zimage_lite.config import ControlNetConfig
    from zimage_lite.models.controlnet import ZImageControlNet

    cfg = ControlNetConfig(control_layers_places=places, control_refiner_layers_places=(0, 1), control_in_dim=33,
                           add_control_noise_refiner="control_noise_refiner")
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in ZImageControlNet(cfg).state_dict().items()}
    return cfg, {n: (s, "BF16") for n, s in shapes.items()}


def main() -> int:
    from zimage_lite.runtime.plan import plan_for
    from zimage_lite.runtime.units import parse_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--vram", default="4GB")
    p.add_argument("--json", help="append the rows to this JSON file (a list)")
    args = p.parse_args()
    rows = []
    for release, places in RELEASES.items():
        cfg, table = control_table(places)
        plan = plan_for("turbo", "Q4_K_M", args.size, args.size, False, "cuda", parse_size(args.vram, "--vram"),
                        None, "bf16", "Q4_K_M", control=(cfg, table))
        stages = {s.name: s for s in plan.stages}
        dit, net = stages["dit"], stages["controlnet"]
        rows.append({"component": "control_plan", "release": release, "control_blocks": len(places),
                     "control_bytes": sum(2 * math.prod(s) for s, _ in table.values()),
                     "size": args.size, "vram": args.vram,
                     "dit": {"resident": len(dit.resident), "streamed": len(dit.streamed), "peak": dit.peak_bytes},
                     "controlnet": {"resident": len(net.resident), "streamed": len(net.streamed),
                                    "peak": net.peak_bytes},
                     "peak_device": plan.peak_bytes, "peak_host": plan.host_peak_bytes,
                     "transfer_per_step": plan.transfer_per_step, "machine": machine(),
                     "command": f"python benchmarks/control_plan.py {' '.join(sys.argv[1:])}".strip(),
                     "date": time.strftime("%Y-%m-%d")})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        append_rows(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
