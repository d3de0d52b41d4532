"""The conversion tool: official (or ComfyUI / GGUF BF16) checkpoints → GGUF, int8 and nf4 files.

`recipes` holds the predicted sizes and the vocabulary metadata (the per-tensor type rules it writes by live in
zimage_lite/quant/recipes.py), `convert` the streaming writer, `bnb` the bitsandbytes layouts, `cli` the
`zimage-lite quantize` options.
"""

from __future__ import annotations
