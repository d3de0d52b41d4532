"""`quantize --component controlnet`: a Fun ControlNet Union file (alibaba-pai single file or diffusers folder) to
GGUF, with the DiT's recipe for its blocks (quant/recipes.py `control_plan`) and its config in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch

from zimage_lite.quant.recipes import Target, control_plan

from .writing import Result, SourceInput, digest, provenance, write_file, write_gguf


def open_controlnet(src: Path) -> SourceInput:
    """A ControlNet (alibaba-pai single file or diffusers folder) as the runtime opens it; its config (a single
    file's derived for the full-size DiT's 30 layers) is written into the GGUF."""
    from zimage_lite.models.controlnet import ZImageControlNet
    from zimage_lite.weights.control_files import open_control

    config, source = open_control(src, None)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in ZImageControlNet(config).state_dict().items()}
    return SourceInput("controlnet", config, source, src, digest(src, source.inner), None, None, shapes)


def convert_controlnet(inp: SourceInput, target: Target, out: Path, force: bool) -> Result:
    from zimage_lite.config import config_to_dict
    from zimage_lite.weights.control_files import GGUF_CONFIG_KEY

    plan = control_plan(inp.shapes, target)
    recipe = f"{target.name}: the DiT's mix (control embedder and control-refiner blocks BF16)"

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(int(target.ftype))
        w.add_name("Z-Image-Turbo-Fun-Controlnet-Union")
        w.add_string(GGUF_CONFIG_KEY, json.dumps(config_to_dict(inp.config)))
        provenance(w, inp, recipe)

    return write_file(out, force, plan, lambda tmp, bar: write_gguf(tmp, "zimage_controlnet", plan, metadata, inp,
                                                                     bar))
