"""The text-to-image pipeline: load components, and `generate()` as a generator of stages.

Stages run one after another (encode → N DiT steps → decode) and, unless `keep_loaded`, each component is loaded
just before its stage and freed after it, so peak memory is the largest stage rather than the sum.
`generate()` yields an event after encoding, after each step and after decoding: progress bars, cancellation and
per-stage memory figures all hang off those events.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image

from . import __version__
from .components import COMPONENTS
from .config import MAX_TEXT_TOKENS, DiTConfig, ModelConfig
from .control import CONTROL_ARGS, ControlFile, ControlRequest, control_latents, control_request
from .enhance import DEFAULT_MAX_TOKENS, Enhanced, enhance
from .errors import BudgetError, OptionError
from .image import to_pil
from .init_image import InitImage, init_request
from .inputs import image_tensor, mask_tensor
from .loras import Loras
from .models.controlnet import controlled
from .models.vae_encoder import AutoencoderEncoder
from .options import (
    budget_bytes,
    check_budgets,
    check_guidance,
    check_seed,
    check_size,
    check_steps,
    check_text,
    defaults_of,
    grid_of,
    guidance_on,
)
from .preview import preview_image
from .quant.qlinear import release_scratch
from .runtime import plan
from .runtime.budget import resolve_device, usable_budget
from .runtime.memory import is_out_of_memory, map_large_host_blocks, peak_bytes, reset_peak, reused_heap, trim_host
from .runtime.plan_format import format_plan
from .runtime.sizes import source_table
from .runtime.units import format_size
from .sampling import (
    combine_cfg,
    euler_step,
    get_noise,
    get_sigmas,
    guidance_active,
    inpaint_blend,
    model_time,
    scale_noise,
)
from .stage_models import StageModels
from .text import PromptTokenizer, Tokens
from .weights.checks import check_vocabulary
from .weights.components import ModelFiles, open_language_model, resolve_model, scheduler_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Event:
    """One finished stage: `image_encoded` (img2img and inpainting: the init image through the VAE encoder),
    `encoded` (the prompt), `step` (once per DiT forward), `decoded` (once, with the image)."""

    stage: str
    step: int = 0
    steps: int = 0
    seconds: float = 0.0
    peak_bytes: int = 0
    latents: torch.Tensor | None = None
    image: Image.Image | None = None
    info: dict[str, Any] = field(default_factory=dict)
    denoised: torch.Tensor | None = None  # step events: the denoised estimate x0 = x_t - sigma_t * v (preview.py)
    # encoded and decoded: the part of `seconds` spent placing the stage's weights (the text encoder's, the VAE's).
    # 0 elsewhere: the DiT is placed before its first step's clock starts (on the CPU its streamed blocks are read
    # from the file inside each step); image_encoded's seconds hold placing the VAE encoder
    load_seconds: float = 0.0

    @cached_property
    def preview(self) -> Image.Image | None:
        """Step events: a small RGB preview of `denoised` (half the image's size), made when first read."""
        return None if self.denoised is None else preview_image(self.denoised)


@dataclass(frozen=True)
class Request:
    """A run's arguments checked, the model's defaults filled in, its images read and prepared once (`prepare`):
    the parameters (read-only: what `Event.info` carries and images store), the init image, the control inputs.
    Run by the pipeline that made it; run again, it makes the same image (the seed is drawn once, in `prepare`)."""

    params: Mapping[str, Any]
    init: InitImage | None
    control: ControlRequest | None
    pipeline: Any = field(repr=False, compare=False)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto" and dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype}: expected auto, bf16, fp16 or fp32")
    return DTYPES[plan.resolve_dtype(dtype, str(device))]


