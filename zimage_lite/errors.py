"""Error types. Each carries a message a user can act on, naming the file, tensor or option at fault."""

import errno


class ZImageLiteError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class CheckpointError(ZImageLiteError):
    """A checkpoint file or folder is missing, truncated, corrupt or of an unknown layout."""


class ShapeError(CheckpointError):
    """A tensor in a checkpoint has a shape other than the config asks for."""


class UnsupportedQuantError(ZImageLiteError):
    """A quant type that cannot be read, or a tensor that cannot be written as the asked-for type."""


class OptionError(ZImageLiteError):
    """A command-line option or API argument has a value that cannot be used."""


class NumericsError(ZImageLiteError):
    """The computation produced NaN or inf (for example fp16 overflow)."""


class BudgetError(ZImageLiteError):
    """A memory budget that no plan can meet, or running out of memory mid-run."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, carrying what was written in full before it came (the CLI says so, and what was not).

    A KeyboardInterrupt, so code that cleans up on Ctrl-C cleans up on SIGTERM too."""

    def __init__(self, signal_name: str = "SIGINT", written: tuple[str, ...] = ()) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.written = written


def os_error_line(e: OSError) -> str:
    """The one line for an OS error on a path the options gave (the CLI's last resort, where no check named it
    first; `e.filename` set): the file, cut in the middle when it is long, and the system's reason."""
    name = str(e.filename)
    shown = name if len(name) <= 80 else f"{name[:40]}...{name[-30:]} ({len(name)} characters)"
    hint = "; give a shorter path" if e.errno == errno.ENAMETOOLONG else ""
    return f"{shown}: {e.strerror or e}{hint}"
