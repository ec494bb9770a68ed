"""The one place where the stages meet: :func:`prepare` (capture, run the pipeline,
verify), :func:`verify` (verification plus, when outputs differ, a replay that names the
first pass that broke equality), :func:`diff` (the report) and :func:`replay_passes`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import inspect
import re
import warnings
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .capture import Capture, capture_all, guard_checks, share_call_sites, split
from .core.dual import DualGraphModule
from .core.variants import VariantGraphModule, signature_reader
from .modules.fast_forward import install_fast_forward
from .core import meta
from .core.aliases import match_order, match_persistence, restore_missing_state
from .core.config import PrepareConfig
from .core.copying import deepcopy_module
from .core.errors import InconclusiveWarning, InputError, NotEquivalentError, QprepError, TraceError
from .core.inputs import as_positional, call_form, check_call, fit_call, with_concrete
from .core.paths import check_writable
from .core.records import Preparation, TraceNote
from .core.runtime import clone_tree, forked_rng, on_meta_device, preserved_state, shallow_copy, structure_kept
from .passes import run_pipeline
from .report import Report, preparation_of, report_format, snapshot
from .verify import VerifyResult, verify_outputs
from .verify.compare import backward_runs

__all__ = ["prepare", "verify", "diff", "replay_passes", "load_weights"]


def _working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    if inplace:
        return model
    try:
        work = deepcopy_module(model)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"cannot copy {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "pass inplace=True to prepare it without a copy"
        ) from exc
    _same_modes(model, work)
    return work


def _scope_modes(model: nn.Module, gm: nn.Module) -> None:
    """Each module ``gm`` made (the containers fx makes for module paths, the passes'
    wrappers) in the mode of the original module at its path, or of the one it sits in."""
    flags = {name: m.training for name, m in model.named_modules()}
    shared = {id(m) for m in model.modules()}
    for name, m in gm.named_modules():
        if not name or id(m) in shared:
            continue
        scope = name
        while scope and scope not in flags:
            scope = scope.rpartition(".")[0]
        m.training = flags.get(scope, model.training)


def _same_modes(model: nn.Module, work: nn.Module) -> None:
    """Give ``work`` (a copy of ``model``) each of ``model``'s ``training`` flags: a class's
    own ``__deepcopy__`` may not keep them (torchvision's feature-extraction
    ``DualGraphModule`` comes back in train mode, BatchNorm and all). The root goes through
    ``.train()``, which such a class overrides to switch its graph."""
    if work.training != model.training:
        work.train(model.training)
    for original, copied in zip(model.modules(), work.modules()):
        copied.training = original.training


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
    variants: list | tuple = (),
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
            that differs. Both models run on ``example_inputs`` with the ``concrete_args``
            values in their places. On empty example tensors the check proves nothing: it
            warns (:class:`~qprep.InconclusiveWarning`).
        report: a path (``.html``, ``.md``, ``.json``, ``.txt``) to write the diff report to.
        variants: more example inputs (each as ``example_inputs``) the prepared model must
            cover. Where one takes another path through ``forward`` (another answer to a
            guarded ``if x.size(1) > 1:``), the result holds one graph per path over one
            set of modules (:class:`~qprep.core.variants.VariantGraphModule`) and runs the
            first graph whose guards accept a call. Each example is verified.

    Raises:
        InputError: not a module, bad example inputs (more than ``forward`` takes, a
            required argument missing, an argument also in ``concrete_args``), an unknown
            ``concrete_args`` name or option, a ``report`` path that cannot be written;
            all checked before any work.
        TraceError: the model cannot be traced (names the module, the line and the fix).
        PassError: a pass failed (names it and the passes before it).
        NotEquivalentError: the result differs from ``model`` on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"qprep.prepare() takes a torch.nn.Module, got {type(model).__name__}")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise InputError("qprep.prepare() got a torch.compile() wrapper, which runs through dynamo and has no "
                         "forward of its own to trace: prepare the module it compiles (model._orig_mod), and "
                         "compile the prepared model if you like")
    config = _config(config, options)
    args = None if example_inputs is None else as_positional(example_inputs, model)
    if args is not None:
        check_call(model, args, config.concrete_args)
    elif config.concrete_args:
        check_call(model, None, config.concrete_args)
    if variants and args is None:
        raise InputError("variants= are further example inputs: give example_inputs too")
    more = [as_positional(v, model) for v in variants]
    for other in more:
        check_call(model, other, config.concrete_args)
    if report:
        report_format(report)
        check_writable(report, "report")
    with _collector_paused():
        work = _working_copy(model, inplace)
        # A failure at any step leaves the model as it was: with inplace=True the graph module
        # holds the model's own submodules, so whatever a failing step did to them is undone.
        with structure_kept(model.modules() if inplace else (), on_success=False):
            return _prepare_work(model, work, config, args, more, check=check, report=report)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while preparing, as it was afterwards. Tracing
    makes many objects that live to the end (nodes, their example values), so full
    collections come often, and each walks every object in the process (the model's,
    transformers' own): a quarter of the time to prepare a 7B Llama on the meta device."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _prepare_work(model: nn.Module, work: nn.Module, config: PrepareConfig, args: tuple | None, more: list, *,
                  check: bool, report: str | None) -> torch.fx.GraphModule:
    """:func:`prepare` on ``work`` (``model`` itself or its copy), once the arguments are checked."""
    try:
        captured = capture_all(work, config, [args, *more])
    except TraceError as exc:
        if config.on_untraceable != "leaf" or exc.module or args is None or more:
            raise
        return _prepare_inside(model, work, config, args, exc, check=check, report=report)
    before = snapshot(captured.graph_module)
    results = run_pipeline(captured.graph_module, config, recompile=not (captured.dual or captured.variants))
    gm = _assemble(model, captured, config, [args, *more])
    restore_missing_state(work, gm)
    match_order(work, gm)
    match_persistence(work, gm)
    gm.training = model.training
    _scope_modes(model, gm)
    if not isinstance(gm, VariantGraphModule):
        install_fast_forward(gm)
    on_meta = args is not None and on_meta_device(work, [args, *more])
    unverified = (TraceNote("", type(model).__name__, "not verified: the model or its example inputs are on the meta "
                            "device (no values to compare); load weights with to_empty() and load_state_dict(), "
                            "then check with qprep.verify()"),) if on_meta and check else ()
    preparation = Preparation(
        config=config,
        passes=tuple(r.pass_name for r in results),
        changes=captured.notes + tuple(c for r in results for c in r.changes),
        trace_notes=captured.trace_notes + unverified,
        before=before,
        specialised=captured.fixed,
        changed={r.pass_name: r.changed for r in results},
        guards=captured.guards,
    )
    meta.set_graph_facts(gm, **{meta.PREPARATION: preparation})
    if captured.guards:
        meta.set_graph_facts(gm, **{meta.GUARDS: captured.guards})
    if captured.replayed:
        meta.set_graph_facts(gm, **{meta.REPLAYED: captured.replayed})
    if check and args is not None and not on_meta:
        call = with_concrete(model, args, config.concrete_args)
        result = _verify_trained(model, gm, call, model.training)
        if result.equal and captured.dual:  # the other mode's graph too
            result = _verify_trained(model, gm, call, not model.training)
        for other in more:  # every example, each through the graph its guards choose
            if result.equal:
                result = _verify_trained(model, gm, with_concrete(model, other, config.concrete_args), model.training)
        _warn_if_inconclusive(result)
        preparation = preparation.verified(result)
        meta.set_graph_facts(gm, **{meta.PREPARATION: preparation})
        if not preparation.verification.equal:
            raise NotEquivalentError(
                "the prepared model is not bitwise equal to the original on example_inputs:\n"
                + preparation.verification.table(),
                result=preparation.verification,
            )
    if report:
        Report.of(gm, type(model).__name__).write(report)
    return gm


def _assemble(model: nn.Module, captured: Capture, config: PrepareConfig, examples: list) -> nn.Module:
    """The runnable module of a capture whose graph went through the passes: the graph
    module itself, or, for a graph of several paths, one graph per training mode
    (:class:`DualGraphModule`) or per guarded path (:class:`VariantGraphModule`), sharing
    every module the passes made."""
    gm = captured.graph_module
    if captured.dual:
        gm.training = model.training
        gm = DualGraphModule(gm, split(gm, "train"), split(gm, "eval"), gm._get_name())
        gm.after_recompile = install_fast_forward
    elif captured.variants or captured.mode:
        labels = captured.variants
        if labels:
            share_call_sites(gm, labels)
        graphs = [split(gm, label, labels) for label in labels] if labels else [gm.graph]
        read = signature_reader(graphs[0])
        signatures = [[_call_signature(read, model, gm, with_concrete(model, examples[i], config.concrete_args))
                       for i in indices] for indices in captured.members]
        gm = VariantGraphModule(gm, graphs, [guard_checks(g) for g in graphs], list(labels or ("example 1",)),
                                gm._get_name(), captured.mode, signatures, captured.mode_reason)
    return gm


def load_weights(prepared: nn.Module, source: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Give a model prepared on the meta device the weights of ``source`` (the same model,
    built with its weights): storage on ``device`` (``source``'s by default), then every
    Parameter and buffer of ``source`` by name, the non-persistent buffers ``state_dict``
    leaves out (a rotary ``inv_freq``) included; strict about the ``state_dict`` keys (a
    buffer the prepared graph never reads is not in it). Returns ``prepared``."""
    if device is None:
        device = next(iter([*source.parameters(), *source.buffers()]), torch.empty(0)).device
    prepared.to_empty(device=device)
    prepared.load_state_dict(source.state_dict())  # strict: the same keys both ways
    mine = dict(prepared.named_buffers())
    with torch.no_grad():
        for name, buffer in source.named_buffers():
            if name in mine:
                mine[name].copy_(buffer)
    return prepared


