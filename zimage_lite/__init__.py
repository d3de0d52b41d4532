"""zimage-lite: a low-resource runtime and quantizer for Z-Image-Turbo.

The pipeline (and with it torch, seconds to import) loads on first use of `load`, `ZImagePipeline` or `Event`, so
`zimage-lite --help`, `--version` and an option error answer at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The one place the version is written: pyproject.toml reads it from here (tool.setuptools.dynamic).
__version__ = "0.1.0"
__all__ = ["Event", "Request", "ZImagePipeline", "load", "read_params", "save_image", "__version__"]

if TYPE_CHECKING:
    from .image import read_params, save_image
    from .pipeline import Event, Request, ZImagePipeline, load

_LAZY = {"Event": "pipeline", "Request": "pipeline", "ZImagePipeline": "pipeline", "load": "pipeline",
         "read_params": "image", "save_image": "image"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
