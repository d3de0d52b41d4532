"""The prompt enhancer's options and commands: `zimage-lite enhance PROMPT` and `run --enhance` (cli.py registers
them). Nothing here imports torch, so help and option errors answer at once; the work is in enhance.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OptionError
from .options import check_seed, check_text, prompt_from

if TYPE_CHECKING:
    from .pipeline import ZImagePipeline

SYSTEM_FILE = Path(__file__).with_name("enhance_system.txt")
CONTEXT = 4096  # tokens the enhancer holds at most (system prompt, prompt, answer): 0.6 GB of bf16 KV cache at 4B
DEFAULT_MAX_TOKENS = 400  # about 300 words: the image path reads at most 512 tokens of prompt


def system_prompt(path: str | Path | None = None) -> str:
    """Our system prompt (enhance_system.txt), or the UTF-8 text file `path` (`--system`)."""
    file = SYSTEM_FILE if path is None else Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"--system {file}: cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or e})"
                          ) from None
    if not text.strip():
        raise OptionError(f"--system {file} is empty: give the instructions the enhancer follows, or leave --system "
                          "out for ours")
    return check_text(text.strip(), f"--system {file}")


def check_max_tokens(max_tokens: object, context: int = CONTEXT) -> int:
    """New tokens to allow: at least 1, and less than the context (the chat needs room too)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise OptionError(f"--max-tokens {max_tokens!r}: expected a whole number")
    if not 1 <= max_tokens < context:
        raise OptionError(f"--max-tokens {max_tokens}: use 1 to {context - 1} (the enhancer holds {context} tokens, "
                          f"the chat included; default {DEFAULT_MAX_TOKENS})")
    return max_tokens


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 10:
        raise OptionError(f"--temperature {temperature!r}: use 0 (greedy, the default) to 10")
    return float(temperature)


def add_enhance_args(p: Any, run: bool = False) -> None:
    if run:
        p.add_argument("--enhance", action="store_true",
                       help="rewrite the prompt with the text encoder first (see `zimage-lite enhance`); the image "
                            "stores both, and --from-png re-runs the enhanced prompt without enhancing again")
    # `run`: None when not given, so that an enhancer option without --enhance is refused, not ignored
    p.add_argument("--max-tokens", type=int, default=None if run else DEFAULT_MAX_TOKENS,
                   help=f"enhancer: most new tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=None if run else 0.0,
                   help="enhancer: 0 = greedy (default, reproducible); above 0 samples, seeded by --seed")
    p.add_argument("--system", type=Path, metavar="FILE",
                   help="enhancer: a UTF-8 file replacing zimage-lite's system prompt")


def check_enhance_args(args: Any) -> None:
    """The enhancer's options, checked before anything loads (`run`: each needs --enhance, then its default)."""
    if not getattr(args, "enhance", True):
        given = [o for o, v in (("--max-tokens", args.max_tokens), ("--temperature", args.temperature),
                                ("--system", args.system)) if v is not None]
        if given:
            raise OptionError(f"{given[0]} is an enhancer option: add --enhance, or leave {given[0]} out")
    args.max_tokens = DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    args.temperature = 0.0 if args.temperature is None else args.temperature
    check_max_tokens(args.max_tokens)
    check_temperature(args.temperature)
    if args.system is not None:
        system_prompt(args.system)


def enhance_for_run(pipe: ZImagePipeline, args: Any, prompt: str, seed: int) -> tuple[str, dict[str, Any]]:
    """`run --enhance`: the prompt to draw (printed on stdout) and what the image stores beside it. With
    --from-png, the stored original prompt is enhanced again (its stored `prompt` is already an enhanced one)."""
    if not getattr(args, "enhance", False):
        return prompt, {}
    stored = getattr(args, "stored", {})
    if stored.get("original_prompt") and prompt == stored.get("prompt"):
        prompt = stored["original_prompt"]
    result = pipe.enhance(prompt, max_tokens=args.max_tokens, seed=seed, temperature=args.temperature,
                          system=args.system)
    print(result.summary(), file=sys.stderr)
    print(result.prompt, flush=True)
    return result.prompt, result.params()


def cmd_enhance(args: Any) -> int:
    """`zimage-lite enhance PROMPT`: the enhanced prompt on stdout, speeds on stderr."""
    from .pipeline import load

    prompt = check_text(prompt_from(args.prompt, None), "PROMPT")
    check_enhance_args(args)
    if args.int8_compute:  # the enhancer reads the text encoder's file as it is stored
        raise OptionError("--int8-compute applies to `run` and `plan`, not to `enhance`: leave it out")
    seed = check_seed(args.seed)
    pipe = load(args.model, dit=args.dit, text_encoder=args.text_encoder, vae=args.vae, device=args.device,
                dtype=args.dtype, vram=args.vram, ram=args.ram)
    result = pipe.enhance(prompt, max_tokens=args.max_tokens, seed=seed, temperature=args.temperature,
                          system=args.system)
    print(result.summary(), file=sys.stderr)
    print(result.prompt)
    return 0
