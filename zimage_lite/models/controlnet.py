"""The Z-Image ControlNet (alibaba-pai Z-Image-Turbo-Fun-Controlnet-Union, diffusers' ZImageControlNetModel).

Its blocks are the DiT's blocks (models/dit.py `TransformerBlock`) plus two zero-initialised projections: the first
control block adds `before_proj(c)` to the image stream it follows, and every control block hands out
`after_proj(c)` as a hint. Module and parameter names are diffusers' (the alibaba-pai single files use the same), so
`strict` loading is the name check. The blocks form a schedule run through `self.runner`, like the DiT's, so the
memory plan keeps them resident or streams them.

One DiT forward with control (diffusers' pipelines call the ControlNet, then the transformer; here the ControlNet's
pass runs inside the DiT's, `ControlPass` being the DiT's `Control`):

- the control latents are patchified and embedded like the image (pads become the DiT's pad token): the stream c;
- 1.0 (`add_control_noise_refiner` null): after the DiT's refiners, plain refiner blocks run on c;
- 2.1 ("control_noise_refiner"): before them, control-refiner blocks run on c beside the embedded image and give
  hints; the DiT's noise-refiner blocks then also run on a second image stream, the hints added after the layers
  `control_refiner_layers_places` names. That stream feeds the control layers only: the DiT's own image stream is
  refined without hints, as diffusers does (its transformer receives only the main-layer hints);
- 2.0 ("control_layers"): as 2.1, with the control layers themselves in the control-refiner role (they run twice);
- then the control layers run on (c, captions) beside the unified (image, captions) sequence; hint i, times the
  scale, is added to the DiT's sequence after main layer `control_layers_places[i]`.

Where this follows diffusers and not the original: in alibaba-pai's VideoX-Fun (videox_fun/models/
z_image_transformer2d_control.py at 804a4258, `forward` lines 512-545 with `BaseZImageTransformerBlock.forward`
lines 105-111) the 2.x control-refiner hints are added to the DiT's own image stream in its noise refiner, so every
main layer sees them; diffusers (controlnet_z_image.py) adds them to the ControlNet's copy only, and its transformer
refines without them. The tests hold diffusers' behaviour. VideoX-Fun's configs (config/z_image/z_image_control*.yaml)
confirm the places read off the files here: 1.0 every 5th layer, 2.x every 2nd, lite 2.1 [0, 10, 20].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack

import torch
from torch import nn

from ..config import ControlNetConfig, DiTConfig
from .dit import DiTState, TransformerBlock, ZImageDiT, joined, patchify
from .layers import Block, Resident, schedule_of


class ControlBlock(TransformerBlock):
    """A DiT block on the control stream c; the first of its list also takes in the stream it follows."""

    def __init__(self, cfg: DiTConfig, first: bool) -> None:
        super().__init__(cfg, modulation=True)
        self.before_proj = nn.Linear(cfg.dim, cfg.dim) if first else None
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, rope: torch.Tensor, spans: list[int],  # type: ignore[override]
                adaln: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c after the block, its hint); x: the stream the control follows (read by the first block only)."""
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, rope, spans, adaln)
        return c, self.after_proj(c)


class ZImageControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block = cfg.block_config()
        self.control_all_x_embedder = nn.ModuleDict({block.embedder_key: nn.Linear(block.patch_dim, cfg.dim)})
        mode = cfg.add_control_noise_refiner
        if mode == "control_noise_refiner":
            self.control_noise_refiner = nn.ModuleList(
                [ControlBlock(block, i == 0) for i in range(cfg.n_refiner_layers)])
        elif mode is None:
            self.control_noise_refiner = nn.ModuleList(
                [TransformerBlock(block, True) for _ in range(cfg.n_refiner_layers)])
        self.control_layers = nn.ModuleList([ControlBlock(block, i == 0)
                                             for i in range(len(cfg.control_layers_places))])
        self.runner = Resident([b.module for b in self.schedule()])

    def block_lists(self) -> tuple[str, ...]:
        """The block lists in execution order (2.0 has no refiner list: its control layers run twice)."""
        return ("control_layers",) if self.cfg.add_control_noise_refiner == "control_layers" else (
            "control_noise_refiner", "control_layers")

    def schedule(self) -> list[Block]:
        """The control blocks in execution order: what the planner sizes and placement places."""
        return schedule_of(self, self.block_lists())

    def set_attention_chunk(self, chunk: int | None) -> None:
        for block in self.schedule():
            block.module.attention.chunk = chunk

    def check_dit(self, dit: DiTConfig, where: str) -> None:
        """ValueError naming `where` when this ControlNet cannot drive that DiT (width, heads, layers)."""
        cfg = self.cfg
        if (cfg.dim, cfg.n_heads, cfg.n_kv_heads) != (dit.dim, dit.n_heads, dit.n_kv_heads):
            raise ValueError(f"{where}: a ControlNet of width {cfg.dim} with {cfg.n_heads} heads, for another DiT "
                             f"(this one: width {dit.dim}, {dit.n_heads} heads)")
        if max(cfg.control_layers_places) >= dit.n_layers or (cfg.control_refiner_layers_places and max(
                cfg.control_refiner_layers_places) >= dit.n_refiner_layers):
            raise ValueError(f"{where}: it adds hints after layers {list(cfg.control_layers_places)} (refiner "
                             f"{list(cfg.control_refiner_layers_places)}); the DiT has {dit.n_layers} layers and "
                             f"{dit.n_refiner_layers} refiner layers")


