"""Capture: trace a model into a graph and gather the facts the passes rely on.

:func:`capture` is the one entry: it traces (with the arguments the example fixes,
:mod:`.specialise`; every node carries its example value and the specialisations are
guarded, :mod:`.tracer`), finds which calls follow ``self.training`` (:mod:`.analysis`),
and returns a :class:`Capture`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx
import torch.nn as nn

from ..core.config import PrepareConfig
from ..core.errors import InputError, TraceError
from ..core.guards import Guard
from ..core.inputs import call_form
from ..core.provenance import module_scope
from ..core.records import Change, TraceNote
from ..core.runtime import clone_tree, forked_rng, on_meta_device, preserved_state
from .analysis import branch_note, has_mode_sensitive_calls, mark_training_dependence, may_depend_on_mode, same_structure
from .dual import share_call_sites, split, union
from .guards import guard_checks
from .memo import shared_results
from .specialise import example_values, fixed_arguments, trace_specialised
from .tracer import trace

__all__ = ["Capture", "capture", "capture_all", "trace", "fixed_arguments", "split", "guard_checks", "share_call_sites"]


@dataclasses.dataclass(frozen=True)
class Capture:
    """A traced model: the graph module, the tracer's notes on opaque submodules, the
    arguments fixed at trace time, the analysis notes (``self.training`` handling) and the
    guards (also checked in the graph)."""

    graph_module: torch.fx.GraphModule
    trace_notes: tuple[TraceNote, ...]
    fixed: dict
    notes: tuple[Change, ...]
    guards: tuple[Guard, ...] = ()
    dual: bool = False  # one graph of both modes (qprep.capture.dual): split after the passes
    variants: tuple[str, ...] = ()  # one graph of several examples' traces: their labels, to split by
    mode: str | None = None  # "train"/"eval": made for this mode only (a mode-dependent forward's variants)
    members: tuple[tuple[int, ...], ...] = ()  # per variant, the indices of the examples it covers
    mode_reason: str = ""  # why ``mode`` is set, when not for several examples
    replayed: tuple = ()  # module calls replayed from an identical one's (qprep.capture.blocks.Replay)


def capture_all(model: nn.Module, config: PrepareConfig, examples: list[tuple]) -> Capture:
    """:func:`capture` for each of ``examples``; traces that differ (the examples took
    different paths, or gave different answers to guarded questions) are merged into one
    graph of variants (:func:`~qprep.capture.dual.union`), labelled ``example 1``, ...;
    examples whose trace is another's add nothing."""
    captures: list[Capture] = []
    members: list[list[int]] = []  # per distinct trace, the examples (indices) it stands for
    for i, args in enumerate(examples):
        current = capture(model, config, args)
        _add(captures, members, current, [i])
    mode = None
    if len(captures) > 1 and any(c.dual for c in captures):
        # a forward with one path per training mode and per example: the variants are made
        # for the model's current mode only, and the prepared model refuses the other
        mode = "train" if model.training else "eval"
        singles, members_before = [_one_mode(c, mode) for c in captures], members
        captures, members = [], []
        for single, indices in zip(singles, members_before):
            _add(captures, members, single, indices)
    if len(captures) == 1:
        return dataclasses.replace(captures[0], mode=mode) if mode and not captures[0].mode else captures[0]
    reason = next((c.mode_reason for c in captures if c.mode_reason), "")
    if reason:  # one example's trace in the other mode failed: every variant is for this mode only
        mode = "train" if model.training else "eval"
    labels = tuple(f"example {m[0] + 1} ({_shapes(examples[m[0]])})" for m in members)
    gm = union([c.graph_module for c in captures], labels)
    guards = _distinct(g for c in captures for g in c.guards)
    notes = _distinct(n for c in captures for n in c.notes)
    trace_notes = _distinct(n for c in captures for n in c.trace_notes)
    return Capture(gm, trace_notes, captures[0].fixed, notes, guards, False, labels, mode,
                   tuple(tuple(m) for m in members), reason, _distinct(r for c in captures for r in c.replayed))


def _add(captures: list[Capture], members: list[list[int]], current: Capture, indices: list[int]) -> None:
    for kept, its in zip(captures, members):
        if _same_trace(current, kept):
            its.extend(indices)
            return
    captures.append(current)
    members.append(list(indices))


