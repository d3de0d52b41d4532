"""A ControlNet run: the options checked, the control image (and for inpainting the image and mask) turned into the
control latents once, and what an image made under control records.

Semantics of diffusers' ZImageControlNetPipeline and ZImageControlNetInpaintPipeline:
- the control image (a pose, depth, edge... map, used as given) is resized to the run's size (Lanczos, as diffusers'
  image processor does; a warning says so when the sizes differ) and VAE-encoded once, with the posterior mean
  (no random draw), before the prompt;
- a 33-channel ControlNet (2.x) takes [control latents, keep-mask, masked-image latents]: without --image/--mask
  the last 17 channels are zeros; with them (ControlNet inpainting) the keep-mask is 1 - the binarized mask on the
  latent grid (nearest) and the masked image is the image with the repaint area set to 0 in [-1, 1], encoded with
  the posterior mean. The whole image is generated under the hints: no per-step blending, no strength;
- a 16-channel ControlNet (1.0) has no inpaint input: --image/--mask are refused with it.
Without --width/--height the size is the control image's, rounded down to the model's grid.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .canny import PREPROCESSORS, canny
from .config import ControlNetConfig, DiTConfig
from .errors import OptionError
from .init_image import opened_image, pixels_sha256
from .inputs import check_mask_size, default_size, image_tensor, mask_tensor, to_mode
from .options import TURBO_GRID, Grid
from .weights.control_files import open_control
from .weights.lora import file_sha256
from .weights.sources import TensorSource

CONTROL_SCALE = 0.75  # diffusers' controlnet_conditioning_scale default
SHA_SHOWN = 16  # hex digits of the ControlNet file's sha256 in the run parameters


class ControlResizeWarning(UserWarning):
    """The control image (or the inpainting image) is resized to the run's size, as diffusers resizes it."""


@dataclass
class ControlFile:
    """An opened ControlNet: its config (the release it is), its tensors, and its file's hash (computed once,
    when an image first records it)."""

    path: Path
    config: ControlNetConfig
    source: TensorSource
    _sha: str | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, dit: DiTConfig) -> ControlFile:
        config, source = open_control(path, dit)
        return cls(Path(path), config, source)

    @property
    def sha256(self) -> str:
        """sha256 of the file (of a folder: of its .safetensors files in name order), first 16 hex digits."""
        if self._sha is None:
            files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
            self._sha = file_sha256(files[0]) if len(files) == 1 else _sha256_of(files)
        return self._sha[:SHA_SHOWN]


def _sha256_of(files: list[Path]) -> str:
    import hashlib

    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


@dataclass(frozen=True)
class ControlRequest:
    image: Image.Image  # the control map, RGB, at its own size
    scale: float
    inpaint: Image.Image | None  # 2.x inpainting: the image (RGB) and its mask (L, white = repaint)
    mask: Image.Image | None
    width: int
    height: int
    edges: Image.Image | None = None  # --control-preprocess canny: the map made from `image`

    @property
    def map(self) -> Image.Image:
        """What the ControlNet reads."""
        return self.image if self.edges is None else self.edges

    def params(self, control: ControlFile) -> dict[str, Any]:
        """What an image made under this control records: the ControlNet's file name and sha256, the control
        image's (and the inpainting inputs') pixel hashes, the scale."""
        out: dict[str, Any] = {"control": control.path.name, "control_sha256": control.sha256,
                               "control_image_sha256": pixels_sha256(self.image), "control_scale": self.scale,
                               **({"control_preprocess": "canny"} if self.edges is not None else {})}
        if self.inpaint is not None:
            out.update(image_sha256=pixels_sha256(self.inpaint), mask_sha256=pixels_sha256(self.mask))
        return out


