"""`run.py --image-quality`: the tiny K-quant fixture (tests/fixtures.py) rendered from each recipe's DiT file
against its F32 weights (BENCHMARKS.md "Image difference per recipe")."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from benchmarks.run import ROOT


def image_quality(args: argparse.Namespace) -> Iterator[dict]:
    """The tiny K-quant fixture (tests/fixtures.py) rendered from each recipe's DiT file vs from its F32 weights."""
    import numpy as np

    import zimage_lite
    from quantize.convert import convert

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import KQUANT, PROMPTS, make_checkpoint

    cache = Path(args.cache) / "kquant-tiny"
    if not (cache / "model_index.json").is_file():
        make_checkpoint(cache, KQUANT)
    kwargs = dict(width=128, height=128, steps=8, seed=1)
    ref = np.asarray(zimage_lite.load(cache, device="cpu", dtype="fp32").text_to_image(PROMPTS["en"], **kwargs),
                     dtype=np.float32)
    for quant in args.quant.split(","):
        out = Path(args.cache) / f"kquant-tiny-{quant}.gguf"
        if not out.is_file():
            convert(cache, quant, component="dit", out=out)
        img = zimage_lite.load(cache, dit=out, device="cpu", dtype="fp32").text_to_image(PROMPTS["en"], **kwargs)
        diff = np.abs(np.asarray(img, dtype=np.float32) - ref)
        yield {"component": "image", "quant": quant, "width": 128, "height": 128, "steps": 8,
               "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
               "command": f"python benchmarks/run.py {' '.join(sys.argv[1:])}"}
