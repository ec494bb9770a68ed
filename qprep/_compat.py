"""Every use of private torch API in qprep, in one place."""

from __future__ import annotations

import torch
import torch.fx

__all__ = [
    "last_node", "boolean_dispatch_parts", "rename_like_fx", "has_call_hooks", "plain_calls_allowed",
    "canonical_mask", "none_or_dtype", "detect_is_causal_mask",
]


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


_MODULE_CALL = torch.nn.Module.__call__  # as torch defines it, before anyone patches it


def has_call_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module``'s own state makes ``nn.Module.__call__`` do more than call
    ``forward``: a forward, forward-pre, backward or backward-pre hook on it, or a compiled
    call (``module.compile()``). Global hooks: :func:`plain_calls_allowed`."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks  # noqa: SLF001  (read as _call_impl reads them)
        or module._backward_hooks or module._backward_pre_hooks  # noqa: SLF001
        or module._compiled_call_impl is not None  # noqa: SLF001
    )


def plain_calls_allowed() -> bool:
    """Whether calling modules' ``forward`` directly, skipping ``nn.Module.__call__``, is
    unobservable process-wide: no ``torch.jit.trace`` running, no ``torch.compile`` capture
    (dynamo cannot trace the namespace of bound methods), no global module hooks
    (``register_module_forward_hook`` & co) and ``nn.Module.__call__`` not patched (as
    ``torch.fx`` tracing does). Per-module state: :func:`has_call_hooks`."""
    hooks = torch.nn.modules.module
    return not (
        torch._C._get_tracing_state() is not None  # noqa: SLF001
        or torch.compiler.is_compiling()
        or torch.nn.Module.__call__ is not _MODULE_CALL
        or hooks._global_forward_hooks or hooks._global_forward_pre_hooks  # noqa: SLF001
        or hooks._global_backward_hooks or hooks._global_backward_pre_hooks  # noqa: SLF001
    )


def canonical_mask(**kwargs):
    """``torch.nn.functional._canonical_mask``: a bool mask as the float mask attention adds."""
    import torch.nn.functional as F

    return F._canonical_mask(**kwargs)  # noqa: SLF001


def none_or_dtype(value):
    import torch.nn.functional as F

    return F._none_or_dtype(value)  # noqa: SLF001


def detect_is_causal_mask(mask, is_causal, size):
    """``torch.nn.modules.transformer._detect_is_causal_mask``."""
    from torch.nn.modules import transformer

    return transformer._detect_is_causal_mask(mask, is_causal, size)  # noqa: SLF001
