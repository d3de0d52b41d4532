"""Image output: tensor → PIL, PNG with the generation parameters, written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import OptionError


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → 8-bit RGB, rounding as the reference post-processing does."""
    arr = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def check_output(path: Path, force: bool) -> None:
    """Refuse before any work is done: a missing folder, or an existing file without --force."""
    if not path.parent.is_dir():
        raise OptionError(f"--out {path}: folder {path.parent} does not exist")
    if path.exists() and not force:
        raise OptionError(f"--out {path}: file exists; pass --force to overwrite it")


def _public(path: Path) -> None:
    """Give a temporary output the mode a plain `open` would (mkstemp/mkdtemp make it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_atomic(path: Path, write: Callable[[Path], None], force: bool, folder: bool = False) -> None:
    """Write through `write(tmp)` into a temporary file (or folder) beside `path`, then rename it into place.

    An interrupted or failed write leaves nothing behind; an existing output is replaced only with `force`.
    """
    check_output(path, force)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        _public(tmp)
        if path.exists() and not force:  # appeared while we worked
            raise OptionError(f"--out {path}: file exists; pass --force to overwrite it")
        if folder and path.exists():  # a folder cannot be renamed over another: move the old one aside first
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_png(image: Image.Image, path: Path, params: dict[str, object], force: bool = False) -> None:
    """PNG with each generation parameter as a text chunk (prompt, negative, seed, steps, cfg, size, model, quant)."""
    info = PngInfo()
    for key, value in params.items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so CJK prompts survive
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), force)
