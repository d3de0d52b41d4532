"""`zimage-lite run --from-png IMAGE`: the run parameters an image carries, under the options typed this time.

Each option given on the command line replaces the stored value of that option alone (`--dit other.gguf` keeps the
stored model folder, prompt and seed); everything else comes from the image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import OptionError
from .image import read_params

# stored key -> the `run` option's dest (the keys are named as generate()'s keywords, as the options are)
APPLIED = ("prompt", "negative", "seed", "steps", "cfg", "cfg_normalization", "cfg_truncation", "width", "height",
           "model", "dit", "text_encoder", "vae", "dtype", "device", "strength", "control_scale",
           "control_preprocess", "int8_compute")
PATHS = {"dit", "text_encoder", "vae"}


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the `run` options typed in `argv` (abbreviations and `--opt=value` included): the run parser
    parses them again with every default suppressed, so only what was typed lands in the namespace."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    saved = [(a, a.default) for a in run._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        rest = list(argv)[list(argv).index("run") + 1:]
        return set(vars(run.parse_known_args(rest)[0]))
    finally:
        for action, default in saved:
            action.default = default


def apply_image_params(args: argparse.Namespace, given: set[str]) -> None:
    """Fill `args` from the parameters stored in `args.from_png`, except the options in `given`."""
    import zimage_lite

    params = read_params(args.from_png)
    args.stored = params  # cmd_run compares the --image/--mask given with the hashes stored
    if "prompt_file" in given:
        given = given | {"prompt"}
    for key in APPLIED:
        if key in params and key not in given:
            setattr(args, key, Path(params[key]) if key in PATHS else params[key])
    # img2img / inpainting: the images are not stored, only their hashes; they must be given again
    for key, option in (("image_sha256", "image"), ("mask_sha256", "mask")):
        if key in params and getattr(args, option) is None:
            what = "a mask" if option == "mask" else "an init image"
            raise OptionError(f"--from-png {args.from_png}: it was made from {what}, which images do not carry: "
                              f"give it again with --{option} FILE")
    # ControlNet: its file and the control image, likewise known by name and hash only
    for key, option in (("control_sha256", "control"), ("control_image_sha256", "control_image")):
        if key in params and getattr(args, option) is None:
            what = f"the ControlNet {params.get('control')} (sha256 {params[key]}...)" if option == "control" else \
                "a control image"
            raise OptionError(f"--from-png {args.from_png}: it was made with {what}, which images do not carry: "
                              f"give it again with --{option.replace('_', '-')} FILE")
    # LoRAs: likewise only their names, hashes and scales; the files must be given again (--lora replaces them all)
    if params.get("loras") and "lora" not in given:
        listed = " ".join(f"--lora {e['name']}:{e['scale']:g}" for e in params["loras"])
        hashes = ", ".join(f"{e['name']} sha256 {e['sha256']}..." for e in params["loras"])
        raise OptionError(f"--from-png {args.from_png}: it was made with LoRAs, which images do not carry: give "
                          f"them again ({listed}; {hashes})")
    made_by = params.get("version")
    if made_by and made_by != zimage_lite.__version__:
        print(f"note: {args.from_png} was made by zimage-lite {made_by}, this is {zimage_lite.__version__}: the "
              "image may differ", file=sys.stderr)
