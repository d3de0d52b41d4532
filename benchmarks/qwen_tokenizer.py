"""Qwen2's own tokenizer for the full-size benchmarks, rebuilt from the merges stable-diffusion.cpp compiles in.

The random checkpoints carry a small tokenizer (zimage_lite/demo.py) that spends about 2.5 times the tokens Qwen's
does on the same text, so a text-encoder row beside sd.cpp's (which tokenizes with Qwen's merges built into sd-cli)
would compare different amounts of work. sd.cpp's source holds those merges as a byte array
(src/tokenizers/vocab/qwen.hpp in its sdist, unpacked in the benchmark cache); the vocabulary follows from them:
the 256 byte symbols in GPT-2's order, each merge's result in rank order, then Qwen's special tokens from id 151643,
the numbering of Qwen2's tokenizer.json. Nothing of it is stored in this repository.

`qwen_model(folder, cache)` is the turbo folder with this tokenizer: a sibling folder of links to its weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import models

from zimage_lite.demo import FIRST_SPECIAL_ID, write_tokenizer

HEADER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/qwen.hpp"


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in vocabulary order (printable bytes first, as themselves)."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in shown]
    return [chr(b) for b in shown] + [chr(256 + i) for i in range(len(rest))]


def read_merges(sdcpp_sdist: Path) -> list[tuple[str, str]]:
    """The merge pairs of `qwen2_merges_utf8_c_str` in sd.cpp's header, in rank order."""
    text = (sdcpp_sdist / HEADER).read_text()
    start = text.index("qwen2_merges_utf8_c_str")
    body = text[text.index("{", start) + 1:text.index("}", start)]
    raw = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", body)).rstrip(b"\0").decode("utf-8")
    pairs = [tuple(line.split(" ", 1)) for line in raw.split("\n") if " " in line]
    return pairs  # type: ignore[return-value]


def qwen_bpe(sdcpp_sdist: Path) -> models.BPE:
    merges = read_merges(sdcpp_sdist)
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) != FIRST_SPECIAL_ID:
        raise SystemExit(f"{sdcpp_sdist / HEADER}: {len(vocab)} regular tokens, Qwen2 has {FIRST_SPECIAL_ID}")
    return models.BPE(vocab=vocab, merges=merges)


def qwen_model(folder: Path, cache: Path) -> Path:
    """`folder` (an official-layout model) with Qwen's tokenizer: CACHE/<name>-qwen-tokenizer, made once."""
    out = cache / f"{folder.name}-qwen-tokenizer"
    if (out / "tokenizer" / "tokenizer.json").is_file():
        return out
    sdists = sorted((cache / "sdcpp").glob("stable_diffusion_cpp_python-*/"))
    if not sdists:
        raise SystemExit(f"no stable-diffusion.cpp sdist under {cache / 'sdcpp'} (benchmarks/sdcpp.py builds it)")
    tmp = cache / f"{out.name}.tmp"
    tmp.mkdir(exist_ok=True)
    for part in folder.iterdir():
        if part.name != "tokenizer" and not (tmp / part.name).exists():
            (tmp / part.name).symlink_to(part.resolve())
    write_tokenizer(tmp / "tokenizer", qwen_bpe(sdists[-1]))
    tmp.rename(out)
    return out
