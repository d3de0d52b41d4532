"""The text-to-image pipeline: load components, and `generate()` as a generator of stages.

Stages run one after another (encode → N DiT steps → decode) and, unless `keep_loaded`, each component is loaded
just before its stage and freed after it, so peak memory is the largest stage rather than the sum.
`generate()` yields an event after encoding, after each step and after decoding: progress bars, cancellation and
per-stage memory figures all hang off those events.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .config import MAX_TEXT_TOKENS, DiTConfig
from .errors import OptionError
from .image import to_pil
from .models.dit import ZImageDiT
from .models.qwen3 import Qwen3Encoder
from .models.vae import AutoencoderDecoder
from .runtime.memory import peak_bytes, reset_peak
from .sampling import combine_cfg, euler_step, get_noise, get_sigmas, guidance_active, model_time
from .text import PromptTokenizer
from .weights.components import ModelFiles, open_dit, open_text_encoder, open_vae, resolve_model, scheduler_config
from .weights.load import load_module

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Event:
    """One finished stage: `encoded` (once), `step` (steps times), `decoded` (once, with the image)."""

    stage: str
    step: int = 0
    steps: int = 0
    seconds: float = 0.0
    peak_bytes: int = 0
    latents: torch.Tensor | None = None
    image: Image.Image | None = None
    info: dict[str, Any] = field(default_factory=dict)


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); without it bf16 matmuls are emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise OptionError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype}: expected auto, bf16, fp16 or fp32")
    return DTYPES[dtype]


def check_size(width: int, height: int, scale: int) -> None:
    step = 2 * scale  # VAE scale x patch size
    for opt, v in (("--width", width), ("--height", height)):
        if v < step or v % step:
            lo, hi = max(step, v // step * step), (v // step + 1) * step
            near = f"{lo} or {hi}" if lo != hi and lo != v else f"{hi}"
            raise OptionError(f"{opt} {v} is not a positive multiple of {step}: use {near}")


class ZImagePipeline:
    def __init__(self, files: ModelFiles, device: torch.device, dtype: torch.dtype, keep_loaded: bool = False,
                 quant: str = "") -> None:
        self.files, self.device, self.dtype, self.keep_loaded = files, device, dtype, keep_loaded
        # The VAE never runs in plain fp16 (it overflows); fp32 unless bf16 compute was chosen.
        self.vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        self.tokenizer = PromptTokenizer(files.tokenizer, MAX_TEXT_TOKENS)
        self.scheduler = scheduler_config(files)
        self.dit_config: DiTConfig = open_dit(files.dit)[0]
        self.quant = quant or "as stored"
        self._models: dict[str, torch.nn.Module] = {}

    # -- components -------------------------------------------------------------------------------------------
    def _load(self, which: str) -> torch.nn.Module:
        if which in self._models:
            return self._models[which]
        if which == "text_encoder":
            cfg, src = open_text_encoder(self.files.text_encoder)
            with torch.device("meta"):
                model = Qwen3Encoder(cfg)
            model = load_module(model, src, self.dtype, self.device, "text encoder")
        elif which == "dit":
            cfg, src = open_dit(self.files.dit)
            with torch.device("meta"):
                model = ZImageDiT(cfg)
            model = load_module(model, src, self.dtype, self.device, "DiT")
        else:
            cfg, src = open_vae(self.files.vae)
            with torch.device("meta"):
                model = AutoencoderDecoder(cfg)
            model = load_module(model, src, self.vae_dtype, self.device, "VAE")
        self._models[which] = model
        return model

    def _release(self, which: str) -> None:
        if not self.keep_loaded:
            self._models.pop(which, None)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def encode(self, prompt: str) -> tuple[torch.Tensor, int | None]:
        """Caption features (L, hidden) of one prompt, and the untruncated token count if it was cut."""
        tokens = self.tokenizer.encode(prompt)
        return self._load("text_encoder")(tokens.ids, self.device, self.dtype), tokens.truncated_from

    # -- generation -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: str, negative: str = "", width: int = 1024, height: int = 1024, steps: int = 8,
                 seed: int | None = None, cfg: float = 0.0, cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0) -> Iterator[Event]:
        """Yield `encoded`, then one `step` event per DiT forward, then `decoded` with the PIL image."""
        check_size(width, height, 8)
        if steps < 1:
            raise OptionError(f"--steps {steps}: at least 1 step is needed")
        seed = secrets.randbelow(2**63) if seed is None else seed
        use_cfg = cfg > 1.0
        params = {"prompt": prompt, "negative_prompt": negative if use_cfg else "", "seed": seed, "steps": steps,
                  "cfg": cfg, "width": width, "height": height, "model": self.files.name, "quant": self.quant}

        t0 = time.perf_counter()
        reset_peak(self.device)
        feats, cut = self.encode(prompt)
        neg_feats = self.encode(negative)[0] if use_cfg else None
        self._release("text_encoder")
        yield Event("encoded", seconds=time.perf_counter() - t0, peak_bytes=peak_bytes(self.device),
                    info={**params, "tokens": feats.shape[0], "truncated_from": cut})

        dit = self._load("dit")
        latents = get_noise(seed, self.dit_config.in_channels, height, width).to(self.device)
        sigmas = get_sigmas(steps, self.scheduler.shift)
        times = model_time(sigmas[:-1])
        for i in range(steps):
            t0 = time.perf_counter()
            reset_peak(self.device)
            x = latents.to(self.dtype)
            t = times[i:i + 1].to(self.device)
            if use_cfg and guidance_active(cfg, float(times[i]), cfg_truncation):
                out = dit(torch.cat([x, x]), t.repeat(2), [feats, neg_feats])
                pred = combine_cfg(out[0:1], out[1:2], cfg, cfg_normalization)
            else:
                pred = dit(x, t, [feats])
            latents = euler_step(latents, pred, sigmas[i].to(self.device), sigmas[i + 1].to(self.device))
            yield Event("step", i + 1, steps, time.perf_counter() - t0, peak_bytes(self.device), latents)
        self._release("dit")

        t0 = time.perf_counter()
        reset_peak(self.device)
        image = to_pil(self._load("vae").decode(latents)[0])
        self._release("vae")
        yield Event("decoded", steps, steps, time.perf_counter() - t0, peak_bytes(self.device), latents, image,
                    params)

    def text_to_image(self, prompt: str, **kwargs: Any) -> Image.Image:
        """Run all stages and return the image (generation parameters in `image.info`)."""
        for event in self.generate(prompt, **kwargs):
            if event.stage == "decoded":
                event.image.info.update({k: str(v) for k, v in event.info.items()})
                return event.image
        raise AssertionError("generate() ended without a decoded image")


def load(model: str | Path = "demo", *, dit: Path | None = None, text_encoder: Path | None = None,
         vae: Path | None = None, device: str = "auto", dtype: str = "auto",
         keep_loaded: bool = False) -> ZImagePipeline:
    """Open a model (a folder in the official layout, or 'demo') for generation; weights load stage by stage."""
    files = resolve_model(model, dit=dit, text_encoder=text_encoder, vae=vae)
    dev = resolve_device(device)
    return ZImagePipeline(files, dev, resolve_dtype(dtype, dev), keep_loaded=keep_loaded)
