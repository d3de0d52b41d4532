"""The shifted flow-match Euler sampler as pure functions (zimage_spec.md 5).

`steps` = number of DiT forwards (Turbo: 8). Sigmas run from 1 towards 0 with the static shift
sigma' = shift*s / (1 + (shift-1)*s); the model gets t = 1 - sigma' and predicts the negative flow velocity.
"""

from __future__ import annotations

import numpy as np
import torch

from .options import guidance_on


def get_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """steps+1 sigmas in fp32, the last 0, computed as diffusers' pipeline and scheduler compute them: the steps
    sigmas 1 .. 1/steps by an fp32 linspace, then the shift in fp32 (the official code works in float64 and differs
    from this by one fp32 ulp at some step counts: diffusers is the reference that images are held to)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float32).numpy()
    s = shift * s / (1 + (shift - 1) * s)  # numpy float32 throughout (a Python float does not widen it)
    return torch.cat([torch.from_numpy(s.astype(np.float32)), torch.zeros(1)])


def model_time(sigma: torch.Tensor) -> torch.Tensor:
    """The DiT's time input: (1000 - 1000 sigma)/1000 in fp32, spelled as the reference spells it."""
    ts = sigma.float() * 1000
    return (1000 - ts) / 1000


def get_noise(seed: int | torch.Generator, channels: int, height: int, width: int, scale: int = 8) -> torch.Tensor:
    """Initial latent (1, C, 2*(H//16), 2*(W//16)) from a seeded CPU generator: one seed, one image, any device.
    img2img passes the generator its posterior sample was drawn from: the noise is the draw after it."""
    g = torch.Generator("cpu").manual_seed(seed) if isinstance(seed, int) else seed
    h, w = 2 * (height // (2 * scale)), 2 * (width // (2 * scale))
    return torch.randn((1, channels, h, w), generator=g, dtype=torch.float32)


def guidance_active(cfg: float, t_model: float, truncation: float) -> bool:
    """CFG runs when it is on (options.guidance_on) and t is not past the truncation."""
    return guidance_on(cfg) and not t_model > truncation


def combine_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float = 0.0) -> torch.Tensor:
    """pos + scale*(pos - neg) in fp32; with normalization > 0, its norm is capped at normalization*|pos|."""
    pos, neg = pos.float(), neg.float()
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        cap = torch.linalg.vector_norm(pos) * normalization
        norm = torch.linalg.vector_norm(pred)
        if norm > cap:
            pred = pred * (cap / norm)
    return pred


def euler_step(latents: torch.Tensor, model_out: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x <- x + (sigma_next - sigma) * v with v = -model_out (the sign flip of the reference), in fp32. The pipeline
    checks model_out for NaN/inf first (runtime/numerics.py): the step itself is pure arithmetic."""
    return latents + (sigma_next - sigma) * (-model_out.float())


def start_index(steps: int, strength: float) -> int:
    """The first of `steps` sigmas an init image is noised to, for img2img/inpainting at `strength` in (0, 1]: the
    reference's int(max(steps - min(steps * strength, steps), 0)), in Python floats. strength 1 starts from the
    top (pure noise, though the image's posterior draw still comes first); the DiT runs steps - start times."""
    return int(max(steps - min(steps * strength, steps), 0))



def scale_noise(sample: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-match forward process: sample noised to level sigma, sigma * noise + (1 - sigma) * sample, in the
    sample's dtype (the scheduler casts its sigma so)."""
    sigma = sigma.to(sample.device, sample.dtype)
    return sigma * noise + (1.0 - sigma) * sample


def inpaint_blend(latents: torch.Tensor, init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                  sigma_next: torch.Tensor | None) -> torch.Tensor:
    """After a step: keep the sampler's latents where the mask is 1 and the original, re-noised to the next level
    with the same noise, where it is 0; the original clean after the last step (`sigma_next` None)."""
    original = init if sigma_next is None else scale_noise(init, noise, sigma_next)
    return (1 - mask) * original + mask * latents
