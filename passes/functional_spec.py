"""The shape of the functional -> ``nn`` module table: :class:`Spec`, how a call is bound,
and what a builder may consult (:class:`BuildContext`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.nn as nn

__all__ = ["Spec", "Unconvertible", "BuildContext", "REQUIRED", "params", "simple", "by_rank"]

REQUIRED = object()


class Unconvertible(Exception):
    """The call has no exact ``nn`` module equivalent; the message says why."""


@dataclasses.dataclass
class BuildContext:
    """What a builder may consult: the parameter objects behind ``get_attr`` arguments,
    the input's rank when example inputs were run, whether ``training`` follows the
    module's mode, and where to record adopted parameters."""

    attrs: dict[str, Any]  # parameter name -> the tensor object (or None) behind it
    rank: int | None
    follows_training: bool
    adopted: dict[str, Any] = dataclasses.field(default_factory=dict)  # module attr -> get_attr node
    private: list[str] = dataclasses.field(default_factory=list)  # module state qprep added


@dataclasses.dataclass(frozen=True)
class Spec:
    module: str  # the nn class it makes, for reports and tests
    params: tuple[tuple[str, Any], ...]
    inputs: tuple[str, ...]
    build: Callable[[dict, BuildContext], nn.Module]
    parametric: tuple[str, ...] = ()  # parameters taken from the model (get_attr)


def params(*names: str, **defaults: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((n, defaults.get(n, REQUIRED)) for n in names)


def simple(cls: type, *ctor: str, **fixed: Any) -> Callable:
    def build(b: dict, ctx: BuildContext) -> nn.Module:
        return cls(**{name: b[name] for name in ctor}, **fixed)

    return build


def by_rank(classes: dict[int, type], ctx: BuildContext, what: str) -> type:
    if ctx.rank is None:
        raise Unconvertible(f"the input's rank is unknown, so the {what} class is (pass example_inputs)")
    if ctx.rank not in classes:
        raise Unconvertible(f"no {what} module for {ctx.rank}-D input")
    return classes[ctx.rank]
