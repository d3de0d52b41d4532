"""LoRA files. STAND-IN of the i12-formats branch's reader, TO BE REPLACED AT MERGE by that branch's file: it keeps
only the contract the runtime codes against and reads the diffusers/PEFT form alone
(`transformer.<official module>.lora_A.weight` / `.lora_B.weight` / optional `.alpha`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import DiTConfig
from ..errors import CheckpointError


@dataclass(frozen=True)
class Adapter:
    """One low-rank pair on one linear of the DiT."""

    down: torch.Tensor  # (rank, in_features) "A"
    up: torch.Tensor  # (out_features, rank) "B"
    alpha: float | None

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0] if self.alpha is not None else 1.0


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str
    adapters: dict[str, Adapter]  # official DiT linear name without ".weight": "layers.0.attention.to_q"
    skipped: tuple[str, ...]
    sha256: str


def read_lora(path: Path, dit: DiTConfig | None = None) -> LoraFile:
    path = Path(path)
    try:
        state = load_file(str(path))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors LoRA file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    skipped = []
    for key, t in state.items():
        name = key.removeprefix("transformer.")
        for leaf in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if name.endswith(leaf):
                pairs.setdefault(name[:-len(leaf)], {})[leaf] = t
                break
        else:
            skipped.append(key)
    adapters = {m: Adapter(p[".lora_A.weight"], p[".lora_B.weight"],
                           float(p[".alpha"]) if ".alpha" in p else None) for m, p in pairs.items()}
    return LoraFile(path, "diffusers", adapters, tuple(skipped), digest)
