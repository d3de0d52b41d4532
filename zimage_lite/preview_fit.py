"""Fit the preview's latent -> RGB projection (preview.Projection) by least squares from a VAE given as files.

    python -m zimage_lite.preview_fit VAE [--images A.png B.jpg ...] [--samples 16] [--size 32] [--json]

VAE is a `vae/` folder or file zimage-lite reads. The projection is fitted in the sampler's latent space (the space
the previews and FLUX_RGB work in), against the image averaged over each latent cell's 8x8 pixels:
- with --images: the images' latents through the VAE encoder (its posterior mean) -> the images themselves, the
  honest target (what colour is this latent cell?); needs the encoder's weights;
- else: random latents (normal, the spread of a finished sample) -> what the decoder makes of them.
It prints the fitted factors and, on the same data, the error of the fit and of the published FLUX.1 factors the
previews use: with the real FLUX.1 VAE the two should be close. (The demo's random-weight VAE fits nothing real.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import OptionError
from .preview import FLUX, Projection


class LeastSquares:
    """Accumulates the normal equations of rgb = latents . W + b over latent cells, in float64."""

    def __init__(self, channels: int) -> None:
        self.xtx = torch.zeros(channels + 1, channels + 1, dtype=torch.float64)
        self.xty = torch.zeros(channels + 1, 3, dtype=torch.float64)
        self.cells = 0

    def add(self, latents: torch.Tensor, rgb: torch.Tensor) -> None:
        """latents (B, C, h, w) and their cells' colours (B, 3, h, w)."""
        x = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        y = rgb.double().permute(0, 2, 3, 1).reshape(-1, 3)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.cells += x.shape[0]

    def solve(self) -> Projection:
        wb = torch.linalg.solve(self.xtx, self.xty)
        return Projection(wb[:-1].float(), wb[-1].float())


def cell_colours(image: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H/scale, W/scale): each latent cell's mean colour."""
    return F.avg_pool2d(image.float(), scale)


def fit_projection(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], scale: int) -> tuple[Projection, float]:
    """The least-squares projection from (latents, image) pairs, latents (B, C, h, w) and images in [-1, 1]
    (B, 3, scale*h, scale*w), and its RMS error per colour channel over every cell."""
    pairs = list(pairs)
    cells = sum(latents[:, 0].numel() for latents, _ in pairs)
    unknowns = pairs[0][0].shape[1] + 1 if pairs else 17  # per colour: a weight per latent channel, and a bias
    if cells < 4 * unknowns:  # fewer than 4 equations per unknown: a fit that says nothing, or a singular one
        raise OptionError(f"{cells} latent cells are too few to fit {unknowns} numbers per colour (at least "
                          f"{4 * unknowns}): give more --samples or a larger --size (or larger --images)")
    fit = LeastSquares(pairs[0][0].shape[1])
    for latents, image in pairs:
        fit.add(latents, cell_colours(image, scale))
    projection = fit.solve()
    return projection, rms_error(projection, pairs, scale)


def rms_error(projection: Projection, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], scale: int) -> float:
    """RMS of projection(latents) - the cells' colours, over every pair, in [-1, 1] units."""
    total, count = 0.0, 0
    for latents, image in pairs:
        diff = projection.rgb(latents) - cell_colours(image, scale)
        total += float(diff.double().square().sum())
        count += diff.numel()
    return (total / count) ** 0.5


def random_pairs(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, samples: int, size: int,
                 seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`samples` random latents of size x size cells, unit normal (a finished sample's spread), and their images."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(samples):
        latents = torch.randn(1, channels, size, size, generator=generator)
        pairs.append((latents, decode(latents)))
    return pairs


def image_pairs(encode: Callable[[torch.Tensor], torch.Tensor], images: Iterable[Path],
                scale: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each image (read as an init image is: upright, in RGB; each side at most 512 pixels and a multiple of
    `scale`, resized to that) with its encoded latents. OptionError for an image smaller than `scale`."""
    from .errors import OptionError
    from .inputs import image_tensor, load_image

    pairs = []
    for path in images:
        picture = load_image(Path(path), "--images").image
        w, h = (min(side, 512) // scale * scale for side in picture.size)
        if not w or not h:
            raise OptionError(f"--images {path}: {picture.width}x{picture.height} is smaller than one latent cell "
                              f"({scale}x{scale} pixels); give larger images")
        pixels = image_tensor(picture, w, h)
        pairs.append((encode(pixels), pixels))
    return pairs


def fit_vae(vae: Path, images: list[Path] | None = None, samples: int = 16, size: int = 32) -> dict:
    """Fit from a VAE folder or file: the projection, its RMS error and the published FLUX.1 factors' on the same
    data (both in [-1, 1] units), as JSON-ready numbers."""
    from .models.vae import AutoencoderDecoder
    from .models.vae_encoder import AutoencoderEncoder
    from .weights.components import open_component
    from .weights.load import load_module

    comp = open_component(Path(vae), "vae", "VAE")
    cfg = comp.config
    with torch.inference_mode():
        if images:
            with torch.device("meta"):
                encoder = AutoencoderEncoder(cfg)
            encoder = load_module(encoder, comp.source, torch.float32, "cpu", "VAE encoder")
            pairs = image_pairs(encoder.encode, images, cfg.scale)
        else:
            with torch.device("meta"):
                decoder = AutoencoderDecoder(cfg)
            decoder = load_module(decoder, comp.source, torch.float32, "cpu", "VAE")
            pairs = random_pairs(decoder.decode, cfg.latent_channels, samples, size)
        projection, error = fit_projection(pairs, cfg.scale)
        published = rms_error(FLUX, pairs, cfg.scale) if cfg.latent_channels == FLUX.weight.shape[0] else None
    return {"weight": [[round(v, 4) for v in row] for row in projection.weight.tolist()],
            "bias": [round(v, 4) for v in projection.bias.tolist()], "rms": error, "published_rms": published,
            "cells": sum(latents[0, 0].numel() for latents, _ in pairs), "target": "images" if images else "random"}


def main(argv: list[str] | None = None) -> int:
    from .errors import ZImageLiteError

    p = argparse.ArgumentParser(prog="python -m zimage_lite.preview_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("vae", type=Path, help="a vae/ folder or a VAE weights file")
    p.add_argument("--images", type=Path, nargs="+", help="fit on these images through the encoder")
    p.add_argument("--samples", type=int, default=16, help="random latents to decode (without --images)")
    p.add_argument("--size", type=int, default=32, help="their side in latent cells")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        result = fit_vae(args.vae, args.images, args.samples, args.size)
    except ZImageLiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("latent -> RGB factors (rows: latent channels; columns R, G, B):")
    for row in result["weight"]:
        print("  " + "  ".join(f"{v:+.4f}" for v in row))
    print("bias: " + "  ".join(f"{v:+.4f}" for v in result["bias"]))
    published = result["published_rms"]
    print(f"RMS error over {result['cells']} cells ({result['target']}): fit {result['rms']:.4f}"
          + ("" if published is None else f", published FLUX.1 factors {published:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