def _verify_trained(model: nn.Module, gm: nn.Module, call: tuple, train: bool) -> VerifyResult:
    """:func:`verify` in mode ``train``; in train mode the gradients too (a model prepared for
    training is trained: a custom backward lost would leave outputs equal and gradients not).
    Where a backward fails (a Function without one), outputs only, as in eval mode."""
    if not train:
        return verify(model, gm, call, train=False)
    try:
        return verify(model, gm, call, train=True, grad=True)
    except Exception:  # noqa: BLE001
        if backward_runs(model, as_positional(call, model)):
            raise  # the prepared model's backward failed where the original's runs
        return verify(model, gm, call, train=True)


def _call_signature(read, model: nn.Module, prepared: torch.fx.GraphModule, args: tuple) -> dict:
    """What ``read`` (:func:`~qprep.core.variants.signature_reader`) makes of ``args``."""
    positional, keywords = fit_call(model, prepared, args)
    return read(*positional, **keywords)


def _warn_if_inconclusive(result: VerifyResult) -> None:
    if result.caveats:
        warnings.warn("qprep.prepare: the bitwise check proves nothing here: " + "; ".join(result.caveats)
                      + ". Give example inputs with at least one element in every dimension.",
                      InconclusiveWarning, stacklevel=4)


#: The name the model whose own forward cannot be traced has inside its prepared module.
OPAQUE_ROOT = "model"


