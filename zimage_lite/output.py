"""Writing any output (an image, a GGUF file, a bitsandbytes folder) so that a refused, failed or interrupted write
changes nothing: every check before the work starts, then a temporary file beside the target renamed into place.

The one mechanism for the OS errors of writing (disk full, permission, read-only file system): they become one line
naming the output and saying that it was not written.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OptionError
from .runtime.units import format_si


def check_output(path: Path, force: bool, option: str = "--out", folder: bool = False) -> None:
    """Refuse before any work is done: a missing, unwritable or non-folder parent; an existing output (a link counts,
    dangling or not) without `force`; a folder where a file is asked for (`folder=False`)."""
    parent = path.parent
    if not parent.exists():
        raise OptionError(f"{option} {path}: folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise OptionError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: folder {parent} is not writable; choose another folder")
    if path.is_dir() and not folder:
        raise OptionError(f"{option} {path} is a folder; give a file name (in that folder or elsewhere)")
    if os.path.lexists(path) and not force:
        what = f"link (to {os.readlink(path)})" if path.is_symlink() else "folder" if path.is_dir() else "file"
        raise OptionError(f"{option} {path}: a {what} exists there; pass --force to replace it")


def _public(path: Path) -> None:
    """Give a temporary output the mode a plain `open` would (mkstemp/mkdtemp make it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_error(path: Path, e: OSError, option: str = "--out", needed: int | None = None) -> OptionError:
    """The one line for an OS error while writing `path`: disk full (with the size needed when known), else the
    system's reason."""
    short = e.errno is None and " requested and " in str(e)  # numpy's tofile (the GGUF writer's): a short write
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or short:
        size = f" (it needs {format_si(needed)})" if needed else ""
        return OptionError(f"{option} {path}: disk full while writing{size}; free some space or choose another "
                           f"folder. {path.name} was not written and no existing file was changed")
    return OptionError(f"{option} {path}: cannot write ({e.strerror or e}); {path.name} was not written and no "
                       "existing file was changed")


def write_atomic(path: Path, write: Callable[[Path], None], force: bool, folder: bool = False,
                 option: str = "--out", needed: int | None = None) -> None:
    """Write through `write(tmp)` into a temporary file (or folder) beside `path`, then rename it into place.

    An interrupted or failed write leaves nothing behind and the existing output as it was; an existing output is
    replaced only with `force`. OS errors (disk full, ...) become an OptionError naming `path` (`needed`: the
    size, for the disk-full message).
    """
    check_output(path, force, option, folder)
    tmp: Path | None = None
    try:
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        write(tmp)
        _public(tmp)
        if os.path.lexists(path) and not force:  # appeared while we worked
            raise OptionError(f"{option} {path}: a file appeared there while writing; pass --force to replace it")
        if folder and os.path.lexists(path):  # a folder cannot be renamed over another: move the old one aside
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            _remove(tmp)
        raise write_error(path, e, option, needed) from None
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        raise
