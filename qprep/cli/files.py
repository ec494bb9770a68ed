"""Prepared-model files for the command line.

By default ``qprep prepare -o`` writes, and ``qprep verify --prepared`` reads, the pickle-free
format of :mod:`qprep.serialize`: the file is data, and loading it instantiates only
allowlisted classes and functions (plus those named with ``--trust``). ``--pickle`` opts in to
``torch.save`` / ``torch.load(weights_only=False)``, which runs whatever code the file names:
only for files whose origin you trust, with a warning each time.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import tempfile
from typing import Callable, Iterator

import torch
import torch.fx
import torch.nn as nn

from .. import serialize
from .inputs import UsageError, resolve

__all__ = ["PICKLE_WARNING", "warn_pickle", "save_prepared", "load_prepared", "trusted_objects", "needs_trust",
           "trust_flag"]

#: Printed (to stderr) whenever ``--pickle`` is used.
PICKLE_WARNING = ("--pickle: the file is read with torch.load(weights_only=False), which runs any code the "
                  "file names; use it only for files whose origin you trust")


def warn_pickle(command: str) -> None:
    print(f"qprep {command}: warning: {PICKLE_WARNING}", file=sys.stderr)


@contextlib.contextmanager
def _replaced_atomically(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary path in ``path``'s folder that replaces ``path`` when the block succeeds
    (and is removed when it fails): no half-written model file is left behind."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def needs_trust(gm: torch.fx.GraphModule) -> list:
    """The classes and functions of ``gm`` that :func:`qprep.serialize.load` does not allow
    by default: a file holding ``gm`` loads only with these trusted."""
    allowed_classes = set(serialize.ALLOWED_CLASSES.values())
    allowed_functions = set(serialize.ALLOWED_FUNCTIONS.values())
    extra: dict = {}
    for name, module in gm.named_modules():
        if name and type(module) not in allowed_classes and not isinstance(module, torch.fx.GraphModule):
            extra.setdefault(type(module), None)
    for graph in _graphs(gm):
        for node in graph.nodes:
            if node.op == "call_function" and node.target not in allowed_functions:
                extra.setdefault(node.target, None)
    return list(extra)


def _graphs(gm: torch.fx.GraphModule) -> list[torch.fx.Graph]:
    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    for mode in ("train", "eval"):
        of = getattr(gm, "graph_of", None)
        if of is not None:
            graphs.append(of(mode))
    return graphs


def trust_flag(obj) -> str:
    """``--trust module:QualName`` for ``obj``."""
    return f"--trust {getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


def save_prepared(gm: torch.fx.GraphModule, path: pathlib.Path, *, pickle: bool) -> nn.Module:
    """Write ``gm`` to ``path`` (atomically) and return what loading the file gives back."""
    if pickle:
        with _replaced_atomically(path) as tmp:
            torch.save(gm, tmp)
        return torch.load(path, weights_only=False)
    try:
        with _replaced_atomically(path) as tmp:
            serialize.save(gm, tmp)
    except serialize.SerializationError as exc:
        raise UsageError(f"cannot save the prepared model as data ({exc}); --pickle saves it with torch.save "
                         "instead (a file only trusted loaders should open)") from exc
    return serialize.load(path, trusted=needs_trust(gm))


def trusted_objects(specs: list[str] | None) -> list:
    """``--trust`` values: ``package.module:Name`` / ``file.py:Name`` (a class or function),
    or a bare ``Tensor`` method name."""
    return [resolve(spec) if ":" in spec else spec for spec in specs or []]


def load_prepared(path: str, *, pickle: bool, trusted: list) -> nn.Module:
    """Load a prepared model file (see the module docstring); a :class:`UsageError` (exit 2)
    that says what to do when it cannot be loaded."""
    if not pathlib.Path(path).is_file():
        raise UsageError(f"cannot load {path}: no such file")
    if pickle:
        loader: Callable = lambda: torch.load(path, weights_only=False)  # noqa: E731
    else:
        loader = lambda: serialize.load(path, trusted=trusted)  # noqa: E731
    try:
        prepared = loader()
    except serialize.UntrustedError as exc:
        module, _, name = exc.name.rpartition(".")
        flag = f"--trust {module}:{name}" if module else f"--trust {name}"
        raise UsageError(f"cannot load {path}: {exc.name!r} is not allowlisted; if you trust this file, add "
                         f"{flag}") from exc
    except serialize.SerializationError as exc:
        raise UsageError(f"cannot load {path}: {exc} (a file written by torch.save, e.g. qprep prepare --pickle, "
                         "loads with --pickle, which trusts the file)") from exc
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(prepared, nn.Module):
        raise UsageError(f"{path} holds a {type(prepared).__name__}, not a module")
    return prepared