class ControlPass:
    """The ControlNet's part of one DiT forward: `with ControlPass(...) as control: dit.blocks(state, control)`.

    `context`: the control latents (1, control_in_dim, h, w) in the compute dtype, the same for every item of the
    state (CFG's pair); `scale`: diffusers' controlnet_conditioning_scale. Entering opens the ControlNet's runner
    pass (2.x: and runs the control-refiner blocks); leaving closes it however the DiT's pass ended.
    """

    def __init__(self, net: ZImageControlNet, dit: ZImageDiT, state: DiTState, context: torch.Tensor,
                 scale: float) -> None:
        self.net, self.scale = net, scale
        cfg = net.cfg.block_config()
        tokens = net.control_all_x_embedder[cfg.embedder_key](patchify(context[0], cfg.patch_size))
        tokens[state.n_img[0]:] = dit.x_pad_token.to(tokens.dtype)
        self.c = joined([tokens] * len(state.img_spans))
        self.x = state.img  # the control's image stream: refined with the refiner hints (2.x)
        self.refiner_hints: dict[int, torch.Tensor] | None = None
        self._stack = ExitStack()
        self._blocks: Iterator[nn.Module] = iter(())
        self._state = state

    def __enter__(self) -> ControlPass:
        self._blocks = self._stack.enter_context(self.net.runner.run())
        try:
            self._refine()
        except BaseException:  # no __exit__ follows a failed __enter__: give the blocks back here
            self._stack.close()
            raise
        return self

    def _refine(self) -> None:
        """2.x: the control-refiner hints, from the first blocks of the pass (2.0: the control layers, run again
        after)."""
        mode, state = self.net.cfg.add_control_noise_refiner, self._state
        if mode is not None:
            n = len(self.net.control_layers) if mode == "control_layers" else len(self.net.control_noise_refiner)
            self.c, hints = self._run(n, self.c, state.img, state.img_rope, state.img_spans, state.adaln)
            places = self.net.cfg.control_refiner_layers_places
            self.refiner_hints = {layer: hints[i] * self.scale for i, layer in enumerate(places)}
            if mode == "control_layers":  # the control layers run again on the unified sequence: a second pass
                self._stack.close()
                self._blocks = self._stack.enter_context(self.net.runner.run())

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _run(self, n: int, c: torch.Tensor, x: torch.Tensor, rope: torch.Tensor, spans: list[int],
             adaln: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The next n control blocks of the pass on c beside x: (c, their hints)."""
        hints = []
        for _ in range(n):
            c, hint = next(self._blocks)(c, x, rope, spans, adaln)
            hints.append(hint)
        return c, hints

    def refined(self, i: int, block: nn.Module, state: DiTState) -> None:
        if self.refiner_hints is None:  # 1.0: the control's image stream is the DiT's
            return
        self.x = block(self.x, state.img_rope, state.img_spans, state.adaln)
        if i in self.refiner_hints:
            self.x = self.x + self.refiner_hints[i]

    def hints(self, img: torch.Tensor, cap: torch.Tensor, state: DiTState) -> Mapping[int, torch.Tensor]:
        c, x = self.c, img
        if self.refiner_hints is None:  # 1.0: plain refiner blocks on c, after the DiT's refiners
            for _ in range(len(self.net.control_noise_refiner)):
                c = next(self._blocks)(c, state.img_rope, state.img_spans, state.adaln)
        else:
            x = self.x
        c_all, x_all = ZImageDiT.unified(c, cap, state), ZImageDiT.unified(x, cap, state)
        _, hints = self._run(len(self.net.control_layers), c_all, x_all, state.rope, state.spans, state.adaln)
        return {layer: hints[i] * self.scale for i, layer in enumerate(self.net.cfg.control_layers_places)}


def controlled(dit: ZImageDiT, net: ZImageControlNet, context: torch.Tensor, scale: float,
               latents: torch.Tensor, t: torch.Tensor, cap_feats: list[torch.Tensor]) -> torch.Tensor:
    """One DiT forward under the ControlNet: what `dit(latents, t, cap_feats)` returns, with the hints added."""
    state = dit.embed(latents, t, cap_feats)
    with ControlPass(net, dit, state, context.to(latents.dtype), scale) as control:
        state = dit.blocks(state, control)
    return dit.final(state)
