"""Every use of private torch API in qprep, in one place."""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["last_node", "boolean_dispatch_parts", "rename_like_fx"]


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


def rename_like_fx(node: torch.fx.Node, *freed: str) -> None:
    """Rename a ``call_module`` node as tracing would name it (``blocks_0_add`` for target
    ``blocks.0.add``), so preparing a prepared model yields the same code. ``freed``:
    names of erased nodes that may be reused."""
    graph = node.graph
    for name in (node.name, *freed):
        graph._graph_namespace._used_names.discard(name)  # noqa: SLF001
    node._rename(graph._target_to_str(node.target))  # noqa: SLF001
