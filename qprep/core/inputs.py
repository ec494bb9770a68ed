"""Example inputs as positional arguments: one rule for prepare, verify and testing."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ._compat import has_forward_pre_hooks
from .errors import InputError

__all__ = ["Arguments", "as_positional", "keywords_of", "with_keywords", "check_call", "with_concrete", "empty_inputs",
           "fit_call", "call_form"]


class Arguments(tuple):
    """Example inputs as positional arguments, with those that cannot be positional beside
    them in ``keywords``: ``forward``'s keyword-only parameters and the names its ``**kwargs``
    collects. A plain tuple wherever there are none."""

    keywords: dict

    def __new__(cls, args, keywords: dict | None = None):
        self = super().__new__(cls, args)
        self.keywords = dict(keywords or {})
        return self

    def __repr__(self) -> str:
        return f"Arguments({tuple(self)!r}, {self.keywords!r})"

    def __reduce__(self):
        return (Arguments, (tuple(self), self.keywords))


def keywords_of(args: tuple | None) -> dict:
    """The keyword-only example inputs of ``args`` (:class:`Arguments`); ``{}`` for a tuple."""
    return getattr(args, "keywords", {}) if args is not None else {}


def with_keywords(args: tuple, keywords: dict) -> tuple:
    """``args`` with ``keywords`` beside them (:class:`Arguments`), a plain tuple without any."""
    return Arguments(args, keywords) if keywords else tuple(args)


def as_positional(inputs: Any, model: nn.Module | None = None) -> tuple:
    """``inputs`` as a tuple of positional arguments: a tensor, a list or a tuple as they
    are; a dict as keyword arguments put in ``model.forward``'s order, defaults filling the
    gaps before the last one given, and those that cannot go by position (keyword-only, or
    collected by ``**kwargs``) kept by name (:class:`Arguments`). A dict none of whose keys
    ``forward`` takes, for a ``forward`` whose one parameter is required (no ``**kwargs``),
    is that parameter's value."""
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
    parameters = inspect.signature(model.forward).parameters
    params = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    by_name = {k: v for k, v in kwargs.items() if k not in names and (
        k in parameters and parameters[k].kind is inspect.Parameter.KEYWORD_ONLY or var_keyword and k not in parameters)}
    unknown = set(kwargs) - set(names) - set(by_name)
    if unknown == set(kwargs) and len(params) == 1 and params[0].default is params[0].empty and not var_keyword:
        return (kwargs,)  # `forward(self, batch)` given {"image": ..., "mask": ...}: the dict is its one input
    if unknown:
        raise InputError(f"example_inputs names {sorted(unknown)}, which {type(model).__name__}.forward does not take; "
                         "to give a dict as one positional input, wrap it in a tuple: (inputs,)")
    last = max((names.index(k) for k in kwargs if k in names), default=-1)
    args = []
    for p in params[: last + 1]:
        if p.name in kwargs:
            args.append(kwargs[p.name])
        elif p.default is not p.empty:
            args.append(p.default)
        else:
            raise InputError(f"example_inputs lacks {p.name!r}, which {type(model).__name__}.forward requires")
    return with_keywords(args, by_name)


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
    keywords = keywords_of(args)
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    for name in concrete:
        if name in positional[: len(args)]:
            raise InputError(f"{where} argument {name!r} is given twice: as example input "
                             f"{positional.index(name) + 1} and in concrete_args")
        if name in keywords:
            raise InputError(f"{where} argument {name!r} is given twice: in example_inputs and in concrete_args")
        if name not in sig.parameters and not var_keyword:
            raise InputError(f"concrete_args names {name!r}, which {where} does not take "
                             f"(its arguments: {', '.join(sig.parameters) or 'none'})")
    try:
        (sig.bind if complete else sig.bind_partial)(*args, **keywords, **concrete)
    except TypeError as exc:
        raise InputError(f"the example inputs do not fit {where}{sig}: {exc}") from None


def with_concrete(model: nn.Module, args: tuple, concrete_args: dict | None) -> tuple:
    """``args`` with the ``concrete_args`` values put in their positions of ``forward``
    (defaults filling the gaps), or by name where they cannot be positional, so that the
    original and the prepared model are run on the values the preparation fixed."""
    if not concrete_args:
        return args
    sig = _forward_signature(model)
    if sig is None:
        return args
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name: i for i, p in enumerate(positional)}
    keywords = {**keywords_of(args), **{k: v for k, v in concrete_args.items() if k not in names}}
    if len(args) > len(positional):  # *args took the rest: nothing after them is positional
        return with_keywords(args, keywords)
    keyed = {p.name: a for p, a in zip(positional, args)}
    keyed.update((k, v) for k, v in concrete_args.items() if k in names and names[k] >= len(args))
    return with_keywords(tuple(args) + tuple(_keywords_in_order(model, keyed)[len(args):]), keywords)


def call_form(model: nn.Module, args: tuple) -> tuple[tuple, dict]:
    """``model(*args)`` as ``model(*positional, **keywords)``: each argument that may go by
    name goes by name (a Hugging Face ``forward`` under decorators that re-pass some
    arguments by keyword takes no other call), the rest by position; the keyword-only
    ones of :class:`Arguments` by name."""
    keywords = keywords_of(args)
    sig = _forward_signature(model)
    if sig is None:
        return tuple(args), dict(keywords)
    params = list(sig.parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(named) or any(p.kind == p.POSITIONAL_ONLY for p in named[len(args):]):
        return tuple(args), dict(keywords)  # *args took the rest, or too few for positional-only ones: as given
    head = sum(1 for p in named[: len(args)] if p.kind == p.POSITIONAL_ONLY)
    return tuple(args[:head]), {**{p.name: a for p, a in zip(named[head:], args[head:])}, **keywords}


def fit_call(original: nn.Module, prepared: nn.Module, args: tuple) -> tuple[tuple, dict]:
    """``prepared``'s call for ``original(*args)`` (:func:`call_form`). An argument fixed to
    an object at trace time is no parameter of a prepared GraphModule any more: left out."""
    positional, keywords = call_form(original, args)
    if isinstance(prepared, torch.fx.GraphModule):
        names = {n.target.lstrip("*") for n in prepared.graph.nodes if n.op == "placeholder"}
        if not any(n.op == "placeholder" and n.target.startswith("**") for n in prepared.graph.nodes):
            keywords = {k: v for k, v in keywords.items() if k in names}
        return positional, keywords
    sig = _forward_signature(prepared)  # another module (a wrapper): by name only where it takes names
    takes = sig is not None and all(
        k in sig.parameters and sig.parameters[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                           inspect.Parameter.KEYWORD_ONLY)
        for k in keywords) or sig is not None and any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return (positional, keywords) if takes else (tuple(args), dict(keywords_of(args)))


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
