"""The prompt enhancer: Z-Image-Turbo's own text encoder, run as the causal LM it is (Qwen3-4B), turns a short
prompt into the long, specific description the DiT was trained on.

The text encoder file already on disk is the model: every layer, the final norm and the tied head
(`Qwen3Encoder(cfg, lm=True)`, models/qwen3.py), placed as the plan's `enhance` stage says (blocks resident or
streamed; on the CPU, layers converted once for decoding when they all stay resident), loaded for this stage only.
The chat is Qwen3's template with thinking switched off (`<think>\\n\\n</think>\\n\\n` after the assistant tag, as
`apply_chat_template(..., enable_thinking=False)` renders it), so the answer is the prompt alone. The prompt runs
in one pass into a KV cache, then one token per pass until `<|im_end|>` (or `<|endoftext|>`) or `max_tokens`.
Greedy unless `temperature > 0`, which samples from a CPU generator seeded with `seed`: one seed, one text, on
every device.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .enhance_options import CONTEXT, DEFAULT_MAX_TOKENS, check_max_tokens, check_temperature, system_prompt
from .errors import OptionError
from .models.qwen3 import KVCache, Qwen3Encoder
from .options import check_seed, check_text
from .quant.formats import dequantize
from .quant.qlinear import QLinear, prepare_resident

if TYPE_CHECKING:
    from .pipeline import ZImagePipeline

SYSTEM_TAG, USER_TAG = "<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n"
ANSWER_TAG = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class EnhanceWarning(UserWarning):
    """The enhancer changed what it was given: a prompt too long for its context was cut."""


@dataclass(frozen=True)
class Enhanced:
    """An enhanced prompt and how it was made."""

    prompt: str  # the enhanced prompt: what the image is drawn from
    original: str  # the prompt as given
    prompt_tokens: int  # the chat sent, system prompt and template included (after any cut)
    new_tokens: int  # tokens generated, the stop token included
    stopped: str  # "end" (the model ended its answer) or "max_tokens"
    prefill_seconds: float
    generate_seconds: float
    truncated_from: int | None = None  # the chat's length in tokens when it was cut to fit the context
    seed: int = 0
    temperature: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generation speed: the tokens after the first (which the prefill pass yields), per second of decoding."""
        return (self.new_tokens - 1) / self.generate_seconds if self.generate_seconds else 0.0

    def params(self) -> dict[str, Any]:
        """What an image made from it stores beside `prompt` (image.PARAM_TYPES)."""
        return {"original_prompt": self.original, "enhance_seed": self.seed, "enhance_temperature": self.temperature}

    def summary(self) -> str:
        return (f"enhance: {self.prompt_tokens} prompt tokens at {self.prefill_tokens_per_second:.1f} tokens/s, "
                f"{self.new_tokens} new at {self.tokens_per_second:.2f} tokens/s ({self.stopped})")


def chat(system: str, prompt: str) -> str:
    """Qwen3's chat template for a system and a user message, generation prompt added, thinking off."""
    return SYSTEM_TAG + system + USER_TAG + prompt + ANSWER_TAG


def encode_chat(tokenizer: Any, system: str, prompt: str, limit: int) -> tuple[list[int], int | None]:
    """The chat's token ids, at most `limit`: a longer one loses the end of the user's prompt (never the template
    or the system prompt). Returns (ids, the uncut length or None). The whole chat is tokenized once and the cut
    made on its tokens, so the kept ones are exactly those of the uncut text."""
    text = chat(system, prompt)
    enc = tokenizer.encode(text)
    ids = enc.ids
    if len(ids) <= limit:
        return ids, None
    start = len(SYSTEM_TAG) + len(system) + len(USER_TAG)
    user = [i for i, (a, b) in enumerate(enc.offsets) if start <= a and b <= start + len(prompt)]
    excess = len(ids) - limit
    if excess >= len(user):
        raise OptionError(f"the system prompt and template take {len(ids) - len(user)} tokens, too many for the "
                          f"enhancer's {limit}-token room for the chat; use a shorter --system or fewer --max-tokens")
    dropped = set(user[len(user) - excess:])
    return [t for i, t in enumerate(ids) if i not in dropped], len(ids)


