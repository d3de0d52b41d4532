"""The `zimage-lite quantize` options, wired into the main CLI (zimage_lite/cli.py) by `add_arguments` and `run`.

Kept free of heavy imports: the main CLI builds every subparser on each call, `--help` included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The --type values (recipes.TARGETS holds their rules; a test keeps the two in step).
TYPES = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K",
         "int8", "nf4", "int8-convrot", "int8-rowwise")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path,
                   help="the official model folder (transformer/, text_encoder/, ...), a component folder, or one "
                        ".safetensors/.gguf file (official, ComfyUI, stable-diffusion.cpp or llama.cpp names)")
    p.add_argument("--type", required=True, choices=TYPES, metavar="TYPE",
                   help=f"target: {', '.join(TYPES)}. GGUF K-quant mixes as llama.cpp / ComfyUI-GGUF define them; "
                        "int8/nf4: bitsandbytes safetensors for diffusers (DiT only); int8-convrot/int8-rowwise: "
                        "ComfyUI's INT8 safetensors (per-row scales, with/without ConvRot), DiT or text encoder")
    p.add_argument("--component", choices=("dit", "text-encoder", "all", "controlnet"), default=None,
                   help="which component of a model folder (default dit; 'all' writes both into the --out folder); "
                        "for a single file it is detected from the tensor names")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (.gguf for GGUF types, .safetensors for int8-convrot/int8-rowwise, a folder "
                        "name not ending in either for int8/nf4: an earlier such output is replaced with --force), or "
                        "an existing folder for the community file names (z_image_turbo-Q4_K_M.gguf, "
                        "Qwen3-4B-Q4_K_M.gguf); default: the current folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from .convert import convert, summary

    for result in convert(args.src, args.type, component=args.component, out=args.out, force=args.force):
        print(summary(result))
    return 0
