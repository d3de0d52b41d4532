"""Component configs as frozen dataclasses, read from each component's own config.json, and named presets.

Only the keys the runtime uses are kept; unknown keys in config.json are ignored, so a config written by a newer
diffusers/transformers still loads. Every key that is kept is checked against its field's type and range, and the
fields against each other (heads divide the width, RoPE axes add up to a head), naming the file and the key: a
config that parses but is wrong fails here, before any model is built. Values and their sources:
shared/reference/zimage_spec.md sections 1 and 4.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

ADALN_EMBED_DIM = 256  # width of the timestep embedding that drives every adaLN
SEQ_MULTI_OF = 32  # caption and image token counts are padded to a multiple of this
FREQUENCY_EMBEDDING_SIZE = 256
T_EMBED_MID = 1024  # hidden width of the timestep MLP, fixed in the reference code
MAX_TEXT_TOKENS = 512
FIX = "correct it, or download or convert the model again"
_KINDS = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}


def show_value(value: Any) -> str:
    """A JSON value as it reads in the file, and what kind it is: `"3840" (a string)`."""
    if isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    text = text if len(text) <= 40 else text[:37] + "..."
    if value is None:
        return text
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return f"{text} ({'a number' if number else _KINDS.get(type(value), type(value).__name__)})"


def _check_value(cls: type, key: str, hint: Any, value: Any) -> str | None:
    """Why `value` cannot be field `key` of `cls` (declared `hint`), or None when it can. Sizes and counts are
    positive (`ZERO_OK` fields may be 0); floats are finite, and positive unless the field is in `SIGNED`."""
    zero_ok, signed = getattr(cls, "ZERO_OK", ()), getattr(cls, "SIGNED", ())
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        lowest, words = (0, "a non-negative integer") if key in zero_ok else (1, "a positive integer")
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lowest
        return None if ok else words
    if hint is float:
        words = "a finite number" if key in signed else "a finite positive number"
        ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
              and (key in signed or value > 0))
        return None if ok else words
    # tuple[int, ...]
    ok = (isinstance(value, list) and value and
          all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
    return None if ok else "a non-empty list of positive integers"


def _fields(cls: type, data: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """The keys of `data` that are fields of `cls`, each checked against its annotation (lists become tuples)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        expected = _check_value(cls, f.name, hints[f.name], value)
        if expected is not None:
            raise CheckpointError(f'{where}: "{f.name}" is {show_value(value)}; expected {expected}: {FIX}')
        out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def validate_config(cfg: Any, where: str | Path) -> Any:
    """`cfg` when its fields agree with each other (`cfg.problem()` is None); else CheckpointError naming `where`.
    Also for configs read off a single file's tensor shapes and metadata."""
    problem = cfg.problem()
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}: {FIX}")
    return cfg


