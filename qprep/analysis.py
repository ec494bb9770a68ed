"""Facts about a traced graph that the passes rely on, gathered before they run:

* :func:`record_types`: the type (and tensor shape) each node's value has on the example
  inputs, so only tensor-producing ops are wrapped and rank-dependent modules
  (``nn.BatchNorm2d`` vs ``1d``) can be chosen;
* :func:`mark_training_dependence`: which ``training=`` arguments follow ``self.training``,
  found by tracing the model a second time with every module's mode flipped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .records import NOTE, Change
from ._provenance import record_change

__all__ = [
    "record_types", "mark_training_dependence", "preserved_state", "may_depend_on_mode",
    "MODE_SENSITIVE",
]

#: Functionals that take a ``training`` flag: their presence alone asks for the second trace.
MODE_SENSITIVE: frozenset = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.rrelu, F.batch_norm, F.instance_norm,
})


@contextlib.contextmanager
def preserved_state(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm statistics, counters) of ``modules`` on exit, so
    running a model to inspect or verify it leaves no trace on it."""
    saved = []
    for module in modules:
        for buf in module.buffers():
            saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def forked_rng():
    """``torch.random.fork_rng`` over the CPU and every visible CUDA device: running a
    model to inspect or verify it leaves the caller's random streams where they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def record_types(gm: torch.fx.GraphModule, inputs: tuple) -> None:
    """Run ``gm`` once on ``inputs`` and store what each node produced in
    ``meta["qprep"]["value"]``: its type, its shape if a tensor, and whether it holds
    tensors (a tuple from ``torch.max(x, dim)``, a ``PackedSequence``)."""
    with preserved_state(gm), torch.no_grad(), forked_rng():
        _ValueRecorder(gm).run(*_clone(inputs))


class _ValueRecorder(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        n.meta.setdefault("qprep", {})["value"] = {
            "type": type(result), "shape": shape, "has_tensor": _has_tensor(result),
        }
        return result


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _clone(value: Any) -> Any:
    """Inputs are cloned before each run: a model may modify its inputs in place."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def has_mode_sensitive_calls(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` calls a functional that takes a training flag, or any function with
    a bool ``training=`` keyword: then the model is traced again in the other mode."""
    return any(_may_take_training(n) for n in gm.graph.nodes)


def _may_take_training(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    try:
        if node.target in MODE_SENSITIVE:
            return True
    except TypeError:  # an unhashable target
        pass
    return isinstance(node.kwargs.get("training"), bool)


@functools.lru_cache(maxsize=None)
def _class_reads_training(cls: type) -> bool:
    """Whether the source of ``cls`` (or a base below ``nn.Module``) mentions ``training``;
    ``True`` when the source cannot be read."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            if "training" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            return True
    return False


def may_depend_on_mode(model: nn.Module, leaf_types: tuple = ()) -> bool:
    """Whether tracing ``model`` in the other mode could give another graph: some module
    whose code is traced (not a ``torch.nn`` leaf) reads ``training``."""
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith(("torch.nn.modules", "qprep.")) and not _compound(module):
            continue
        if leaf_types and isinstance(module, leaf_types):
            continue
        if _class_reads_training(cls):
            return True
    return False


def _compound(module: nn.Module) -> bool:
    from .tracer import COMPOUND_NN

    return isinstance(module, COMPOUND_NN)


def _flips(node: torch.fx.Node, twin: torch.fx.Node) -> list[str | int]:
    """Positions and keyword names of the bool constants that differ between two traces."""
    flips: list[str | int] = [
        i for i, (a, b) in enumerate(zip(node.args, twin.args))
        if isinstance(a, bool) and isinstance(b, bool) and a != b
    ]
    flips += [k for k, a in node.kwargs.items()
              if isinstance(a, bool) and isinstance(twin.kwargs.get(k), bool) and a != twin.kwargs[k]]
    return flips


def _signature(gm: torch.fx.GraphModule) -> list:
    return [(n.op, n.target if n.op != "get_attr" else "attr") for n in gm.graph.nodes]


def mark_training_dependence(
    gm: torch.fx.GraphModule, flipped: torch.fx.GraphModule, mode: str,
    scope_training: Callable[[torch.fx.Node], bool],
) -> list[Change]:
    """Compare ``gm`` with ``flipped`` (traced with every module's mode flipped).

    A call with one bool argument that flips with the mode and equals its scope module's
    ``training`` flag follows ``self.training``: it gets ``meta["qprep"]["follows_training"]``
    and ``["mode_arg"]`` (the position or keyword), whichever function it is
    (``F.dropout``, ``torchvision.ops.stochastic_depth``, a user function). Flags that flip
    otherwise (two of them, ``not self.training``, into a module call) get a note: the
    prepared graph keeps their traced values. When the graphs differ in structure
    (``forward`` branches on ``self.training``), returns a note: the prepared graph
    reproduces ``mode``.
    """
    if _signature(gm) != _signature(flipped):
        first = next((n for n in gm.graph.nodes if n.op not in ("placeholder",)), None)
        note = (f"forward branches on self.training: the graph was traced in {mode} mode and "
                f"the prepared model reproduces {mode} mode only")
        return [record_change(first, "trace", NOTE, "self.training", "self.training", reason=note)] if first else []
    notes = []
    for node, twin in zip(gm.graph.nodes, flipped.graph.nodes):
        flips = _flips(node, twin)
        if not flips:
            continue
        where = flips[0]
        value = node.args[where] if isinstance(where, int) else node.kwargs[where]
        if node.op == "call_function" and len(flips) == 1 and value == scope_training(node):
            node.meta.setdefault("qprep", {}).update(follows_training=True, mode_arg=where)
            continue
        reason = (f"arguments {flips} follow the module's mode in a way qprep cannot keep; "
                  f"the prepared graph keeps their {mode}-mode values")
        notes.append(record_change(node, "trace", NOTE, str(node.target), str(node.target), reason=reason))
    return notes
