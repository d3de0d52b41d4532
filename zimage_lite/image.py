"""Images: tensor → PIL, and PNG, JPEG or WebP files that carry every parameter of the run that made them.

The parameters are stored as one JSON object (UTF-8), read back typed by `read_params`:
- PNG: an iTXt chunk `zimage-lite`, beside one readable iTXt chunk per parameter (what image viewers show);
- JPEG and WebP: the EXIF UserComment (tag 0x9286, ASCII character code, the JSON with non-ASCII escaped), which
  exiftool and most viewers show. A JPEG's EXIF segment holds at most 64 KB, so a prompt longer than that is refused
  for .jpg before the run starts (PNG and WebP have no such limit).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import OptionError
from .output import check_output, write_atomic
from .weights.checks import check_path

if TYPE_CHECKING:
    import torch

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 95  # JPEG and WebP: near-transparent loss; a pixel-exact copy is what PNG is for
METADATA_KEY = "zimage-lite"
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
ASCII_CODE = b"ASCII\0\0\0"  # the UserComment character-code prefix (EXIF 2.3, 4.6.5)
JPEG_EXIF_LIMIT = 65533  # an APP1 segment's length field counts itself: 2^16 - 1 - 2 bytes of payload
# The run parameters and their types (the keys generate() names them by); others are kept as they come.
PARAM_TYPES: dict[str, type] = {
    "prompt": str, "negative": str, "seed": int, "steps": int, "cfg": float, "cfg_normalization": float,
    "cfg_truncation": float, "width": int, "height": int, "model": str, "dit": str, "text_encoder": str, "vae": str,
    "dit_format": str, "text_encoder_format": str, "dtype": str, "device": str, "version": str,
    "strength": float, "image_sha256": str, "mask_sha256": str,  # img2img / inpainting (not the images themselves)
    "control": str, "control_sha256": str, "control_image_sha256": str, "control_scale": float,  # ControlNet
    "control_preprocess": str,
    "loras": list,  # [{"name": file name, "sha256": first 16 hex digits, "scale": float}, ...] (not the files)
    # run --enhance: `prompt` is the enhanced text (what --from-png draws again), these say what it came from
    "original_prompt": str, "enhance_seed": int, "enhance_temperature": float,
}
LORA_KEYS = {"name": str, "sha256": str, "scale": float}


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → 8-bit RGB, rounding as the reference post-processing does."""
    import torch  # here: reading and checking images (the CLI's --from-png, --out) need no torch

    arr = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def image_format(path: Path, option: str = "--out") -> str:
    """The Pillow format an image path asks for by its extension; any other extension is refused."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        allowed = ", ".join(FORMATS)
        raise OptionError(f"{option} {path}: the extension {path.suffix or '(none)'!s} is not an image format "
                          f"zimage-lite writes; use one of {allowed}")
    return fmt


def image_path(out: Path | None, seed: int) -> Path:
    """Where `run` writes: `out`, or zimage-<seed>.png in the current folder or in `out` when that is a folder."""
    name = Path(f"zimage-{seed}.png")
    if out is None:
        return name
    return out / name if out.is_dir() else out


def check_image_output(path: Path, force: bool, params: Mapping[str, Any] | None = None) -> None:
    """Every check of an image output, before the run: the extension, the folder, an existing file (see
    output.check_output), and whether `params` known so far (the prompts) fit the format's metadata."""
    fmt = image_format(path)
    check_output(path, force)
    if params:
        _save_options(fmt, _typed(params, "--out"), path, slack=1024)  # room for the keys filled in by the run


def _coerce(value: Any, want: type) -> Any:
    if isinstance(value, bool):
        raise TypeError("a truth value")
    if want is list:  # the LoRAs: a list of {name, sha256, scale}, or its JSON text
        entries = json.loads(value) if isinstance(value, str) else value
        if not isinstance(entries, list) or not all(isinstance(e, dict) and set(e) == set(LORA_KEYS)
                                                    for e in entries):
            raise TypeError("not a list of LoRAs")
        return [{k: _coerce(e[k], t) for k, t in LORA_KEYS.items()} for e in entries]
    if want is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise TypeError("not text")
    if want is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not whole")
        return int(value)  # int, whole float, or its text (image.info holds text)
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


