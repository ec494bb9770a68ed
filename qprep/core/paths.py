"""Output paths checked before any work: a preparation that takes minutes must not fail
at the end because the file it writes cannot be created."""

from __future__ import annotations

import os
import pathlib

from .errors import InputError

__all__ = ["check_writable"]


def check_writable(path: str | os.PathLike, what: str = "output") -> pathlib.Path:
    """``path`` as a :class:`pathlib.Path`; :class:`InputError` unless a file can be written
    there: its folder exists and is writable, and ``path`` is not a folder."""
    path = pathlib.Path(path)
    folder = path.parent
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder; give a file name")
    if not folder.is_dir():
        raise InputError(f"{what} {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{what} {str(path)!r} is not writable")
    return path
