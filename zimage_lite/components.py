"""The component registry: what each part of a Z-Image model is, in one table.

Every place that needs a component's config class, model class, folder in the official layout, name for people or
command-line option reads it here (weights/components.py to find and open files, the pipeline to build and place
models, `info`, the quantize tool).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ControlNetConfig, DiTConfig, TextEncoderConfig, VAEConfig
from .models.controlnet import ZImageControlNet
from .models.dit import ZImageDiT
from .models.qwen3 import Qwen3Encoder
from .models.vae import AutoencoderDecoder
from .models.vae_encoder import AutoencoderEncoder


@dataclass(frozen=True)
class ComponentKind:
    kind: str  # "dit", "text_encoder", "vae"
    label: str  # for people: "DiT", "text encoder", "VAE"
    folder: str  # its folder in the official layout (Tongyi-MAI/Z-Image-Turbo)
    option: str  # the command-line option that points at its file
    config: type  # the frozen config dataclass read from its config.json
    models: tuple[type[nn.Module], ...]  # the models built from its weights; the first is the one a run needs
    optional: bool = False  # not part of a model (a ControlNet, given with --control): no folder to look for

    @property
    def model(self) -> type[nn.Module]:
        return self.models[0]


REGISTRY: dict[str, ComponentKind] = {c.kind: c for c in (
    ComponentKind("dit", "DiT", "transformer", "--dit", DiTConfig, (ZImageDiT,)),
    ComponentKind("text_encoder", "text encoder", "text_encoder", "--text-encoder", TextEncoderConfig,
                  (Qwen3Encoder,)),
    ComponentKind("vae", "VAE", "vae", "--vae", VAEConfig, (AutoencoderDecoder, AutoencoderEncoder)),
    ComponentKind("controlnet", "ControlNet", "controlnet", "--control", ControlNetConfig, (ZImageControlNet,),
                  optional=True),
)}
COMPONENTS = tuple(k for k, c in REGISTRY.items() if not c.optional)  # the parts of a model
TOKENIZER_FOLDER = "tokenizer"
