"""Every run option's validation, one function per concern, shared by the CLI and the Python API.

Each check raises OptionError naming the option as the CLI spells it (`--steps`, `PROMPT`), the value, the range
allowed and why, so `zimage-lite run` and `ZImagePipeline.generate` refuse the same values with the same words. The
checks a run can make before anything is loaded take the Turbo architecture's bounds; `generate()` checks again
against the loaded model's own (its scheduler, its RoPE axes, its VAE). This module never imports torch: an option
error is reported without the seconds that import costs.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from pathlib import Path
from typing import NamedTuple

from .config import PRESETS, DiTConfig, ModelConfig, SchedulerConfig
from .errors import OptionError
from .runtime.units import MIB, format_option_size, parse_size

# torch.Generator.manual_seed takes any unsigned 64-bit integer; noise is drawn from it, so a seed is one of those.
SEED_LIMIT = 2**64
# The scheduler's num_train_timesteps: the model was trained on 1000 noise levels, so a schedule finer than that
# only samples between them, while each step is one more DiT forward (seconds to minutes each at full size).
MAX_STEPS = SchedulerConfig().num_train_timesteps
# Guidance scales in use are 0 (Turbo) to about 10 (Base uses 4-5); far above that the image saturates. The bound
# catches a slipped digit, and keeps pos + cfg * (pos - neg) well inside fp32.
MAX_CFG = 100.0
# Prompts are cut at 512 tokens (config.MAX_TEXT_TOKENS), a few KiB of text; a prompt file over 1 MiB is the wrong
# file (a binary, /dev/zero), refused before it is read whole.
MAX_PROMPT_FILE = 1 * MIB


class Grid(NamedTuple):
    """The image sizes a model can render: multiples of `cell` pixels, up to `max_width` x `max_height`."""

    cell: int  # VAE scale x patch size: one DiT token covers cell x cell pixels
    max_width: int
    max_height: int


def grid_of(dit: DiTConfig, vae_scale: int) -> Grid:
    """A model's image grid. Token (h, w) sits at RoPE position (frame, h, w), and the DiT's `axes_lens` are the
    positions each axis was built for (zimage_spec.md 1.2, 4.3): height 512 tokens x 16 pixels = 8192 for Turbo."""
    cell = vae_scale * dit.patch_size
    return Grid(cell, dit.axes_lens[2] * cell, dit.axes_lens[1] * cell)


TURBO_GRID = grid_of(PRESETS["turbo"].dit, PRESETS["turbo"].vae.scale)


def _integer(value: object, option: str) -> int:
    if isinstance(value, bool):  # an int to Python, never meant as one here
        raise OptionError(f"{option} {value!r}: expected a whole number")
    try:
        return operator.index(value)
    except TypeError:
        raise OptionError(f"{option} {value!r}: expected a whole number") from None


def _number(value: object, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too
        raise OptionError(f"{option} {value!r}: expected a number")
    if not math.isfinite(value):
        raise OptionError(f"{option} {value}: expected a finite number")
    return float(value)


def check_seed(seed: object) -> int:
    """The noise seed: an integer in [0, 2**64), the range of the CPU generator it seeds."""
    seed = _integer(seed, "--seed")
    if not 0 <= seed < SEED_LIMIT:
        raise OptionError(f"--seed {seed}: use an integer from 0 to 2**64 - 1 = {SEED_LIMIT - 1} (the range of the "
                          f"64-bit noise generator)")
    return seed


def check_steps(steps: object, limit: int = MAX_STEPS) -> int:
    """DiT forwards: 1 to `limit`, the scheduler's num_train_timesteps."""
    steps = _integer(steps, "--steps")
    if not 1 <= steps <= limit:
        raise OptionError(f"--steps {steps}: use 1 to {limit} (each step is one DiT forward; the scheduler has "
                          f"{limit} training timesteps, so more steps only sample between them; Turbo needs 8)")
    return steps


