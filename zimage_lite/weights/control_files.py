"""Opening a ControlNet for Z-Image: which release a file is, from its tensor names and shapes (never its name).

`--control` takes:
- the single .safetensors alibaba-pai publishes (Z-Image-Turbo-Fun-Controlnet-Union 1.0, 2.0, 2.1, lite 2.1), whose
  tensor names are diffusers' ZImageControlNetModel names; it carries no config, so the config is read off it:
  `control_in_dim` from the control embedder's width (16: 1.0; 33: 2.x), the blocks from the names, and the
  refiner mode as diffusers' single-file loader tells 2.0 from 2.1: control-refiner blocks with a `before_proj`
  that is not all zero are 2.1's; all zero (or none) are 2.0's (its control layers take that role); plain refiner
  blocks (no projections) are 1.0's. The files do not say after which main layers the hints go: the control
  blocks are spread evenly over the DiT's layers (6 of 30: every 5th; 15: every 2nd; 3: every 10th, as VideoX-Fun's
  config/z_image/z_image_control*.yaml give them), and the control-refiner hints go after the refiner layers in
  order (2.x's [0, 1]);
- a diffusers ZImageControlNetModel folder (config.json + safetensors), its config as written;
- a GGUF written by `quantize --component controlnet` (the same names; the config in its metadata).
A ControlNet for another model (Flux, SD/SDXL) or another Z-Image component is refused, naming what it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ControlNetConfig, DiTConfig, read_json, validate_config
from ..errors import CheckpointError
from .checks import check_path
from .components import open_stored
from .gguf_source import GGUFSource
from .names import CONTROL_EMBEDDER as EMBEDDER
from .names import CONTROL_PREFIXES, OTHER_CONTROLNETS, detect_component, strip_prefix
from .sources import RenamedSource, TensorSource

GGUF_CONFIG_KEY = "zimage_lite.controlnet.config"  # the config.json text, in the GGUF quantize writes
WHERE_TO_GET = ("use a Z-Image-Turbo-Fun-Controlnet-Union file from alibaba-pai, or a diffusers "
                "ZImageControlNetModel folder")


def _count(names: list[str], prefix: str) -> int:
    found = {int(n[len(prefix):].split(".", 1)[0]) for n in names
             if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()}
    return max(found) + 1 if found else 0


def _refuse_other(names: list[str], path: Path) -> None:
    """CheckpointError saying what the file is when it is not a Z-Image ControlNet."""
    if EMBEDDER in names or "control_layers.0.after_proj.weight" in names:
        return
    for prefixes, what in OTHER_CONTROLNETS:
        if any(n.startswith(prefixes) or f".{prefixes[0]}" in n for n in names):
            raise CheckpointError(f"{path}: {what}, not a Z-Image ControlNet; {WHERE_TO_GET}")
    kind = detect_component(names)
    if kind is not None:
        label = {"dit": "DiT", "text_encoder": "text encoder", "vae": "VAE"}[kind]
        raise CheckpointError(f"{path}: a Z-Image {label}, not a ControlNet; {WHERE_TO_GET}")
    raise CheckpointError(f"{path}: not a Z-Image ControlNet (no {EMBEDDER} or control_layers.N tensors); "
                          f"{WHERE_TO_GET}")


def _derived_config(stored: TensorSource, names: list[str], path: Path, dit: DiTConfig) -> ControlNetConfig:
    """The config of a single file, read off its tensors (see the module doc)."""
    dim, in_features = stored.shape(EMBEDDER)
    head_dim = stored.shape("control_layers.0.attention.norm_q.weight")[0]
    n_kv = stored.shape("control_layers.0.attention.to_k.weight")[0] // head_dim
    n = _count(names, "control_layers.")
    if n == 0 or n > dit.n_layers:
        raise CheckpointError(f"{path}: {n} control blocks for a DiT of {dit.n_layers} layers")
    step = dit.n_layers // n
    n_ref = _count(names, "control_noise_refiner.")
    before = "control_noise_refiner.0.before_proj.weight"
    if n_ref and before not in names:
        mode = None  # 1.0: plain refiner blocks
    elif before in names and bool(stored.get(before).float().abs().max() > 0):
        mode = "control_noise_refiner"  # 2.1
    else:
        mode = "control_layers"  # 2.0 (its control-refiner tensors, if any, are unused zeros)
    patch = 2 * 2 * 1
    return ControlNetConfig(
        control_layers_places=tuple(range(0, n * step, step)),
        control_refiner_layers_places=() if mode is None else tuple(range(dit.n_refiner_layers)),
        control_in_dim=in_features // patch, add_control_noise_refiner=mode, dim=dim,
        n_refiner_layers=n_ref or dit.n_refiner_layers, n_heads=dim // head_dim, n_kv_heads=n_kv,
        norm_eps=dit.norm_eps)


def open_control(path: Path | str, dit: DiTConfig | None) -> tuple[ControlNetConfig, TensorSource]:
    """(config, tensors under the model's names) of a ControlNet file or folder for a DiT of config `dit`;
    CheckpointError naming the file when it is not one (or not for this DiT). `dit` None (quantizing, no DiT at
    hand): a single file's hints are spread over the full-size DiT's layers, and nothing is checked against one."""
    from ..models.controlnet import ZImageControlNet

    path = check_path(Path(path), folder_ok=True)
    stored = open_stored(path)
    prefix, names = strip_prefix(list(stored.names()), CONTROL_PREFIXES)
    _refuse_other(names, path)
    if path.is_dir():
        config = ControlNetConfig.from_dict(read_json(path / "config.json"), path / "config.json")
    elif isinstance(stored, GGUFSource) and stored.meta(GGUF_CONFIG_KEY) is not None:
        config = ControlNetConfig.from_dict(json.loads(stored.meta(GGUF_CONFIG_KEY)), f"{path} metadata")
    else:
        config = validate_config(_derived_config(RenamedSource(stored, {n: prefix + n for n in names}), names, path,
                                                 dit or DiTConfig()), path)
    with torch.device("meta"):
        model = ZImageControlNet(config)
    try:
        if dit is not None:
            model.check_dit(dit, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    wanted = list(model.state_dict())
    missing = [n for n in wanted if n not in names]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: a Z-Image ControlNet {config.version}, but tensor(s) "
                              f"{', '.join(missing[:5])}{more} are missing")
    return config, RenamedSource(stored, {n: prefix + n for n in wanted})


def is_controlnet(names: list[str]) -> bool:
    """Whether tensor names are a Z-Image ControlNet's (headers only)."""
    bare = strip_prefix(names, CONTROL_PREFIXES)[1]
    return EMBEDDER in bare or "control_layers.0.after_proj.weight" in bare


def describe_controlnet(path: Path) -> dict:
    """What `info` shows of a ControlNet: the release its tensors make it, its blocks and where the hints go."""
    import dataclasses

    config, source = open_control(path, None)
    source.close()
    refiner = {None: "plain refiner blocks after the DiT's", "control_layers": "the control blocks (run twice)",
               "control_noise_refiner": "control-refiner blocks"}[config.add_control_noise_refiner]
    n_ref = 0 if config.add_control_noise_refiner == "control_layers" else config.n_refiner_layers
    return {"component": "controlnet", "layout": "diffusers", "config": dataclasses.asdict(config),
            "version": config.version, "blocks": len(config.control_layers_places) + n_ref,
            "summary": (f"Z-Image ControlNet {config.version}, width {config.dim}; hints after main layers "
                        f"{list(config.control_layers_places)}; refiner stage: {refiner}"
                        + (f", hints after refiner layers {list(config.control_refiner_layers_places)}"
                           if config.control_refiner_layers_places else "")
                        + ("; inpainting input (mask + masked image)" if config.inpaint else ""))}
