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

__all__ = ["union", "split"]


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


def union(train: torch.fx.GraphModule, evaluation: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Merge the train-mode and eval-mode traces of one model (see the module docstring)."""
    graph = torch.fx.Graph(tracer_cls=QprepTracer)
    attrs: dict[str, Any] = {}
    env_train: dict[torch.fx.Node, torch.fx.Node] = {}
    open_keys: dict[tuple, list[torch.fx.Node]] = {}
    # A node's place in the union graph: (i, 0) for the i-th train node, (i, k) for the k-th
    # eval-only node placed after it. Eval-only nodes are placed right after the cursor,
    # which only moves forward, so these pairs stay in graph order without renumbering.
    position: dict[torch.fx.Node, tuple[int, int]] = {}
    outputs: list[Any] = [None, None]

    for node in train.graph.nodes:
        if node.op == "output":
            outputs[0] = torch.fx.node.map_arg(node.args[0], env_train.__getitem__)
            continue
        new = graph.node_copy(node, env_train.__getitem__)
        _take_attr(train, evaluation, node, new, attrs)
        key = _key(node, env_train)
        env_train[node] = new
        position[new] = (len(position), 0)
        meta.set_facts(new, **{meta.MODES: ("train",)})
        open_keys.setdefault(key, []).append(new)

    env_eval: dict[torch.fx.Node, torch.fx.Node] = {}
    cursor: torch.fx.Node | None = None  # the union node of the last eval node placed
    for node in evaluation.graph.nodes:
        if node.op == "output":
            outputs[1] = torch.fx.node.map_arg(node.args[0], env_eval.__getitem__)
            continue
        key = _key(node, env_eval)
        candidates = [n for n in open_keys.get(key, ()) if cursor is None or position[n] > position[cursor]]
        if candidates and _same_attr(train, evaluation, node):
            shared = candidates[0]
            open_keys[key].remove(shared)
            meta.set_facts(shared, **{meta.MODES: MODES})
            env_eval[node] = cursor = shared
            continue
        anchor = cursor if cursor is not None else _last_placeholder(graph)
        with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
            new = graph.node_copy(node, env_eval.__getitem__)
        _take_attr(evaluation, train, node, new, attrs)
        meta.set_facts(new, **{meta.MODES: ("eval",)})
        position[new] = (position[anchor][0], position[anchor][1] + 1) if anchor is not None else (-1, 0)
        env_eval[node] = cursor = new
    graph.output(tuple(outputs))
    gm = torch.fx.GraphModule(attrs, graph, train._get_name())
    constants_out_of_state(gm)
    gm.training = train.training
    gm.meta.update(train.meta)
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


def _same_attr(a: torch.fx.GraphModule, b: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Shared get_attr/call_module nodes must name the same object in both traces (tensor
    constants made by each trace have the same names but are different tensors)."""
    if node.op not in ("get_attr", "call_module"):
        return True
    try:
        return _resolve(a, node.target) is _resolve(b, node.target)
    except AttributeError:
        return False


def _take_attr(source: torch.fx.GraphModule, other: torch.fx.GraphModule, node: torch.fx.Node,
               new: torch.fx.Node, attrs: dict) -> None:
    """Record the object a get_attr/call_module node refers to; a tensor constant of one
    trace that clashes with the other's gets a name of its own."""
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


def split(gm: torch.fx.GraphModule, mode: str) -> torch.fx.Graph:
    """The graph of ``mode`` (``"train"``/``"eval"``) out of a union graph, in its own order."""
    index = 0 if mode == "train" else 1
    graph = torch.fx.Graph(tracer_cls=QprepTracer)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0][index], env.__getitem__))
        elif node.op == "placeholder" or mode in modes_of(node):
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "get_attr")
    return graph
