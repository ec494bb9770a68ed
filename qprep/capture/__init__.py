"""Capture: trace a model into a graph and gather the facts the passes rely on.

:func:`capture` is the one entry: it traces (with the arguments the example fixes,
:mod:`.specialise`), records what each node produced on the example inputs and which calls
follow ``self.training`` (:mod:`.analysis`), and returns a :class:`Capture`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import torch.fx
import torch.nn as nn

from ..core.config import PrepareConfig
from ..core.errors import InputError, QprepError, TraceError
from ..core.provenance import module_scope
from ..core.records import Change, TraceNote
from .analysis import has_mode_sensitive_calls, mark_training_dependence, may_depend_on_mode, record_types
from .specialise import fixed_arguments, trace_specialised
from .tracer import trace

__all__ = ["Capture", "capture", "trace", "fixed_arguments"]


@dataclasses.dataclass(frozen=True)
class Capture:
    """A traced model: the graph module, the tracer's notes on opaque submodules, the
    arguments fixed at trace time, and the analysis notes (``self.training`` handling)."""

    graph_module: torch.fx.GraphModule
    trace_notes: tuple[TraceNote, ...]
    fixed: dict
    notes: tuple[Change, ...]


def capture(model: nn.Module, config: PrepareConfig, args: tuple | None) -> Capture:
    """Trace ``model`` for example inputs ``args`` (a tuple of positional arguments, or
    ``None``) and analyse the graph. ``model`` is traced, not run, except on ``args``."""
    gm, trace_notes, fixed = trace_specialised(model, config, args)
    notes: list[Change] = []
    leaf_types = tuple(t for t in config.leaf_modules if isinstance(t, type))
    if has_mode_sensitive_calls(gm) or may_depend_on_mode(model, leaf_types):
        with _flipped_modes(model):
            flipped, _ = trace(model, dataclasses.replace(config, concrete_args=fixed or None))
        notes += mark_training_dependence(gm, flipped, "train" if model.training else "eval", _scope_mode(model))
    if args is not None:
        try:
            record_types(gm, args)
        except Exception as exc:  # noqa: BLE001  (bad example inputs or a graph that fails: tell which)
            raise _input_error(model, args, exc) from exc
    return Capture(gm, tuple(trace_notes), fixed, tuple(notes))


class _flipped_modes:
    """Every module of ``model`` in the other mode, restored on exit."""

    def __init__(self, model: nn.Module):
        self.modes = {m: m.training for m in model.modules()}

    def __enter__(self):
        for m, mode in self.modes.items():
            m.training = not mode

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.training = mode


def _scope_mode(model: nn.Module) -> Callable[[torch.fx.Node], bool]:
    """The ``training`` flag of the module whose ``forward`` made a node."""

    def training(node: torch.fx.Node) -> bool:
        try:
            return model.get_submodule(module_scope(node)).training
        except AttributeError:
            return model.training

    return training


def _input_error(model: nn.Module, args: tuple, exc: Exception) -> QprepError:
    try:
        with torch.no_grad():
            copy.deepcopy(model)(*args)
    except Exception as original_exc:  # noqa: BLE001
        return InputError(
            f"example_inputs do not run through {type(model).__name__}: "
            f"{type(original_exc).__name__}: {original_exc}"
        )
    return TraceError(
        f"the traced graph of {type(model).__name__} fails on example_inputs although the model runs: "
        f"{type(exc).__name__}: {exc}. Mark the module that computes differently under tracing as a leaf."
    )
