"""Graph helpers the stages share: what a node computes, naming new modules, swapping a node
for a module call, looking a target up in a table."""

from __future__ import annotations

import copy
import operator
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn as nn

from . import meta
from ._compat import rename_like_fx
from .provenance import stamp
from .text import callable_name

__all__ = [
    "produces_tensor",
    "example_value",
    "ModuleNamer",
    "replace_with_module",
    "node_inputs",
    "resolve_attr",
    "target_text",
    "lookup",
    "member",
    "short_name",
    "erase_unused_attrs",
    "type_name",
    "retarget_scope",
    "constants_out_of_state",
]

# Tensor methods and attributes whose result is metadata, not a tensor.
_META_METHODS = frozenset({
    "size", "dim", "numel", "nelement", "stride", "item", "tolist", "__len__", "data_ptr",
    "element_size", "is_contiguous", "get_device", "storage_offset", "is_floating_point",
    "is_complex", "ndimension",
})
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout", "names"})


def example_value(node: torch.fx.Node) -> dict | None:
    """What the node produced on the example inputs (:data:`qprep.core.meta.VALUE`):
    ``{"type", "shape", "has_tensor"}``, or ``None`` when no example inputs were run."""
    return meta.fact(node, meta.VALUE)


def lookup(table: dict, target: Any) -> Any:
    """``table.get(target)``, ``None`` for an unhashable target (a bound method of a tensor)."""
    try:
        return table.get(target)
    except TypeError:
        return None


def member(collection, target: Any) -> bool:
    """``target in collection``, ``False`` for an unhashable target."""
    try:
        return target in collection
    except TypeError:
        return False


def short_name(node: torch.fx.Node) -> str:
    """The op's bare name: ``add_`` for ``x.add_()``, ``relu`` for ``F.relu``."""
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def produces_tensor(node: torch.fx.Node, memo: dict | None = None) -> bool:
    """Whether ``node`` computes a tensor (or a tuple of them), not shape arithmetic.

    Uses the value seen on example inputs when they were given,
    else static rules: ``x.size(0) // 2`` is an int, ``x + 1`` is a tensor when ``x`` is.
    Unknown values count as tensors (wrapping an int op in a module is still exact).
    A caller asking about many nodes in graph order passes one ``memo`` dict, so each
    node's inputs are answered from it rather than walked again.
    """
    seen = example_value(node)
    if seen is not None:
        return seen["has_tensor"]
    return _static_tensor(node, {} if memo is None else memo)


def _static_tensor(node: torch.fx.Node, memo: dict) -> bool:
    if node not in memo:
        memo[node] = _static_rule(node, memo)
    return memo[node]


def _static_rule(node: torch.fx.Node, memo: dict) -> bool:
    op, target = node.op, node.target
    if op == "placeholder":
        annotation = node.type
        return not (isinstance(annotation, type) and issubclass(annotation, (int, float, bool, str)))
    if op == "get_attr":
        return True
    if op == "call_module":
        return True
    if op == "call_method":
        if target in _META_METHODS:
            return False
        base = node.args[0] if node.args else None
        return not isinstance(base, torch.fx.Node) or _static_tensor(base, memo)
    if op == "call_function":
        if target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
            return False
        if target is len:
            return False
        if target is operator.getitem:
            base = node.args[0]
            return isinstance(base, torch.fx.Node) and _static_tensor(base, memo)
        if getattr(target, "__module__", None) in ("_operator", "operator", "builtins", "math"):
            nodes = node_inputs(node)
            return any(_static_tensor(n, memo) for n in nodes)
        return True
    return False


def node_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes in ``node``'s args and kwargs, in order, with repeats."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def resolve_attr(gm: torch.fx.GraphModule, node: Any) -> Any:
    """The object a ``get_attr`` node refers to, or ``None`` when ``node`` is not one."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def target_text(node: torch.fx.Node) -> str:
    """A stable textual name of the node's target: ``operator.iadd``, ``torch.cat``,
    ``torch.nn.functional.relu``, ``Tensor.add_``, or the module path."""
    if node.op == "call_method":
        return callable_name(node.target)
    if node.op in ("call_module", "get_attr", "placeholder", "output"):
        return str(node.target)
    return callable_name(node.target)


class ModuleNamer:
    """Deterministic, scoped names for new modules: ``layer1.0.add``, ``layer1.0.add_1``.

    A name is taken when the scope module already has an attribute of that name or an
    earlier call of :meth:`name` returned it.
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self._taken: set[str] = set()

    def exists(self, qualified: str) -> bool:
        """Whether ``qualified`` names an attribute of the graph module already."""
        obj: Any = self.gm
        for part in qualified.split("."):
            if isinstance(obj, nn.Module) and (part in obj._modules or part in obj._parameters or part in obj._buffers):
                obj = getattr(obj, part)
            elif hasattr(obj, part):
                obj = getattr(obj, part)
            else:
                return False
        return True

    def name(self, scope: str, base: str) -> str:
        prefix = f"{scope}." if scope else ""
        candidate, k = f"{prefix}{base}", 0
        while candidate in self._taken or self.exists(candidate):
            k += 1
            candidate = f"{prefix}{base}_{k}"
        self._taken.add(candidate)
        return candidate

    def take(self, qualified: str) -> None:
        """Mark ``qualified`` as used."""
        self._taken.add(qualified)


def replace_with_module(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    name: str,
    module: nn.Module,
    inputs: Iterable[Any],
    pass_name: str,
    kwargs: dict | None = None,
) -> torch.fx.Node:
    """Register ``module`` as ``name``, call it where ``node`` was (with ``inputs``), move
    every use of ``node`` to the call, carry ``node.meta`` over and erase ``node``.
    The module starts in the graph module's mode (a dropout follows ``gm.train()``)."""
    module.train(gm.training)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, tuple(inputs), kwargs or {})
    new.meta = copy.copy(node.meta)
    retarget_scope(new, name, module)
    stamp(new, pass_name, "rewritten", node.name)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    rename_like_fx(new, node.name)
    return new


def type_name(module: nn.Module) -> str:
    """``torch.nn.ReLU``, ``qprep.modules.Add``, or ``package.module.Class`` for others."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn.modules"):
        return f"torch.nn.{cls.__qualname__}"
    if cls.__module__.startswith("qprep.modules"):
        return f"qprep.modules.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def retarget_scope(node: torch.fx.Node, name: str, module: nn.Module, *, replace_last: bool = False) -> None:
    """Record in ``nn_module_stack`` that ``node`` now calls ``module`` as ``name``:
    appended for a node that was a function call, replacing the innermost entry for a
    ``call_module`` node that now calls another instance."""
    stack = dict(node.meta.get("nn_module_stack") or {})
    if replace_last and stack:
        del stack[next(reversed(stack))]
    stack[name] = (name, type(module))
    node.meta["nn_module_stack"] = stack


def erase_unused_attrs(gm: torch.fx.GraphModule) -> None:
    """Erase ``get_attr`` nodes nothing uses any more (calls are never erased: a module
    called only for its side effects stays)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


def constants_out_of_state(gm: torch.fx.GraphModule) -> None:
    """Tensors made at trace time are constants of the graph, not state: GraphModule
    registers them as buffers, which would add ``_tensor_constant0`` to ``state_dict()`` and
    break loading the original's checkpoint with ``strict=True``."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("_tensor_constant") and "." not in node.target:
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                gm.register_buffer(node.target, value, persistent=False)
