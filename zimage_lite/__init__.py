"""zimage-lite: a low-resource runtime and quantizer for Z-Image-Turbo."""

from .pipeline import Event, ZImagePipeline, load

__version__ = "0.1.0"
__all__ = ["Event", "ZImagePipeline", "load", "__version__"]
