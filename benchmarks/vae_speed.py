"""The full-size FLUX VAE on the CPU, decode (or encode): where the time goes, and the layers' forms before and after.

    flock /work/wt/fullsize.lock python benchmarks/vae_speed.py --json benchmarks/results/cpu-vae.json

`--encode`: the encoder instead (img2img, inpainting and control images), on a random image of that size, two
variants interleaved: `encode NCHW` (NCHW maps, ours before) and `encode` (the maps as the runtime lays them out now,
channels-last where vae_tiles.channels_last says so).

One process loads the VAE of the `--preset turbo` cache folder (random weights, the real shapes) per dtype and
decodes a random latent of --width x --height pixels with three variants, interleaved (A B C, then C B A, so that
drift and other processes' load fall on all): `upsampled` (nearest x2, then the 3x3 convolution on the upsampled
map, NCHW maps: diffusers' Upsample2D, and ours at first), `phases NCHW` (vae.upsample_conv: one 2x2 convolution per
output phase on the low-resolution map, NCHW maps: ours before the maps went channels-last) and `phases` (what the
runtime does now: the same, with channels-last maps where vae_tiles.channels_last says so, as it does on the CPU for
fp32, and for bf16 where oneDNN has it). Each variant runs once untimed first (oneDNN's primitives, the first
touch of memory; rows before the encoder's were added, 2026-12-04, had no such call), then each timed decode runs
under torch.profiler; the rows
give its seconds by kind of op (self CPU time), the decoder's FLOPs as the upsampled form counts them (so that both
variants' effective GFLOP/s compare), and the GFLOP/s of one 512-channel 3x3 convolution at the latent's size in the
same dtype, measured in the same run: the convolution roof the decode is held against. The load average before and
after says how much of the machine other processes took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import DEFAULT_CACHE, DTYPES, append_rows, machine  # noqa: E402
from zimage_lite.models import vae as vae_module  # noqa: E402
from zimage_lite.models import vae_encoder  # noqa: E402
from zimage_lite.models.vae import AutoencoderDecoder  # noqa: E402
from zimage_lite.models.vae_encoder import AutoencoderEncoder  # noqa: E402
from zimage_lite.weights.components import open_component  # noqa: E402
from zimage_lite.weights.load import load_module  # noqa: E402

VARIANTS = ("upsampled", "phases NCHW", "phases")
ENCODE_VARIANTS = ("encode NCHW", "encode")
# profiler op name -> kind; the rest is "other"
KINDS = {"mkldnn_convolution": "conv", "convolution": "conv", "native_group_norm": "group_norm",
         "_scaled_dot_product_flash_attention_for_cpu": "attention", "bmm": "matmul", "addmm": "matmul",
         "mm": "matmul", "upsample_nearest2d": "upsample", "silu_": "silu", "silu": "silu", "add_": "add",
         "add": "add", "copy_": "copies", "fill_": "copies", "constant_pad_nd": "copies", "cat": "copies",
         "einsum": "matmul"}


def upsampled(self: vae_module.Upsample, x: torch.Tensor) -> torch.Tensor:
    """The upsampling as diffusers (and zimage-lite before) compute it: the 2x map, then the 3x3 convolution."""
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def flop_hooks(model: torch.nn.Module, total: list[float]) -> list:
    """Forward hooks adding each layer's FLOPs to total[0] (for the decoder as the upsampled form counts them, so
    all variants' effective GFLOP/s compare): convolutions, linear layers, the attention's two matmuls. Remove them
    after."""

    def conv(m: torch.nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        total[0] += 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]

    def linear(m: torch.nn.Linear, args: tuple, out: torch.Tensor) -> None:
        total[0] += 2 * out.numel() * m.in_features

    def attention(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        b, c, h, w = args[0].shape
        total[0] += 2 * 2 * b * (h * w) ** 2 * c

    hooks = {torch.nn.Conv2d: conv, torch.nn.Linear: linear, vae_module.AttnBlock: attention}
    return [m.register_forward_hook(hook) for m in model.modules() for kind, hook in hooks.items()
            if isinstance(m, kind)]


def conv_roof(dtype: torch.dtype, side: int) -> float:
    """GFLOP/s of one 512->512 3x3 convolution on a side x side map (best of 3 after a warm-up)."""
    conv = torch.nn.Conv2d(512, 512, 3, padding=1).to(dtype)
    x = torch.randn(1, 512, side, side, dtype=dtype)
    conv(x)
    best = min(_seconds(lambda: conv(x)) for _ in range(3))
    return 2 * 512 * 512 * 9 * side * side / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profiled(fn) -> tuple[float, dict[str, float]]:
    """One call of fn (a decode or an encode): its wall seconds and its self CPU seconds per kind of op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = _seconds(fn)
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        kind = KINDS.get(e.key.removeprefix("aten::"), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e6
    return seconds, {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def layer_rounds(dtype: torch.dtype, rounds: int = 3) -> list[dict]:
    """The three upsampling layers of the full-size decoder alone (random weights, no files), both forms interleaved
    (A B, B A, A B): seconds per call. Printed only (--layers): a quick check of the replaced op itself."""
    rows = []
    for c, side in ((512, 64), (512, 128), (256, 256)):
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dtype)
        x = torch.randn(1, c, side, side, dtype=dtype)
        forms = {"upsampled": lambda conv=conv, x=x: upsampled(SimpleNamespace(conv=conv), x),
                 "phases": lambda conv=conv, x=x: vae_module.upsample_conv(x, conv)}
        for fn in forms.values():
            fn()  # oneDNN's primitives for the shape
        times: dict[str, list[float]] = {k: [] for k in forms}
        order = tuple(forms)  # the layers alone: the layout variants (VARIANTS' middle one) do not apply
        for i in range(rounds):
            for k in (order if i % 2 == 0 else order[::-1]):
                times[k].append(round(_seconds(forms[k]), 3))
        rows.append({"channels": c, "side": side, "dtype": str(dtype), **times})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--json", help="append the rows to this JSON file (a list)")
    p.add_argument("--layers", action="store_true", help="only time the upsampling layers alone (no files), print")
    p.add_argument("--encode", action="store_true", help="time the encoder (NCHW against the runtime's layout)")
    args = p.parse_args()
    if args.layers:
        with torch.inference_mode():
            for name in args.dtypes.split(","):
                for row in layer_rounds(DTYPES[name]):
                    print(json.dumps(row), flush=True)
        return 0
    comp = open_component(args.cache / "turbo" / "vae", "vae")
    info = {"component": "vae", "command": f"python benchmarks/vae_speed.py {' '.join(sys.argv[1:])}",
            "machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": "cpu", "width": args.width,
            "height": args.height, "threads": torch.get_num_threads()}
    dtypes, side = args.dtypes.split(","), args.height // 8
    if args.encode:
        image = torch.rand(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
        rows = interleaved(AutoencoderEncoder, comp, dtypes, ENCODE_VARIANTS, encoder_variant,
                           lambda encoder: encoder.encode(image), side, info)
    else:
        latent = torch.randn(1, comp.config.latent_channels, side, args.width // 8,
                             generator=torch.Generator().manual_seed(0))
        rows = interleaved(AutoencoderDecoder, comp, dtypes, VARIANTS, decoder_variant,
                           lambda decoder: decoder.decode(latent), side, info)
    if args.json:
        append_rows(Path(args.json), rows)
    return 0


def _nchw(device: str, elem: int) -> bool:
    return False


@contextmanager
def decoder_variant(variant: str) -> Iterator[None]:
    """The decoder's upsampling and layout as `variant` (VARIANTS) has them, put back after."""
    phases, layout = vae_module.Upsample.forward, vae_module.channels_last
    vae_module.Upsample.forward = upsampled if variant == "upsampled" else phases
    vae_module.channels_last = layout if variant == "phases" else _nchw
    try:
        yield
    finally:
        vae_module.Upsample.forward, vae_module.channels_last = phases, layout


@contextmanager
def encoder_variant(variant: str) -> Iterator[None]:
    """The encoder's layout as `variant` (ENCODE_VARIANTS) has it, put back after."""
    layout = vae_encoder.channels_last
    vae_encoder.channels_last = _nchw if variant == "encode NCHW" else layout
    try:
        yield
    finally:
        vae_encoder.channels_last = layout


def interleaved(model_cls: type[torch.nn.Module], comp, dtypes: list[str], variants: tuple[str, ...],
                as_variant: Callable[[str], AbstractContextManager], run: Callable[[torch.nn.Module], object],
                side: int, info: dict) -> list[dict]:
    """Per dtype, the full-size `model_cls` loaded once and `run` with each of `variants` set up (`as_variant`):
    once untimed (oneDNN's primitives, the first touch of memory; the first variant's call also counts the FLOPs),
    then timed under the profiler in order and reversed (A B .., .. B A). One row per dtype and variant."""
    rows = []
    with torch.inference_mode():
        for name in dtypes:
            with torch.device("meta"):
                model = model_cls(comp.config)
            model = load_module(model, comp.source, DTYPES[name], "cpu", "VAE")
            flops, load, roof = [0.0], [round(v, 2) for v in os.getloadavg()], conv_roof(DTYPES[name], side)
            runs: dict[str, list] = {v: [] for v in variants}
            for variant in variants:
                hooks = flop_hooks(model, flops) if variant == variants[0] else []
                with as_variant(variant):
                    run(model)
                for h in hooks:
                    h.remove()
            for order in (variants, variants[::-1]):
                for variant in order:
                    with as_variant(variant):
                        runs[variant].append(profiled(partial(run, model)))
                    print(f"{name} {variant}: {runs[variant][-1][0]:.1f} s", file=sys.stderr, flush=True)
            for variant, measured in runs.items():
                row = {**info, "dtype": name, "variant": variant, "seconds": [t for t, _ in measured],
                       "flops": int(flops[0]), "conv_roof_gflops": round(roof, 1), "ops_seconds": min(measured)[1],
                       "load_before": load, "load_after": [round(v, 2) for v in os.getloadavg()]}
                print(json.dumps(row), flush=True)
                rows.append(row)
            del model
    return rows


if __name__ == "__main__":
    sys.exit(main())