def _other_uses(cls: type, name: str) -> str | None:
    """An attribute other than ``forward`` that ``cls``'s code reads off ``self.<name>``
    (torchvision's GeneralizedRCNN calls ``self.transform.postprocess``), in its own and its
    base classes' source; ``None`` when these show none (or cannot be read: the verification
    that follows still checks)."""
    found: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("torch", "builtins"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        found |= {m.group(1) for m in re.finditer(rf"self\.{re.escape(name)}\.(\w+)", source)} - {"forward"}
    return sorted(found)[0] if found else None


def _prepare_inside(model: nn.Module, work: nn.Module, config: PrepareConfig, args: tuple, failure: TraceError,
                    *, check: bool, report: str | None) -> torch.fx.GraphModule:
    """``on_untraceable="leaf"`` when the model's own ``forward`` cannot be traced: that
    forward is the smallest untraceable scope, so it stays opaque, and each submodule it
    calls is prepared on its own, with the inputs it gets on the example (recorded in one
    run), and put back in its place. The result calls the opaque model; its ``state_dict``
    keys are the model's own. With ``inplace=True`` (``work`` is ``model``) the prepared
    submodules go into a shallow copy of ``model`` (sharing its submodules, Parameters and
    buffers), so ``model``'s own attributes stay as they were."""
    if work is model:
        work = shallow_copy(model)
    inputs = _child_inputs(work, args)
    notes: list[TraceNote] = []
    prepared_names: list[str] = []
    for name, calls in inputs.items():
        child = getattr(work, name)
        if len(calls) > 1 and len({_signature(c) for c in calls}) > 1:
            notes.append(TraceNote(name, type(child).__name__, "not prepared: called with inputs of different shapes"))
            continue
        call_args, call_kwargs = calls[0]
        if call_kwargs:
            notes.append(TraceNote(name, type(child).__name__, "not prepared: called with keyword arguments"))
            continue
        used = _other_uses(type(work), name)
        if used:  # `self.transform.postprocess(...)`: a GraphModule has only forward
            notes.append(TraceNote(name, type(child).__name__, f"not prepared: the model's code also uses "
                                   f"self.{name}.{used}, which a prepared graph module does not have"))
            continue
        try:
            prepared = prepare(child, call_args, config=config, inplace=True, check=False)
        except QprepError as exc:
            notes.append(TraceNote(name, type(child).__name__, f"not prepared: {exc}"))
            continue
        setattr(work, name, prepared)
        prepared_names.append(name)
    why = str(failure).splitlines()[0]
    notes.insert(0, TraceNote("", type(work).__name__, f"its own forward stays opaque ({why}); the submodules it "
                              f"calls were prepared on their own: {', '.join(prepared_names) or 'none'}",
                              failure.location))
    gm = _opaque_module(work, type(model).__name__)
    preparation = Preparation(config=config, passes=(), changes=(), trace_notes=tuple(notes), before=snapshot(gm))
    meta.set_graph_facts(gm, **{meta.PREPARATION: preparation})
    if check:
        result = verify(model, gm, with_concrete(model, args, config.concrete_args))
        _warn_if_inconclusive(result)
        meta.set_graph_facts(gm, **{meta.PREPARATION: preparation.verified(result)})
        if not result.equal:
            raise NotEquivalentError("the prepared model is not bitwise equal to the original on example_inputs:\n"
                                     + result.table(), result=result)
    if report:
        Report.of(gm, type(model).__name__).write(report)
    return gm


def _signature(call: tuple) -> tuple:
    args, kwargs = call
    return tuple((type(a), tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else (type(a),) for a in args)


def _child_inputs(work: nn.Module, args: tuple) -> dict[str, list]:
    """The arguments each direct submodule of ``work`` is called with on ``args``."""
    calls: dict[str, list] = {}
    handles = []
    for name, child in work.named_children():
        def record(module, call_args, call_kwargs, name=name):
            calls.setdefault(name, []).append((clone_tree(call_args), clone_tree(call_kwargs)))
        handles.append(child.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with preserved_state(work), forked_rng(), torch.no_grad():
            positional, keywords = call_form(work, clone_tree(args))
            work(*positional, **keywords)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _opaque_module(work: nn.Module, class_name: str) -> torch.fx.GraphModule:
    """A GraphModule that calls ``work`` (as submodule :data:`OPAQUE_ROOT`) on its inputs, with
    ``work``'s own ``state_dict`` keys."""
    graph = torch.fx.Graph()
    params = [p for p in inspect.signature(work.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    placeholders = [graph.placeholder(p.name, default_value=p.default) if p.default is not p.empty
                    else graph.placeholder(p.name) for p in params]
    graph.output(graph.call_module(OPAQUE_ROOT, tuple(placeholders)))
    gm = torch.fx.GraphModule({OPAQUE_ROOT: work}, graph, class_name)
    gm.training = work.training
    prefix = f"{OPAQUE_ROOT}."
    gm.register_state_dict_post_hook(_strip_prefix(prefix))
    gm.register_load_state_dict_pre_hook(_add_prefix(prefix))
    return gm


def _strip_prefix(prefix: str):
    def hook(module, state_dict, local_prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(local_prefix + prefix)]:
            state_dict[local_prefix + key[len(local_prefix + prefix):]] = state_dict.pop(key)

    return hook


def _add_prefix(prefix: str):
    def hook(module, state_dict, local_prefix, local_metadata, strict, missing, unexpected, errors):
        for key in [k for k in state_dict if k.startswith(local_prefix) and not k.startswith(local_prefix + prefix)]:
            state_dict[local_prefix + prefix + key[len(local_prefix):]] = state_dict.pop(key)

    return hook


def verify(
    original: nn.Module,
    prepared: nn.Module,
    inputs: Any,
    *,
    train: bool | None = None,
    grad: bool = False,
    seed: int = 0,
    replay: bool = True,
) -> VerifyResult:
    """Compare ``prepared`` with ``original`` on ``inputs`` bitwise
    (:func:`qprep.verify.verify_outputs`: every output leaf with ``torch.equal``, containers by
    type and keys, both runs from RNG seed ``seed``, in ``train`` or eval mode, gradients with
    ``grad``). When outputs differ, ``replay`` and ``prepared`` came from :func:`prepare`,
    the result also names the first pass after which a fresh preparation stops being equal.

    When ``prepared`` came from :func:`prepare` with ``concrete_args`` and ``inputs`` stop
    before those arguments, both models get the concrete values (the prepared model is made
    for them). Empty input tensors or outputs make the result inconclusive
    (:attr:`VerifyResult.caveats`, :attr:`VerifyResult.conclusive`)."""
    preparation = preparation_of(prepared)
    if preparation is not None and preparation.config.concrete_args:
        inputs = with_concrete(original, as_positional(inputs, original), preparation.config.concrete_args)
    result = verify_outputs(original, prepared, inputs, train=train, grad=grad, seed=seed)
    if result.equal or not replay:
        return result
    if preparation is None:
        return result
    try:
        first = replay_passes(original, preparation.config, as_positional(inputs, original), seed)
    except Exception as exc:  # noqa: BLE001  (the replay is a diagnosis; never mask the verdict)
        first = f"unknown (replay failed: {type(exc).__name__}: {exc})"
    return dataclasses.replace(result, first_bad_pass=first)


def replay_passes(original: nn.Module, config: PrepareConfig, args: tuple, seed: int = 0) -> str | None:
    """Re-prepare a copy of ``original`` pass by pass; name the first step after which it
    is no longer bitwise equal to ``original`` on ``args`` (``"trace"`` for the tracer)."""
    work = copy.deepcopy(original)
    captured = capture_all(work, config, [args])
    broken: list[str] = []

    def check(step: str, current: torch.fx.GraphModule) -> None:
        if broken:
            return
        # a graph of both training modes (or of guarded paths) runs as the module prepare makes of it
        runnable = _assemble(original, dataclasses.replace(captured, graph_module=current), config, [args])
        if not verify_outputs(original, runnable, args, seed=seed).equal:
            broken.append(step)

    check("trace", captured.graph_module)
    run_pipeline(captured.graph_module, config, after_each=check)
    return broken[0] if broken else None


def diff(original: nn.Module, prepared: nn.Module | None = None, example_inputs: Any = None,
         **prepare_options: Any) -> Report:
    """The report of how ``prepared`` was made from ``original``.

    When ``prepared`` carries its preparation record (it came from :func:`qprep.prepare` in
    this process), that record is used. Otherwise (``None``, a GraphModule qprep did not make,
    or one loaded with ``torch.load``, which drops ``meta``) ``original`` is prepared with
    ``example_inputs`` and ``prepare_options``.
    """
    if preparation_of(prepared) is None:
        prepared = prepare(original, example_inputs, **prepare_options)
    elif example_inputs is not None or prepare_options:
        raise InputError("diff(): example_inputs and prepare options are used only when prepared is not given")
    return Report.of(prepared, type(original).__name__)

