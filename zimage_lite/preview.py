"""Live previews: a small RGB image of what the sampler is drawing, after every DiT step, at almost no cost.

The preview is a fixed linear map of the latents, 16 channels -> RGB per latent cell, plus a bias: no VAE run.
It is applied to the step's *denoised estimate* x0 = x_t - sigma_t * v (flow matching: the latent minus sigma times
the predicted velocity), as ComfyUI's previews are: the noisy latent x_t itself shows mostly noise in the early
steps, where a preview matters most. At the last step (sigma 0 after it) x0 is the final latent.

The factors for the FLUX.1 latent space are published ones (see FLUX_RGB); `preview_fit.py` fits the same map by
least squares from any VAE given as files, so that anyone holding the real FLUX VAE can recompute and check them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import OptionError
from .output import check_output, write_atomic

# Latent -> RGB factors of the FLUX.1 latent space (rows: the 16 latent channels; columns: R, G, B) and the bias,
# as published in ComfyUI, comfy/latent_formats.py, class Flux (`latent_rgb_factors`, `latent_rgb_factors_bias`;
# read at commit 040a3243468ecefd1f2802592d90458f1ce4d65f of github.com/comfyanonymous/ComfyUI). They act on the
# sampler's latents, i.e. after ComfyUI's `process_in` = (z - shift_factor) * scaling_factor, which is the space our
# sampler works in (the decoder undoes it: z = latents / 0.3611 + 0.1159), and give RGB in [-1, 1]. Z-Image uses the
# FLUX.1 VAE unchanged (zimage_spec.md 6), so they apply as they are. Data, not code: the numbers are the facts.
FLUX_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
# The preview's side per latent cell: the image's is 8 (the VAE's scale), so a preview is half the image's size
# (256x256 for 512x512, 512x512 for 1024x1024): big enough to judge composition and colour, a few hundred KB at most.
PREVIEW_SCALE = 4
PREVIEW_KEY = "zimage-lite-preview"  # PNG text chunk marking a file as our preview: a later run may replace it


@dataclass(frozen=True)
class Projection:
    """RGB = latents . weight + bias per latent cell: weight (C, 3), bias (3,), RGB in [-1, 1]."""

    weight: torch.Tensor
    bias: torch.Tensor

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) or (C, h, w) latents -> (B, 3, h, w) or (3, h, w) RGB in [-1, 1] (unclamped), in fp32."""
        w = self.weight.to(latents.device, torch.float32)
        b = self.bias.to(latents.device, torch.float32)
        out = torch.einsum("...chw,cr->...rhw", latents.float(), w)
        return out + b[:, None, None]


FLUX = Projection(torch.tensor(FLUX_RGB), torch.tensor(FLUX_RGB_BIAS))


def preview_image(latents: torch.Tensor, projection: Projection = FLUX, scale: int = PREVIEW_SCALE) -> Image.Image:
    """The preview of one latent (1, C, h, w) or (C, h, w): RGB per cell, upscaled `scale` times (bilinear), as an
    8-bit RGB image of (scale * w) x (scale * h) pixels, oriented as the decoded image is (row 0 at the top)."""
    if latents.ndim == 4:
        latents = latents[0]
    rgb = projection.rgb(latents)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)


def is_preview(path: Path) -> bool:
    """Whether `path` is a PNG file a zimage-lite run wrote as its --preview (PREVIEW_KEY in its text chunks)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and PREVIEW_KEY in image.info
    except (OSError, UnidentifiedImageError):
        return False


def check_preview(path: Path, force: bool, out: Path | None = None) -> None:
    """Refuse a --preview path before any work: not .png, the same file as --out, a missing or unwritable folder, a
    folder. An existing file is replaced without --force only when it is an earlier run's preview (is_preview):
    a preview is scratch that every step rewrites, but any other file there is the user's."""
    if path.suffix.lower() != ".png":
        raise OptionError(f"--preview {path}: a preview is written as PNG; give a file name ending in .png")
    if out is not None and os.path.realpath(path) == os.path.realpath(out):  # links followed: one file, two names
        raise OptionError(f"--preview {path} is the --out file; give the preview another name")
    check_output(path, force or is_preview(path), "--preview")


class PreviewFile:
    """The --preview file: rewritten after every step, atomically (a viewer never reads half a PNG).

    A failed write (disk full, the folder removed) does not stop a run that may have taken an hour so far: the
    error is kept in `error` (the first one) and later steps try again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes = 0
        self.last = ""  # "step 3 of 8": what the file shows now
        self.error: OptionError | None = None

    def write(self, image: Image.Image, step: int, steps: int) -> None:
        info = PngInfo()
        info.add_text(PREVIEW_KEY, f"step {step} of {steps}")
        try:
            # force: the path was checked before the run (check_preview); from then on it is ours to rewrite
            write_atomic(self.path, lambda tmp: image.save(tmp, "PNG", pnginfo=info, compress_level=1), force=True,
                         option="--preview")
            self.writes += 1
            self.last = f"step {step} of {steps}"
        except OptionError as e:
            self.error = self.error or e