@torch.inference_mode()
def generate(model: Qwen3Encoder, ids: list[int], max_tokens: int, stop: set[int], device: torch.device,
             dtype: torch.dtype, temperature: float = 0.0, seed: int = 0,
             cached: bool = True) -> tuple[list[int], float, float]:
    """New token ids after `ids` (the stop token included when one came), prefill seconds, generation seconds.
    `cached` False runs the whole sequence again for every token (the KV cache's reference)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    cache = KVCache(model.cfg, len(model.layers), len(ids) + max_tokens, device, dtype) if cached else None
    seq = torch.tensor(ids, dtype=torch.long)
    out: list[int] = []
    t0 = time.perf_counter()
    logits = model.logits(seq, cache, device, dtype)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        if temperature > 0:
            probs = torch.softmax(logits.cpu() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())
        out.append(token)
        if token in stop or len(out) >= max_tokens:
            break
        seq = torch.cat([seq, torch.tensor([token])])
        logits = model.logits(seq[-1:] if cached else seq, cache, device, dtype)
    return out, prefill, time.perf_counter() - t0


def enhance(pipe: ZImagePipeline, prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0,
            temperature: float = 0.0, system: str | Path | None = None) -> Enhanced:
    """Enhance `prompt` with the pipeline's text encoder (ZImagePipeline.enhance). `system`: a file replacing our
    system prompt. Warns (EnhanceWarning) when the prompt is cut to fit the context."""
    from .quant.qlinear import release_scratch
    from .runtime.memory import trim_host
    from .runtime.placement import place
    from .weights.components import open_language_model

    prompt = check_text(prompt, "PROMPT")
    seed, temperature = check_seed(seed), check_temperature(temperature)
    cfg, source = open_language_model(pipe.files.text_encoder)
    context = min(CONTEXT, cfg.max_position_embeddings)
    max_tokens = check_max_tokens(max_tokens, context)
    tokenizer = pipe.tokenizer.tokenizer
    ids, cut = encode_chat(tokenizer, system_prompt(system), prompt, context - max_tokens)
    if cut:
        warnings.warn(EnhanceWarning(f"the prompt is {cut} tokens with the system prompt and template; the enhancer "
                                     f"holds {context} with --max-tokens {max_tokens}: its end was cut to "
                                     f"{len(ids)}"), stacklevel=2)
    stage = pipe.enhance_stage(cfg, source, len(ids) + max_tokens)
    with torch.device("meta"):
        model = Qwen3Encoder(cfg, lm=True)
    stop = {i for t in STOP_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
    try:
        model = place(model, source, stage, pipe.device, pipe.dtype, "text encoder (enhancer)")
        hold_for_decoding(model, stage, pipe.dtype, pipe.files.text_encoder)
        new, prefill, decode = generate(model, ids, max_tokens, stop, pipe.device, pipe.dtype, temperature, seed)
    finally:
        close = getattr(getattr(model, "runner", None), "close", None)
        if close is not None:
            close()
        del model
        source.close()
        release_scratch()
        trim_host()
    ended = bool(new) and new[-1] in stop
    text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True).strip()
    if not text:  # nothing to draw from: the image keeps the prompt as given
        warnings.warn(EnhanceWarning("the enhancer answered with no text; the prompt is kept as given"), stacklevel=2)
        text = prompt
    return Enhanced(text, prompt, len(ids), len(new), "end" if ended else "max_tokens", prefill, decode, cut, seed,
                    temperature)


def hold_for_decoding(model: Qwen3Encoder, stage: Any, dtype: torch.dtype, mapped: Path | None = None) -> None:
    """The placed model as the plan's stage holds it for decoding: its layers converted once when `stage.unpacked`
    (`unpack_layers`), its head made now (int8 rows when `stage.head` says so). `mapped`: the file or folder the
    weights are read from, whose resident pages are handed back after each conversion (runtime/memory.py
    `release_pages`; whatever is read again comes back from the page cache): the converted copies are what the plan
    counts, not the file's pages under them."""
    from .quant.decode_linear import DecodeLinear
    from .runtime.memory import release_pages

    def release() -> None:
        if mapped is not None:
            release_pages(mapped)

    if stage.unpacked:
        unpack_layers(model, dtype, release)
    elif next(model.parameters()).device.type == "cpu":  # the stored form runs its int8 layers as the image path does:
        prepare_resident(model)  # oneDNN's copies made now, the file's pages under them handed back, as planned
    if stage.head == "int8":
        with torch.no_grad():
            model.set_head(DecodeLinear.head_of(model.embed_tokens))
    if stage.head != "view":  # a view reads the whole table at every token: nothing to hand back
        model.head  # noqa: B018  (made once, here)
        release()


def unpack_layers(model: Qwen3Encoder, dtype: torch.dtype, after_layer: Callable[[], None] = lambda: None) -> None:
    """Every packed Linear of the decoder layers replaced, once: on the CPU with the weight-only integer kernels by
    a `DecodeLinear` (quant/decode_linear.py), else by a plain Linear holding its weight dequantized to `dtype`;
    `after_layer` is called as each layer is done."""
    from .quant.decode_linear import decode_route, to_decode

    packed = decode_route(next(model.parameters()).device) == "packed"
    for layer in model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, QLinear) and m.lora is None and m.bias is None:
                if packed:
                    new: nn.Module = to_decode(m)
                else:
                    new = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
                    w = dequantize(m.weight, m.qtype, m.shape, dtype, state=m.state)
                    new.weight = nn.Parameter(w, requires_grad=False)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, new)
        after_layer()
