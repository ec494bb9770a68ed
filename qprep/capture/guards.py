"""Recording guards while tracing, and putting their checks into the graph.

:class:`GuardRecorder` collects one :class:`~qprep.core.guards.Guard` each time the traced
code needs a concrete value. :func:`insert_guards` adds a ``check_guard`` call for each,
right after the node it checks, and moves the checks that depend only on the inputs'
metadata (shapes, ranks, dtypes, lengths) with what they read to the top of ``forward``:

    def forward(self, input_ids, attention_mask):
        dim = attention_mask.dim()
        eq = dim == 2
        qprep_core_guards_check_guard(eq, True, 'bool', 'attention_mask.dim() == 2', 'modeling.py:988')
        ...
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx

from ..core.guards import Guard, check_guard, is_guard
from ..core.template import tree_any

__all__ = ["GuardRecorder", "insert_guards", "guard_checks", "describe", "reads_metadata_only", "is_metadata_read",
           "module_output"]

# Ops that only read metadata: a guard built from them and the inputs can run first.
_METADATA_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_floating_point", "is_complex",
    "get_device", "is_contiguous", "element_size", "keys",
})
_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "is_cpu", "type", "layout", "requires_grad"})
_ARITHMETIC = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/", operator.floordiv: "//",
    operator.mod: "%", operator.pow: "**", operator.eq: "==", operator.ne: "!=", operator.lt: "<",
    operator.le: "<=", operator.gt: ">", operator.ge: ">=", operator.and_: "&", operator.or_: "|",
}
_PURE_FUNCTIONS = frozenset({operator.getitem, builtins.len, builtins.getattr, operator.not_, operator.neg,
                             math.ceil, math.floor, math.trunc, builtins.round, builtins.min, builtins.max,
                             builtins.abs, builtins.isinstance})


_MISSING = object()


class GuardRecorder:
    """The guards of one trace, in the order they were needed."""

    def __init__(self):
        self.guards: list[tuple[torch.fx.Node, Guard]] = []
        self._seen: set = set()

    def record(self, node: torch.fx.Node, how: str, expected: Any, location: str, code: str) -> bool:
        """Record a guard; ``False`` when the same one was recorded before."""
        key = (node, how, repr(expected))
        if key in self._seen:
            return False
        self._seen.add(key)
        self.guards.append((node, Guard(node.name, how, expected, describe(node), location, code)))
        return True

    def drop(self, node: torch.fx.Node, how: str, expected: Any) -> None:
        """Forget one guard (its value turned out not to be used)."""
        key = (node, how, repr(expected))
        self._seen.discard(key)
        self.guards = [(n, g) for n, g in self.guards if not (n is node and g.how == how
                                                              and repr(g.expected) == key[2])]

    def mark(self) -> int:
        return len(self.guards)

    def rollback(self, mark: int) -> None:
        """Forget the guards recorded after ``mark`` (their nodes were erased)."""
        for node, guard in self.guards[mark:]:
            self._seen.discard((node, guard.how, repr(guard.expected)))
        del self.guards[mark:]


def describe(node: Any, depth: int = 0) -> str:
    """The expression a metadata node computes, in terms of the inputs: ``x.size(-1) == 224``
    (deeper than a few steps, a node is shown by its name)."""
    if isinstance(node, (list, tuple)) and not isinstance(node, torch.Size):
        inner = ", ".join(describe(n, depth) for n in node)
        return f"[{inner}]" if isinstance(node, list) else f"({inner}{',' if len(node) == 1 else ''})"
    if isinstance(node, slice):
        return _slice_text(node)
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "placeholder":
        return node.target.lstrip("*")
    if node.op == "get_attr":
        return f"self.{node.target}"
    if depth > 5:
        return node.name
    args = node.args
    if node.op == "call_method" and args:
        rest = ", ".join(describe(a, depth + 1) for a in args[1:])
        return f"{_operand(args[0], depth)}.{node.target}({rest})"
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return f"{_operand(args[0], depth)}.{args[1]}"
        if node.target is operator.getitem:
            return f"{_operand(args[0], depth)}[{describe(args[1], depth + 1).strip('()') or ':'}]"
        if node.target in _ARITHMETIC and len(args) == 2:
            return f"{_operand(args[0], depth)} {_ARITHMETIC[node.target]} {_operand(args[1], depth)}"
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}({', '.join(describe(a, depth + 1) for a in args)})"
    return node.name


def _operand(node: Any, depth: int) -> str:
    """An operand, in parentheses when it is itself an operation: ``(a - 1) * 2``."""
    text = describe(node, depth + 1)
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _ARITHMETIC:
        return f"({text})"
    return text


def _slice_text(s: slice) -> str:
    parts = ["" if v is None else describe(v, 6) for v in (s.start, s.stop)]
    return ":".join(parts) + (f":{describe(s.step, 6)}" if s.step is not None else "")


def module_output(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a module call's output or a part of one (``out[1]`` of an LSTM):
    its structure is fixed by the module's code, so iterating it needs no guard."""
    while node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node.op == "call_module"


