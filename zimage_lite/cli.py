"""The one command-line entry point: `zimage-lite run | enhance | quantize | info | plan` (also `python -m
zimage_lite`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .commands import check_given, cmd_info, cmd_plan, cmd_quantize
from .enhance_options import add_enhance_args, check_enhance_args, cmd_enhance, enhance_for_run
from .errors import Interrupted, OptionError, ZImageLiteError, os_error_line
from .options import (
    MAX_STEPS,
    check_image_options,
    check_seed,
    check_text,
    prompt_from,
)
from .runtime.units import gib

# Nothing imported above imports torch (seconds): help, --version and option errors answer at once; a command
# imports what it needs when it runs.


def _add_model_args(p: argparse.ArgumentParser, model_default: str | None) -> None:
    shown = model_default or "none: plan for --preset turbo without files"
    p.add_argument("--model", default=model_default,
                   help=f"model folder in the official layout (Tongyi-MAI/Z-Image-Turbo), a single file, or 'demo' "
                        f"(default: {shown})")
    p.add_argument("--dit", type=Path, help="DiT weights file, overriding the model folder's transformer/")
    p.add_argument("--text-encoder", type=Path, help="text encoder weights file, overriding text_encoder/")
    p.add_argument("--vae", type=Path, help="VAE weights file, overriding vae/")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute dtype; auto: bf16 where the hardware has it, else fp16 (GPU) or fp32 (CPU)")
    p.add_argument("--vram", help="GPU memory budget, e.g. 4GB, 3.5GiB (default: what the GPU reports)")
    p.add_argument("--ram", help="RAM budget on the CPU path, e.g. 8GB (default: available memory)")
    p.add_argument("--int8-compute", action="store_true",
                   help="convert GGUF-quantized Linears to int8 rows at load and run integer matmuls (faster where "
                        "the CPU has int8 dot products; a little more error; ComfyUI int8 files always run so)")


def _add_size_args(p: argparse.ArgumentParser) -> None:
    # defaults from the model (ZImagePipeline.defaults, or the --preset): Turbo's, or the demo's for its DiT
    p.add_argument("--width", type=int, default=None,
                   help="image width, a multiple of 16 up to 8192 (default: the model's; Turbo 1024, demo 256)")
    p.add_argument("--height", type=int, default=None,
                   help="image height, a multiple of 16 up to 8192 (default: the model's; Turbo 1024, demo 256)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"DiT forwards, 1 to {MAX_STEPS} (default: the model's; Turbo 8, plan --preset base 50)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale, 0 to 100; CFG runs when above 1 (default 0; plan --preset base: 4)")


class _OneLine(argparse.ArgumentParser):
    """A parser whose errors (an option's value of the wrong type, an unknown choice) are one line, as every other
    error of the CLI is, pointing at --help for the options instead of printing their usage."""

    def error(self, message: str) -> NoReturn:
        # the top parser also reports a command's unknown options: point at the command's help too
        hint = (f"`{self.prog} --help` lists the options" if " " in self.prog else
                f"`{self.prog} --help` lists the commands, `{self.prog} COMMAND --help` a command's options")
        self.exit(2, f"error: {self.prog}: {message} ({hint})\n")


class _Parser(_OneLine):
    """A subcommand's parser whose arguments may come from a module imported only when that subcommand is parsed or
    shows its help (`fill`): `zimage-lite run` and `plan` never import the quantize tool."""

    def __init__(self, *args: Any, fill: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fill = fill

    def _filled(self) -> None:
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._filled()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._filled()
        return super().format_usage()

    def format_help(self) -> str:
        self._filled()
        return super().format_help()


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    from quantize.cli import add_arguments

    add_arguments(p)


def _add_image_args(p: argparse.ArgumentParser, mask: bool = True) -> None:
    p.add_argument("--image", type=Path, metavar="FILE",
                   help="img2img: start from this image (any file Pillow reads); its size unless --width/--height "
                        "are given (then it is resized, Lanczos)")
    if mask:
        p.add_argument("--mask", type=Path, metavar="FILE",
                       help="with --image, inpainting: white = repaint, black = keep (binarized at 50%%)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image, in (0, 1]: how much of the schedule runs again, about strength x --steps DiT "
                        "forwards (default 0.6; with --mask 1.0)")


RUN_EXAMPLES = """examples:
  zimage-lite run "a red fox in the snow" --model Z-Image-Turbo --out fox.png
  zimage-lite run "a watercolor fox" --image photo.jpg --strength 0.6        (image to image)
  zimage-lite run "a red hat" --image photo.jpg --mask hat.png                (inpainting: white = repaint)
  zimage-lite run "a fox, ink style" --lora ink.safetensors:0.8               (a LoRA at scale 0.8)
  zimage-lite run --from-png fox.png --seed 7                                 (re-run an image, another seed)
"""


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA to the DiT at SCALE (default 1.0; alpha/rank comes on top, as in diffusers); "
                        "repeat for several")


def _add_control_args(p: argparse.ArgumentParser, image: bool = True) -> None:
    p.add_argument("--control", type=Path, metavar="FILE", help="a Z-Image ControlNet: an alibaba-pai "
                   "Z-Image-Turbo-Fun-Controlnet-Union .safetensors, a diffusers folder or our GGUF")
    if image:
        p.add_argument("--control-image", type=Path, metavar="FILE", help="with --control: the pose, depth, edge "
                       "... map the image follows (its size unless --width/--height); 2.x: --image and --mask too "
                       "for ControlNet inpainting")
        p.add_argument("--control-scale", default=None, metavar="S", help="with --control: the hints' weight "
                       "(default 0.75)")
        p.add_argument("--control-preprocess", default=None, metavar="canny", help="make the map from the "
                       "--control-image photo: canny (edges; numpy, no model download)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLine(prog="zimage-lite", description="Z-Image-Turbo on small hardware.")
    parser.add_argument("--version", action="version", version=f"zimage-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="generate an image from a prompt", epilog=RUN_EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("prompt", nargs="?", metavar="PROMPT", help="what to draw (or --prompt-file, or --from-png)")
    run.add_argument("--prompt-file", metavar="FILE",
                     help="read the prompt from a UTF-8 file ('-': standard input), e.g. one over the OS limit on "
                          "an argument's length (128 KiB)")
    _add_model_args(run, "demo")
    _add_size_args(run)
    run.add_argument("--seed", type=int, default=None,
                     help="noise seed, 0 to 2**64-1 (default: random, printed and stored)")
    run.add_argument("--negative", default="", help="negative prompt (used when --cfg > 0)")
    run.add_argument("--cfg-normalization", type=float, default=0.0,
                     help="cap the guided prediction's norm at this factor times the positive one (0: off)")
    run.add_argument("--cfg-truncation", type=float, default=1.0,
                     help="0 to 1: no guidance once the model time t = 1 - sigma exceeds this (1: every step)")
    run.add_argument("--out", type=Path, default=None,
                     help="output image, .png, .jpg or .webp, or a folder (default zimage-<seed>.png)")
    run.add_argument("--force", action="store_true", help="overwrite an existing output file")
    run.add_argument("--preview", type=Path, metavar="FILE.png",
                     help="rewrite a small preview PNG (half the image's size) after every step, from the latents; "
                          "an earlier run's preview there is replaced, any other file only with --force")
    _add_image_args(run)
    _add_lora_args(run)
    _add_control_args(run)
    run.add_argument("--from-png", type=Path, metavar="IMAGE",
                     help="re-run from the parameters an image made by zimage-lite carries (.png, .jpg or .webp); "
                          "options given as well replace the stored ones")
    add_enhance_args(run, run=True)
    run.set_defaults(func=cmd_run)

    enhance = sub.add_parser("enhance", help="rewrite a short prompt into a detailed one with the text encoder "
                                             "(a Qwen3-4B), printed on stdout")
    enhance.add_argument("prompt", metavar="PROMPT", help="the idea to expand")
    _add_model_args(enhance, "demo")
    enhance.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0 (default 0)")
    add_enhance_args(enhance)
    enhance.set_defaults(func=cmd_enhance)

    plan = sub.add_parser("plan", help="print the memory plan for a run, without loading weights")
    _add_model_args(plan, None)
    _add_size_args(plan)
    plan.add_argument("--preset", default=None, help="plan for a preset model (turbo, base, demo) without files")
    plan.add_argument("--quant", default="Q4_K_M", help="DiT weight format for --preset (default Q4_K_M)")
    plan.add_argument("--text-quant", default="BF16", help="text encoder weight format for --preset (default BF16)")
    plan.add_argument("--prompt-tokens", type=int, default=512,
                      help="caption length to plan for, chat template included (default: the 512 maximum)")
    _add_image_args(plan, mask=False)
    _add_lora_args(plan)
    _add_control_args(plan, image=False)
    plan.add_argument("--enhance", action="store_true", help="plan the prompt enhancer's stage first (4096 tokens)")
    plan.set_defaults(func=cmd_plan)

    quant = sub.add_parser("quantize", help="write GGUF (Q8_0, Q4_K_M, ...), int8 or nf4 files from a checkpoint",
                           fill=_add_quantize_args)
    quant.set_defaults(func=cmd_quantize)

    info = sub.add_parser("info", help="what a file or folder holds: component, layout, quant types, size, "
                                       "and which tools load it")
    info.add_argument("path", type=Path, help="a GGUF or safetensors file, a component folder or a model folder")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(func=cmd_info)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    import secrets

    if args.from_png is not None:
        from .rerun import apply_image_params, given_options

        apply_image_params(args, given_options(build_parser(), args.argv))
    prompt = prompt_from(args.prompt, args.prompt_file)
    if prompt is None:
        raise OptionError("no prompt: give the text to draw as PROMPT, with --prompt-file FILE, or re-run an image "
                          "with --from-png IMAGE")
    check_text(args.negative, "--negative", empty_ok=True)
    if args.seed is not None:
        check_seed(args.seed)
    check_given(args)
    check_enhance_args(args)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)

    from tqdm import tqdm

    from .image import check_image_output, image_path, save_image
    from .pipeline import load

    out = image_path(args.out, seed)
    check_image_output(out, args.force, {"prompt": prompt, "negative": args.negative})  # before loading anything
    preview = _preview_file(args.preview, args.force, out)
    from .control import check_control_args

    check_control_args(args.control, args.control_image, args.control_scale, args.strength, args.control_preprocess)
    controls = {"control_image": args.control_image, "control_scale": args.control_scale,
                "control_preprocess": args.control_preprocess}
    image, mask = _control_inputs(args, controls) if args.control else _image_inputs(args)
    pipe = load(args.model, dit=args.dit, text_encoder=args.text_encoder, vae=args.vae, device=args.device,
                dtype=args.dtype, vram=args.vram, ram=args.ram, loras=args.loras, control=args.control,
                int8_compute=args.int8_compute)
    stored = getattr(args, "stored", {}).get("control_sha256")
    if stored and pipe.control is not None and pipe.control.sha256 != stored:
        print(f"note: --control {args.control} is not the ControlNet {args.from_png} was made with: the result "
              "will differ", file=sys.stderr)
    prompt, enhanced = enhance_for_run(pipe, args, prompt, seed)  # --enhance: the prompt to draw, and the original
    # checked against the model, its defaults filled in, the inputs prepared (once): the output's metadata as the
    # run will write it (paths, hashes) is checked before the run, not after; the run starts with the first event
    request = pipe.prepare(prompt, negative=args.negative, width=args.width, height=args.height, steps=args.steps,
                           seed=seed, cfg=args.cfg, cfg_normalization=args.cfg_normalization,
                           cfg_truncation=args.cfg_truncation, image=image, mask=mask, strength=args.strength,
                           **controls)
    check_image_output(out, args.force, {**enhanced, **request.params})
    events = pipe.run(request)
    if args.seed is None:
        print(f"seed: {seed}")
    start = time.perf_counter()
    peak = 0
    # One bar per stage, opened as the stage starts: the events arrive when a stage (or step) has finished.
    stages = iter([*([("encode image", "image")] if image or args.control else []), ("encode", "prompt"),
                   ("denoise", "step"), ("decode", "image")])
    name, seconds, bar, params, start_step = "", 0.0, None, {}, 0

    def next_bar(total: int) -> tqdm:
        nonlocal name, seconds
        name, unit = next(stages)
        seconds = 0.0
        return tqdm(total=total, desc=name, unit=unit, disable=None)

    def close(ev) -> None:
        bar.close()
        tqdm.write(f"{name}: {seconds:.1f} s, peak {gib(ev.peak_bytes)}")

    bar = next_bar(1)
    try:
        for ev in events:
            peak = max(peak, ev.peak_bytes)
            seconds += ev.seconds
            bar.update(1)
            if ev.stage == "image_encoded":
                start_step, info = ev.info["start"], ev.info
                for note in info["notes"]:
                    tqdm.write(f"note: {note}")
                kind = "inpainting" if "mask_sha256" in info else "img2img"
                tqdm.write(f"ControlNet {info['control']} at scale {info['control_scale']:g}"
                           + (", inpainting" if "mask_sha256" in info else "") if "control" in info else
                           f"{kind} at strength {info['strength']:g}: {info['steps'] - start_step} of "
                           f"{info['steps']} steps run ({info['width']}x{info['height']})")
                close(ev)
                bar = next_bar(1)
            elif ev.stage == "step" and preview is not None:
                preview.write(ev.preview, ev.step, ev.steps)
            elif ev.stage == "encoded":
                params = ev.info
                if ev.info["truncated_from"]:
                    tqdm.write(f"note: the prompt is {ev.info['truncated_from']} tokens with the chat template; "
                               f"cut to 512")
            if ev.stage == "encoded" or (ev.stage == "step" and ev.step == ev.steps):
                close(ev)
                bar = next_bar(params["steps"] - start_step if ev.stage == "encoded" else 1)
            elif ev.stage == "decoded":
                close(ev)
                save_image(ev.image, out, ev.info | enhanced, force=args.force)
    except KeyboardInterrupt as e:  # the preview, if any, is a whole file: say so
        if preview is None or not preview.writes:
            raise
        raise Interrupted(getattr(e, "signal_name", "SIGINT"), (f"the preview {preview.path} ({preview.last})",)
                          ) from None
    finally:
        bar.close()
    total = time.perf_counter() - start
    if preview is not None and preview.error is not None:
        print(f"warning: the preview was not always written: {preview.error}", file=sys.stderr)
    print(f"{out}  ({params['width']}x{params['height']}, {total:.1f} s, peak memory {gib(peak)} on "
          f"{pipe.device.type})")
    return 0


def _preview_file(path: Path | None, force: bool, out: Path) -> Any:
    """--preview checked before anything loads (preview.check_preview), as the file the steps rewrite; or None."""
    if path is None:
        return None
    from .preview import PreviewFile, check_preview

    check_preview(path, force, out)
    return PreviewFile(path)


def _image_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The --image and --mask files read and checked with every image option before the model loads (the pipeline
    checks again against the model's own bounds and steps), or (None, None)."""
    check_image_options(args.image, args.mask, args.strength)
    if args.image is None:
        return None, None
    from .init_image import init_request
    from .inputs import load_image, load_mask

    image = load_image(args.image)
    mask = load_mask(args.mask) if args.mask is not None else None
    for note in image.notes + (mask.notes if mask else []):
        print(f"note: {note}", file=sys.stderr)
    init_request(image.image, mask.image if mask else None, args.strength, args.width, args.height, args.steps)
    _compare_stored(args, {"image": image, "mask": mask})
    return image.image, mask.image if mask else None


def _control_inputs(args: argparse.Namespace, controls: dict[str, Any]) -> tuple[Any, Any]:
    """With --control: the control image (into `controls`) and a 2.x ControlNet's --image and --mask, read before
    the model loads, their notes printed, compared with the hashes a --from-png image stored."""
    from .inputs import load_image, load_mask

    loaded = {"control_image": load_image(args.control_image, "--control-image") if args.control_image else None,
              "image": load_image(args.image) if args.image is not None else None,
              "mask": load_mask(args.mask) if args.mask is not None else None}
    for item in loaded.values():
        for note in item.notes if item else ():
            print(f"note: {note}", file=sys.stderr)
    _compare_stored(args, loaded)
    if loaded["control_image"]:
        controls["control_image"] = loaded["control_image"].image
    return tuple(item.image if item else None for item in (loaded["image"], loaded["mask"]))  # type: ignore[return-value]


def _compare_stored(args: argparse.Namespace, loaded: dict[str, Any]) -> None:
    """--from-png: a note for each input image whose pixels are not those the image was made from."""
    from .init_image import pixels_sha256

    for key, item in loaded.items():
        stored = getattr(args, "stored", {}).get(f"{key}_sha256")  # the inputs the image was made from
        if stored and item and pixels_sha256(item.image) != stored:
            print(f"note: --{key.replace('_', '-')} {getattr(args, key)} is not the one {args.from_png} was made "
                  "from: the result will differ", file=sys.stderr)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """zimage-lite's own warnings (a LoRA given twice, keys skipped, a plan mismatch) as one `warning:` line; other
    libraries' as Python prints them."""
    if category.__module__.startswith("zimage_lite"):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    from .interrupts import interrupted_message, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was typed: --from-png keeps those options
    with sigterm_as_interrupt(), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except ZImageLiteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other command-line tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 141
        except OSError as e:  # the file system refused a path the options gave (a name too long, ...): one line
            if e.filename is None:  # not about a path (out of memory, an I/O error): the traceback says where
                raise
            print(f"error: {os_error_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (errors.Interrupted)
            line, code = interrupted_message(e)
            print(line, file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
