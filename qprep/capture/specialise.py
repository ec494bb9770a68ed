"""Argument specialisation: which ``forward`` arguments are fixed at trace time, and which
example value each traced argument has.

A prepared model is made for calls like its example. Forward arguments the example inputs
leave out are fixed to their defaults (``mask=None``), those given as ``None`` are fixed to
``None`` (``if mask is not None:`` then traces one way), and the user's ``concrete_args``
are fixed to the values given, on top of those. Without example inputs, defaults are fixed
only when tracing fails otherwise. Either way the report lists what was fixed.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch.fx
import torch.nn as nn

from ..core.config import PrepareConfig
from ..core.errors import TraceError
from ..core.inputs import keywords_of
from .tracer import Traced, trace

__all__ = ["fixed_arguments", "example_values", "trace_specialised"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def fixed_arguments(model: nn.Module, args: tuple | None) -> dict[str, Any]:
    """Arguments fixed for example inputs ``args`` (``None``: none given): defaults of the
    parameters after the given ones, and ``None`` for arguments given as ``None``."""
    params = _parameters(model)
    given = len(args) if args is not None else 0
    keywords = keywords_of(args)
    fixed = {
        p.name: p.default for p in params[given:]
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in keywords
    }
    for i, a in enumerate(args or ()):
        if a is None and i < len(params) and params[i].kind in _POSITIONAL:
            fixed[params[i].name] = None
    fixed.update((k, None) for k, v in keywords.items() if v is None and k in {p.name for p in params})
    return fixed


def example_values(model: nn.Module, args: tuple) -> dict[str, Any]:
    """Forward parameter name -> its example value (``*args`` collects the rest, ``**kwargs``
    the keywords no parameter takes)."""
    values: dict[str, Any] = {}
    rest = list(args)
    keywords = dict(keywords_of(args))
    for p in _parameters(model):
        if p.kind in _POSITIONAL and rest:
            values[p.name] = rest.pop(0)
        elif p.kind == p.VAR_POSITIONAL:
            values[p.name], rest = tuple(rest), []
        elif p.kind == p.KEYWORD_ONLY and p.name in keywords:
            values[p.name] = keywords.pop(p.name)
    for p in _parameters(model):
        if p.kind == p.VAR_KEYWORD:
            values[p.name] = keywords
    return values


def trace_specialised(model: nn.Module, config: PrepareConfig, args: tuple | None) -> tuple[Traced, dict]:
    """Trace ``model`` with the fixed arguments; returns what :func:`trace` returns and every
    argument fixed (the user's ``concrete_args`` included)."""
    fixed = {**fixed_arguments(model, args), **(config.concrete_args or {})}
    if args is not None or config.concrete_args:
        examples = example_values(model, args) if args is not None else None
        with_fixed = dataclasses.replace(config, concrete_args=fixed or None)
        return trace(model, with_fixed, examples), fixed
    try:
        return trace(model, config), {}
    except TraceError as first:
        if not fixed:
            raise
        try:
            traced = trace(model, dataclasses.replace(config, concrete_args=fixed))
        except TraceError:
            raise first from None
        return traced, fixed
