"""Guards: what tracing fixed to the example's values, checked when the prepared model runs.

Where Python code needs a concrete value (``if x.dim() == 2:``, ``range(x.size(0))``,
``len(args)``), tracing uses the example's value and records a :class:`Guard`. The prepared
graph checks each guard with :func:`check_guard`, at the top of ``forward`` when it depends
only on the inputs' shapes, ranks, dtypes and lengths, else right where the value is
computed, and raises :class:`~qprep.core.errors.GuardError` on a call its specialisation
does not cover, never computing something else.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch.fx

from .errors import GuardError

__all__ = ["Guard", "check_guard", "update_buffer", "is_guard", "CONVERSIONS"]

#: how a guarded value is read: the Python conversion the traced code applied to it.
CONVERSIONS = {
    "bool": bool,
    "index": operator.index,
    "int": int,
    "float": float,
    "len": len,
    "keys": lambda value: tuple(value.keys()),
    "is_none": lambda value: value is None,
    "is_tensor": lambda value: isinstance(value, torch.Tensor),
    "value": lambda value: value,  # an argument fixed at trace time (use_cache=True)
}


@dataclasses.dataclass(frozen=True)
class Guard:
    """One specialisation: ``how(expression) == expected``, needed at ``location``.

    Attributes:
        node: the graph node whose value is checked.
        how: a key of :data:`CONVERSIONS` (``"bool"`` for ``if``, ``"index"`` for ``range()``).
        expected: the value on the example inputs.
        expression: the checked expression in terms of the inputs (``x.size(-1) == 224``).
        location: ``file:line`` of the code that needed the value; ``code``: that line.
        inputs_only: whether it depends only on the inputs' metadata (checked at the top).
    """

    node: str
    how: str
    expected: Any
    expression: str
    location: str = ""
    code: str = ""
    inputs_only: bool = False

    def text(self) -> str:
        shown = {"bool": f"{self.expression} is {self.expected}", "len": f"len({self.expression}) == {self.expected!r}",
                 "keys": f"{self.expression}.keys() == {self.expected!r}",
                 "is_none": f"{self.expression} is {'None' if self.expected else 'not None'}",
                 "is_tensor": f"isinstance({self.expression}, torch.Tensor) is {self.expected}"}
        return shown.get(self.how, f"{self.expression} == {self.expected!r}")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "expected": repr(self.expected), "text": self.text()}


def check_guard(value: Any, expected: Any, how: str, expression: str, location: str) -> None:
    """Raise :class:`GuardError` unless ``CONVERSIONS[how](value) == expected``."""
    try:
        actual = CONVERSIONS[how](value)
    except Exception as exc:  # noqa: BLE001  (a value that cannot even be read as traced)
        actual = f"<{type(exc).__name__}: {exc}>"
    if type(actual) is type(expected) and actual == expected:
        return
    where = f" (needed at {location})" if location else ""
    shown = {"len": f"len({expression})", "keys": f"{expression}.keys()", "is_none": f"{expression} is None",
             "is_tensor": f"isinstance({expression}, torch.Tensor)"}
    raise GuardError(
        f"this call does not match the prepared model's specialisation: `{shown.get(how, expression)}` gave "
        f"{actual!r}, the model was prepared for {expected!r}{where}. Prepare it with example inputs like this "
        "call's.",
        expression=expression, expected=expected, actual=actual, location=location,
    )


def update_buffer(buffer: torch.Tensor, new: torch.Tensor, name: str, location: str) -> torch.Tensor:
    """``self.<name> = new`` on a buffer, as a prepared graph records it: the buffer takes the
    new values in place. The trace's new value had the buffer's shape and dtype and needed no
    gradient; a call whose value does not (a length the code makes it follow) raises
    :class:`GuardError`, where an in-place copy would fail or differ."""
    if new.shape != buffer.shape or new.dtype != buffer.dtype or new.requires_grad:
        actual = (tuple(new.shape), new.dtype, new.requires_grad)
        raise GuardError(
            f"this call does not match the prepared model's specialisation: `self.{name} = ...` gives the buffer "
            f"a tensor of shape {actual[0]}, {actual[1]}{', requiring grad' if actual[2] else ''}; the model was "
            f"prepared to update it in place as {tuple(buffer.shape)}, {buffer.dtype} (at {location}).",
            expression=f"self.{name}", expected=(tuple(buffer.shape), buffer.dtype, False), actual=actual,
            location=location)
    with torch.no_grad():
        buffer.copy_(new)
    return buffer


# Re-tracing a prepared model's code (torch.fx does when it unpickles one) records the check
# as a call instead of running it on the tracer's proxies.
torch.fx.wrap("check_guard")
torch.fx.wrap("update_buffer")


def is_guard(node) -> bool:
    """Whether a graph node is a guard check (not an op of the model: passes leave it be)."""
    return node.op == "call_function" and node.target is check_guard
