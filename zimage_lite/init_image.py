"""An img2img or inpainting request, checked before anything loads: the init image, the mask, the strength, the
size they give the run, and where the schedule starts (the semantics of diffusers' ZImageImg2ImgPipeline and
ZImageInpaintPipeline)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import OptionError
from .inputs import check_mask_size, default_size, open_image, to_mode
from .options import TURBO_GRID, Grid, check_image_options
from .sampling import start_index

STRENGTH = 0.6  # img2img's default, the reference's
INPAINT_STRENGTH = 1.0  # with a mask: the reference inpainting default


@dataclass(frozen=True)
class InitImage:
    image: Image.Image  # RGB, at its own size (resized to width x height when encoded)
    mask: Image.Image | None  # L, white = repaint
    strength: float
    start: int  # index of the first sigma: the DiT runs steps - start times
    width: int
    height: int
    notes: tuple[str, ...]  # what was done to the inputs, for the user

    def params(self) -> dict[str, object]:
        """What an image made from this request records: the strength, and which inputs (by their pixels' sha256;
        never the pictures themselves)."""
        out: dict[str, object] = {"strength": self.strength, "image_sha256": pixels_sha256(self.image)}
        if self.mask is not None:
            out["mask_sha256"] = pixels_sha256(self.mask)
        return out


def pixels_sha256(image: Image.Image) -> str:
    """sha256 over mode, size and pixels: the same picture hashes the same whatever lossless file held it."""
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def init_request(image: Image.Image | str | Path | None, mask: Image.Image | str | Path | None,
                 strength: float | None, width: int | None, height: int | None, steps: int | None,
                 grid: Grid = TURBO_GRID) -> InitImage | None:
    """Validate the image inputs of a run; None for text-to-image. Without width and height the size is the image's,
    rounded down to the grid's cell (a note says so when that changes it); with them the image is resized (Lanczos).
    `steps` None (not known yet: the model's default) skips the check that a DiT step runs; the pipeline repeats it."""
    strength = check_image_options(image, mask, strength)
    if image is None:
        return None
    if strength is None:
        strength = STRENGTH if mask is None else INPAINT_STRENGTH
    start = start_index(steps, strength) if steps is not None else 0
    if steps is not None and start >= steps:
        raise OptionError(f"--strength {strength:g} with --steps {steps} runs no DiT step; use --strength "
                          f"{1 / steps:.3g} or more (one step) or more steps")
    notes: list[str] = []
    image, mask = opened_image(image, "--image", notes), opened_image(mask, "--mask", notes)
    rgb = to_mode(image, "RGB", "--image")
    notes += rgb.notes
    if width is None and height is None:
        width, height = default_size(rgb.image, grid.cell)
        if width > grid.max_width or height > grid.max_height:
            raise OptionError(f"--image is {rgb.image.width}x{rgb.image.height}: larger than the model renders (at "
                              f"most {grid.max_width}x{grid.max_height}); give --width and --height to resize it")
        if (width, height) != rgb.image.size:
            notes.append(f"--image is {rgb.image.width}x{rgb.image.height}: resized to {width}x{height} (Lanczos), "
                         f"the nearest multiples of {grid.cell} below")
    elif width is None or height is None:
        raise OptionError("--width and --height go together with --image (or give neither: the image's size)")
    elif (width, height) != rgb.image.size:
        notes.append(f"--image {rgb.image.width}x{rgb.image.height} resized to {width}x{height} (Lanczos)")
    gray = None
    if mask is not None:
        m = to_mode(mask, "L", "--mask")
        note = check_mask_size(m.image, rgb.image)
        notes += m.notes + ([note] if note else [])
        gray = m.image
    return InitImage(rgb.image, gray, float(strength), start, width, height, tuple(notes))


def opened_image(image: Image.Image | str | Path | None, option: str, notes: list[str]) -> Image.Image | None:
    """A PIL image as given, or the file a path names (read as the CLI reads it)."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        try:
            image.load()  # a lazily opened file: damage shows here, not mid-run
        except (OSError, ValueError, SyntaxError) as e:
            raise OptionError(f"{option}: the image cannot be read ({e}); the file may be truncated") from None
        return image
    if not isinstance(image, (str, Path)):
        raise OptionError(f"{option}: expected a PIL image or a path to an image file, not {type(image).__name__}")
    loaded = open_image(Path(image), option)
    notes += loaded.notes
    return loaded.image