def is_metadata_read(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads a tensor's metadata (``x.size(1)``, ``x.shape``, ``x.dtype``),
    not its data."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target is builtins.getattr and len(node.args) > 1 \
        and node.args[1] in _METADATA_ATTRS


def reads_metadata_only(node: torch.fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
        try:
            pure = node.target in _ARITHMETIC or node.target in _PURE_FUNCTIONS
        except TypeError:
            return False
        # arithmetic on sizes, not on tensors (x * w is compute, and may read a buffer an
        # earlier in-place op updated): the example value must be known and hold no tensor
        value = node.meta.get("val", _MISSING)
        return pure and value is not _MISSING and not tree_any(value, lambda v: isinstance(v, torch.Tensor))
    return False


#: What updates a Python container in place (``pad[dim] = (0, n)``, ``shape.append(n)``).
_CONTAINER_UPDATES = frozenset({
    "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update", "setdefault", "popitem",
    "add", "discard", "__setitem__", "__delitem__", "__iadd__", "__imul__",
})
#: In-place tensor methods that change what the metadata reads answer (``x.unsqueeze_(0)``).
_METADATA_UPDATES = frozenset({
    "unsqueeze_", "squeeze_", "transpose_", "t_", "swapdims_", "swapaxes_", "resize_", "resize_as_", "as_strided_",
    "set_", "requires_grad_", "detach_",
})
_UPDATING_FUNCTIONS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.imul, operator.iconcat, builtins.setattr,
})


def _updated_in_place(node: torch.fx.Node) -> bool:
    """Whether the graph changes what a metadata read of ``node`` answers, in place: a Python
    container updated (LongT5 pads with ``pad = [(0, 0)] * x.ndim; pad[dim] = ...``) or a
    tensor's shape or flags changed (``x.unsqueeze_(0)``). A read of it must stay where it is."""
    value = node.meta.get("val")
    container = isinstance(value, (list, dict, set, bytearray))
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if user.op == "call_method" and user.target in (_CONTAINER_UPDATES if container else _METADATA_UPDATES):
            return True
        if user.op == "call_function" and user.target in _UPDATING_FUNCTIONS \
                and (container or user.target is builtins.setattr):
            return True
    return False


def _metadata_ancestors(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """``node`` and everything it reads, when all of it only reads the inputs' metadata (and
    no Python container among them is updated in place: moved first, a read would miss it)."""
    found, todo = {}, [node]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        if not reads_metadata_only(current) or _updated_in_place(current):
            return None
        found[current] = None
        todo.extend(current.all_input_nodes)
    return list(found)


def insert_guards(graph: torch.fx.Graph, recorder: GuardRecorder) -> tuple[Guard, ...]:
    """Add a ``check_guard`` call per recorded guard; hoist the input-only ones to the top.
    Returns the guards (``inputs_only`` set for the hoisted)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    hoist: set[torch.fx.Node] = set()
    guards = []
    for node, guard in recorder.guards:
        if node.graph is not graph:  # erased by a rollback or dead-code elimination
            continue
        with graph.inserting_after(node):
            check = graph.call_function(check_guard, (node, guard.expected, guard.how, guard.expression,
                                                      guard.location))
        check.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        # fx then writes `wrap("<its name>")` into the generated code, so that re-tracing the
        # code (torch.fx does when it unpickles a GraphModule) records the check as a call
        check.meta["is_wrapped"] = True
        ancestors = _metadata_ancestors(node)
        inputs_only = ancestors is not None
        if inputs_only:
            hoist.update(n for n in ancestors if n.op != "placeholder")
            hoist.add(check)
        guards.append(Guard(node.name, guard.how, guard.expected, guard.expression, guard.location, guard.code,
                            inputs_only))
    if hoist:
        anchor = placeholders[-1] if placeholders else None
        for node in [n for n in graph.nodes if n in hoist]:
            if anchor is None:
                first = next(iter(graph.nodes))
                if first is not node:
                    first.prepend(node)
            else:
                anchor.append(node)
            anchor = node
    return tuple(guards)


def guard_checks(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A graph with ``graph``'s parameters that runs only its input-only guard checks (and
    the metadata reads they need) and returns ``None``: whether a call is one ``graph``
    covers, decided before anything is computed."""
    keep: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if is_guard(node):
            ancestors = _metadata_ancestors(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else []
            if ancestors is not None:
                keep.update(ancestors)
                keep.add(node)
    checks = torch.fx.Graph(tracer_cls=graph._tracer_cls)  # noqa: SLF001
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" or node in keep:
            env[node] = checks.node_copy(node, env.__getitem__)
    checks.output(None)
    return checks
