"""What the adapters read from a qprep wrapper: its call with the inputs put in their slots."""

from __future__ import annotations

import operator
from typing import Any

from ... import modules as qm
from ...modules import Input

__all__ = ["fill", "plain_call", "tensor_slots"]

# in-place and dunder forms -> the plain call (out of place); reflected forms are not plain.
_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.imatmul: operator.matmul,
}


def plain_call(call: Any) -> Any:
    """``operator.iadd`` -> ``operator.add``, ``"add_"``/``"__add__"``/``"__iadd__"`` -> ``"add"``;
    a reflected form (``"__rsub__"``) is returned as it is (its arguments are swapped)."""
    if isinstance(call, str):
        if call.startswith("__i") and call.endswith("__"):
            return call[3:-2]
        if call.startswith("__r") and call.endswith("__"):
            return call
        if call.startswith("__") and call.endswith("__"):
            return call[2:-2]
        return call[:-1] if call.endswith("_") else call
    return _INPLACE_OPERATORS.get(call, call)


def fill(value: Any, inputs: tuple) -> Any:
    """The template ``value`` with each :class:`~qprep.modules.Input` slot replaced by its input."""
    if isinstance(value, Input):
        return inputs[value.index]
    if isinstance(value, (list, tuple)):
        filled = [fill(v, inputs) for v in value]
        return filled if isinstance(value, list) else type(value)(filled)
    if isinstance(value, dict):
        return {k: fill(v, inputs) for k, v in value.items()}
    return value


def arguments(wrapper: qm.TensorOp, inputs: tuple) -> tuple[tuple, dict]:
    """The positional and keyword arguments the wrapper passes to its call for ``inputs``."""
    if wrapper.args is None:
        args = (list(inputs),) if wrapper.pack_inputs else tuple(inputs)
        return args, dict(wrapper.kwargs)
    return tuple(fill(list(wrapper.args), inputs)), fill(dict(wrapper.kwargs), inputs)


def tensor_slots(wrapper: qm.TensorOp) -> int:
    """How many inputs the wrapper's ``forward`` takes (0 when built without a template)."""
    slots: list[int] = []

    def walk(value):
        if isinstance(value, Input):
            slots.append(value.index)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(wrapper.args or ())
    walk(wrapper.kwargs)
    return max(slots) + 1 if slots else 0
