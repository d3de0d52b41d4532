"""The models of a pipeline, one per component: opened once, loaded for a stage as the plan places them, released
when the stage ends.

`StageModels` is the base of `pipeline.ZImagePipeline`: the file handles (config and tensor source per component,
headers read once), the tensor tables the planner sizes, the loaded models, and the one way a stage's output is
checked for NaN/inf. The pipeline sets `plan` before a stage loads its model, and `loras` before the DiT loads.
"""

from __future__ import annotations

from typing import Any

import torch

from .components import REGISTRY
from .loras import Loras
from .quant.qlinear import prepare_resident, release_scratch
from .runtime import plan
from .runtime.memory import trim_host
from .runtime.numerics import finite, nonfinite_error
from .runtime.placement import place
from .runtime.sizes import TensorTable, layout, recipe_label, source_table
from .weights.comfy_quant import Int8ComputeSource
from .weights.components import ModelFiles, open_component
from .weights.gguf_source import GGUFSource
from .weights.load import load_module
from .weights.sources import TensorSource


class StageModels:
    loras: Loras  # set by the pipeline once the DiT's config is known

    def __init__(self, files: ModelFiles, device: torch.device, dtype: torch.dtype, keep_loaded: bool,
                 int8_compute: bool) -> None:
        self.files, self.device, self.dtype, self.keep_loaded = files, device, dtype, keep_loaded
        self.int8_compute = int8_compute  # GGML-quantized Linears converted to int8 rows at load (comfy_quant.py)
        # The VAE never runs in plain fp16 (it overflows); fp32 unless bf16 compute was chosen.
        self.vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        self.plan: plan.Plan | None = None
        # (config, source) per component, opened once: the index stays, the maps go at each stage's end
        self._sources: dict[str, tuple[Any, TensorSource]] = {}
        self._tables: dict[str, TensorTable] = {}  # per component, from the headers: the files do not change
        self._models: dict[str, torch.nn.Module] = {}

    def _open(self, which: str) -> tuple[Any, TensorSource]:
        """(config, source) of a component; headers are read once per pipeline. The source maps its files when a
        tensor is read, and `_close_source` unmaps them."""
        if which not in self._sources:
            comp = open_component(getattr(self.files, which), which)
            source = comp.source
            if self.int8_compute and which in ("dit", "text_encoder"):
                source = Int8ComputeSource(source, layout(comp.config).linears)
            self._sources[which] = comp.config, source
        return self._sources[which]

    def _close_source(self, which: str) -> None:
        """Unmap a component's files when its stage ends: every page the stage read through the map would stay
        resident (the text encoder's through all DiT steps). Config and index stay; the next read maps again.
        Called with keep_loaded too: a kept model's weights hold the pages they view by themselves, and the open
        (cached in components.identify, shared) must not hold them past the pipeline."""
        if which in self._sources:
            self._sources[which][1].close()

    def tensor_table(self, which: str) -> TensorTable:
        """A component's typed tensor table (official name -> (shape, stored type)), from its file headers: what
        the planner sizes, tensor by tensor."""
        if which not in self._tables:
            self._tables[which] = source_table(self._open(which)[1])
        return self._tables[which]

    def weight_format(self, which: str) -> str:
        """What a component's file is, in one word: the recipe its GGUF metadata names (Q4_K_M, Q8_0, ...), else
        the type most of its block weights are stored in (Q4_K, BF16, int8, nf4). Labels the plan and the PNG."""
        cfg, src = self._open(which)
        stored = getattr(src, "inner", src)
        file_type = stored.meta("general.file_type") if isinstance(stored, GGUFSource) else None
        return recipe_label(cfg, self.tensor_table(which), file_type)

    def _drop_stale(self, new: plan.Plan) -> None:
        """Kept models placed under a plan whose stage differs from the new one (another size moves blocks between
        resident and streamed, or changes attention chunking) are freed, to be placed again."""
        def placed(p: plan.Plan, which: str) -> tuple:
            stage = p.stage(which)
            return stage.resident, stage.streamed, stage.attention, stage.attention_chunk

        for which in list(self._models):
            if self.plan is None or placed(self.plan, which) != placed(new, which):
                self._free(which)

    def _load(self, which: str) -> torch.nn.Module:
        if which in self._models:
            return self._models[which]
        cfg, src = self._open(which)
        label, cls = REGISTRY[which].label, REGISTRY[which].model
        with torch.device("meta"):
            model = cls(cfg)
        if which == "dit" and self.loras:  # side paths on the DiT's linears, placed with their blocks
            src = self.loras.attach(model, src, self.dtype)
        stage = self.plan.stage(which) if self.plan else None
        if which == "vae":
            model = self._load_vae_part(model, label)
        else:
            model = place(model, src, stage, self.device, self.dtype, label)
            if self.device.type == "cpu":
                prepare_resident(model)
            if which in ("dit", "controlnet") and stage is not None:
                model.set_attention_chunk(stage.attention_chunk if stage.attention == "chunked" else None)
        self._models[which] = model
        return model

    def _load_vae_part(self, model: torch.nn.Module, label: str) -> torch.nn.Module:
        """The VAE's decoder or encoder (on `meta`) loaded in the VAE's dtype. Cast from a file stored in another
        float type (fp32 from the checkpoint's bf16) or moved to a GPU, its tensors are copies, and load_module hands
        the file's pages under them back (full size at 512x512, fp32: the decode stage measured 1.237 GiB above the
        baseline against 1.186 planned with the decoder's bf16 pages, 0.09 GiB, resident beside its fp32 copy; 1.090
        with them gone). On the CPU, tensors stored in the VAE's dtype, or packed (a GGUF VAE's quantized linears),
        are views."""
        return load_module(model, self._open("vae")[1], self.vae_dtype, self.device, label)

    def _release(self, which: str) -> None:
        """The end of a stage: unmap its files; free the component (its pinned host chunks first) and the
        dequantize scratch unless models are kept loaded."""
        self._close_source(which)
        release_scratch()  # sized for this stage's largest weight: the next stage plans its own
        if not self.keep_loaded:
            self._free(which)
        trim_host()

    def _free(self, which: str) -> None:
        model = self._models.pop(which, None)
        close = getattr(getattr(model, "runner", None), "close", None)
        if close is not None:
            close()
        release_scratch()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_finite(self, which: str, output: torch.Tensor, model: type[torch.nn.Module] | None = None,
                      label: str | None = None) -> None:
        """One isfinite on what a stage hands on (the latent's or the image's size, never the weights). On NaN/inf:
        free what is loaded, then find out why from that component's weights (runtime/numerics.py); `model` and
        `label` for a model of the component other than its run model (the VAE encoder)."""
        if finite(output):
            return
        for loaded in list(self._models):
            self._free(loaded)
        config, source = self._open(which)
        raise nonfinite_error(which, config, source, self.vae_dtype if which == "vae" else self.dtype, model, label)
