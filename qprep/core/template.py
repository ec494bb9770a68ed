"""Argument templates: a call's arguments with every runtime value replaced by an
:class:`Input` slot, so a wrapper module can replay the exact call (constants kept as they
were). :func:`call_template` makes one from a graph node; :func:`fill` puts values back."""

from __future__ import annotations

from typing import Any

import torch.fx

__all__ = ["Input", "has_slot", "fill", "call_template", "tree_any"]


class Input:
    """A slot in an argument template: the ``index``-th input of ``forward``."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"Input({self.index})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Input) and other.index == self.index

    def __hash__(self) -> int:
        return hash(("qprep.Input", self.index))

    def __getstate__(self):
        return self.index

    def __setstate__(self, state):
        self.index = state


def tree_any(value: Any, predicate) -> bool:
    """Whether ``predicate`` holds for ``value`` or anything in its lists, tuples, dicts and slices.

    Reads without rebuilding: ``map_aggregate`` rebuilds each namedtuple, which a
    ``PackedSequence`` (whose constructor takes different arguments) does not survive."""
    if predicate(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(tree_any(v, predicate) for v in value)
    if isinstance(value, dict):
        return any(tree_any(v, predicate) for v in value.values())
    if isinstance(value, slice):  # x[:, :n] = v: a traced bound inside the key
        return any(tree_any(v, predicate) for v in (value.start, value.stop, value.step))
    return False


def has_slot(value: Any) -> bool:
    """Whether ``value`` (a constant, or a list/tuple/dict of them) holds an :class:`Input`."""
    return tree_any(value, lambda v: isinstance(v, Input))


def fill(value: Any, inputs: tuple) -> Any:
    """``value`` with every :class:`Input` slot replaced by its input; lists and dicts come
    back as plain ``list`` and ``dict`` (a template's are fx's immutable ones), as the user's
    call made them."""
    if isinstance(value, Input):
        return inputs[value.index]
    if isinstance(value, tuple):
        filled = [fill(v, inputs) for v in value]
        return type(value)(*filled) if hasattr(value, "_fields") else tuple(filled)
    if isinstance(value, list):
        return [fill(v, inputs) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, inputs) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(fill(value.start, inputs), fill(value.stop, inputs), fill(value.step, inputs))
    return value


def call_template(node: torch.fx.Node) -> tuple[tuple, dict, list[torch.fx.Node]]:
    """Args/kwargs with every Node replaced by an :class:`Input` slot, and the Nodes."""
    inputs: list[torch.fx.Node] = []

    def slot(n: torch.fx.Node) -> Input:
        inputs.append(n)
        return Input(len(inputs) - 1)

    args = torch.fx.node.map_arg(node.args, slot)
    kwargs = torch.fx.node.map_arg(node.kwargs, slot)
    return tuple(args), dict(kwargs), inputs