def _from_dict(cls, data: dict[str, Any], where: str | Path, extra: dict[str, Any] | None = None):
    kwargs = _fields(cls, data, where)
    for key, value in (extra or {}).items():
        kwargs.setdefault(key, value)
    return validate_config(cls(**kwargs), where)


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

    ZERO_OK: typing.ClassVar = ("n_refiner_layers",)

    def problem(self) -> str | None:
        """What keeps these fields from describing a buildable DiT, or None."""
        if self.dim % self.n_heads:
            return f'"dim" {self.dim} is not a multiple of "n_heads" {self.n_heads}'
        if self.n_heads % self.n_kv_heads:
            return f'"n_heads" {self.n_heads} is not a multiple of "n_kv_heads" {self.n_kv_heads}'
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            return (f'"axes_dims" {list(self.axes_dims)} and "axes_lens" {list(self.axes_lens)} must each have 3 '
                    f"entries (the frame, height and width RoPE axes)")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            return (f'"axes_dims" {list(self.axes_dims)} must be even and add up to the head size, "dim" / "n_heads" '
                    f"= {self.head_dim}")
        return None

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
    def from_dict(cls, data: dict[str, Any], where: str | Path = "config.json") -> DiTConfig:
        """Read a DiT config.json's values; `where` (the file) names it in errors."""
        return _from_dict(cls, data, where)


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

    def problem(self) -> str | None:
        """What keeps these fields from describing a buildable Qwen3 encoder, or None."""
        if self.num_attention_heads % self.num_key_value_heads:
            return (f'"num_attention_heads" {self.num_attention_heads} is not a multiple of "num_key_value_heads" '
                    f"{self.num_key_value_heads}")
        if self.head_dim % 2:
            return f'"head_dim" {self.head_dim} is odd; RoPE rotates pairs'
        if self.num_hidden_layers < 2:
            return (f'"num_hidden_layers" is {self.num_hidden_layers}; Z-Image reads the output of the second-to-last '
                    f"layer, so at least 2 are needed")
        return None

    @property
    def layers_used(self) -> int:
        """Z-Image reads hidden_states[-2]: the output of the second-to-last layer, without the final norm."""
        return self.num_hidden_layers - 1

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = "config.json") -> TextEncoderConfig:
        """Read a transformers Qwen3 config.json's values; `where` (the file) names it in errors."""
        given = _fields(cls, data, where)
        extra = {}
        # transformers >= 5 moves rope_theta into rope_parameters; accept both spellings.
        params = data.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise CheckpointError(f'{where}: "rope_parameters" is {show_value(params)}; expected an object: {FIX}')
        if params and "rope_theta" in params:
            try:
                extra["rope_theta"] = _fields(cls, {"rope_theta": params["rope_theta"]}, where)["rope_theta"]
            except CheckpointError as e:
                raise CheckpointError(str(e).replace('"rope_theta"', '"rope_parameters.rope_theta"')) from None
        if "hidden_size" in given and "num_attention_heads" in given:
            extra["head_dim"] = given["hidden_size"] // given["num_attention_heads"]
        return _from_dict(cls, data, where, extra)


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

    SIGNED: typing.ClassVar = ("shift_factor",)

    def problem(self) -> str | None:
        """What keeps these fields from describing a buildable FLUX-style decoder, or None."""
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            return (f'"block_out_channels" {list(self.block_out_channels)} are not all multiples of "norm_num_groups" '
                    f"{self.norm_num_groups} (GroupNorm splits each width into that many groups)")
        if self.out_channels != 3:
            return f'"out_channels" is {self.out_channels}; Z-Image decodes RGB images, 3 channels'
        return None

    @property
    def scale(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = "vae/config.json") -> VAEConfig:
        """Read a diffusers AutoencoderKL config.json's values; `where` (the file) names it in errors."""
        cfg = _from_dict(cls, data, where)
        if data.get("use_post_quant_conv") or data.get("use_quant_conv"):
            raise CheckpointError(f"{where}: quant_conv/post_quant_conv VAEs are not the FLUX AE Z-Image uses")
        return cfg


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False

    def problem(self) -> str | None:
        return None  # the fields are independent; each was checked on its own

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = "scheduler_config.json") -> SchedulerConfig:
        """Read a diffusers scheduler_config.json's values; `where` (the file) names it in errors."""
        return _from_dict(cls, data, where)


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
    """A JSON file that must hold an object (config.json, an index, ...): anything else fails naming the file."""
    from .weights.checks import check_file

    check_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a JSON text file (it holds bytes that are not UTF-8); download or "
                              f"convert the model again") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); download or convert the model again") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds {show_value(data)}, not a JSON object; download or convert the model "
                              f"again")
    return data


def config_to_dict(cfg) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


# --- the ControlNet (alibaba-pai Z-Image-Turbo-Fun-Controlnet-Union; diffusers' ZImageControlNetModel) ----------

