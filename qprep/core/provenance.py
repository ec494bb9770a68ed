"""Where a node came from: its user source line and module scope, and the records about it.

Provenance lives in ``node.meta["qprep"]`` (one namespaced key): ``{"pass", "action", "from"}``
for nodes a pass created, so a report can say which pass made a node out of which.
"""

from __future__ import annotations

import functools
import linecache
import os
import pathlib
import re
from typing import Any

import torch
import torch.fx

from . import meta
from .records import Change

__all__ = ["source_location", "location_text", "source_code", "module_scope", "record_change", "stamp", "split_location", "source_uri"]

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")


def _frames(node: torch.fx.Node) -> tuple[tuple[str, int, str], ...]:
    """``(file, line, code)`` for each frame of the node's recorded stack trace."""
    return _parse_trace(node.meta.get(meta.STACK_TRACE) or "")


@functools.lru_cache(maxsize=4096)
def _parse_trace(text: str) -> tuple[tuple[str, int, str], ...]:
    lines = text.splitlines()
    frames = []
    for i, text in enumerate(lines):
        match = _FRAME.search(text)
        if match:
            code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.search(lines[i + 1]) else ""
            frames.append((match["file"], int(match["line"]), code))
    return tuple(frames)


def _user_frame(node: torch.fx.Node) -> tuple[str, int, str] | None:
    """The innermost frame outside torch (the user's line), else the innermost frame:
    for ``F.sigmoid(x)``, traced inside torch as ``x.sigmoid()``, the user's call."""
    return _user_frame_of(_frames(node))


@functools.lru_cache(maxsize=4096)
def _user_frame_of(frames: tuple) -> tuple[str, int, str] | None:
    for frame in reversed(frames):
        if not os.path.abspath(frame[0]).startswith(_TORCH_DIR):
            return frame
    return frames[-1] if frames else None


def source_location(node: torch.fx.Node) -> str:
    """``path/to/file.py:LINE`` of the user code that made ``node``, or ``""``."""
    frame = _user_frame(node)
    if frame is None:
        return ""
    return location_text(frame[0], frame[1])


def location_text(file: str, line: int) -> str:
    """``file:line`` as reports show it: code in an installed package relative to the package
    (``torchvision/models/resnet.py:102``), other code relative to the working directory unless
    that climbs two levels up."""
    return f"{_shown(file, os.getcwd())}:{line}"


_INSTALLED = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


@functools.lru_cache(maxsize=512)
def _shown(file: str, cwd: str) -> str:
    for marker in _INSTALLED:
        if marker in file:
            return file.rsplit(marker, 1)[1]
    try:
        shown = os.path.relpath(file, cwd)
    except ValueError:  # another drive on Windows
        return file
    return file if shown.startswith(".." + os.sep + "..") else shown


def source_code(node: torch.fx.Node) -> str:
    """The user's source line for ``node``, stripped, or ``""``."""
    frame = _user_frame(node)
    if frame is None:
        return ""
    return frame[2] or linecache.getline(frame[0], frame[1]).strip()


def module_scope(node: torch.fx.Node) -> str:
    """Qualified name of the innermost user module whose ``forward`` made ``node``
    (``""`` for the root). For a ``call_module`` node this is the caller's scope."""
    stack = node.meta.get(meta.MODULE_STACK) or {}
    if not stack:
        return ""
    entries = list(stack.values())
    path = entries[-1][0]
    if node.op == "call_module" and path == node.target:
        path = entries[-2][0] if len(entries) > 1 else ""
    return path


def stamp(node: torch.fx.Node, pass_name: str, action: str, origin: Any) -> None:
    """Record in ``node.meta["qprep"]`` that ``pass_name`` made ``node`` from ``origin``."""
    meta.set_facts(node, **{meta.PASS: pass_name, meta.ACTION: action, meta.FROM: origin})


def record_change(node: torch.fx.Node, pass_name: str, action: str, op: str, target: str = "", **fields) -> Change:
    """A :class:`~qprep.records.Change` about ``node`` with its source location filled in."""
    return Change(
        pass_name=pass_name,
        action=action,
        node=node.name,
        op=op,
        target=target,
        location=fields.pop("location", None) or source_location(node),
        code=fields.pop("code", None) or source_code(node),
        scope=fields.pop("scope", None) if "scope" in fields else module_scope(node),
        **fields,
    )


def split_location(location: str) -> tuple[str, int | None]:
    """``("path/file.py", 42)`` from ``"path/file.py:42"``; ``(location, None)`` otherwise."""
    path, _, line = location.rpartition(":")
    return (path, int(line)) if path and line.isdigit() else (location, None)


def source_uri(location: str) -> str:
    """``file:///abs/path/file.py#L42`` for a ``file.py:42`` location, or ``""``."""
    path, line = split_location(location)
    if not path or line is None:
        return ""
    return pathlib.Path(os.path.abspath(path)).as_uri() + f"#L{line}"
