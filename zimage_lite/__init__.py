"""zimage-lite: a low-resource runtime and quantizer for Z-Image-Turbo."""

from .image import read_params, save_image
from .pipeline import Event, ZImagePipeline, load

__version__ = "0.1.0"
__all__ = ["Event", "ZImagePipeline", "load", "read_params", "save_image", "__version__"]
