"""Text shared by every rendering: numbers and callables as reports and reprs show them."""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["fmt_float", "callable_name"]


def fmt_float(value: float | None) -> str:
    """``"-"`` for ``None``, ``"inf"`` for infinity, else three significant digits."""
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"


def callable_name(call: Callable | str | Any) -> str:
    """A stable name of an op: ``operator.iadd``, ``torch.cat``, ``torch.nn.functional.relu``,
    ``Tensor.add_`` for a Tensor method name, ``package.module.function`` otherwise."""
    if isinstance(call, str):
        return f"Tensor.{call}"
    module = getattr(call, "__module__", None) or ""
    name = getattr(call, "__name__", None) or repr(call)
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if not module or module.startswith("torch._C") or module == "torch._VariableFunctions":
        return f"torch.{name}"
    return f"{module}.{name}"
