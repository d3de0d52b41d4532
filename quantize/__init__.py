"""The conversion tool: official (or ComfyUI / GGUF BF16) checkpoints → GGUF, int8 and nf4 files.

`recipes` the predicted sizes and vocabulary metadata (the per-tensor type rules live in zimage_lite/quant/recipes.py),
`convert` the streaming writer, `bnb` the
bitsandbytes layouts, `cli` the `zimage-lite quantize` options.
"""

from __future__ import annotations
