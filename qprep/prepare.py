"""``qprep.prepare``: trace, analyse, run the pipeline, verify."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .aliases import restore_missing_state
from .analysis import has_mode_sensitive_calls, mark_training_dependence, may_depend_on_mode, record_types
from .config import PrepareConfig
from .errors import InputError, NotEquivalentError, QprepError, TraceError
from .fast_forward import install_fast_forward
from .inputs import as_positional
from .pipeline import PIPELINE, pass_name, run_pipeline
from .records import Change
from .tracer import TraceNote, trace
from .verify import VerifyResult, verify

__all__ = ["prepare", "Preparation", "replay_passes", "snapshot"]


@dataclasses.dataclass
class Preparation:
    """Everything a report needs about one :func:`prepare` run; stored on the prepared
    module as ``gm.meta["qprep"]["preparation"]``."""

    config: PrepareConfig
    passes: tuple[str, ...]
    changes: tuple[Change, ...]
    trace_notes: tuple[TraceNote, ...]
    before: dict  # snapshot() of the traced graph before the passes
    specialised: dict = dataclasses.field(default_factory=dict)  # argument -> value fixed at trace time
    verification: VerifyResult | None = None
    changed: dict = dataclasses.field(default_factory=dict)  # pass -> bool


def snapshot(gm: torch.fx.GraphModule) -> dict:
    """A plain-data picture of a graph for reports: its code and its nodes."""
    from ._provenance import module_scope, source_location
    from .graph_utils import target_text

    nodes = []
    for node in gm.graph.nodes:
        module_type = ""
        if node.op == "call_module":
            module_type = type(gm.get_submodule(node.target)).__name__
        nodes.append({
            "name": node.name, "op": node.op, "target": target_text(node), "module_type": module_type,
            "args": [a.name for a in node.all_input_nodes], "location": source_location(node),
            "scope": module_scope(node), "meta": dict(node.meta.get("qprep") or {}),
        })
    modules = sum(1 for _ in gm.modules())
    params = sum(p.numel() for p in gm.parameters())
    return {"code": gm.code, "nodes": nodes, "modules": modules, "parameters": params}


def _defaults_after(model: nn.Module, given: int) -> dict[str, Any]:
    """Forward parameters past the ``given`` positional ones that have defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default for p in params[given:]
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _none_arguments(model: nn.Module, args: tuple) -> dict[str, None]:
    """Example inputs given as ``None`` are fixed to ``None`` (``if mask is not None``)."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}
    return {names[i]: None for i, a in enumerate(args) if a is None and i < len(names)}


def _trace(model: nn.Module, config: PrepareConfig, args: tuple | None) -> tuple[torch.fx.GraphModule, list, dict]:
    """Trace. Forward arguments that the example inputs leave out are fixed to their
    defaults (``mask=None``), and those given as ``None`` to ``None``: the prepared model is
    for calls like the example. Without
    example inputs, they are fixed only if tracing fails otherwise. Either way it is said."""
    fixed = {}
    if config.concrete_args is None:
        fixed = _defaults_after(model, len(args) if args is not None else 0)
        fixed.update(_none_arguments(model, args or ()))
    if args is not None and fixed:
        return (*trace(model, dataclasses.replace(config, concrete_args=fixed)), fixed)
    try:
        gm, notes = trace(model, config)
        return gm, notes, {}
    except TraceError as first:
        if not fixed:
            raise
        try:
            gm, notes = trace(model, dataclasses.replace(config, concrete_args=fixed))
        except TraceError:
            raise first from None
        return gm, notes, fixed


def _flip_modes(model: nn.Module) -> dict:
    modes = {m: m.training for m in model.modules()}
    for m in modes:
        m.training = not modes[m]
    return modes


def _scope_mode(model: nn.Module):
    """The ``training`` flag of the module whose ``forward`` made a node."""
    from ._provenance import module_scope

    def training(node: torch.fx.Node) -> bool:
        try:
            return model.get_submodule(module_scope(node)).training
        except AttributeError:
            return model.training

    return training


def _analyse(model: nn.Module, gm: torch.fx.GraphModule, config: PrepareConfig, args: tuple | None,
             fixed: dict) -> list[Change]:
    notes: list[Change] = []
    leaf_types = tuple(t for t in config.leaf_modules if isinstance(t, type))
    if has_mode_sensitive_calls(gm) or may_depend_on_mode(model, leaf_types):
        modes = _flip_modes(model)
        try:
            flipped, _ = trace(model, dataclasses.replace(config, concrete_args=fixed) if fixed else config)
        finally:
            for m, mode in modes.items():
                m.training = mode
        notes += mark_training_dependence(gm, flipped, "train" if model.training else "eval", _scope_mode(model))
    if args is not None:
        try:
            record_types(gm, args)
        except Exception as exc:  # noqa: BLE001  (bad example inputs or a graph that fails: tell which)
            raise _input_error(model, args, exc) from exc
    return notes


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


def _working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"cannot copy {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "pass inplace=True to prepare it without a copy"
        ) from exc


def _config(config: PrepareConfig | None, options: dict) -> PrepareConfig:
    """``config`` with ``options`` (its field names) applied on top."""
    if config is not None and not isinstance(config, PrepareConfig):
        raise InputError(f"config must be a qprep.PrepareConfig, got {type(config).__name__}")
    try:
        return dataclasses.replace(config, **options) if config is not None else PrepareConfig(**options)
    except TypeError as exc:
        raise InputError(f"unknown prepare() option: {exc}") from exc


def prepare(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    config: PrepareConfig | None = None,
    inplace: bool = False,
    check: bool = True,
    report: str | None = None,
    **options: Any,
) -> torch.fx.GraphModule:
    """Make ``model`` ready for module-level quantization, bit for bit.

    Returns a ``torch.fx.GraphModule`` that computes exactly what ``model`` computes and in
    which every compute op is a ``call_module`` of a module no other node calls.

    Args:
        model: the ``nn.Module`` to prepare. It is not modified (unless ``inplace``).
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword
            arguments. With them, qprep learns
            which values are tensors (shape arithmetic stays plain Python) and input ranks,
            and verifies the result bitwise (``check``).
        config: a :class:`PrepareConfig`; or pass its fields as keyword ``options``
            (``leaf_modules=[...]``, ``concrete_args={...}``, ``strict=True``, ...).
        inplace: ``False`` (default) prepares a deep copy: the result shares nothing with
            ``model``. ``True`` skips the copy (saving one full copy of the weights and the
            time to make it): the result then holds ``model``'s own submodules, Parameters
            and buffers, so training one trains the other; ``model``'s own attributes and
            ``forward`` are still not changed.
        check: with ``example_inputs``, verify the result with :func:`qprep.verify` and
            raise :class:`~qprep.errors.NotEquivalentError` instead of returning a model
            that differs.
        report: a path (``.html``, ``.md``, ``.json``, ``.txt``) to write the diff report to.

    Raises:
        InputError: not a module, bad example inputs, unknown option.
        TraceError: the model cannot be traced (names the module, the line and the fix).
        PassError: a pass failed (names it and the passes before it).
        NotEquivalentError: the result differs from ``model`` on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"qprep.prepare() takes a torch.nn.Module, got {type(model).__name__}")
    config = _config(config, options)
    args = None if example_inputs is None else as_positional(example_inputs, model)
    work = _working_copy(model, inplace)
    gm, trace_notes, fixed = _trace(work, config, args)
    notes = _analyse(work, gm, config, args, fixed)
    before = snapshot(gm)
    results = run_pipeline(gm, config)
    restore_missing_state(work, gm)
    gm.training = model.training
    preparation = Preparation(
        config=config,
        passes=tuple(pass_name(p) for p in PIPELINE),
        changes=tuple(notes) + tuple(c for r in results for c in r.changes),
        trace_notes=tuple(trace_notes),
        before=before,
        specialised=fixed,
        changed={pass_name(p): r.changed for p, r in zip(PIPELINE, results)},
    )
    gm.meta.setdefault("qprep", {})["preparation"] = preparation
    install_fast_forward(gm)
    if check and args is not None:
        preparation.verification = verify(model, gm, args)
        if not preparation.verification.equal:
            raise NotEquivalentError(
                "the prepared model is not bitwise equal to the original on example_inputs:\n"
                + preparation.verification.table(),
                result=preparation.verification,
            )
    if report:
        from .report import diff

        diff(model, gm).write(report)
    return gm


def replay_passes(original: nn.Module, config: PrepareConfig, args: tuple, seed: int = 0) -> str | None:
    """Re-prepare a copy of ``original`` pass by pass; name the first step after which it
    is no longer bitwise equal to ``original`` on ``args`` (``"trace"`` for the tracer)."""
    work = copy.deepcopy(original)
    gm, _, fixed = _trace(work, config, args)
    _analyse(work, gm, config, args, fixed)
    broken: list[str] = []

    def check(step: str, current: torch.fx.GraphModule) -> None:
        if not broken and not verify(original, current, args, seed=seed, replay=False).equal:
            broken.append(step)

    check("trace", gm)
    run_pipeline(gm, config, after_each=check)
    return broken[0] if broken else None
