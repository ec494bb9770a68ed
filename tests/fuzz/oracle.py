"""Run one generated program through qprep and classify what happens.

Verdicts:

* ``equal``: prepared, and bitwise equal to the original (``qprep.verify`` and an
  independent ``torch.equal`` run that also compares output container types) on the example
  inputs and on fresh inputs of the same shape, in eval and in train mode; also at another
  batch size where the original runs at it (there a ``qprep.GuardError``, where qprep has
  that class, is accepted: ``guarded``).
* ``refused``: ``prepare`` raised a ``qprep.QprepError`` whose message names a line of the
  program's source file. ``expected`` says whether the line is one the generator marked as
  untraceable today.
* ``failure``: anything else: a mismatch, an exception that is not a ``QprepError``, a
  ``QprepError`` naming no line of the program, a prepared model that crashes, another
  output container type, a user model changed by ``prepare``.
* ``invalid``: the original model itself fails on its inputs: a bug in the generator.

An ``equal`` outcome may carry *signatures*: departures that are not wrong numbers and
that the fuzz test accepts only while their finding is listed as known:

* ``kernel_bound``: bitwise equal on the unfused kernels, but the fused ones (oneDNN RNNs,
  the attention fast path) differ at the outputs by more than qprep's documented bound
  (where they differ on non-finite values, NaN against numbers, no bound holds and
  ``prepare`` refuses: the outcome is ``refused``);
* ``state_dict_order``: the prepared model's ``state_dict`` has the original's keys in
  another order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch

import qprep
from tests.fuzz.generator import Program

native_kernels = importlib.import_module("qprep.verify").native_kernels  # the module, not the function
#: what preparation makes of a fused kernel (oneDNN RNNs, the attention fast path, SDPA)
_MODULAR = (qprep.modules.ModularLSTM, qprep.modules.ModularGRU, qprep.modules.ModularRNN,
            qprep.modules.ModularLSTMCell, qprep.modules.ModularGRUCell, qprep.modules.ModularRNNCell,
            qprep.modules.ModularMultiheadAttention, qprep.modules.ScaledDotProductAttention)

__all__ = ["Outcome", "check", "minimize", "guard_error_class", "same_structure"]

EQUAL, REFUSED, FAILURE, INVALID = "equal", "refused", "failure", "invalid"


@dataclasses.dataclass
class Outcome:
    verdict: str
    stage: str = ""
    detail: str = ""
    expected: bool = True  # refused: the named line is one the generator marked untraceable
    guarded: bool = False  # a GuardError at the other batch size
    new_batch_checked: bool = False
    grad_checked: bool = False
    signatures: dict[str, str] = dataclasses.field(default_factory=dict)  # see the module docstring

    @property
    def label(self) -> str:
        if self.verdict == REFUSED:
            return "refused" if self.expected else "refused (unexpected line)"
        if self.verdict == EQUAL and self.signatures:
            return "equal, with " + " and ".join(sorted(self.signatures))
        if self.verdict == EQUAL and self.guarded:
            return "equal (guarded at new batch)"
        return self.verdict

    def merge(self, other: Outcome | None) -> Outcome | None:
        """Fold an ``equal`` stage result into this outcome; return ``other`` if it is final."""
        if other is None:
            return None
        if other.verdict != EQUAL:
            return other
        self.guarded |= other.guarded
        for key, value in other.signatures.items():
            self.signatures.setdefault(key, value)
        return None


def guard_error_class() -> type | None:
    """``qprep.GuardError`` where qprep has it (a value-aware tracer's guard failed)."""
    return getattr(qprep, "GuardError", None) or getattr(getattr(qprep, "errors", None), "GuardError", None)


def named_line(message: str, path: Path, n_lines: int) -> int | None:
    """The line of ``path`` that ``message`` names as ``<file>:<line>``, if any."""
    for match in re.finditer(re.escape(path.name) + r"\"?(?::|, line )(\d+)", message):
        line = int(match.group(1))
        if 1 <= line <= n_lines:
            return line
    return None


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _run(model: torch.nn.Module, args: tuple, train: bool, seed: int = 0, grad: bool = False,
         state: dict | None = None) -> Any:
    """One seeded run in the given mode; the model's buffers and mode are restored. With
    ``grad``, also backward from the sum of the outputs (as ``qprep.verify(grad=True)``);
    ``state`` (a dict) receives the ``state_dict`` as the run left it."""
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items()
               if b is not None]  # a forward may re-bind a buffer (self.ema = ...): restore the binding too
    modes = {m: m.training for m in model.modules()}
    try:
        model.train(train)
        with torch.random.fork_rng(), torch.set_grad_enabled(grad):
            torch.manual_seed(seed)
            args = _clone(args)
            if not grad:
                out = model(*args)
                if state is not None:
                    state.update((k, v.detach().clone()) for k, v in model.state_dict().items())
                return out
            leaves = [a.requires_grad_() for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            out = model(*(a.clone() if any(a is leaf for leaf in leaves) else a for a in args))
            tensors = [t for t in _leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                params = [p for p in model.parameters() if p.requires_grad]
                torch.autograd.grad(sum(t.double().sum() for t in tensors), leaves + params, allow_unused=True)
            return out
    finally:
        with torch.no_grad():
            for m, name, b, saved in buffers:
                m._buffers[name] = b
                b.copy_(saved)
                if b.grad_fn is not None and b._base is None:
                    b.detach_()  # a forward that updates a buffer from inputs that required grad
        for m, mode in modes.items():
            m.training = mode


def same_structure(a: Any, b: Any) -> str | None:
    """Where the output containers of ``a`` and ``b`` differ in type, keys or length (None: same)."""
    if type(a) is not type(b):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"dict keys {list(a)} vs {list(b)}"
        return next((d for d in (same_structure(a[k], b[k]) for k in a) if d), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"length {len(a)} vs {len(b)}"
        return next((d for d in (same_structure(x, y) for x, y in zip(a, b)) if d), None)
    return None


def _leaves(value: Any) -> list:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _bitwise(a: Any, b: Any) -> bool:
    for x, y in zip(_leaves(a), _leaves(b)):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                return False
            if not (torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                          and torch.equal(x.nan_to_num(), y.nan_to_num()))):
                return False
        elif x != y:
            return False
    return True


def _state(model: torch.nn.Module) -> tuple:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: m.training for name, m in model.named_modules()})


