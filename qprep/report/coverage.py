"""``qprep.coverage``: how many of a model's float compute ops a module-level quantizer can observe.

A module-level quantizer (torch.ao eager mode, AIMET QuantSim, Brevitas, Distiller) puts its
quantizers at module calls, on the output of leaf modules. An op whose output passes through
a module call is *observable*; a bare tensor op (``out += identity``, ``torch.cat``,
``F.relu``) is not, and neither is an op computed inside a fused kernel (``nn.LSTM``'s gates).

>>> cov = qprep.coverage(DistillerBlock(), (x,))        # qprep.examples
>>> cov.observed, cov.total, f"{cov.fraction:.0%}"
(6, 9, '67%')
>>> print(cov.table(unobserved_only=True))

How ops are counted (the model runs once on the example inputs, in its current mode, with no
gradient; its buffers and the random streams are left as they were):

* The model is traced with qprep's tracer, so ``torch.nn`` leaf modules and qprep's modules
  are ``call_module`` nodes; a submodule that cannot be traced is kept as an opaque leaf
  (noted in :attr:`Coverage.notes`). It works on any model, prepared or not.
* A ``call_function``/``call_method`` node that produces a floating-point tensor is one op,
  **unobserved**, unless it only moves data (``view``, ``reshape``, ``getitem``, ``to``, ...:
  qprep's data-movement lists, the same policy :func:`qprep.prepare` applies).
* A ``call_module`` of a leaf module whose output holds a floating-point tensor is one op,
  **observed**. If the same module object is called at several nodes it is still observed,
  but flagged ``shared``: one quantizer collects the statistics of all its call sites.
* A fused module (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, their cells, ``nn.MultiheadAttention``)
  counts as the ops qprep's modular twin runs on the same inputs: one per distinct gate
  module (an LSTM cell has 12: two linears, the gate add, four activations, three products,
  the cell add and the cell tanh; +1 with ``proj_size``; GRU 11; RNN 4; per layer and
  direction, plus the inter-layer dropout), because that is what a quantizer must see to
  simulate the module in 8 bits. Only the op that makes the module's output (the last
  gate op, ``out_proj`` for attention) is observed; the others are computed inside one kernel.
* An opaque module with submodules (qprep's modular LSTM/attention, a module kept opaque
  because it could not be traced) is run with hooks: each distinct leaf submodule it calls
  is one observed op, each float tensor op it makes outside a leaf submodule one unobserved
  op. Inside qprep's own modular modules the ops outside the gate modules only join the
  per-step outputs over time, layers and directions (``torch.stack``/``cat``); they are not
  counted, so a fused module and its modular twin have the same total.
* Not counted: data movement, ``nn.Identity``/``nn.Flatten``/``nn.Unflatten``, and ops with
  no floating-point output (shape arithmetic, comparisons, ``argmax``, integer indices).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn as nn
from tabulate import tabulate
from torch.overrides import TorchFunctionMode

from .. import modules as qm
# qprep's tracer, and the data-movement policy the passes apply: the only imports from the
# layers below that are not the public ``qprep.modules``.
from ..capture.specialise import trace_specialised
from ..core.config import PrepareConfig
from ..core.errors import TraceError
from ..core.inputs import as_positional
from ..core.provenance import source_location
from ..core.runtime import forked_rng, preserved_state
from ..passes.op_tables import DATA_MOVEMENT_FUNCTIONS, DATA_MOVEMENT_METHODS

__all__ = ["coverage", "Coverage", "OpCoverage", "coverage_lines", "moves_data", "untouched", "FUSED_TWINS"]

#: fused ``torch.nn`` module type -> the qprep modular twin whose gate modules are counted.
FUSED_TWINS: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.LSTM: qm.ModularLSTM.from_float,
    nn.GRU: qm.ModularGRU.from_float,
    nn.RNN: qm.ModularRNN.from_float,
    nn.LSTMCell: qm.ModularLSTMCell.from_float,
    nn.GRUCell: qm.ModularGRUCell.from_float,
    nn.RNNCell: qm.ModularRNNCell.from_float,
    nn.MultiheadAttention: qm.ModularMultiheadAttention.from_float,
}

#: the twin's gate module that makes the fused module's (first) output, where it is not the
#: last one the twin runs (attention averages its weights over heads after ``out_proj``).
_OUTPUT_OP = {nn.MultiheadAttention: "out_proj"}

#: leaf modules that only move data: not compute ops.
DATA_MOVEMENT_MODULES: tuple[type, ...] = (nn.Identity, nn.Flatten, nn.Unflatten)
#: ``flatten`` only moves data too; qprep turns it into ``nn.Flatten`` (so the passes do not
#: list it as data movement), and both sides of a preparation must count alike.
_FLATTEN_FUNCTIONS = (torch.flatten, torch.Tensor.flatten)
# Tensor dunders that index, as a TorchFunctionMode sees them (fx records operator.getitem).
_INDEXING = frozenset({"__getitem__", "__setitem__", "__get__", "__set__"})


def moves_data(target: Any) -> bool:
    """Whether a call only moves or reinterprets data: qprep's data-movement policy (the
    passes' lists: ``Tensor`` methods by name, functions by identity) plus ``flatten``.
    Takes an fx node's target or a function a ``TorchFunctionMode`` sees (``Tensor.view``)."""
    if isinstance(target, str):
        return target in DATA_MOVEMENT_METHODS or target == "flatten"
    if any(target is f for f in _FLATTEN_FUNCTIONS):
        return True
    name = getattr(target, "__name__", "")
    if name in _INDEXING:
        return True
    try:
        if target in DATA_MOVEMENT_FUNCTIONS:
            return True
    except TypeError:  # unhashable
        return False
    owner = getattr(target, "__objclass__", None)  # a Tensor method: by name, as the passes match methods
    return isinstance(owner, type) and issubclass(torch.Tensor, owner) and name in DATA_MOVEMENT_METHODS