def check_scale(scale: Any) -> float:
    """--control-scale as a finite number; OptionError otherwise."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(scale, bool) or not math.isfinite(value):
        raise OptionError(f"--control-scale {scale!r}: not a number; give the hints' weight, e.g. 0.75 (the "
                          "default), 0 for none, 1 for full")
    return value


CONTROL_ARGS = ("control_image", "control_scale", "control_preprocess")  # control_request's: generate() passes them


def control_request(control: ControlFile | None, image: Image.Image | str | Path | None,
                    mask: Image.Image | str | Path | None, strength: float | None, width: int | None,
                    height: int | None, grid: Grid = TURBO_GRID, control_image: Image.Image | str | Path | None = None,
                    control_scale: Any = None, control_preprocess: str | None = None) -> ControlRequest | None:
    """Validate a run's control inputs (OptionError naming the option); None without --control. The control image
    is the map itself, or with `control_preprocess` "canny" a photo to take the edges of (canny.py)."""
    scale = check_control_args(control.path if control else None, control_image, control_scale, strength,
                               control_preprocess)
    if control is None:
        return None
    cfg = control.config
    if not cfg.inpaint and (image is not None or mask is not None):
        option = "--mask" if mask is not None else "--image"
        raise OptionError(f"{option} with --control {control.path.name}: a {cfg.control_in_dim}-channel ControlNet "
                          f"({cfg.version}) has no inpaint input; use a 2.x (33-channel) ControlNet, or drop {option}")
    if (image is None) != (mask is None):
        missing = "--image" if image is None else "--mask"
        raise OptionError(f"ControlNet inpainting with --control {control.path.name} needs both --image and --mask: "
                          f"give {missing} too (white = repaint)")
    ctrl = to_mode(opened_image(control_image, "--control-image", []), "RGB", "--control-image").image
    edges = canny(ctrl) if control_preprocess else None
    if width is None and height is None:
        width, height = default_size(ctrl, grid.cell)
    elif width is None or height is None:
        raise OptionError("--width and --height go together with --control-image (or give neither: its size)")
    inpaint = gray = None
    if image is not None:
        inpaint = to_mode(opened_image(image, "--image", []), "RGB", "--image").image
        gray = to_mode(opened_image(mask, "--mask", []), "L", "--mask").image
        check_mask_size(gray, inpaint)
    for option, picture in (("--control-image", ctrl), ("--image", inpaint)):
        if picture is not None and picture.size != (width, height):
            warnings.warn(ControlResizeWarning(
                f"{option} is {picture.width}x{picture.height}: resized to {width}x{height} (Lanczos), as diffusers "
                "resizes it"), stacklevel=3)
    return ControlRequest(ctrl, scale, inpaint, gray, width, height, edges)


def control_latents(request: ControlRequest, cfg: ControlNetConfig, encode: Any, latent_channels: int) -> torch.Tensor:
    """The control context (1, control_in_dim, h, w) in fp32: `encode(pixels)` is the VAE encoder's posterior mean
    (scaled latents) of a (1, 3, H, W) image in [-1, 1]."""
    w, h = request.width, request.height
    latents = encode(image_tensor(request.map, w, h))
    if not cfg.inpaint:
        return latents
    extra = cfg.control_in_dim - latent_channels
    if request.inpaint is None:  # 2.x without inpainting: mask and masked image are zeros
        return torch.cat([latents, latents.new_zeros(1, extra, *latents.shape[2:])], dim=1)
    repaint = mask_tensor(request.mask, w, h, h, w)  # binarized at full size (a same-size nearest resample)
    masked = encode(image_tensor(request.inpaint, w, h) * (repaint < 0.5))
    keep = 1 - torch.nn.functional.interpolate(repaint, size=latents.shape[2:], mode="nearest")
    return torch.cat([latents, keep.to(latents.device), masked], dim=1)


def check_control_args(control: str | Path | None, control_image: Any, scale: Any, strength: Any,
                       preprocess: Any = None) -> float | None:
    """The control options that go together, checked before anything loads (the rest needs the ControlNet's
    config); the scale (None without --control)."""
    if control is None:
        if control_image is not None or scale is not None or preprocess is not None:
            option = ("--control-image" if control_image is not None else "--control-scale" if scale is not None
                      else "--control-preprocess")
            raise OptionError(f"{option} needs --control: give the ControlNet file (a Z-Image-Turbo-Fun-Controlnet-"
                              "Union .safetensors) that reads the control image")
        return None
    if control_image is None:
        raise OptionError(f"--control {Path(control).name}: give the control image (a pose, depth or edge map) "
                          "with --control-image FILE")
    if preprocess is not None and preprocess not in PREPROCESSORS:
        raise OptionError(f"--control-preprocess {preprocess!r}: use {', '.join(PREPROCESSORS)} (or give the map "
                          "itself as --control-image)")
    if strength is not None:
        raise OptionError("--strength does not apply under --control: ControlNet inpainting regenerates the whole "
                          "image under the hints (drop --strength)")
    return CONTROL_SCALE if scale is None else check_scale(scale)
