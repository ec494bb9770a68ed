"""Example inputs as positional arguments: one rule for prepare, verify and testing."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ._compat import has_forward_pre_hooks
from .errors import InputError

__all__ = ["as_positional", "check_call", "with_concrete", "empty_inputs", "fit_call"]


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


def _forward_signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a Python signature: nothing to check against
        return None


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_call(model: nn.Module, args: tuple | None, concrete_args: dict | None = None) -> None:
    """Raise :class:`InputError` unless ``model.forward`` takes the positional ``args``
    together with ``concrete_args`` as keywords: no more positional inputs than it has
    parameters for (``*args`` takes any number), no unknown name in ``concrete_args`` (unless
    ``**kwargs``), no argument given both ways, no required argument left without a value.
    With ``args=None`` (no example inputs) only the ``concrete_args`` names are checked.

    Skipped for a model with forward pre-hooks (they may change what ``forward`` gets) and
    for a ``forward`` without a Python signature."""
    sig = _forward_signature(model)
    if sig is None or has_forward_pre_hooks(model):
        return
    where = f"{type(model).__name__}.forward"
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    complete = args is not None
    args = args if complete else ()
    if not any(p.kind is p.VAR_POSITIONAL for p in params) and len(args) > len(positional):
        raise InputError(
            f"{_count(len(args), 'example input')} given, but {where} takes "
            f"{_count(len(positional), 'positional input')} ({', '.join(positional) or 'none'})")
    concrete = dict(concrete_args or {})
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    for name in concrete:
        if name in positional[: len(args)]:
            raise InputError(f"{where} argument {name!r} is given twice: as example input "
                             f"{positional.index(name) + 1} and in concrete_args")
        if name not in sig.parameters and not var_keyword:
            raise InputError(f"concrete_args names {name!r}, which {where} does not take "
                             f"(its arguments: {', '.join(sig.parameters) or 'none'})")
    try:
        (sig.bind if complete else sig.bind_partial)(*args, **concrete)
    except TypeError as exc:
        raise InputError(f"the example inputs do not fit {where}{sig}: {exc}") from None


def with_concrete(model: nn.Module, args: tuple, concrete_args: dict | None) -> tuple:
    """``args`` with the ``concrete_args`` values put in their positions of ``forward``
    (defaults filling the gaps), so that the original and the prepared model are run on
    the values the preparation fixed. Keyword-only arguments cannot be positional: they
    are left to their defaults."""
    if not concrete_args:
        return args
    sig = _forward_signature(model)
    if sig is None:
        return args
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name: i for i, p in enumerate(positional)}
    if len(args) > len(positional):  # *args took the rest: nothing after them is positional
        return args
    keyed = {p.name: a for p, a in zip(positional, args)}
    keyed.update((k, v) for k, v in concrete_args.items() if k in names and names[k] >= len(args))
    return args + _keywords_in_order(model, keyed)[len(args):]


def fit_call(original: nn.Module, prepared: nn.Module, args: tuple) -> tuple[tuple, dict]:
    """``prepared``'s call for ``original(*args)``. An argument fixed to an object at trace
    time is no parameter of the prepared model's any more, and the ones after it may be
    keyword-only there (behind a ``*name`` that must stay empty): those are passed by
    keyword and the fixed one left out."""
    if not isinstance(prepared, torch.fx.GraphModule):
        return args, {}
    targets = [n.target for n in prepared.graph.nodes if n.op == "placeholder"]
    stars = [i for i, t in enumerate(targets) if t.startswith("*") and not t.startswith("**")]
    sig = _forward_signature(original)
    if sig is None or not stars or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return args, {}
    before, after = set(targets[: stars[0]]), set(targets[stars[0] + 1:])
    positional = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    head = tuple(value for name, value in zip(positional, args) if name in before)
    keywords = {name: value for name, value in zip(positional, args) if name in after}
    return head + tuple(args[len(positional):]), keywords


def empty_inputs(args: tuple) -> list[str]:
    """The example inputs that are or hold tensors with no elements (``"input 1 (shape
    0x8x16x16)"``): ops on them compute nothing, so a comparison on them proves nothing
    about those ops."""
    found: list[str] = []

    def visit(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() == 0:
                found.append(f"{where} (shape {'x'.join(map(str, value.shape))})")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{where}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{where}[{k!r}]")

    for i, a in enumerate(args, 1):
        visit(a, f"input {i}")
    return found
