"""Every use of private torch API in qprep, in one place."""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["last_node", "boolean_dispatch_parts", "is_graph_module_class"]


def last_node(graph: torch.fx.Graph) -> torch.fx.Node:
    """The graph's last node (the root sentinel when the graph is empty), in O(1)."""
    return graph._root.prev  # noqa: SLF001  (fx keeps nodes in a linked list behind _root)


def boolean_dispatch_parts(fn) -> tuple:
    """For ``F.max_pool2d``-style ``boolean_dispatch`` wrappers: the two functions it picks
    between, so a table keyed by callable can find calls traced to either."""
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None) or ()
    if code is None or "if_true" not in code.co_freevars:
        return ()
    cells = dict(zip(code.co_freevars, closure))
    return tuple(cells[name].cell_contents for name in ("if_true", "if_false") if name in cells)


def is_graph_module_class(cls: type) -> bool:
    return issubclass(cls, torch.fx.GraphModule)