def guidance_on(cfg: float) -> bool:
    """Classifier-free guidance runs when the scale is above 0, as in every diffusers Z-Image pipeline (0.37 on).
    The official code runs it above 1 only; the two agree for Turbo (0) and Base (4-5), and differ for 0 < cfg <= 1,
    where zimage-lite follows diffusers, the reference its images are held to."""
    return cfg > 0.0


def check_guidance(cfg: object, normalization: object = 0.0, truncation: object = 1.0) -> tuple[float, float, float]:
    """Guidance scale in [0, MAX_CFG] (CFG runs above 0: guidance_on), normalization >= 0 (0: off)
    and truncation in [0, 1] (the model time t = 1 - sigma runs from 0 to 1)."""
    cfg = _number(cfg, "--cfg")
    if not 0 <= cfg <= MAX_CFG:
        raise OptionError(f"--cfg {cfg:g}: use 0 to {MAX_CFG:g} (guidance runs above 0: Base uses 4-5, Turbo 0; "
                          f"{'a negative scale is no guidance at all' if cfg < 0 else 'higher saturates the image'})")
    normalization = _number(normalization, "--cfg-normalization")
    if normalization < 0:
        raise OptionError(f"--cfg-normalization {normalization:g}: use 0 (off) or a positive factor: the guided "
                          f"prediction's norm is capped at this times the positive one's")
    truncation = _number(truncation, "--cfg-truncation")
    if not 0 <= truncation <= 1:
        raise OptionError(f"--cfg-truncation {truncation:g}: use 0 to 1 (guidance stops once the model time "
                          f"t = 1 - sigma, which runs from 0 to 1, passes it; 1: guidance at every step)")
    return cfg, normalization, truncation


def check_image_options(image: object, mask: object, strength: object) -> float | None:
    """img2img / inpainting options that go together: a mask or a strength needs an init image; the strength is in
    (0, 1]. Returns the strength (None: text-to-image, or the default for the image: 0.6, with a mask 1.0)."""
    if image is None:
        if mask is not None:
            raise OptionError("--mask needs --image: the mask marks what to repaint in that image")
        if strength is not None:
            raise OptionError("--strength needs --image: text-to-image always starts from pure noise")
        return None
    return None if strength is None else check_strength(strength)


def check_strength(strength: object) -> float:
    """img2img strength in (0, 1]."""
    strength = _number(strength, "--strength")
    if not 0 < strength <= 1:
        raise OptionError(f"--strength {strength:g}: use a value in (0, 1]: how much of the schedule is run again "
                          f"from the image (1: from pure noise; small values keep more of the image)")
    return strength


def check_size(width: object, height: object, grid: Grid = TURBO_GRID) -> tuple[int, int]:
    """Width and height: multiples of the grid's cell, from one cell up to what the model's RoPE axes cover."""
    sizes = []
    for option, value, top, across in (("--width", width, grid.max_width, "wide"),
                                       ("--height", height, grid.max_height, "high")):
        v = _integer(value, option)
        cell = grid.cell
        why = f"one DiT token covers {cell}x{cell} pixels"
        if v < cell:
            raise OptionError(f"{option} {v}: an image is at least {cell} pixels {across} ({why}): use {cell} or more")
        if v > top:
            raise OptionError(f"{option} {v}: at most {top} ({top // cell} tokens of {cell} pixels, as far as the "
                              f"model's RoPE axes_lens reach): use {top} or less")
        if v % cell:  # between two multiples, both in range (cell and top are multiples)
            lo = v // cell * cell
            raise OptionError(f"{option} {v} is not a multiple of {cell} ({why}): use {lo} or {lo + cell}")
        sizes.append(v)
    return sizes[0], sizes[1]


def check_budgets(device_kind: str, vram: int | str | None, ram: int | str | None) -> None:
    """`--vram` bounds a GPU run and `--ram` a CPU run; the other one would be silently ignored, so it is refused."""
    def shown(v: int | str) -> str:
        return v if isinstance(v, str) else format_option_size(v)

    if device_kind == "cpu" and vram is not None:
        raise OptionError(f"--vram {shown(vram)}: this run is on the CPU, where --vram does not apply; bound its "
                          f"memory with --ram, or pass --device cuda for a GPU run")
    if device_kind == "cuda" and ram is not None:
        raise OptionError(f"--ram {shown(ram)}: this run is on a GPU, where --ram does not apply; bound its memory "
                          f"with --vram, or pass --device cpu for a CPU run")


