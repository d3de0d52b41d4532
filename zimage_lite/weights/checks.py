"""Checks of what is read, before it is used: paths before they are opened, components before they run together.

A path must be an existing, readable, non-empty regular file (or a folder where one may stand), checked with `stat`
alone, before any `open`: a FIFO given as `--dit` would block the reader forever, /dev/null reads as an empty file,
a folder where a file belongs fails deep inside a parser, and none of these would name the option. Components are
checked against each other once all are opened (`check_compatible`, `check_vocabulary`). Imports nothing heavy:
config.read_json uses it while the command line is still being read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ZImageLiteError

_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")


def check_path(path: Path | str, option: str | None = None, folder_ok: bool = False,
               error: type[ZImageLiteError] = CheckpointError) -> Path:
    """`path` when it is a regular file that can be read and is not empty, or (with `folder_ok`) a folder that can
    be listed; else `error` (CheckpointError for weights, OptionError for an input image) naming the path, the option
    it came from (`--dit`, `--image`, ...) and what to give."""
    path = Path(path)
    where = f"{path} ({option})" if option else str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{where}: not found") from None
    except OSError as e:  # a path through a file (NotADirectoryError), a loop of links, a name too long
        raise error(f"{where}: cannot be looked up ({e.strerror or e})") from None
    wanted = "a weights file or a model folder" if folder_ok else "a regular file"
    if stat.S_ISDIR(st.st_mode):
        if not folder_ok:
            raise error(f"{where}: a folder, not a file; give the file itself")
        if not os.access(path, os.R_OK | os.X_OK):
            raise error(f"{where}: the folder cannot be read (permission denied); make it readable")
        return path
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{where}: {_kind(st.st_mode)}, not a regular file; give {wanted}")
    if not os.access(path, os.R_OK):
        raise error(f"{where}: the file cannot be read (permission denied); make it readable")
    if st.st_size == 0:
        raise error(f"{where}: the file is empty (0 bytes), an interrupted download or copy? Download or "
                              f"convert it again")
    return path


def check_file(path: Path | str, option: str | None = None) -> Path:
    """`check_path` for a place where only a file will do (a config.json, a shard, a tokenizer)."""
    return check_path(path, option)


# --- the components against each other -------------------------------------------------------------------------
# Each is checked on its own as it is opened (config.py, components.py); these are the sizes one component hands to
# another. A text encoder, VAE or tokenizer taken from another model passes every check of its own, then fails
# mid-compute with a bare shape or index error: here it fails at load, naming both files.

MIXED = "they are not parts of one model"


def check_compatible(dit: tuple[Path, Any], text_encoder: tuple[Path, Any], vae: tuple[Path, Any]) -> None:
    """(path, config) of each component: the text encoder's width is the DiT's caption width, and the VAE decodes
    the DiT's latent channels. CheckpointError naming both files and both sizes otherwise."""
    (dit_path, d), (te_path, t), (vae_path, v) = dit, text_encoder, vae
    if t.hidden_size != d.cap_feat_dim:
        raise CheckpointError(
            f"{te_path} (text encoder) gives caption features {t.hidden_size} wide (hidden_size), but {dit_path} "
            f"(DiT) reads {d.cap_feat_dim} (cap_feat_dim): {MIXED}; pass the matching --text-encoder or --dit")
    if v.latent_channels != d.in_channels:
        raise CheckpointError(
            f"{vae_path} (VAE) decodes latents of {v.latent_channels} channels (latent_channels), but {dit_path} "
            f"(DiT) makes {d.in_channels} (in_channels): {MIXED}; pass the matching --vae or --dit")


def check_vocabulary(tokenizer: Path, largest_id: int, text_encoder: Path, vocab_size: int) -> None:
    """Every id the tokenizer can produce has a row in the text encoder's embedding table."""
    if largest_id >= vocab_size:
        raise CheckpointError(
            f"{tokenizer}: the tokenizer's ids reach {largest_id}, but {text_encoder} (text encoder) has "
            f"{vocab_size} embedding rows (vocab_size): {MIXED}; use the tokenizer that came with the text encoder")