def _state_changed(model: torch.nn.Module, before: tuple) -> str | None:
    try:
        tensors, modes = _state(model)
    except Exception as exc:  # noqa: BLE001  (a buffer replaced by something that is not a tensor)
        return f"its state can no longer be read: {type(exc).__name__}: {exc}"
    if list(tensors) != list(before[0]):
        return "state_dict keys changed"
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor) or not torch.equal(v, before[0][k]):
            return f"state_dict entry {k!r} changed"
    if modes != before[1]:
        return "training flags changed"
    return None


def _compare(original, prepared, inputs, train: bool, stage: str, guard: type | None) -> Outcome | None:
    """None when equal; an Outcome otherwise: a failure, or an equal one that is guarded or
    exceeds the fused-kernel bound."""
    try:
        result = qprep.verify(original, prepared, inputs, train=train)
    except Exception as exc:  # noqa: BLE001  (classified below)
        if guard is not None and isinstance(exc, guard):
            return Outcome(EQUAL, stage, f"GuardError: {exc}", guarded=True)
        kind = "qprep error" if isinstance(exc, qprep.QprepError) else "crash"
        return Outcome(FAILURE, stage, f"{kind} while verifying: {type(exc).__name__}: {exc}")
    notes = Outcome(EQUAL, stage)
    if not result.equal:
        if result.kernel_diff is None:
            return Outcome(FAILURE, stage, "MISMATCH (qprep.verify):\n" + result.table())
        if math.isinf(result.kernel_diff):  # bitwise the unfused kernel, which gives NaN where the fused one
            # gives numbers (CPU flash attention turns a query row with NaN into zeros): no bound
            # holds, so prepare(check=True) refuses the model; a refusal, not a wrong number
            return Outcome(REFUSED, stage, "NotEquivalentError: the fused kernel treats non-finite values unlike "
                                           "the unfused one\n" + result.table())
        # equal on the unfused kernels (verify checked), over the bound on the fused ones
        notes.signatures["kernel_bound"] = f"{stage}:\n{result.table()}"
    # verify compares models with fused kernels (oneDNN RNNs, the attention fast path) on
    # the unfused ones, where they must be bitwise equal: so does the independent run.
    # So does a model whose fused kernel only feeds the state a run leaves (a buffer that
    # stores an SDPA output): verify compares outputs, which are then equal on either kernel.
    fused = result.reference != "default kernels" or any(isinstance(m, _MODULAR) for m in prepared.modules())
    kernels = native_kernels() if fused else contextlib.nullcontext()
    state_a: dict = {}
    state_b: dict = {}
    try:
        with kernels:
            out_a, out_b = _run(original, inputs, train, state=state_a), _run(prepared, inputs, train, state=state_b)
    except Exception as exc:  # noqa: BLE001
        return Outcome(FAILURE, stage, f"crash on a second run: {type(exc).__name__}: {exc}")
    diff = same_structure(out_a, out_b)
    if diff:
        return Outcome(FAILURE, stage, f"output containers differ: {diff}")
    if not _bitwise(out_a, out_b):
        return Outcome(FAILURE, stage, "MISMATCH on an independent run although qprep.verify said equal")
    if set(state_a) != set(state_b):
        return Outcome(FAILURE, stage, f"state_dict keys differ: only the original has {sorted(set(state_a) - set(state_b))}, "
                                       f"only the prepared model has {sorted(set(state_b) - set(state_a))}")
    if list(state_a) != list(state_b):
        notes.signatures["state_dict_order"] = f"{stage}: {list(state_a)} vs {list(state_b)}"
    changed = [k for k in state_a if not _bitwise(state_a[k], state_b[k])]
    if changed:
        return Outcome(FAILURE, stage, f"MISMATCH in the state a run leaves (buffers): {changed}")
    return notes if notes.signatures else None