def _typed(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`params` with each known key as its type (text from `image.info` converted); None values left out."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        want = PARAM_TYPES.get(key)
        if want is None:
            out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
            continue
        try:
            out[key] = _coerce(value, want)
        except (TypeError, ValueError, OverflowError):
            kind = {str: "text", int: "a whole number", float: "a number",
                    list: 'a list of {"name", "sha256", "scale"} objects'}[want]
            raise OptionError(f"{where}: parameter {key} = {value!r} should be {kind}") from None
    return out


def _save_options(fmt: str, params: dict[str, Any], path: Path, slack: int = 0) -> dict[str, Any]:
    """Pillow's save keywords for `fmt` carrying `params`; a JPEG whose metadata cannot fit is refused."""
    if fmt == "PNG":
        info = PngInfo()
        info.add_itxt(METADATA_KEY, json.dumps(params, ensure_ascii=False))  # iTXt: UTF-8, CJK prompts survive
        for key, value in params.items():
            info.add_itxt(key, json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value))
        return {"pnginfo": info}
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = ASCII_CODE + json.dumps(params, ensure_ascii=True).encode("ascii")
    size = len(exif.tobytes()) + slack
    if fmt == "JPEG" and size > JPEG_EXIF_LIMIT:
        raise OptionError(f"--out {path}: the run's parameters ({size} bytes, mostly the prompt) do not fit a JPEG's "
                          f"{JPEG_EXIF_LIMIT}-byte metadata segment; write .png or .webp instead")
    return {"exif": exif, "quality": QUALITY}


def save_image(image: Image.Image, path: str | Path, params: Mapping[str, Any] | None = None,
               force: bool = False) -> None:
    """Write `image` as PNG, JPEG or WebP (by the extension of `path`) carrying `params` (default: `image.info`,
    which `text_to_image` fills), so that `read_params` and `zimage-lite run --from-png` can make it again.

    Written atomically: an error or Ctrl-C leaves no partial file; an existing file is replaced only with `force`.
    """
    if not isinstance(image, Image.Image):
        raise OptionError(f"save_image: image is {type(image).__name__}, not a PIL image (text_to_image returns one)")
    if params is not None and not isinstance(params, Mapping):
        raise OptionError(f"save_image: params is {type(params).__name__}; give a mapping of run parameters, such "
                          "as an event's info")
    path = Path(path)
    fmt = image_format(path)
    options = _save_options(fmt, _typed(image.info if params is None else params, str(path)), path)
    write_atomic(path, lambda tmp: image.save(tmp, format=fmt, **options), force)


def open_picture(path: str | Path, option: str) -> Image.Image:
    """An image file read whole (a truncated file fails here, not later), or OptionError naming the option and the
    file: not a regular file, empty, not an image, damaged, or larger than Pillow's decompression-bomb limit."""
    path = check_path(path, option, error=OptionError)  # a FIFO would block the read
    try:
        with warnings.catch_warnings():  # sizes are checked by the caller against the model; Pillow's own warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # would only print
            img = Image.open(path)
            img.load()
    except Image.DecompressionBombError as e:
        raise OptionError(f"{path} ({option}): too large to read safely ({e}); resize it first") from None
    except UnidentifiedImageError:
        raise OptionError(f"{path} ({option}): not an image Pillow can read (a damaged or non-image file); give a "
                          f"PNG, JPEG or WebP") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise OptionError(f"{path} ({option}): the image cannot be read ({e}); the file may be truncated") from None
    return img


def read_params(path: str | Path) -> dict[str, Any]:
    """The run parameters an image written by `save_image` carries, typed (seed an int, cfg a float, ...)."""
    path = Path(path)
    img = open_picture(path, "--from-png")
    if img.format == "PNG":
        raw = img.text.get(METADATA_KEY)
    else:
        raw = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        raw = raw.removeprefix(ASCII_CODE).decode("ascii", "replace") if isinstance(raw, bytes) else raw
    if not raw:
        raise OptionError(f"--from-png {path}: the image holds no zimage-lite parameters; give the prompt and "
                          "options on the command line instead")
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as e:
        raise OptionError(f"--from-png {path}: the stored zimage-lite parameters are not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise OptionError(f"--from-png {path}: the stored zimage-lite parameters are not a JSON object")
    return _typed(params, f"--from-png {path}")
