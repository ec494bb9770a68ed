"""One graph for both training modes, so the passes make one set of modules for both.

A ``forward`` that branches on ``self.training`` is traced in train mode and in eval mode.
:func:`union` merges the two graphs into one: every node the two traces share (same op,
same target, same arguments, in the same order) appears once, the rest once per mode, each
node tagged with the modes it runs in (:data:`qprep.core.meta.MODES`); the output is
``(train_output, eval_output)``. The passes run once on the union, so an op both modes run
becomes one module both graphs call, and ``split_reused_modules`` does not clone a module
two modes call once each. :func:`split` then takes each mode's graph back out, in that
mode's own order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn

from ..core import meta
from ..core.dual import MODES, modes_of
from ..core.graph import constants_out_of_state
from .tracer import QprepTracer

__all__ = ["union", "split", "share_call_sites"]


def _key(node: torch.fx.Node, env: dict) -> tuple:
    """What a node computes, in terms of union nodes: equal keys compute the same thing."""
    def arg(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return ("node", id(env[a]))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(arg(v) for v in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, arg(v)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("slice", arg(a.start), arg(a.stop), arg(a.step))
        return ("const", type(a).__name__, repr(a))

    target = node.target if isinstance(node.target, str) else ("callable", id(node.target))
    return (node.op, target, arg(node.args), arg(node.kwargs))


def union(graph_modules: list[torch.fx.GraphModule], labels: tuple[str, ...] = MODES) -> torch.fx.GraphModule:
    """Merge traces of one model (one per label: the train-mode and eval-mode traces, or
    the traces of several example inputs) into one graph (see the module docstring); the
    output is the tuple of their outputs, in ``labels``' order."""
    first = graph_modules[0]
    graph = torch.fx.Graph(tracer_cls=QprepTracer)
    attrs: dict[str, Any] = {}
    open_keys: dict[tuple, list[torch.fx.Node]] = {}
    # A node's place in the union graph: (i, 0) for the i-th node when a trace starts, (i, k)
    # for the k-th node of the trace placed after it. A trace's own nodes go right after the
    # cursor, which only moves forward, so these pairs stay in graph order within a trace.
    position: dict[torch.fx.Node, tuple[int, int]] = {}
    outputs: list[Any] = []
    for label, gm in zip(labels, graph_modules):
        position = {n: (i, 0) for i, n in enumerate(graph.nodes)}
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        taken: set[torch.fx.Node] = set()  # union nodes this trace shares already
        cursor: torch.fx.Node | None = None  # the union node of this trace's last node
        for node in gm.graph.nodes:
            if node.op == "output":
                outputs.append(torch.fx.node.map_arg(node.args[0], env.__getitem__))
                continue
            key = _key(node, env)
            shared = next((n for n in open_keys.get(key, ()) if n not in taken and _same_attr(attrs, gm, n, node)
                           and (cursor is None or position[n] > position[cursor])), None)
            if shared is not None:
                taken.add(shared)
                meta.set_facts(shared, **{meta.MODES: (*meta.fact(shared, meta.MODES), label)})
                env[node] = cursor = shared
                continue
            anchor = cursor if cursor is not None else _last_placeholder(graph)
            with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
                new = graph.node_copy(node, env.__getitem__)
            _take_attr(gm, node, new, attrs)
            meta.set_facts(new, **{meta.MODES: (label,)})
            open_keys.setdefault(key, []).append(new)
            taken.add(new)
            position[new] = (position[anchor][0], position[anchor][1] + 1) if anchor is not None else (-1, 0)
            env[node] = cursor = new
    graph.output(tuple(outputs))
    gm = torch.fx.GraphModule(attrs, graph, first._get_name())
    constants_out_of_state(gm)
    gm.training = first.training
    gm.meta.update(first.meta)
    return gm


def _last_placeholder(graph: torch.fx.Graph) -> torch.fx.Node | None:
    found = None
    for n in graph.nodes:
        if n.op != "placeholder":
            break
        found = n
    return found


