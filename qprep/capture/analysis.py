"""Facts about a traced graph that the passes rely on, gathered before they run:
which ``training=`` arguments follow ``self.training`` (:func:`mark_training_dependence`),
found by tracing the model a second time with every module's mode flipped when its code
reads ``training`` (:func:`may_depend_on_mode`, :func:`has_mode_sensitive_calls`). (What
each node produced on the example inputs is recorded while tracing: :mod:`.values`.)
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..core import meta
from ..core.graph import lookup
from ..core.provenance import record_change
from ..core.records import NOTE, Change
from ..modules import MODULE_TYPES
from .compound import COMPOUND_NN

__all__ = [
    "mark_training_dependence", "may_depend_on_mode", "has_mode_sensitive_calls", "same_structure", "branch_note",
    "MODE_SENSITIVE", "class_reads_training",
]

#: Functionals that take a ``training`` flag: their presence alone asks for the second trace.
MODE_SENSITIVE: frozenset = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.rrelu, F.batch_norm, F.instance_norm,
})


_MODE_SENSITIVE = dict.fromkeys(MODE_SENSITIVE, True)


def has_mode_sensitive_calls(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` calls a functional that takes a training flag, or any function with
    a bool ``training=`` keyword: then the model is traced again in the other mode."""
    return any(_may_take_training(n) for n in gm.graph.nodes)


def _may_take_training(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    return bool(lookup(_MODE_SENSITIVE, node.target)) or isinstance(node.kwargs.get("training"), bool)


@functools.lru_cache(maxsize=None)
def class_reads_training(cls: type) -> bool:
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
        if (cls.__module__.startswith("torch.nn.modules") or isinstance(module, MODULE_TYPES)) \
                and not isinstance(module, COMPOUND_NN):
            continue
        if leaf_types and isinstance(module, leaf_types):
            continue
        if class_reads_training(cls):
            return True
    return False


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


def same_structure(gm: torch.fx.GraphModule, flipped: torch.fx.GraphModule,
                   scope_training: Callable[[torch.fx.Node], bool] | None = None) -> bool:
    """Whether two traces (of the two modes) make the same calls in the same order, with the
    same arguments but for flags that follow ``self.training`` (one bool argument of a
    function call equal to its scope's ``training``). Anything else that differs (a branch,
    ``0.9 if self.training else 1.0``, ``not self.training``) needs one graph per mode."""
    if _signature(gm) != _signature(flipped):
        return False
    if scope_training is None:
        return True
    for node, twin in zip(gm.graph.nodes, flipped.graph.nodes):
        flips = _flips(node, twin)
        if len(flips) > 1 or (flips and not (node.op == "call_function" and _flag(node, flips[0]) == scope_training(node))):
            return False
        if _arguments(node, flips) != _arguments(twin, flips):
            return False
    return True


def _flag(node: torch.fx.Node, where: int | str):
    return node.args[where] if isinstance(where, int) else node.kwargs[where]


def _arguments(node: torch.fx.Node, skip: list) -> str:
    """The node's arguments as text (nodes by name), without the positions in ``skip``."""
    args = [a for i, a in enumerate(node.args) if i not in skip]
    kwargs = {k: v for k, v in node.kwargs.items() if k not in skip}
    return repr((node.target if isinstance(node.target, str) else id(node.target), args, kwargs))


def branch_note(gm: torch.fx.GraphModule) -> Change:
    """The note that a ``forward`` branches on ``self.training``."""
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    reason = ("forward branches on self.training: prepared as two graphs, one traced in train mode and one in "
              "eval mode, over the same modules; .train() and .eval() switch between them")
    return record_change(first, "trace", NOTE, "self.training", "self.training", reason=reason)


def mark_training_dependence(
    gm: torch.fx.GraphModule, flipped: torch.fx.GraphModule, mode: str,
    scope_training: Callable[[torch.fx.Node], bool],
) -> list[Change]:
    """Compare ``gm`` with ``flipped`` (traced with every module's mode flipped).

    A call with one bool argument that flips with the mode and equals its scope module's
    ``training`` flag follows ``self.training``: it gets ``meta["qprep"]["follows_training"]``
    and ``["mode_arg"]`` (the position or keyword), whichever function it is
    (``F.dropout``, ``torchvision.ops.stochastic_depth``, a user function). The traces must
    differ in nothing else (:func:`same_structure` with ``scope_training``); a ``forward``
    that differs otherwise between the modes is prepared as two graphs instead
    (:mod:`qprep.capture.dual`), and the notes here do not arise then.
    """
    notes = []
    for node, twin in zip(gm.graph.nodes, flipped.graph.nodes):
        flips = _flips(node, twin)
        if not flips:
            continue
        where = flips[0]
        value = node.args[where] if isinstance(where, int) else node.kwargs[where]
        if node.op == "call_function" and len(flips) == 1 and value == scope_training(node):
            meta.set_facts(node, **{meta.FOLLOWS_TRAINING: True, meta.MODE_ARG: where})
            continue
        reason = (f"arguments {flips} follow the module's mode in a way qprep cannot keep; "
                  f"the prepared graph keeps their {mode}-mode values")
        notes.append(record_change(node, "trace", NOTE, str(node.target), str(node.target), reason=reason))
    return notes
