"""Size units: the one place that reads `--vram` / `--ram` values and writes byte counts for people.

Units, case-insensitive. A unit spelled with "B" after an SI prefix is decimal, as disk makers and accelerate's
`max_memory` count (1 GB = 10^9 B). The binary spellings are powers of two: GiB, and also the bare letter, as docker,
java and `ulimit`-style options read it (1 GiB = 1 G = 2^30 B). A number with no unit is bytes, and may use an
exponent (`2e9`). So `--vram 4GB` is 3.73 GiB, while `--vram 4G` and `--vram 4GiB` are 4 GiB.

Memory is written in binary units (`gib`, `format_size`: what allocators and `free` report); file sizes in decimal
ones (`gb`, `format_si`: what disk tools and the community's model cards report).
"""

from __future__ import annotations

import math
import re

from ..errors import OptionError

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12

UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": KIB, "kib": KIB, "kb": KB,
    "m": MIB, "mib": MIB, "mb": MB,
    "g": GIB, "gib": GIB, "gb": GB,
    "t": TIB, "tib": TIB, "tb": TB,
}

_SIZE = re.compile(r"^\s*(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_FORMS = "a number with an optional unit, e.g. 4GB (10^9 B), 4G or 4GiB (2^30 B), 3.5GiB, 512MB, 800M, 2e9 (bytes)"


def parse_size(text: str, option: str) -> int:
    """Bytes in a size such as `4GB`, `3.5GiB`, `800M` or `2e9`; `option` names the flag in the error message."""
    match = _SIZE.match(text or "")
    unit = match.group("unit").lower() if match else ""
    if match is None or unit not in UNITS:
        raise OptionError(f"{option} {text!r} is not a size: use {_FORMS}")
    value = float(match.group("num")) * UNITS[unit]
    if not math.isfinite(value):
        raise OptionError(f"{option} {text!r} is too large to be a size: use {_FORMS}")
    if value < 1:
        raise OptionError(f"{option} {text!r} must be at least one byte: use {_FORMS}")
    return int(value)


def format_size(n: int) -> str:
    """A byte count for people, in binary units: `3.42 GiB`, `512.00 MiB`, `17 B`."""
    for unit, scale in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def gib(n: float, unit: bool = True) -> str:
    """`n` bytes as `X.XX GiB`, with the exact size after it when that rounds to nothing (the demo model's
    figures); `unit=False` gives the number alone, for a table column headed GiB."""
    if not unit:
        return f"{n / GIB:.2f}"
    return f"{n / GIB:.2f} GiB" + (f" ({format_size(int(n))})" if 0 < n < GIB // 100 else "")


def gb(n: float, unit: bool = True) -> str:
    """`n` bytes as `X.XX GB` (decimal: file sizes); `unit=False` gives the number alone."""
    return f"{n / GB:.2f}" + (" GB" if unit else "")


def format_si(n: float, unit: str = "B") -> str:
    """A count with a decimal prefix: `4.98 GB`, `512.00 MB`, `17 B`; `unit=""` for plain counts (`6.15 G`)."""
    for scale, prefix in ((GB, "G"), (MB, "M"), (KB, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_option_size(n: int, round_up: bool = False) -> str:
    """A byte count as an option value `parse_size` reads back (`4GB`, `4GiB`, `1.7GB`); `round_up` first rounds up
    to a tenth of a GB, or to a whole MB below that, for a figure to suggest."""
    if round_up:
        n = math.ceil(n / (GB // 10)) * (GB // 10) if n > GB // 10 else math.ceil(n / MB) * MB
    for unit, scale in (("GB", GB), ("GiB", GIB), ("GB", GB // 10), ("MB", MB), ("MiB", MIB)):
        if n % scale == 0:
            return f"{n / GB:g}GB" if scale == GB // 10 else f"{n // scale}{unit}"
    return str(n)