def _resolve(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _same_attr(attrs: dict, gm: torch.fx.GraphModule, shared: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Shared get_attr/call_module nodes must name the same object in both traces (tensor
    constants made by each trace have the same names but are different tensors)."""
    if node.op not in ("get_attr", "call_module"):
        return True
    try:
        return attrs.get(shared.target) is _resolve(gm, node.target)
    except AttributeError:
        return False


def _take_attr(source: torch.fx.GraphModule, node: torch.fx.Node, new: torch.fx.Node, attrs: dict) -> None:
    """Record the object a get_attr/call_module node refers to; a tensor constant of one
    trace that clashes with another's gets a name of its own."""
    if node.op not in ("get_attr", "call_module"):
        return
    value = _resolve(source, node.target)
    name = node.target
    if name in attrs and attrs[name] is not value:
        k = 1
        while f"{name}_{k}" in attrs:
            k += 1
        name = f"{name}_{k}"
        new.target = name
    attrs[name] = value


def split(gm: torch.fx.GraphModule, mode: str, labels: tuple[str, ...] = MODES) -> torch.fx.Graph:
    """The graph of ``mode`` (one of ``labels``) out of a union graph, in its own order."""
    index = labels.index(mode)
    graph = torch.fx.Graph(tracer_cls=QprepTracer)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0][index], env.__getitem__))
        elif node.op == "placeholder" or mode in modes_of(node):
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "get_attr")
    return graph


def share_call_sites(gm: torch.fx.GraphModule, labels: tuple[str, ...]) -> list[str]:
    """After the passes, one module per call site of the source across the union's traces.

    Where two traces diverge, every later node differs in its arguments, so the union keeps
    them apart and the passes give each its own module: the ``+`` on one line of the source
    would get one module (one quantizer) per trace. The ``k``-th call from one stack of
    source lines in each trace is one call site: when their modules are alike (same class,
    same settings, the same or equal tensors), the traces share the first one. Returns the
    names of the modules that went away."""
    groups: dict[tuple, dict[str, list[torch.fx.Node]]] = {}
    for node in gm.graph.nodes:
        modes = modes_of(node) if node.op == "call_module" else ()
        stack = node.meta.get(meta.STACK_TRACE)
        if len(modes) != 1 or modes[0] not in labels or not stack:
            continue
        key = (stack, type(gm.get_submodule(node.target)))
        groups.setdefault(key, {}).setdefault(modes[0], []).append(node)
    removed: list[str] = []
    for by_label in groups.values():
        if len(by_label) < 2:
            continue
        for occurrence in zip(*by_label.values()):
            first = gm.get_submodule(occurrence[0].target)
            for node in occurrence[1:]:
                if node.target != occurrence[0].target and _alike(first, gm.get_submodule(node.target)):
                    old, node.target = node.target, occurrence[0].target
                    if not any(n.op == "call_module" and n.target == old for n in gm.graph.nodes):
                        gm.delete_submodule(old)
                        removed.append(old)
    if removed:
        gm.recompile()
    return removed


def _alike(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules compute the same function: same class and settings, and each
    Parameter and buffer the same tensor or an equal one."""
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr():
        return False
    mine, theirs = dict(a.named_parameters()), dict(b.named_parameters())
    mine.update(a.named_buffers())
    theirs.update(b.named_buffers())
    if mine.keys() != theirs.keys() or dict(a.named_modules()).keys() != dict(b.named_modules()).keys():
        return False
    for name, tensor in mine.items():
        other = theirs[name]
        if tensor is not other and not (tensor.dtype == other.dtype and tensor.shape == other.shape
                                         and tensor.device == other.device and torch.equal(tensor, other)):
            return False
    plain = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}  # noqa: E731
    try:
        return plain(a) == plain(b)
    except Exception:  # noqa: BLE001  (attributes that cannot be compared: not alike)
        return False