_WHY_MODULE = "output of a module call"
_WHY_TENSOR_OP = "tensor op, not a module call: no module-level quantizer sees its output"
_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")


@dataclasses.dataclass(frozen=True)
class OpCoverage:
    """One float compute op and whether a module-level quantizer can observe its output.

    ``op`` says what computes (``operator.iadd``, ``Conv2d``, ``forget_gate (Sigmoid)``),
    ``location`` where in the model (module path, or module scope and graph node), ``source``
    the user's ``file:line`` when known.
    """

    op: str
    location: str
    observed: bool
    why: str
    source: str = ""
    shared: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Coverage:
    """What :func:`coverage` found: one :class:`OpCoverage` per float compute op."""

    model: str
    ops: tuple[OpCoverage, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return len(self.ops)

    @property
    def observed(self) -> int:
        return sum(op.observed for op in self.ops)

    @property
    def fraction(self) -> float:
        """``observed / total``; 1.0 for a model with no float compute op."""
        return self.observed / self.total if self.ops else 1.0

    @property
    def unobserved(self) -> tuple[OpCoverage, ...]:
        return tuple(op for op in self.ops if not op.observed)

    @property
    def shared(self) -> tuple[OpCoverage, ...]:
        """Observed ops whose module is called at several sites (one quantizer for all)."""
        return tuple(op for op in self.ops if op.shared)

    def summary(self) -> str:
        return (f"{self.model}: {self.observed} of {self.total} float compute ops observable by a "
                f"module-level quantizer ({self.fraction:.1%})")

    def table(self, unobserved_only: bool = False, tablefmt: str = "github") -> str:
        """The per-op table (op, location, source, observed, why)."""
        rows = [(op.op, op.location, op.source, "yes" if op.observed else "no", op.why)
                for op in self.ops if not (unobserved_only and op.observed)]
        return tabulate(rows, headers=["op", "location", "source", "observed", "why"], tablefmt=tablefmt)

    def as_dict(self) -> dict:
        return {"schema": "qprep.coverage/1", "model": self.model, "observed": self.observed, "total": self.total,
                "fraction": self.fraction, "ops": [op.as_dict() for op in self.ops], "notes": list(self.notes)}

    def __str__(self) -> str:
        return self.summary()


def coverage(model: nn.Module, example_inputs: Any, *, config: PrepareConfig | None = None) -> Coverage:
    """Count ``model``'s float compute ops and those a module-level quantizer can observe.

    Args:
        model: any ``nn.Module``, prepared by :func:`qprep.prepare` or not. Not modified.
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword
            arguments; the model runs once on them (in its current mode, without gradients).
        config: tracing options (``leaf_modules``, ``concrete_args``); untraceable submodules
            are always kept opaque and counted by running them (see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qprep.coverage() takes a torch.nn.Module, got {type(model).__name__}")
    args = as_positional(example_inputs, model)
    config = dataclasses.replace(config or PrepareConfig(), on_untraceable="leaf")
    name = type(model).__name__
    with untouched(model), torch.no_grad():
        try:
            # A GraphModule (qprep.prepare's output) is walked as it is: its nodes keep the
            # user's source lines; anything else is traced for the example inputs.
            gm, trace_notes = (model, []) if isinstance(model, torch.fx.GraphModule) else \
                tuple(trace_specialised(model, config, args)[0])
        except TraceError as exc:  # the root forward itself: count by running the whole model
            ops = _probe(model, "", type(model).__name__, _Call(model, args, {}), count_glue=True)[1]
            note = f"the root forward could not be traced ({str(exc).splitlines()[0]}); its ops were counted by running it"
            return Coverage(name, tuple(ops), (note,))
        walker = _GraphWalker(gm)
        walker.run(*args)
    notes = tuple(f"{n.module} ({n.module_type}) kept opaque: {n.reason}" for n in trace_notes)
    return Coverage(name, tuple(walker.ops), notes)


def coverage_lines(cov: Coverage, limit: int = 20) -> list[str]:
    """Lines for ``qprep check`` (text format): the summary, shared quantizers and the
    unobserved ops (at most ``limit``), each with its location and why."""
    lines = [f"coverage: {cov.observed} of {cov.total} float compute ops observable by a module-level "
             f"quantizer ({cov.fraction:.1%})"]
    if cov.shared:
        names = sorted({op.location for op in cov.shared})
        lines.append(f"  {len(cov.shared)} observed op(s) share one quantizer across call sites: {', '.join(names)}")
    missed = cov.unobserved
    if missed:
        lines.append(f"  unobserved ({len(missed)}):")
        for op in missed[:limit]:
            where = f"{op.source} " if op.source else ""
            lines.append(f"    {where}{op.location}: {op.op}: {op.why}")
        if len(missed) > limit:
            lines.append(f"    ... and {len(missed) - limit} more (qprep.coverage(model, inputs).table())")
    lines.extend(f"  note: {note}" for note in cov.notes)
    return lines


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Running ``model`` inside leaves its buffers (BatchNorm statistics) and the random
    streams as they were."""
    with preserved_state(model), forked_rng():
        yield


def _has_float(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    if isinstance(value, (list, tuple)):
        return any(_has_float(v) for v in value)
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if hasattr(value, "data") and isinstance(getattr(value, "data"), torch.Tensor):  # PackedSequence
        return _has_float(value.data)
    return False


def _short_name(target: Any) -> str:
    """``"add"`` for ``operator.add``, ``"view"`` for ``"view"``, ``"getitem"`` for ``__getitem__``."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    return name


def _op_text(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    if module in ("_operator", "operator"):
        module = "operator"
    elif module.startswith("torch._C") or module == "torch._VariableFunctions" or not module:
        module = "torch"
    elif module == "torch.nn.functional":
        module = "F"
    return f"{module}.{name}"


def _scope(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _is_leaf(module: nn.Module) -> bool:
    return next(iter(module.children()), None) is None


def _is_qprep_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("qprep.")


@dataclasses.dataclass
class _Call:
    module: nn.Module
    args: tuple
    kwargs: dict

    def __call__(self):
        return self.module(*self.args, **self.kwargs)


class _GraphWalker(torch.fx.Interpreter):
    """Runs the traced graph once and records one :class:`OpCoverage` per float compute op."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.ops: list[OpCoverage] = []
        sites = collections.Counter(id(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module")
        self._sites = sites

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_module":
            return self._module_node(n)
        result = super().run_node(n)
        if n.op in ("call_function", "call_method") and not moves_data(n.target) and _has_float(result):
            location = f"{_scope(n) or '<root>'} ({n.name})"
            self.ops.append(OpCoverage(_op_text(n), location, False, _WHY_TENSOR_OP, source_location(n)))
        return result

    def _module_node(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target)
        call = _Call(module, args, kwargs)
        source = source_location(n)
        if type(module) in FUSED_TWINS:
            result, ops = _fused(module, n.target, call)
        elif not _is_leaf(module):
            result, ops = _probe(module, n.target, type(module).__name__, call, count_glue=not _is_qprep_module(module))
        else:
            result = call()
            ops = []
            if not isinstance(module, DATA_MOVEMENT_MODULES) and _has_float(result):
                sites = self._sites[id(module)]
                why = _WHY_MODULE if sites == 1 else (
                    f"module called at {sites} sites: observed, but one quantizer collects all their statistics")
                ops.append(OpCoverage(type(module).__name__, n.target, True, why, shared=sites > 1))
        self.ops.extend(dataclasses.replace(op, source=op.source or source) for op in ops)
        return result


def _fused(module: nn.Module, name: str, call: _Call, result: Any = None) -> tuple[Any, list[OpCoverage]]:
    """The module's result (``call()`` unless given), and one op per gate module of its
    modular twin run on the same inputs (the last one, the module's output, observed)."""
    if result is None:
        result = call()
    kind = type(module).__name__
    try:
        twin = FUSED_TWINS[type(module)](module)
        twin.train(module.training)
        _, inner = _probe(twin, name, kind, _Call(twin, call.args, call.kwargs), count_glue=False)
    except Exception as exc:  # noqa: BLE001  (an unusual configuration: say so, count the output only)
        why = f"output of a fused {kind}; its internal ops were not counted ({type(exc).__name__}: {exc})"
        return result, [OpCoverage(kind, name, True, why)] if _has_float(result) else []
    output_op = f"{name}.{_OUTPUT_OP[type(module)]}" if type(module) in _OUTPUT_OP else inner[-1].location
    ops = []
    for op in inner:
        observed = op.location == output_op
        why = (f"the output of nn.{kind}: observable at the module call" if observed else
               f"computed inside nn.{kind}'s fused kernel: only the module's output is observable")
        ops.append(dataclasses.replace(op, observed=observed, why=why, shared=False))
    return result, ops


class _GlueCounter(TorchFunctionMode):
    """Records float tensor ops made while no leaf submodule is running."""

    def __init__(self, inside: list[int], record: Callable[[Any, Any], None]):
        super().__init__()
        self._inside = inside
        self._record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not self._inside[0] and not moves_data(func) and _has_float(result):
            self._record(func, result)
        return result


def _caller_source() -> str:
    """``file:line`` of the innermost frame outside torch and qprep's coverage."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename != __file__:
            return f"{os.path.relpath(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


def _probe(module: nn.Module, name: str, kind: str, call: _Call, count_glue: bool) -> tuple[Any, list[OpCoverage]]:
    """Run ``call`` with hooks on ``module``'s leaf (and fused) submodules; one op per
    distinct leaf submodule called (observed) and, with ``count_glue``, one per float tensor
    op made outside them (unobserved)."""
    inside = [0]  # > 0 while a leaf or fused submodule runs
    seen: set[int] = set()
    ops: list[OpCoverage] = []
    prefix = f"{name}." if name else ""
    where = name or "<root>"

    def pre(_module, _args):
        inside[0] += 1

    def post(sub_name: str):
        def hook(sub, args, kwargs, output):
            try:
                if id(sub) in seen or isinstance(sub, DATA_MOVEMENT_MODULES) or not _has_float(output):
                    return
                seen.add(id(sub))
                if type(sub) in FUSED_TWINS:
                    ops.extend(_fused(sub, prefix + sub_name, _Call(sub, args, kwargs), output)[1])
                else:
                    why = f"output of a module call inside {kind} '{where}'"
                    ops.append(OpCoverage(type(sub).__name__, prefix + sub_name, True, why))
            finally:
                inside[0] -= 1
        return hook

    def record(func, _result):
        why = f"tensor op inside {kind} '{where}', not a module call: no module-level quantizer sees its output"
        ops.append(OpCoverage(_short_name(func), where, False, why, _caller_source()))

    handles = []
    try:
        for sub_name, sub in module.named_modules():
            if sub is module or not (_is_leaf(sub) or type(sub) in FUSED_TWINS):
                continue
            handles.append(sub.register_forward_pre_hook(pre))
            handles.append(sub.register_forward_hook(post(sub_name), with_kwargs=True, always_call=True))
        with _GlueCounter(inside, record) if count_glue else contextlib.nullcontext():
            result = call()
    finally:
        for handle in handles:
            handle.remove()
    return result, ops