def _one_mode(captured: Capture, mode: str) -> Capture:
    """A two-mode capture's graph of ``mode`` alone."""
    if not captured.dual:
        return captured
    gm = captured.graph_module
    single = torch.fx.GraphModule(gm, split(gm, mode), gm._get_name())
    single.meta.update(gm.meta)
    return dataclasses.replace(captured, graph_module=single, dual=False)


def _distinct(items) -> tuple:
    found: list = []
    for item in items:
        if item not in found:
            found.append(item)
    return tuple(found)


def _same_trace(a: Capture, b: Capture) -> bool:
    return a.graph_module.code == b.graph_module.code and a.guards == b.guards


def _shapes(args: tuple) -> str:
    """``1x8, 1x8`` for two tensors: an example's tensor shapes, for labels and errors."""
    parts = []
    for value in args:
        if isinstance(value, torch.Tensor):
            parts.append("x".join(map(str, value.shape)) or "scalar")
        else:
            parts.append(type(value).__name__)
    return ", ".join(parts)


def capture(model: nn.Module, config: PrepareConfig, args: tuple | None) -> Capture:
    """Trace ``model`` for example inputs ``args`` (a tuple of positional arguments, or
    ``None``) and analyse the graph. ``model`` is traced on meta tensors, not run (but for
    a check of the example inputs when some op could not run on meta tensors)."""
    with shared_results():  # both modes' traces reuse each other's op results
        return _capture(model, config, args)


def _capture(model: nn.Module, config: PrepareConfig, args: tuple | None) -> Capture:
    try:
        traced, fixed = trace_specialised(model, config, args)
    except TraceError:
        if args is not None and not on_meta_device(model, [args]):
            _check_inputs(model, args)  # an example the model itself rejects is the error to report
        raise
    gm, trace_notes = traced
    if args is not None and traced.failures:
        _check_inputs(model, args)
    notes: list[Change] = []
    leaf_types = tuple(t for t in config.leaf_modules if isinstance(t, type))
    guards, dual = traced.guards, False
    if has_mode_sensitive_calls(gm) or may_depend_on_mode(model, leaf_types):
        examples = example_values(model, args) if args is not None else None
        mode = "train" if model.training else "eval"
        try:
            with _flipped_modes(model):
                flipped = trace(model, dataclasses.replace(config, concrete_args=fixed or None), examples,
                                code_on_demand=True)  # compared, or merged into a new graph: never run
        except TraceError as exc:  # the other mode cannot be traced (a layerdrop's random draw): this one only
            other = "eval" if mode == "train" else "train"
            reason = f"{other} mode cannot be traced: {str(exc).splitlines()[0]}"
            note = TraceNote("", type(model).__name__, f"prepared for {mode} mode only; {reason}", exc.location or "")
            return Capture(gm, tuple(trace_notes) + (note,), fixed, tuple(notes), guards, False, mode=mode,
                           mode_reason=reason, replayed=traced.replayed)
        if same_structure(gm, flipped[0], _scope_mode(model)):
            notes += mark_training_dependence(gm, flipped[0], mode, _scope_mode(model))
        else:  # forward branches on self.training: one graph per mode, over the same modules
            train_gm, eval_gm = (gm, flipped[0]) if model.training else (flipped[0], gm)
            gm, dual = union([train_gm, eval_gm]), True
            guards = guards + tuple(g for g in flipped.guards if g not in guards)
            notes.append(branch_note(gm))
    return Capture(gm, tuple(trace_notes), fixed, tuple(notes), guards, dual, replayed=traced.replayed)


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


def _check_inputs(model: nn.Module, args: tuple) -> None:
    """Some op could not run on the example's meta tensors: run the model once on the
    example, so that inputs it rejects are an :class:`InputError`, not a later surprise."""
    try:
        with preserved_state(model), forked_rng(), torch.no_grad():
            positional, keywords = call_form(model, clone_tree(args))
            model(*positional, **keywords)
    except Exception as exc:  # noqa: BLE001  (the model rejects its example inputs)
        raise InputError(
            f"example_inputs do not run through {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
