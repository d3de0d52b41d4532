"""Image inputs: the init image (img2img, inpainting) and the mask, read from files and turned into tensors as the
reference pipelines (diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline) preprocess them.

Reading accepts whatever Pillow opens: the EXIF orientation is applied (as photos are shown), any mode is converted
(16-bit, CMYK, palette, alpha), an animated image gives its first frame. Each such conversion is reported as a note
for the user. The preprocessing then follows the reference exactly for an RGB image and an L mask: Lanczos resize to
the target size, [0, 1] → [-1, 1] for the image; the mask binarized at 0.5 (white = repaint) and taken to the latent
grid by nearest-neighbour sampling, never averaged. Other modes are converted before resizing (the reference
resizes first, which Pillow does with nearest neighbour for palette images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import OptionError
from .image import open_picture

MASK_THRESHOLD = 0.5  # the reference binarizes the resized mask here: below keeps, at or above repaints
ASPECT_TOLERANCE = 0.01  # a mask whose aspect ratio differs by more than this from the image's is refused


@dataclass
class Loaded:
    """An input image as the pipeline takes it, with what was done to it on the way (for the user)."""

    image: Image.Image
    notes: list[str] = field(default_factory=list)


def open_image(path: Path, option: str = "--image") -> Loaded:
    """An input image read whole (image.open_picture), its first frame, upright as its EXIF orientation says."""
    img = open_picture(path, option)
    frames = getattr(img, "n_frames", 1)  # open_picture read the first frame
    notes = [f"{option} {Path(path).name}: {frames} frames; the first is used"] if frames > 1 else []
    return Loaded(ImageOps.exif_transpose(img), notes)


def to_mode(img: Image.Image, mode: str, option: str) -> Loaded:
    """`img` in `mode` ("RGB" or "L"), converting 16-bit and float images by their range (Pillow's own conversion
    clips them to 0..255, which turns a 16-bit image white)."""
    notes = []
    if img.mode == mode:
        return Loaded(img, notes)
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        kind = "16-bit" if top > 255 else "float" if img.mode == "F" else "integer"
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append(f"{option}: a {kind} image, scaled to 8 bits")
    elif img.mode not in ("1", "L", "RGB"):
        notes.append(f"{option}: {img.mode} converted to {mode}"
                     + (" (transparency dropped)" if "A" in img.mode or "transparency" in img.info else ""))
    return Loaded(img.convert(mode), notes)


def load_image(path: Path, option: str = "--image") -> Loaded:
    """An init image from a file, in RGB."""
    loaded = open_image(path, option)
    rgb = to_mode(loaded.image, "RGB", option)
    return Loaded(rgb.image, loaded.notes + rgb.notes)


def load_mask(path: Path, option: str = "--mask") -> Loaded:
    """A mask from a file, in L (white = repaint, black = keep)."""
    loaded = open_image(path, option)
    gray = to_mode(loaded.image, "L", option)
    return Loaded(gray.image, loaded.notes + gray.notes)


def default_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(width, height) of the image rounded down to `multiple`, as the reference takes the size from its input."""
    w, h = image.width - image.width % multiple, image.height - image.height % multiple
    if w < multiple or h < multiple:
        raise OptionError(f"--image: {image.width}x{image.height} is smaller than {multiple}x{multiple} pixels")
    return w, h


def check_mask_size(mask: Image.Image, image: Image.Image) -> str | None:
    """A mask of another size than the image is resized with it when the aspect ratios agree (a note says so);
    one of another shape would repaint the wrong place: refused, with both sizes."""
    if mask.size == image.size:
        return None
    ratio = (mask.width / mask.height) / (image.width / image.height)
    if abs(ratio - 1) > ASPECT_TOLERANCE:
        raise OptionError(f"--mask is {mask.width}x{mask.height} and --image {image.width}x{image.height}: their "
                          f"shapes differ; give a mask of the image's size")
    return f"--mask {mask.width}x{mask.height} resized to the image's {image.width}x{image.height}"


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 3, height, width) fp32 in [-1, 1]: Lanczos resize (a no-op at the same size), /255, 2x - 1."""
    arr = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    return torch.from_numpy(arr / 255.0).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def mask_tensor(mask: Image.Image, width: int, height: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """(1, 1, latent_h, latent_w) fp32 of 0 (keep) and 1 (repaint): Lanczos resize to the image size, binarize at
    0.5, nearest-neighbour to the latent grid."""
    arr = np.asarray(mask.convert("L").resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    full = torch.from_numpy((arr >= MASK_THRESHOLD).astype(np.float32))[None, None]
    return F.interpolate(full, size=(latent_h, latent_w), mode="nearest")
