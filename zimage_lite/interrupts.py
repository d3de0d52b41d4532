"""Ctrl-C and SIGTERM: one way to stop, and a true account of what was written.

SIGTERM (what `kill`, systemd and job schedulers send) is raised as `Interrupted`, a KeyboardInterrupt, so every
clean-up written for Ctrl-C (temporary outputs removed, the source unmapped) runs for it too.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import Interrupted

EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Interrupted("SIGTERM")`; the previous handler is restored on the way out.

    Left alone: a SIGTERM the parent process told us to ignore, and any thread but the main one (where Python
    cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(e: KeyboardInterrupt) -> tuple[str, int]:
    """The line to print and the exit code for an interruption: which signal, and what was written before it."""
    name = getattr(e, "signal_name", "SIGINT")
    written = getattr(e, "written", ())
    how = "interrupted" if name == "SIGINT" else f"interrupted by {name}"
    if not written:
        return f"{how}: nothing was written", EXIT_CODES.get(name, 130)
    verb = "was" if len(written) == 1 else "were"
    return (f"{how}: {', '.join(written)} {verb} written in full; the rest was not (no partial file is left)",
            EXIT_CODES.get(name, 130))