REFINER_MODES = ("control_layers", "control_noise_refiner")  # add_control_noise_refiner's values besides null


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ZImageControlNetModel config. `control_layers_places[i]`: the main layer after which control
    block i's hint is added; `control_refiner_layers_places`: the noise-refiner layers that get the control-refiner
    hints (2.x); `add_control_noise_refiner`: null (v1: plain refiner blocks on the control stream after the DiT's
    refiners), "control_noise_refiner" (2.1: control-refiner blocks before them) or "control_layers" (2.0: the
    control layers themselves in that role); `control_in_dim`: 16 (v1) or 33 (2.x: latents + mask + masked image)."""

    control_layers_places: tuple[int, ...] = (0,)
    control_refiner_layers_places: tuple[int, ...] = ()
    control_in_dim: int = 16
    add_control_noise_refiner: str | None = None
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    ZERO_OK: typing.ClassVar = ("n_refiner_layers",)
    PLACES: typing.ClassVar = ("control_layers_places", "control_refiner_layers_places")

    def problem(self) -> str | None:
        """What keeps these fields from describing a buildable ControlNet, or None."""
        if self.add_control_noise_refiner not in (None, *REFINER_MODES):
            return (f'"add_control_noise_refiner" is {show_value(self.add_control_noise_refiner)}; expected null, '
                    f'"{REFINER_MODES[0]}" or "{REFINER_MODES[1]}"')
        if not self.control_layers_places or self.control_layers_places[0] != 0:
            return f'"control_layers_places" {list(self.control_layers_places)} must start with 0'
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            return f'"dim" {self.dim}, "n_heads" {self.n_heads} and "n_kv_heads" {self.n_kv_heads} do not divide'
        if self.control_in_dim not in (16, 33):
            return f'"control_in_dim" is {self.control_in_dim}; expected 16 (1.0) or 33 (2.x: latents, mask, image)'
        refiners = {None: 0, "control_layers": len(self.control_layers_places),
                    "control_noise_refiner": self.n_refiner_layers}[self.add_control_noise_refiner]
        if len(self.control_refiner_layers_places) > refiners:
            return (f'"control_refiner_layers_places" {list(self.control_refiner_layers_places)} names more layers '
                    f"than the {refiners} blocks that make refiner hints")
        return None

    @property
    def inpaint(self) -> bool:
        """The 2.x input: control latents, keep-mask and masked-image latents (control_in_dim 33)."""
        return self.control_in_dim > 16

    @property
    def version(self) -> str:
        """For people: which alibaba-pai release this config is the shape of."""
        mode = {None: "1.0", "control_layers": "2.0", "control_noise_refiner": "2.1"}[self.add_control_noise_refiner]
        return f"{mode} ({len(self.control_layers_places)} control blocks, {self.control_in_dim}-channel input)"

    def block_config(self) -> DiTConfig:
        """The DiT config its blocks are built from: the same block code as the DiT's."""
        return dataclasses.replace(DiTConfig(), dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                   norm_eps=self.norm_eps, qk_norm=self.qk_norm, n_refiner_layers=self.n_refiner_layers,
                                   all_patch_size=self.all_patch_size, all_f_patch_size=self.all_f_patch_size,
                                   in_channels=self.control_in_dim)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = "config.json") -> ControlNetConfig:
        """Read a ZImageControlNetModel config.json; the places are layer indices (0 allowed), the mode null or a
        name: checked here, the other keys as every config's are."""
        extra: dict[str, Any] = {}
        for key in cls.PLACES:
            value = data.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                      for v in value):
                raise CheckpointError(f'{where}: "{key}" is {show_value(value)}; expected a list of layer indices: '
                                      f"{FIX}")
            extra[key] = tuple(value)
        if "add_control_noise_refiner" in data:
            extra["add_control_noise_refiner"] = data["add_control_noise_refiner"]
        rest = {k: v for k, v in data.items() if k not in (*cls.PLACES, "add_control_noise_refiner")}
        return _from_dict(cls, rest, where, extra)
