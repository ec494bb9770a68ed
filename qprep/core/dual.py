"""A GraphModule with one graph per training mode, over the same modules.

A ``forward`` that branches on ``self.training`` (``if self.training: y = y + 1``) computes
one thing in train mode and another in eval mode; one traced graph reproduces only one of
them. :class:`DualGraphModule` holds both, traced in each mode, sharing every module and
tensor, and runs the graph of its current mode: ``.train()`` and ``.eval()`` switch it, as
torchvision's ``DualGraphModule`` does for feature extraction. ``deepcopy``, ``pickle`` and
``torch.save`` keep both graphs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.fx
import torch.nn as nn

from . import meta

__all__ = ["DualGraphModule", "MODES", "modes_of"]

#: The two modes, in the order :class:`DualGraphModule` stores their graphs.
MODES = ("train", "eval")


def modes_of(node: torch.fx.Node) -> tuple[str, ...]:
    """The modes a node runs in: both, unless it is in a graph of both modes and tagged
    with :data:`qprep.core.meta.MODES`."""
    return meta.fact(node, meta.MODES) or MODES


def _copy_attr(source: nn.Module, target: nn.Module, qualified: str) -> None:
    """Install ``source``'s attribute ``qualified`` at the same path in ``target``: the same
    object, under new intermediate containers where ``target`` has none (as torch.fx does)."""
    *path, field = qualified.split(".")
    for part in path:
        child = getattr(source, part)
        existing = target._modules.get(part)  # noqa: SLF001
        if existing is None:
            existing = nn.Module()
            target.add_module(part, existing)
        if existing is child:  # the very module is installed already, with all it holds
            return
        source, target = child, existing
    value = getattr(source, field)
    if isinstance(value, nn.Module):
        target.add_module(field, value)
    elif isinstance(value, nn.Parameter):
        target.register_parameter(field, value)
    elif field in source._buffers:  # noqa: SLF001
        target.register_buffer(field, value, persistent=field not in source._non_persistent_buffers_set)  # noqa: SLF001
    else:
        setattr(target, field, value)


class DualGraphModule(torch.fx.GraphModule):
    """A GraphModule that runs ``train_graph`` in train mode and ``eval_graph`` in eval mode.

    Args:
        root: the module holding every module and tensor either graph refers to.
        train_graph, eval_graph: the two graphs (each a complete ``forward``).
        class_name: the class name shown for the module.
    """

    def __init__(self, root: nn.Module, train_graph: torch.fx.Graph, eval_graph: torch.fx.Graph,
                 class_name: str = "GraphModule"):
        training = root.training
        super().__init__(root, train_graph if training else eval_graph, class_name)
        for graph in (train_graph, eval_graph):
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    _copy_attr(root, self, node.target)
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.training = training
        #: called with the module after each switch regenerates ``forward`` (qprep installs
        #: its faster forward there); ``None`` keeps torch.fx's
        self.after_recompile = None

    def graph_of(self, mode: str) -> torch.fx.Graph:
        """The graph run in ``mode`` (``"train"`` or ``"eval"``)."""
        return self.train_graph if mode == "train" else self.eval_graph

    def train(self, mode: bool = True):
        wanted = self.train_graph if mode else self.eval_graph
        if self.graph is not wanted:
            self.graph = wanted  # regenerates forward
            if self.after_recompile is not None:
                self.after_recompile(self)
        return super().train(mode)

    # deepcopy and pickling keep both graphs (GraphModule's own keep the current one only)
    def _deepcopy_init(self):
        def init(res: DualGraphModule, fake_mod: nn.Module, graph: torch.fx.Graph) -> None:
            state = fake_mod.__dict__
            DualGraphModule.__init__(res, fake_mod, state["train_graph"], state["eval_graph"], self._get_name())
            res.after_recompile = state.get("after_recompile")
            if res.after_recompile is not None:
                res.after_recompile(res)

        return init

    def __reduce__(self):
        parts = []
        for graph in (self.train_graph, self.eval_graph):
            single = torch.fx.GraphModule(self, copy.deepcopy(graph), self._get_name())
            single.training = self.training
            parts.append(single)
        return (_rebuild, (parts[0], parts[1], self.training, self._get_name(), self.after_recompile))


def _rebuild(train_module: torch.fx.GraphModule, eval_module: torch.fx.GraphModule, training: bool,
             class_name: str, after_recompile=None) -> DualGraphModule:
    """Unpickle a :class:`DualGraphModule` from its two single-mode GraphModules, which share
    their modules and tensors (pickle keeps one copy of each)."""
    root = nn.Module()
    for module in (train_module, eval_module):
        for node in module.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                _copy_attr(module, root, node.target)
    root.training = training
    dual = DualGraphModule(root, train_module.graph, eval_module.graph, class_name)
    dual.after_recompile = after_recompile
    if after_recompile is not None:
        after_recompile(dual)
    meta: Any = getattr(train_module, "meta", None)
    if isinstance(meta, dict):
        dual.meta.update(meta)
    return dual
