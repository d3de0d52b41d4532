"""The conversion tool: official (or ComfyUI / GGUF BF16) checkpoints → GGUF, int8 and nf4 files.

`recipes` holds the per-tensor type rules and predicted sizes, `convert` the streaming writer, `bnb` the
bitsandbytes layouts, `cli` the `zimage-lite quantize` options.
"""

from __future__ import annotations
