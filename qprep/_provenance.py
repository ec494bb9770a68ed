"""Where a node came from: its user source line and module scope, and the records about it.

Provenance lives in ``node.meta["qprep"]`` (one namespaced key): ``{"pass", "action", "from"}``
for nodes a pass created, so a report can say which pass made a node out of which.
"""

from __future__ import annotations

import linecache
import os
import re
from typing import Any

import torch.fx

from .records import Change

__all__ = ["source_location", "source_code", "module_scope", "record_change", "stamp"]

META_KEY = "qprep"
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def _last_frame(node: torch.fx.Node) -> tuple[str, int, str] | None:
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return None
    file, line, func = frames[-1]
    return file, int(line), func


def source_location(node: torch.fx.Node) -> str:
    """``path/to/file.py:LINE`` of the user code that made ``node``, or ``""``."""
    frame = _last_frame(node)
    if frame is None:
        return ""
    file, line, _ = frame
    try:
        shown = os.path.relpath(file)
    except ValueError:  # another drive on Windows
        shown = file
    if shown.startswith(".." + os.sep + ".."):
        shown = file
    return f"{shown}:{line}"


def source_code(node: torch.fx.Node) -> str:
    """The user's source line for ``node``, stripped, or ``""``."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    if lines and not lines[-1].startswith("File "):
        return lines[-1]
    frame = _last_frame(node)
    if frame is None:
        return ""
    return linecache.getline(frame[0], frame[1]).strip()


def module_scope(node: torch.fx.Node) -> str:
    """Qualified name of the innermost user module whose ``forward`` made ``node``
    (``""`` for the root). For a ``call_module`` node this is the caller's scope."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    entries = list(stack.values())
    path = entries[-1][0]
    if node.op == "call_module" and path == node.target:
        path = entries[-2][0] if len(entries) > 1 else ""
    return path


def stamp(node: torch.fx.Node, pass_name: str, action: str, origin: Any) -> None:
    """Record in ``node.meta["qprep"]`` that ``pass_name`` made ``node`` from ``origin``."""
    node.meta[META_KEY] = {"pass": pass_name, "action": action, "from": origin}


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