def _compare_grads(original, prepared, inputs, train: bool) -> tuple[Outcome | None, bool]:
    """Gradients w.r.t. inputs and parameters, bitwise (``qprep.verify(grad=True)``), where
    the original model supports a backward pass (in-place ops may forbid it). Returns a
    failure or None, and whether gradients were compared."""
    stage = f"gradients, {'train' if train else 'eval'} mode"
    try:
        _run(original, inputs, train, grad=True)
    except Exception:  # noqa: BLE001  (the program itself does not support backward)
        return None, False
    try:
        result = qprep.verify(original, prepared, inputs, train=train, grad=True)
    except Exception as exc:  # noqa: BLE001
        return Outcome(FAILURE, stage, f"crash while verifying gradients: {type(exc).__name__}: {exc}"), True
    if not result.equal and result.kernel_diff is None:
        return Outcome(FAILURE, stage, "MISMATCH (qprep.verify, grad=True):\n" + result.table()), True
    if not result.equal:  # gradients bitwise on the unfused kernels; outputs over the bound on the fused ones
        return Outcome(EQUAL, stage, signatures={"kernel_bound": f"{stage}:\n{result.table()}"}), True
    return None, True


def check(program: Program, directory: Path | str, *, new_batch: bool = True,
          prepare: Callable[..., Any] | None = None) -> Outcome:
    """Prepare ``program``'s model and classify the result (see the module docstring).
    ``prepare`` (default ``qprep.prepare``) is replaceable so tests can check the oracle."""
    prepare = prepare or qprep.prepare
    source, untraceable = program.render()
    n_lines = source.count("\n")
    try:
        model = program.load(directory)
    except Exception as exc:  # noqa: BLE001
        return Outcome(INVALID, "import", f"{type(exc).__name__}: {exc}")
    path = Path(directory) / f"{program.name}.py"
    args = program.make_inputs()
    try:
        for train in (False, True):
            _run(model, args, train)
    except Exception as exc:  # noqa: BLE001
        return Outcome(INVALID, "eager", f"{type(exc).__name__}: {exc}")

    before = _state(model)
    try:
        gm = prepare(model, args, check=False, **dict(program.options))
    except qprep.QprepError as exc:
        line = named_line(str(exc), path, n_lines)
        if line is None:
            return Outcome(FAILURE, "prepare", f"{type(exc).__name__} names no line of the program: {exc}")
        return Outcome(REFUSED, "prepare", f"{type(exc).__name__} at line {line}: {str(exc).splitlines()[0]}",
                       expected=line in untraceable)
    except Exception as exc:  # noqa: BLE001
        return Outcome(FAILURE, "prepare", f"not a QprepError: {type(exc).__name__}: {exc}")
    changed = _state_changed(model, before)
    if changed:
        return Outcome(FAILURE, "prepare", f"prepare() modified the user's model: {changed}")

    guard = guard_error_class()
    outcome = Outcome(EQUAL)
    for label, inputs in (("example inputs", args), ("fresh inputs", program.make_inputs(seed=1))):
        for train in (False, True):
            final = outcome.merge(_compare(model, gm, inputs, train, f"{label}, {'train' if train else 'eval'} mode", None))
            if final is not None:
                return final
    grads, outcome.grad_checked = _compare_grads(model, gm, args, program.training)
    final = outcome.merge(grads)
    if final is not None:
        return final
    if new_batch:
        batch = program.batch + 3
        inputs = program.make_inputs(batch=batch, seed=2)
        try:
            for train in (False, True):
                _run(model, inputs, train)
        except Exception:  # noqa: BLE001  (the program itself does not allow another batch size)
            return outcome
        outcome.new_batch_checked = True
        for train in (False, True):
            final = outcome.merge(_compare(model, gm, inputs, train, f"batch {batch}, {'train' if train else 'eval'} mode",
                                           guard))
            if final is not None:
                return final
            if outcome.guarded:
                break
    return outcome


def _output_names(program: Program) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\b(t\d+|x|y)\b", program.output)))


def minimize(program: Program, directory: Path | str, still_fails: Callable[[Outcome], bool],
             **check_options: Any) -> Program:
    """The smallest program (by removing statements and simplifying the output) for which
    ``still_fails(check(...))`` holds. Greedy; every candidate is checked for real."""

    def fails(candidate: Program) -> bool:
        outcome = check(candidate, directory, **check_options)
        return outcome.verdict != INVALID and still_fails(outcome)

    best = program
    for name in _output_names(best):
        candidate = dataclasses.replace(best, output=name, output_features=frozenset(), namedtuple_fields=())
        if fails(candidate):
            best = candidate
            break
    changed = True
    while changed:
        changed = False
        for i in reversed(range(len(best.body))):
            candidate = best.without(i)
            if fails(candidate):
                best, changed = candidate, True
    return best
