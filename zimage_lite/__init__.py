"""zimage-lite: a low-resource runtime and quantizer for Z-Image-Turbo.

The pipeline (and with it torch, seconds to import) loads on first use of `load`, `ZImagePipeline` or `Event`, so
`zimage-lite --help`, `--version` and an option error answer at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The one place the version is written: pyproject.toml reads it from here (tool.setuptools.dynamic).
__version__ = "0.1.0"
__all__ = ["Event", "ZImagePipeline", "load", "__version__"]

if TYPE_CHECKING:
    from .pipeline import Event, ZImagePipeline, load

_FROM_PIPELINE = ("Event", "ZImagePipeline", "load")


def __getattr__(name: str) -> Any:
    if name in _FROM_PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM_PIPELINE])
