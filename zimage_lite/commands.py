"""The commands beside `run`: `plan`, `info` and `quantize`, and the option checks `run` and `plan` share."""

from __future__ import annotations

import argparse
import sys

from .config import PRESETS, ModelConfig
from .enhance_options import CONTEXT
from .errors import OptionError
from .options import (
    TURBO_GRID,
    check_budgets,
    check_guidance,
    check_size,
    check_steps,
    check_strength,
    guidance_on,
    lora_option,
)
from .runtime.budget import device_kind
from .runtime.units import parse_size


def fill_defaults(args: argparse.Namespace, defaults: ModelConfig) -> None:
    """Size, steps and guidance the user left out, from the model's (or the preset's) defaults."""
    for name, value in (("width", defaults.default_size), ("height", defaults.default_size),
                        ("steps", defaults.default_steps), ("cfg", defaults.default_cfg)):
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_given(args: argparse.Namespace) -> None:
    """The options `run` and `plan` share, checked before anything is loaded against the bounds every Z-Image model
    shares (the pipeline checks again against the model's own). The device is known here unless it is `auto`."""
    if args.steps is not None:
        check_steps(args.steps)
    check_guidance(0.0 if args.cfg is None else args.cfg, getattr(args, "cfg_normalization", 0.0),
                   getattr(args, "cfg_truncation", 1.0))
    cell = TURBO_GRID.cell  # a size left out is the model's: in range
    check_size(cell if args.width is None else args.width, cell if args.height is None else args.height)
    if args.device != "auto":
        check_budgets(device_kind(args.device), args.vram, args.ram)
    for option, value in (("--vram", args.vram), ("--ram", args.ram)):
        if value is not None:
            parse_size(value, option)
    args.loras = [lora_option(text) for text in args.lora]


def cmd_plan(args: argparse.Namespace) -> int:
    check_given(args)
    if args.strength is not None:  # planning needs no image: a strength alone plans the encoder's stage too
        check_strength(args.strength)
    # the VAE encoder's stage comes first (an init image, or the control image)
    encode = args.image is not None or args.strength is not None or args.control is not None
    if args.image is not None:  # the size a run from it would have, checked as run checks it
        from .init_image import init_request
        from .inputs import open_image

        init = init_request(open_image(args.image).image, None, args.strength, args.width, args.height, args.steps)
        args.width, args.height = init.width, init.height

    from .runtime.plan import plan_for
    from .runtime.plan_format import format_plan

    vram = parse_size(args.vram, "--vram") if args.vram else None
    ram = parse_size(args.ram, "--ram") if args.ram else None
    if args.model is None or args.preset is not None:
        if args.int8_compute:  # converts the files' GGUF linears: a preset has no files
            raise OptionError("--int8-compute plans from files: give --model (and --dit), not --preset")
        preset = args.preset or "turbo"
        fill_defaults(args, PRESETS.get(preset, PRESETS["turbo"]))  # plan_for names an unknown preset
        if args.device == "auto":  # the budget that applies depends on the device auto finds
            from .runtime.budget import resolve_device

            check_budgets(resolve_device("auto").type, vram, ram)
        adapters = None
        if args.loras:
            from .loras import Loras

            adapters = Loras.read(args.loras, PRESETS.get(preset, PRESETS["turbo"]).dit).table()
        control = None
        if args.control is not None:
            from .control import ControlFile
            from .runtime.sizes import source_table

            opened = ControlFile.open(args.control, PRESETS.get(preset, PRESETS["turbo"]).dit)
            control = opened.config, source_table(opened.source)
            opened.source.close()
        plan = plan_for(preset, args.quant, args.width, args.height, guidance_on(args.cfg), args.device,
                        vram, ram, args.dtype, args.text_quant, caption_tokens=args.prompt_tokens, encode=encode,
                        adapter_tensors=adapters, control=control,
                        enhance_tokens=CONTEXT if args.enhance else 0)
    else:
        from .pipeline import load

        pipe = load(args.model, dit=args.dit, text_encoder=args.text_encoder, vae=args.vae, device=args.device,
                    dtype=args.dtype, vram=vram, ram=ram, loras=args.loras, control=args.control,
                    int8_compute=args.int8_compute)
        fill_defaults(args, pipe.defaults)
        check_size(args.width, args.height, pipe.grid)
        plan = pipe.make_plan(args.width, args.height, args.cfg, args.prompt_tokens, image=encode,
                              enhance_tokens=CONTEXT if args.enhance else 0)
        if (refused := pipe.int8_streaming(plan)) is not None:  # `run` refuses this plan: say so with it
            print(f"note: {refused}", file=sys.stderr)
    print(format_plan(plan))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantize.cli import run

    return run(args)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from .errors import CheckpointError
    from .weights.inspect import describe, format_info

    desc = describe(args.path)
    errors = [s["error"] for s in desc["sections"] if s.get("error")]
    if errors and len(errors) == len(desc["sections"]):  # nothing readable to describe: one error line
        raise CheckpointError(errors[0] if len(errors) == 1 else "; ".join(errors))
    print(json.dumps(desc, indent=2, default=str) if args.json else format_info(desc))
    if errors:  # the readable parts are described above; the run still fails
        raise CheckpointError(f"{len(errors)} of {len(desc['sections'])} parts cannot be read: {'; '.join(errors)}")
    return 0