class ZImagePipeline(StageModels):
    def __init__(self, files: ModelFiles, device: torch.device, dtype: torch.dtype, keep_loaded: bool = False,
                 vram: int | None = None, ram: int | None = None,
                 loras: Sequence[tuple[str | Path, float]] = (), control: str | Path | None = None,
                 int8_compute: bool = False) -> None:
        super().__init__(files, device, dtype, keep_loaded, int8_compute)
        self.vram, self.ram = vram, ram
        map_large_host_blocks()  # freed stage memory goes back to the OS: host memory as the plan counts it
        self.tokenizer = PromptTokenizer(files.tokenizer, MAX_TEXT_TOKENS)
        self.scheduler = scheduler_config(files)
        self.dit_config: DiTConfig = self._open("dit")[0]
        self.loras = Loras.read(loras, self.dit_config)  # checked now; their tensors are read as the DiT loads
        self.control = ControlFile.open(control, self.dit_config) if control is not None else None
        if self.control is not None:  # a component of this pipeline, opened from its own file
            self._sources["controlnet"] = self.control.config, self.control.source
        ids = self.tokenizer.tokenizer.get_vocab(with_added_tokens=True).values()
        check_vocabulary(files.tokenizer, max(ids, default=0), files.text_encoder,
                         self._open("text_encoder")[0].vocab_size)
        # default size, steps and guidance: the demo's for the demo's DiT (wherever its folder is), else Turbo's
        self.defaults: ModelConfig = defaults_of(self.dit_config)
        self.grid = grid_of(self.dit_config, self._open("vae")[0].scale)

    # -- planning ----------------------------------------------------------------------------------------------
    @cached_property
    def budget(self) -> tuple[int, int]:
        """(bytes, headroom) for tensors, fixed at the first plan: measured again later, free memory would no longer
        count what kept models (keep_loaded) already hold, and each image would plan for less."""
        return usable_budget(str(self.device), self.vram, self.ram)

    def make_plan(self, width: int, height: int, cfg: float, caption_tokens: int = MAX_TEXT_TOKENS,
                  image: bool = False, enhance_tokens: int = 0) -> plan.Plan:
        """The memory plan for one image, from the tensors the files really hold: which blocks stay resident,
        attention chunking, VAE tiling, host memory; with keep_loaded, every stage beside the other components.
        `image`: an init image is encoded first (img2img, inpainting); `enhance_tokens`: the prompt enhancer first."""
        config = ModelConfig(dit=self.dit_config, text_encoder=self._open("text_encoder")[0],
                             vae=self._open("vae")[0])
        text = (source_table(open_language_model(self.files.text_encoder)[1]) if enhance_tokens  # the whole LM's
                else self.tensor_table("text_encoder"))
        return plan.plan_for(config, self.weight_format("dit"), width, height, guidance_on(cfg), str(self.device),
                             self.vram, self.ram, DTYPE_NAMES[self.dtype], self.weight_format("text_encoder"),
                             caption_tokens=caption_tokens, dit_tensors=self.tensor_table("dit"),
                             text_tensors=text, keep_loaded=self.keep_loaded, budget=self.budget,
                             model_name=self.files.name, encode=image, enhance_tokens=enhance_tokens,
                             adapter_tensors=self.loras.table() if self.loras else None,
                             control=(self.control.config, self.tensor_table("controlnet")) if self.control else None,
                             converted=frozenset(w for w in ("dit", "text_encoder")
                                                 if getattr(self._open(w)[1], "converts", False)))

    def enhance_stage(self, cfg: Any, source: Any, tokens: int) -> plan.StagePlan:
        """The prompt enhancer's stage of the plan (runtime/enhance_plan.py: what `plan --enhance` prints) for a
        context of `tokens`, beside the models this pipeline keeps loaded; BudgetError when even streaming every
        block does not fit."""
        from .runtime.enhance_plan import enhance_stage
        from .runtime.residency import Beside, NoFit

        budget, headroom = self.budget
        config = ModelConfig(dit=self.dit_config, text_encoder=cfg, vae=self._open("vae")[0])
        req = plan.PlanRequest(config, budget, text_quant=self.weight_format("text_encoder"), device=str(self.device),
                               dtype=DTYPE_NAMES[self.dtype], headroom=headroom, text_tensors=source_table(source),
                               enhance_tokens=tokens)
        loaded = [self.plan.stage(w) for w in self._models] if self.plan else []
        kept = Beside(sum(s.loaded_bytes for s in loaded), 0)
        kept_host = sum(s.pinned_bytes + s.host_weight_bytes for s in loaded)  # on cuda: their host-side parts
        try:
            stage = enhance_stage(req, kept)
            return plan.with_host(replace(stage, kept_bytes=kept.kept, kept_host_bytes=kept_host), req.kind)
        except NoFit as e:
            option = "--vram" if self.device.type == "cuda" else "--ram"
            raise BudgetError(f"{option} {format_size(budget + headroom)} is too small for the prompt enhancer "
                              f"({e.parts}); use a smaller quant of the text encoder (a Q4_K_M GGUF) or fewer "
                              f"--max-tokens") from None

    def int8_streaming(self, made: plan.Plan) -> str | None:
        """Why `made` does not suit --int8-compute, or None: it converts a block's Linears as the block is read, and
        on the CPU a streamed DiT block is read from the file again at every step, so it would be converted again
        each time (the text encoder's run once per prompt: no more than loading them)."""
        s = made.stage("dit")
        if not (self.device.type == "cpu" and s.streamed and getattr(self._open("dit")[1], "converts", False)):
            return None
        ram = format_size(made.request.budget + made.request.headroom)
        return (f"--int8-compute: under --ram {ram} the plan streams {len(s.streamed)} of the DiT's {len(s.blocks)} "
                f"blocks, each converted to int8 again at every step; raise --ram until `zimage-lite plan "
                f"--int8-compute` shows none of them streamed, or leave --int8-compute off")

    def enhance(self, prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0, temperature: float = 0.0,
                system: str | Path | None = None) -> Enhanced:
        """`prompt` rewritten by the text encoder run as an LM (enhance.py): `.prompt`, `.params()`, tokens/s."""
        return enhance(self, prompt, max_tokens, seed, temperature, system)

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        """Caption features (L, hidden) of one prompt."""
        return self._encode(self.tokenizer.encode(prompt))

    def _encode(self, tokens: Tokens) -> torch.Tensor:
        feats = self._load("text_encoder")(tokens.ids, self.device, self.dtype)
        self._check_finite("text_encoder", feats)
        return feats

    # -- generation -------------------------------------------------------------------------------------------
    def run_params(self, prompt: str, negative: str = "", width: int | None = None, height: int | None = None,
                   steps: int | None = None, seed: int | None = None, cfg: float | None = None,
                   cfg_normalization: float = 0.0, cfg_truncation: float = 1.0, image: Image.Image | None = None,
                   mask: Image.Image | None = None, strength: float | None = None, **control: Any) -> dict[str, Any]:
        """generate()'s arguments checked (OptionError naming the option), the model's defaults filled in, and
        everything an image needs to be made again: the parameters `Event.info` carries and images store."""
        return self.prepare(prompt, negative, width, height, steps, seed, cfg, cfg_normalization, cfg_truncation,
                            image, mask, strength, **control).params.copy()

    def prepare(self, prompt: str, negative: str = "", width: int | None = None, height: int | None = None,
                steps: int | None = None, seed: int | None = None, cfg: float | None = None,
                cfg_normalization: float = 0.0, cfg_truncation: float = 1.0, image: Image.Image | None = None,
                mask: Image.Image | None = None, strength: float | None = None, **control: Any) -> Request:
        """generate()'s arguments as a `Request` for `run` (its `params` are `run_params`')."""
        d = self.defaults
        if unknown := sorted(set(control) - set(CONTROL_ARGS)):
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}: generate() takes its own and, for a "
                            f"ControlNet given to load, {', '.join(CONTROL_ARGS)}")
        steps = check_steps(d.default_steps if steps is None else steps, self.scheduler.num_train_timesteps)
        ctrl = control_request(self.control, image, mask, strength, width, height, self.grid, **control)
        if ctrl is not None:  # the image and mask are the ControlNet's inpaint input, not an init image
            image, mask, width, height = None, None, ctrl.width, ctrl.height
        # img2img / inpainting: the size is the image's unless given
        init = init_request(image, mask, strength, width, height, steps, self.grid)
        if init is not None:
            width, height = init.width, init.height
        width, height = check_size(d.default_size if width is None else width,
                                   d.default_size if height is None else height, self.grid)
        cfg, cfg_normalization, cfg_truncation = check_guidance(d.default_cfg if cfg is None else cfg,
                                                                cfg_normalization, cfg_truncation)
        negative = check_text(negative, "--negative", empty_ok=True)
        params: dict[str, Any] = {
            "prompt": check_text(prompt, "PROMPT"), "negative": negative if guidance_on(cfg) else "",
            "seed": secrets.randbelow(2**63) if seed is None else check_seed(seed), "steps": steps, "cfg": cfg,
            "cfg_normalization": cfg_normalization, "cfg_truncation": cfg_truncation, "width": width,
            "height": height, **(init.params() if init else {}), "model": self.files.model or self.files.name,
            **({"loras": self.loras.params()} if self.loras else {}),
            **({"int8_compute": True} if self.int8_compute else {})}  # a bool: read_params keeps it as it comes
        for which in COMPONENTS:  # only what overrode the model's own files: the model names the rest
            if which in self.files.overridden:
                params[which] = os.path.abspath(getattr(self.files, which))
        params.update({"dit_format": self.weight_format("dit"), "text_encoder_format": self.weight_format(
            "text_encoder"), "dtype": DTYPE_NAMES[self.dtype], "device": str(self.device), "version": __version__,
            **(ctrl.params(self.control) if ctrl else {})})
        return Request(MappingProxyType(params), init, ctrl, self)

    def generate(self, prompt: str, negative: str = "", width: int | None = None, height: int | None = None,
                 steps: int | None = None, seed: int | None = None, cfg: float | None = None,
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0, image: Image.Image | None = None,
                 mask: Image.Image | None = None, strength: float | None = None, **control: Any) -> Iterator[Event]:
        """Yield `encoded`, then one `step` event per DiT forward, then `decoded` with the PIL image.

        Size, steps and guidance left at None are the model's defaults (Turbo: 1024x1024, 8 steps, no CFG; the demo:
        256x256). With `image`: img2img from it at `strength` (default 0.6: the DiT runs the last ~60% of the steps),
        first an `image_encoded` event; with `mask` too (white = repaint, black = keep): inpainting (default strength
        1.0). With an image and no width and height, the size is the image's rounded down to a multiple of 16.
        The arguments are checked here, before the first event is asked for: a bad one raises OptionError from this
        call. Every event's `info` holds the run parameters (`run_params`). With `load(control=...)`: `control_image`,
        `control_scale` (0.75), `control_preprocess` ("canny"), and with a 2.x ControlNet `image` + `mask` for
        ControlNet inpainting (control.py `control_request`)."""
        return self.run(self.prepare(prompt, negative, width, height, steps, seed, cfg, cfg_normalization,
                                     cfg_truncation, image, mask, strength, **control))

    @torch.inference_mode()
    def run(self, request: Request) -> Iterator[Event]:
        """generate()'s events for a prepared request (`prepare`)."""
        if request.pipeline is not self:
            raise OptionError("a Request runs on the pipeline whose prepare() made it: prepare it with this one")
        params, init, ctrl = request.params.copy(), request.init, request.control
        cfg = params["cfg"]
        tokens = self.tokenizer.encode(params["prompt"])
        neg_tokens = self.tokenizer.encode(params["negative"]) if guidance_on(cfg) else None
        longest = max(tokens.ids.shape[0], neg_tokens.ids.shape[0] if neg_tokens else 0)
        new_plan = self.make_plan(params["width"], params["height"], cfg, caption_tokens=longest,
                                  image=init is not None or ctrl is not None)
        if (refused := self.int8_streaming(new_plan)) is not None:
            raise OptionError(refused)
        self._drop_stale(new_plan)
        self.plan = new_plan
        try:
            yield from self._stages(tokens, neg_tokens, params, init, ctrl)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            for which in list(self._models):
                self._free(which)
            option = "--vram" if self.device.type == "cuda" else "--ram"
            raise BudgetError(
                f"out of {self.device.type} memory: set a smaller {option} so that more blocks stream, use a smaller "
                f"quant (--dit with a Q4_K_M or Q3_K_M file) or a lower resolution. The plan it ran under:\n"
                f"{format_plan(self.plan)}") from None
        finally:
            # a run stopped early (break, close(), an error) lets go of what its stage held, as a finished stage does
            for which in list(self._sources):
                self._release(which)

    def _stages(self, tokens: Tokens, neg_tokens: Tokens | None, params: dict[str, Any],
                init: InitImage | None, ctrl: ControlRequest | None) -> Iterator[Event]:
        use_cfg = neg_tokens is not None
        width, height, steps, seed = params["width"], params["height"], params["steps"], params["seed"]
        cfg, cfg_normalization, cfg_truncation = params["cfg"], params["cfg_normalization"], params["cfg_truncation"]
        # One CPU generator for every draw, in the reference's order: the init image's posterior sample, then the noise
        generator = torch.Generator("cpu").manual_seed(seed)
        sigmas = get_sigmas(steps, self.scheduler.shift)
        start, init_latents = 0, None
        if init is not None:
            t0 = time.perf_counter()
            reset_peak(self.device)
            init_latents, start = self._encode_image(init, width, height, generator), init.start
            yield Event("image_encoded", seconds=time.perf_counter() - t0, peak_bytes=peak_bytes(self.device),
                        info={**params, "start": start, "notes": init.notes})
        context = None
        if ctrl is not None:  # once, before the prompt: the VAE encoder stage
            t0 = time.perf_counter()
            reset_peak(self.device)
            context = self._with_encoder(lambda encode: control_latents(
                ctrl, self.control.config, encode, self.dit_config.in_channels))
            yield Event("image_encoded", seconds=time.perf_counter() - t0, peak_bytes=peak_bytes(self.device),
                        info={**params, "start": 0, "notes": ()})
        t0 = time.perf_counter()
        reset_peak(self.device)
        self._load("text_encoder")
        loaded = time.perf_counter() - t0
        feats, cut = self._encode(tokens), tokens.truncated_from
        neg_feats = self._encode(neg_tokens) if use_cfg else None
        self._release("text_encoder")
        yield Event("encoded", seconds=time.perf_counter() - t0, peak_bytes=peak_bytes(self.device),
                    info={**params, "tokens": feats.shape[0], "truncated_from": cut}, load_seconds=loaded)

        dit = forward = self._load("dit")
        if ctrl is not None:
            forward = functools.partial(controlled, dit, self._load("controlnet"), context.to(self.device), ctrl.scale)
        noise = get_noise(generator, self.dit_config.in_channels, height, width).to(self.device)
        latents, mask = noise, None
        if init is not None:
            init_latents = init_latents.to(self.device)
            latents = scale_noise(init_latents, noise, sigmas[start])
            if init.mask is not None:
                mask = mask_tensor(init.mask, width, height, *noise.shape[2:]).to(self.device)
        times = model_time(sigmas[:-1])
        for i in range(start, steps):
            t0 = time.perf_counter()
            reset_peak(self.device)
            x = latents.to(self.dtype)
            t = times[i:i + 1].to(self.device)
            with reused_heap(self.device):  # runtime/memory.py
                if use_cfg and guidance_active(cfg, float(times[i]), cfg_truncation):
                    out = forward(torch.cat([x, x]), t.repeat(2), [feats, neg_feats])
                    pred = combine_cfg(out[0:1], out[1:2], cfg, cfg_normalization)
                else:
                    pred = forward(x, t, [feats])
            self._check_finite("dit", pred)
            denoised = latents + sigmas[i].to(self.device) * pred.float()  # x0 = x_t - sigma v, v = -pred (preview)
            latents = euler_step(latents, pred, sigmas[i].to(self.device), sigmas[i + 1].to(self.device))
            if mask is not None:
                latents = inpaint_blend(latents, init_latents, noise, mask, sigmas[i + 1] if i + 1 < steps else None)
                denoised = inpaint_blend(denoised, init_latents, noise, mask, None)  # the kept part: the original
            yield Event("step", i + 1 - start, steps - start, time.perf_counter() - t0, peak_bytes(self.device),
                        latents, info=params, denoised=denoised)
        del dit, forward  # this frame lives on through the VAE stage: its reference would keep the DiT (and its map)
        self._release("dit")
        if ctrl is not None:
            self._release("controlnet")

        t0 = time.perf_counter()
        reset_peak(self.device)
        vae_plan = self.plan.stage("vae")
        tile = vae_plan.tile if vae_plan.tiled else None
        vae = self._load("vae")
        loaded = time.perf_counter() - t0
        decoded = vae.decode(latents, tile=tile)[0]
        del vae
        self._check_finite("vae", decoded)  # to_pil would turn NaN into black, silently
        image = to_pil(decoded)
        self._release("vae")
        yield Event("decoded", steps - start, steps - start, time.perf_counter() - t0, peak_bytes(self.device), latents,
                    image, params, load_seconds=loaded)

    def _encode_image(self, init: InitImage, width: int, height: int, generator: torch.Generator) -> torch.Tensor:
        """The init image's latents (1, C, h, w) in fp32 on the CPU, a sample of the VAE posterior drawn from
        `generator`."""
        return self._with_encoder(lambda encode: encode(image_tensor(init.image, width, height), generator=generator))

    def _with_encoder(self, run: Callable[[Callable[..., torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """`run(encode)` on the CPU, `encode(pixels, generator=None)` the VAE encoder's latents (without a generator
        the posterior mean); the encoder is loaded for this stage only (never kept) and tiled as the plan says."""
        cfg = self._open("vae")[0]
        with torch.device("meta"):
            encoder = AutoencoderEncoder(cfg)
        encoder = self._load_vae_part(encoder, "VAE encoder")
        stage = self.plan.stage("vae_encode")
        encode = functools.partial(encoder.encode, tile=stage.tile if stage.tiled else None)
        try:
            latents = run(encode).cpu()
        finally:
            del encoder, encode
            self._close_source("vae")
            release_scratch()
            trim_host()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._check_finite("vae", latents, AutoencoderEncoder, "VAE encoder")
        return latents

    def text_to_image(self, prompt: str, **kwargs: Any) -> Image.Image:
        """Run all stages and return the image (generation parameters in `image.info`)."""
        for event in self.generate(prompt, **kwargs):
            if event.stage == "decoded":
                event.image.info.update({k: v if isinstance(v, list) else str(v) for k, v in event.info.items()})
                return event.image
        raise AssertionError("generate() ended without a decoded image")


def load(model: str | Path = "demo", *, dit: Path | None = None, text_encoder: Path | None = None,
         vae: Path | None = None, device: str | torch.device = "auto", dtype: str = "auto",
         vram: int | str | None = None,
         ram: int | str | None = None, keep_loaded: bool = False,
         loras: Sequence[tuple[str | Path, float]] = (), control: str | Path | None = None,
         int8_compute: bool = False) -> ZImagePipeline:
    """Open a model (a folder in the official layout, or 'demo') for generation; weights load stage by stage.

    `device`: 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device. `vram`/`ram` are memory budgets in bytes or as
    text ('4GB'); absent, what the device reports minus headroom.
    `loras`: (file, scale) pairs applied to the DiT as low-rank side paths, scale as diffusers' `set_adapters`
    weights (alpha / rank comes on top); read and checked here. `control`: a ControlNet file (control.py).
    `int8_compute`: GGUF-quantized Linears are converted to int8 rows at load and run by integer matmuls
    (quant/int8_compute.py), at some extra error.
    """
    if not isinstance(model, (str, Path)):
        raise OptionError(f"model={model!r}: give a model folder, a weights file or 'demo'")
    dev = resolve_device(device)
    vram_bytes, ram_bytes = budget_bytes(vram, "--vram"), budget_bytes(ram, "--ram")
    check_budgets(dev.type, vram, ram)  # options first: opening the files takes a while
    vram, ram = vram_bytes, ram_bytes
    files = resolve_model(model, dit=dit, text_encoder=text_encoder, vae=vae)
    return ZImagePipeline(files, dev, resolve_dtype(dtype, dev), keep_loaded=keep_loaded, vram=vram, ram=ram,
                          loras=loras, control=control, int8_compute=int8_compute)