def budget_bytes(value: object, option: str) -> int | None:
    """A memory budget as given to `load` (bytes, or text such as '4GB': units.parse_size), in bytes; None: none."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_size(value, option)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 1:
        raise OptionError(f"{option} {value!r}: give a size in bytes (at least 1) or as text such as '4GB'")
    return int(value)  # 8e9 as well as 8_000_000_000


def check_text(text: object, option: str, empty_ok: bool = False) -> str:
    """A prompt as the tokenizer takes it: text that is valid Unicode (so UTF-8), not empty unless `empty_ok`."""
    if not isinstance(text, str):
        raise OptionError(f"{option}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # argv bytes that are not UTF-8 reach Python as lone surrogates (U+DC80-U+DCFF for byte 0x80-0xFF)
        char = ord(text[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise OptionError(f"{option}: not valid UTF-8 text ({what} at character {e.start}); write the prompt in "
                          f"UTF-8 (a UTF-8 locale, or a UTF-8 file with --prompt-file)") from None
    if not empty_ok and not text.strip():
        raise OptionError(f"{option} is empty: give the text of the image to draw")
    return text


def read_prompt_file(path: str | Path) -> str:
    """The prompt in a UTF-8 file (`-`: standard input), without its final line breaks, as `$(cat FILE)` gives it.
    For prompts past the OS limit on one argument (128 KiB on Linux)."""
    option = f"--prompt-file {path}"
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_PROMPT_FILE + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_PROMPT_FILE + 1)
    except OSError as e:
        raise OptionError(f"{option}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_PROMPT_FILE:
        raise OptionError(f"{option}: larger than {MAX_PROMPT_FILE // MIB} MiB; a prompt is cut at 512 tokens "
                          f"(a few KiB), so this is not a prompt file")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark some editors write is not part of the prompt
    except UnicodeDecodeError as e:
        raise OptionError(f"{option}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it "
                          f"as UTF-8") from None
    return check_text(text.rstrip("\r\n"), option)


def prompt_from(prompt: str | None, prompt_file: str | None) -> str | None:
    """The prompt given as PROMPT or with --prompt-file (not both), checked; None when neither is given."""
    if prompt is not None and prompt_file is not None:
        raise OptionError("give the prompt either as PROMPT or with --prompt-file FILE, not both")
    if prompt_file is not None:
        return read_prompt_file(prompt_file)
    return None if prompt is None else check_text(prompt, "PROMPT")


def preset_of(dit: DiTConfig) -> str:
    """The preset whose DiT a model has: 'demo' for the demo's, else 'turbo' (Turbo and Base share the full-size
    architecture; a model of another size renders at Turbo's defaults)."""
    return "demo" if dit == PRESETS["demo"].dit else "turbo"


def defaults_of(dit: DiTConfig) -> ModelConfig:
    """The preset holding a model's default size, steps and guidance (`default_size`, `default_steps`, ...)."""
    return PRESETS[preset_of(dit)]


def check_lora_scale(scale: object, path: object) -> float:
    """A LoRA's scale (any finite number: 0 switches it off, a negative one inverts it)."""
    return _number(scale, f"--lora {path}: the scale")


def lora_option(text: str) -> tuple[Path, float]:
    """`--lora PATH[:SCALE]` as (path, scale), scale 1.0 when absent. The text splits at its last ':' only when
    what follows is a number, so a path holding ':' (C:\\loras\\x.safetensors, a:b.safetensors) still works; a file
    named before a ':' whose tail is not a number is a bad scale, said so."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), check_lora_scale(float(tail), path)
        except ValueError:
            if Path(path).is_file() and not Path(text).exists():
                raise OptionError(f"--lora {text}: the scale {tail!r} is not a number; write PATH:SCALE with a "
                                  "number, such as 0.8 (PATH alone: 1.0)") from None
    return Path(text), 1.0
