"""Example inputs as positional arguments: one rule for prepare, verify and testing."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from .errors import InputError

__all__ = ["as_positional"]


def as_positional(inputs: Any, model: nn.Module | None = None) -> tuple:
    """``inputs`` as a tuple of positional arguments: a tensor, a list or a tuple as they
    are; a dict as keyword arguments put in ``model.forward``'s order, defaults filling the
    gaps before the last one given."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, list):
        return tuple(inputs)
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, dict) and model is not None:
        return _keywords_in_order(model, inputs)
    raise InputError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(inputs).__name__}"
    )


def _keywords_in_order(model: nn.Module, kwargs: dict) -> tuple:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    unknown = set(kwargs) - set(names)
    if unknown:
        raise InputError(f"example_inputs names {sorted(unknown)}, which {type(model).__name__}.forward does not take")
    last = max(names.index(k) for k in kwargs) if kwargs else -1
    args = []
    for p in params[: last + 1]:
        if p.name in kwargs:
            args.append(kwargs[p.name])
        elif p.default is not p.empty:
            args.append(p.default)
        else:
            raise InputError(f"example_inputs lacks {p.name!r}, which {type(model).__name__}.forward requires")
    return tuple(args)
