"""Where each component's weights and config come from: a model folder in the official layout, or one file each.

`resolve_model` turns `--model` and the per-component overrides into paths; `open_*` turn a path into
(config, tensor source) with official tensor names, whatever the layout on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import DiTConfig, SchedulerConfig, TextEncoderConfig, VAEConfig, read_json
from ..errors import CheckpointError
from .sources import RenamedSource, SafetensorsSource, TensorSource

# Component → folder name in the official (diffusers) layout.
FOLDERS = {"dit": "transformer", "text_encoder": "text_encoder", "tokenizer": "tokenizer", "vae": "vae"}
LAYOUT_HINT = ("a model folder holds transformer/, text_encoder/, tokenizer/ and vae/ "
               "(the Tongyi-MAI/Z-Image-Turbo layout)")


@dataclass(frozen=True)
class ModelFiles:
    name: str
    dit: Path
    text_encoder: Path
    tokenizer: Path  # tokenizer.json
    vae: Path
    scheduler: Path | None  # scheduler_config.json, when present


def resolve_model(model: str | Path, dit: Path | None = None, text_encoder: Path | None = None,
                  vae: Path | None = None, tokenizer: Path | None = None) -> ModelFiles:
    """`model` is a folder in the official layout or 'demo'; the other arguments override one component each."""
    if str(model) == "demo":
        from ..demo import demo_path

        root, name = demo_path(), "demo"
    else:
        root, name = Path(model), Path(model).name
    if not root.is_dir():
        raise CheckpointError(f"--model {root}: folder not found; {LAYOUT_HINT}")

    def part(key: str, override: Path | None) -> Path:
        if override is not None:
            if not Path(override).exists():
                raise CheckpointError(f"{override}: file not found (--{key.replace('_', '-')})")
            return Path(override)
        path = root / FOLDERS[key]
        if not path.is_dir():
            raise CheckpointError(f"{root}: no {FOLDERS[key]}/ folder; {LAYOUT_HINT}")
        return path

    tok = part("tokenizer", tokenizer)
    tok_file = tok / "tokenizer.json" if tok.is_dir() else tok
    sched = root / "scheduler" / "scheduler_config.json"
    return ModelFiles(name, part("dit", dit), part("text_encoder", text_encoder), tok_file, part("vae", vae),
                      sched if sched.is_file() else None)


def _folder_source(path: Path) -> TensorSource:
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a component folder with config.json and safetensors")
    return SafetensorsSource.from_folder(path)


def _strip_prefix(source: TensorSource, prefix: str) -> TensorSource:
    names = list(source.names())
    if any(n.startswith(prefix) for n in names):
        return RenamedSource(source, {n[len(prefix):]: n for n in names if n.startswith(prefix)})
    return source


def open_dit(path: Path) -> tuple[DiTConfig, TensorSource]:
    return DiTConfig.from_dict(read_json(path / "config.json")), _folder_source(path)


def open_text_encoder(path: Path) -> tuple[TextEncoderConfig, TensorSource]:
    # Qwen3ForCausalLM stores `model.layers...`; Qwen3Model without the prefix: accept both.
    cfg = TextEncoderConfig.from_dict(read_json(path / "config.json"))
    return cfg, _strip_prefix(_folder_source(path), "model.")


def open_vae(path: Path) -> tuple[VAEConfig, TensorSource]:
    return VAEConfig.from_dict(read_json(path / "config.json")), _folder_source(path)


def scheduler_config(files: ModelFiles) -> SchedulerConfig:
    return SchedulerConfig.from_dict(read_json(files.scheduler)) if files.scheduler else SchedulerConfig()
