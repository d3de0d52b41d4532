#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on the GPU machine, into .whl/ (ignored by git; name it in the `run`
# tool's carry). That machine's image already has torch, numpy, safetensors, tokenizers, pillow, tqdm, pyyaml,
# requests, huggingface-hub (>= 1.32, as diffusers asks), accelerate and pytest (the device notes' package list);
# it lacks gguf (the runtime's GGUF reader) and diffusers (the group-offloading peer). Versions: pyproject.toml's.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    gguf==0.19.0 diffusers==0.42.1
du -ch .whl/*.whl
