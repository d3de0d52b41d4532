"""Component configs as frozen dataclasses, read from each component's own config.json, and named presets.

Only the keys the runtime uses are kept; unknown keys in config.json are ignored, so a config written by a newer
diffusers/transformers still loads. Values and their sources: shared/reference/zimage_spec.md sections 1 and 4.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

ADALN_EMBED_DIM = 256  # width of the timestep embedding that drives every adaLN
SEQ_MULTI_OF = 32  # caption and image token counts are padded to a multiple of this
FREQUENCY_EMBEDDING_SIZE = 256
T_EMBED_MID = 1024  # hidden width of the timestep MLP, fixed in the reference code
MAX_TEXT_TOKENS = 512


def _from_dict(cls, data: dict[str, Any], aliases: dict[str, Any] | None = None):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    for key, getter in (aliases or {}).items():
        if key not in kwargs:
            value = getter(data)
            if value is not None:
                kwargs[key] = value
    return cls(**kwargs)


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    in_channels: int = 16
    cap_feat_dim: int = 2560
    norm_eps: float = 1e-5
    qk_norm: bool = True
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def f_patch_size(self) -> int:
        return self.all_f_patch_size[0]

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.f_patch_size * self.in_channels

    @property
    def embedder_key(self) -> str:
        """Suffix of `all_x_embedder.<p>-<f>` and `all_final_layer.<p>-<f>` in the official key names."""
        return f"{self.patch_size}-{self.f_patch_size}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TextEncoderConfig:
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    vocab_size: int = 151936
    max_position_embeddings: int = 40960

    @property
    def layers_used(self) -> int:
        """Z-Image reads hidden_states[-2]: the output of the second-to-last layer, without the final norm."""
        return self.num_hidden_layers - 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextEncoderConfig:
        # transformers >= 5 moves rope_theta into rope_parameters; accept both spellings.
        def rope_theta(d):
            params = d.get("rope_parameters") or {}
            return params.get("rope_theta")

        def head_dim(d):
            if "hidden_size" in d and "num_attention_heads" in d:
                return d["hidden_size"] // d["num_attention_heads"]
            return None

        return _from_dict(cls, data, {"rope_theta": rope_theta, "head_dim": head_dim})


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    latent_channels: int = 16
    out_channels: int = 3
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def scale(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        cfg = _from_dict(cls, data)
        if data.get("use_post_quant_conv") or data.get("use_quant_conv"):
            raise CheckpointError("vae/config.json: quant_conv/post_quant_conv VAEs are not the FLUX AE Z-Image uses")
        return cfg


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ModelConfig:
    """Everything a pipeline needs to know about a model, without touching weights."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    default_steps: int = 8
    default_cfg: float = 0.0
    default_size: int = 1024


# The tiny demo model: every mechanism of the full model (refiners, pads, GQA, 3-axis RoPE, 4-level VAE)
# at a size that runs in well under a second on a CPU.
DEMO = ModelConfig(
    dit=DiTConfig(
        dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12),
        axes_lens=(1536, 512, 512),
    ),
    text_encoder=TextEncoderConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=151936, max_position_embeddings=40960,
    ),
    vae=VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
    default_size=256,
)

PRESETS: dict[str, ModelConfig] = {
    "turbo": ModelConfig(),
    # Z-Image Base shares the architecture; it is a 50-step CFG model.
    "base": ModelConfig(default_steps=50, default_cfg=4.0),
    "demo": DEMO,
}


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def config_to_dict(cfg) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
