"""Modular, bit-exact LSTM, GRU and RNN: every gate op is a named submodule.

``nn.LSTM`` computes its gates inside one ATen (or oneDNN) call, so a module-level quantizer
cannot see them. The modules here compute the same thing with every gate op a submodule,
structured cell -> layer -> stack like ``torch.ao.nn.quantizable.LSTM``, but complete:

* a **cell** (:mod:`qprep.modules.rnn_cells`, re-exported here) holds the ops of one time
  step and is a drop-in for ``nn.LSTMCell``, ``nn.GRUCell`` or ``nn.RNNCell``; its module
  docstring spells out the gate ops.
* a **layer** (:class:`ModularRecurrentLayer`) runs one cell over time in one direction,
  padded or packed; the same cell modules are called at every step.
* a **stack** (:class:`ModularLSTM`, :class:`ModularGRU`, :class:`ModularRNN`) holds the
  ``num_layers x num_directions`` layers (``layers[layer * num_directions + direction]``),
  the ``layer_dropout`` between layers and the time loop, with the torch module's call
  signature, return structure, ``parameters()`` order and ``state_dict()`` keys.

``from_float`` takes over the original Parameter objects (no copies) and ``to_float`` hands
them to a new ``torch.nn`` module.

Numerics. On CPU, outputs and gradients are bitwise equal (``torch.equal``) to ATen's
native kernels, which ``nn.GRU``, ``nn.RNN`` and the cells always use, and ``nn.LSTM`` uses
under ``torch.backends.mkldnn.flags(enabled=False)`` or with ``proj_size > 0``. The ops and
their order mirror ``aten/src/ATen/native/RNN.cpp``: one ``input_linear`` call projects a
whole sequence, each step adds ``hidden_linear(h)`` to its slice, and every sigmoid and tanh
reads a tensor laid out as in ATen (their vectorized and scalar paths can differ in the
last bit, so layout matters): the GRU adds its reset and update pre-activations in one
call and splits them afterwards, as ATen's in-place adds on chunks leave them.

``ModularLSTM`` is not bit-exact to ``nn.LSTM``'s default CPU kernel, oneDNN's fused LSTM.
Largest absolute difference over outputs and final states (float32, inputs ~N(0, 1),
torch 2.14.1, measured by ``benchmarks/bench_rnn.py``): 3.9e-7 over T in {5, 32},
B in {1, 4}, (input, hidden) in {(16, 16), (32, 64), (128, 128)}, 1 layer or 2
bidirectional; 4.2e-7 for T=32, B=8, I=H=128 and 5.4e-7 for T=64, B=16, I=H=256, 2 layers
(in ``c_n``). The tests assert it stays under :data:`ONEDNN_LSTM_ATOL` = 1e-6.

Speed. The layers project a whole sequence with one ``input_linear`` call, then, while no
hook, trace or compiler could tell, call the op each gate module makes (``torch.sigmoid``,
``operator.mul``, ``F.linear`` with the module's weight) instead of the module, skipping
``nn.Module.__call__`` (see :func:`_direct_calls`). With a hook on any gate op, a global
hook, fx/jit tracing, dynamo or export, every call goes through ``__call__``; a gate op
replaced by another module, or a patched ``forward``, is called as such. Where, besides, every
gate op is the module it was built with (:func:`_as_built`) and no gradient is recorded, an
LSTM step is ATen's own (:func:`_lstm_step`, in place where ATen is), and a GRU or RNN stack
calls ATen's native kernel itself (:meth:`_ModularStack._native_kernel`); both are the same bits.
The remaining cost of an LSTM over ATen's native kernel is that of calling its small ops per
step from Python (``benchmarks/bench_rnn.py``).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ..core._compat import NATIVE_RNN, has_call_hooks, plain_calls_allowed
from ..core.aliases import hide_aliases
from .base import TensorOp
from .rnn_cells import ModularGRUCell, ModularLSTMCell, ModularRNNCell, _check_not_parametrized, _describe, _ModularCell
from .rnn_cells import _cell_call_args, _cell_result  # noqa: F401  (fx-wrapped cell helpers, importable from here)

__all__ = [
    "ModularLSTMCell", "ModularGRUCell", "ModularRNNCell", "ModularRecurrentLayer",
    "ModularLSTM", "ModularGRU", "ModularRNN", "ONEDNN_LSTM_ATOL", "CUDA_RNN_ATOL",
]

#: bound on ``|ModularLSTM - nn.LSTM|`` against the default oneDNN kernel (float32, CPU).
ONEDNN_LSTM_ATOL = 1e-6
#: bound on the modular stacks and cells against CUDA's kernels (cuDNN, or ATen's fused cells),
#: relative to the outputs' magnitude (float32; half and bfloat16 scaled as TF32's resolution
#: to theirs). Measured on an H200 (torch 2.11, cuDNN, 4 configurations up to T=64, H=256,
#: bidirectional): cuDNN 8.3e-4 (nn.RNN; GRU 3.5e-4, LSTM 1.1e-4) with TF32 allowed or not,
#: half 1.2e-3, bfloat16 1.2e-2; ATen's CUDA kernels (cuDNN off) 1.2e-6; the cells 6e-8.
CUDA_RNN_ATOL = 3e-3


# ----------------------------------------------------------------------------- layer
def _unobserved(module: nn.Module) -> bool:
    """Whether calling ``module.forward`` is indistinguishable from calling ``module``:
    nothing hooks into its ``__call__`` and its class keeps ``nn.Module``'s (or
    :class:`TensorOp`'s, which only skips frames) ``__call__``."""
    return not has_call_hooks(module) and type(module).__call__ in _PLAIN_CALLS


_PLAIN_CALLS = (nn.Module.__call__, TensorOp.__call__)


def _as_is(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` is a plain ``cls`` (not a subclass), unobserved, its ``forward`` its
    class's, and its class's methods those it was imported with (see :data:`_METHODS`)."""
    return type(module) is cls and _unobserved(module) and "forward" not in module.__dict__ and _kept(cls)


def _methods(cls: type) -> tuple:
    return getattr(cls, "forward", None), getattr(cls, "step", None)


def _kept(cls: type) -> bool:
    """Whether ``cls``'s methods are those it was imported with (:data:`_METHODS`)."""
    return _METHODS.get(cls, _methods(cls)) == _methods(cls)


#: The methods of every class a fast path stands in for (the stacks, layers, cells and the
#: cells' ops), as imported: a class whose ``forward`` (or a cell's ``step``) was replaced
#: since, for every instance (a quantizer patching ``nn.Sigmoid.forward``), runs its modules.
_METHODS: dict[type, tuple] = {}


def _aten_exact(t: Tensor) -> bool:
    """Whether ``t`` is a float32 or float64 CPU tensor: where the modules' ops are proven ATen's bits."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


#: module types whose ``forward`` is exactly ``fn(input)``.
_UNARY_FORWARD = {nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh}


def _linear(module: nn.Linear):
    weight, bias = module.weight, module.bias

    def linear(input):
        return F.linear(input, weight, bias)
    return linear


def _plain_forward(module: nn.Module):
    """What ``module.forward(*inputs)`` calls, bound to the module's current state: the op
    itself for a gate op whose class ``forward`` is known (``nn.Sigmoid`` -> ``torch.sigmoid``,
    a wrapper -> ``operator.add``, ``nn.Linear`` -> ``F.linear`` with its weight); else the
    bound ``forward``. Same call, same arguments, fewer Python frames."""
    cls = type(module)
    if "forward" in module.__dict__ or not _kept(cls):  # a forward patched by a tool
        return module.forward
    if cls in _UNARY_FORWARD:
        return _UNARY_FORWARD[cls]
    if cls is nn.Linear:
        return _linear(module)
    if isinstance(module, TensorOp) and cls.forward is TensorOp.forward and not module.kwargs and module._run is not None:
        return module._run
    return module.forward


def _direct_calls(cell: nn.Module):
    """The cell's ops for one sequence: plain callables (:func:`_plain_forward`) where that
    is unobservable, else the cell itself, whose ops are then called as modules.

    A step makes ~12 module calls; ``nn.Module.__call__`` and the ops' ``forward`` frames
    would cost more Python time than the small ops themselves. Any hook (on a gate op or
    global), jit or fx tracing, dynamo or export turns this off, so observers and fake-quant
    hooks see every call. The callables are built per sequence: a module replaced
    (``cell.input_gate = ...``), hooked or given new weights between calls is seen by the
    next call. (Within a sequence nothing can change them: no user code runs there.)
    """
    if not plain_calls_allowed():
        return cell
    children = {name: m for name, m in cell._modules.items() if m is not None}
    if not all(_unobserved(m) for m in children.values()):
        return cell
    return SimpleNamespace(**{name: _plain_forward(m) for name, m in children.items()})


_REFERENCE_OPS: dict[tuple, dict[str, nn.Module]] = {}
#: what a gate op's configuration is (TensorOp wrappers; nn.ReLU's ``inplace``)
_OP_STATE = ("call", "args", "kwargs", "inplace")


def _reference_ops(cell: _ModularCell) -> dict[str, nn.Module]:
    """The gate ops a new cell of ``cell``'s class and configuration has."""
    key = (type(cell), cell.bias, getattr(cell, "nonlinearity", None))
    if key not in _REFERENCE_OPS:
        config = {"nonlinearity": cell.nonlinearity} if hasattr(cell, "nonlinearity") else {}
        fresh = type(cell)(1, 1, cell.bias, device="meta", **config)
        _REFERENCE_OPS[key] = dict(fresh._modules)
    return _REFERENCE_OPS[key]


def _as_built(cell: _ModularCell) -> bool:
    """Whether ``cell`` computes exactly what ATen's cell does: every op is the module it was
    built with (same class and configuration, no patched ``forward``, no hook), and its
    ``step`` is its class's. (Global hooks and tracing: :func:`plain_calls_allowed`.)"""
    if "step" in cell.__dict__ or not _as_is(cell, type(cell)):
        return False
    reference = _reference_ops(cell)
    if cell._modules.keys() != reference.keys():  # noqa: SLF001
        return False
    for name, op in cell._modules.items():  # noqa: SLF001
        like = reference[name]
        if not _as_is(op, type(like)):
            return False
        state, built = op.__dict__, like.__dict__
        if any(state.get(attr) != built.get(attr) for attr in _OP_STATE):
            return False
        if isinstance(like, nn.Linear) and (op.bias is None) != (like.bias is None):
            return False
    return True


def _lstm_step(weight: Tensor, bias: Tensor | None, input_gates: Tensor, state: tuple, ops=None) -> tuple:
    """One LSTM step as ATen's native ``LSTMCell`` computes it, in place where it is, which
    :meth:`ModularLSTMCell.step` reproduces bitwise op by op."""
    h, c = state
    gates = F.linear(h, weight, bias).add_(input_gates)
    i, f, g, o = gates.unsafe_chunk(4, 1)
    i, f, g, o = i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
    c = (f * c).add_(i * g)
    return o * c.tanh(), c


def _stepper(cell: _ModularCell, input_gates: Tensor, state: tuple) -> tuple:
    """``(step, ops)`` for one sequence: the cell's ``step`` and its ops (:func:`_direct_calls`);
    for an LSTM cell whose ops are all as built and unobserved (:func:`_as_built`), without
    projection, where no gradient is recorded, on float32 or float64 CPU tensors (where the
    modules' out-of-place ops are proven ATen's bits), ATen's own step (:func:`_lstm_step`):
    the same bits with half the Python calls."""
    if type(cell) is ModularLSTMCell and cell.proj_size == 0 and _aten_exact(input_gates) and plain_calls_allowed() \
            and _as_built(cell):
        linear = cell.hidden_linear
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input_gates, *state, linear.weight, linear.bias))
        if not grad:
            return functools.partial(_lstm_step, linear.weight, linear.bias), None
    return cell.step, _direct_calls(cell)


class ModularRecurrentLayer(nn.Module):
    """One direction of one layer: runs ``cell`` over a sequence, as ATen's CPU layers do.

    ``forward(input, state, batch_sizes=None) -> (output, final state)``: ``input`` is a
    time-major ``(T, B, I)`` tensor, or the data of a PackedSequence with its ``batch_sizes``
    as a list of ints; ``state`` is the cell's state tuple (``(h, c)`` or ``(h,)``).
    """

    def __init__(self, cell: _ModularCell, reverse: bool = False):
        super().__init__()
        self.cell = cell
        self.reverse = reverse

    def forward(self, input: Tensor, state: tuple, batch_sizes: list[int] | None = None):
        input_gates = self.cell.input_linear(input)
        stepper = _stepper(self.cell, input_gates, state)
        if batch_sizes is None:
            return self._scan(input_gates.unbind(0), state, stepper)
        if self.reverse:
            return self._scan_packed_reversed(input_gates, state, batch_sizes, stepper)
        return self._scan_packed(input_gates, state, batch_sizes, stepper)

    def _scan(self, steps: tuple, state: tuple, stepper: tuple):
        (step, ops), outputs = stepper, []
        for input_gates in (reversed(steps) if self.reverse else steps):
            state = step(input_gates, state, ops)
            outputs.append(state[0])
        if self.reverse:
            outputs.reverse()
        return torch.stack(outputs, 0), state

    def _scan_packed(self, input_gates: Tensor, state: tuple, batch_sizes: list[int], stepper: tuple):
        """ATen's ``PackedLayer``: finished sequences drop out of the state as the batch shrinks."""
        (step, ops), outputs, finished = stepper, [], []
        offset, last = 0, batch_sizes[0]
        for size in batch_sizes:
            step_gates = input_gates.narrow(0, offset, size)
            offset += size
            if size < last:
                finished.append(tuple(s.narrow(0, size, last - size) for s in state))
                state = tuple(s.narrow(0, 0, size) for s in state)
            last = size
            state = step(step_gates, state, ops)
            outputs.append(state[0])
        finished.append(state)
        finished.reverse()
        return torch.cat(outputs, 0), tuple(torch.cat(parts, 0) for parts in zip(*finished))

    def _scan_packed_reversed(self, input_gates: Tensor, initial: tuple, batch_sizes: list[int], stepper: tuple):
        """ATen's ``ReversedPackedLayer``: sequences join the state as the batch grows."""
        (step, ops), outputs = stepper, []
        offset, last = input_gates.size(0), batch_sizes[-1]
        state = tuple(s.narrow(0, 0, last) for s in initial)
        for size in reversed(batch_sizes):
            if size > last:
                joining = tuple(s.narrow(0, last, size - last) for s in initial)
                state = tuple(torch.cat([s, j], 0) for s, j in zip(state, joining))
            offset -= size
            last = size
            state = step(input_gates.narrow(0, offset, size), state, ops)
            outputs.append(state[0])
        outputs.reverse()
        return torch.cat(outputs, 0), state

    def extra_repr(self) -> str:
        return "reverse=True" if self.reverse else ""



# ----------------------------------------------------------------------------- stacks
def _param_names(layer: int, reverse: bool, bias: bool, proj: bool) -> dict[str, str]:
    """Cell parameter name -> the torch stack's name (``weight_ih`` -> ``weight_ih_l0_reverse``)."""
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else []) + (["weight_hr"] if proj else [])
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    return {name: name + suffix for name in names}


class _ModularStack(nn.Module):
    """Layers x directions of modular cells, with ``nn.RNNBase``'s call and parameter names."""

    _float_cls: ClassVar[type[nn.RNNBase]]
    _cell_cls: ClassVar[type[_ModularCell]]
    _config_attrs: ClassVar[tuple[str, ...]] = (
        "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")

    def __init__(self, module: nn.RNNBase):
        super().__init__()
        for attr in self._config_attrs:
            setattr(self, attr, getattr(module, attr))
        directions = 2 if self.bidirectional else 1
        layers, aliases = [], {}
        for index in range(self.num_layers * directions):
            layer, direction = divmod(index, directions)
            names = _param_names(layer, direction == 1, self.bias, bool(getattr(self, "proj_size", 0)))
            for cell_name, name in names.items():
                self.register_parameter(name, getattr(module, name))
                aliases[f"layers.{index}.cell.{cell_name}"] = name
            cell = self._cell_cls._from_params({c: getattr(self, n) for c, n in names.items()}, **self._cell_config())
            layers.append(ModularRecurrentLayer(cell, reverse=direction == 1))
        self.layers = nn.ModuleList(layers)
        self.layer_dropout = nn.Dropout(self.dropout)
        hide_aliases(self, aliases)
        self.train(module.training)

    @classmethod
    def from_float(cls, module: nn.RNNBase):
        """The modular stack holding ``module``'s own Parameter objects."""
        if type(module) is not cls._float_cls:
            raise TypeError(f"{cls.__name__}.from_float expects an nn.{cls._float_cls.__name__}, got {type(module).__name__}")
        _check_not_parametrized(module)
        stack = cls.__new__(cls)
        _ModularStack.__init__(stack, module)
        return stack

    def to_float(self) -> nn.RNNBase:
        """The ``torch.nn`` module holding this stack's Parameter objects."""
        module = self._float_cls(**{attr: getattr(self, attr) for attr in self._config_attrs}, device="meta")
        for name, param in self.named_parameters(recurse=False):
            setattr(module, name, param)
        return module.train(self.training)

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``nn.LSTM`` (there is no cuDNN weight buffer here)."""

    def _cell_config(self) -> dict:
        return {}

    # -- state conversion: the user's hx <-> a tuple of tensors (``(h, c)`` or ``(h,)``).
    def _state_sizes(self) -> tuple:
        return (self.hidden_size,)

    def _user_state(self, hx) -> tuple | None:
        if hx is None or isinstance(hx, Tensor):
            return hx if hx is None else (hx,)
        raise TypeError(f"{type(self).__name__}: expected hx to be a tensor or None, got {type(hx).__name__}")

    def _user_result(self, state: tuple):
        return state[0]

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        name = type(self).__name__
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            raise ValueError(f"{name}: expected input to be a 2-D or 3-D tensor, got {_describe(input)}")
        state, batched, batch_dim = self._user_state(hx), input.dim() == 3, 0 if self.batch_first else 1
        if state is not None and any(s.dim() != input.dim() for s in state):
            raise ValueError(f"{name}: for {input.dim()}-D input, hx should be {input.dim()}-D, got {[s.dim() for s in state]}-D")
        if not batched:
            input = input.unsqueeze(batch_dim)
            state = None if state is None else tuple(s.unsqueeze(1) for s in state)
        if self.batch_first:
            input = input.transpose(0, 1)
        output, state = self._run(input, self._initial_state(state, input, input.size(1)), None)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output, state = output.squeeze(batch_dim), tuple(s.squeeze(1) for s in state)
        return output, self._user_result(state)

    def _forward_packed(self, input: PackedSequence, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        state = self._user_state(hx)
        if state is not None and sorted_indices is not None:
            state = tuple(s.index_select(1, sorted_indices) for s in state)
        state = self._initial_state(state, data, int(batch_sizes[0]), packed=True)
        output, state = self._run(data, state, batch_sizes.tolist())
        if unsorted_indices is not None:
            state = tuple(s.index_select(1, unsorted_indices) for s in state)
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self._user_result(state)

    def _initial_state(self, state: tuple | None, input: Tensor, batch: int, packed: bool = False) -> tuple:
        """Checks the input and the state (zeros when absent), as ``check_forward_args`` does."""
        name, weight = type(self).__name__, self.weight_ih_l0
        if input.dim() != (2 if packed else 3) or input.size(-1) != self.input_size:
            raise ValueError(f"{name}: expected input of size (..., {self.input_size}), got {tuple(input.shape)}")
        if input.dtype != weight.dtype:
            raise ValueError(f"{name}: input dtype ({input.dtype}) does not match weight dtype ({weight.dtype})")
        expected = [(self.num_layers * (2 if self.bidirectional else 1), batch, size) for size in self._state_sizes()]
        if state is None:
            return tuple(input.new_zeros(shape) for shape in expected)
        for index, (s, shape) in enumerate(zip(state, expected)):
            if tuple(s.shape) != shape:
                raise ValueError(f"{name}: expected hidden[{index}] of size {shape}, got {tuple(s.shape)}")
        return state

    def _run(self, input: Tensor, state: tuple, batch_sizes: list[int] | None):
        """ATen's ``apply_layer_stack``: layers in order, directions concatenated, dropout between."""
        kernel = self._native_kernel(input)
        if kernel is not None:
            return self._run_native(kernel, input, state, batch_sizes)
        states = list(zip(*(s.unbind(0) for s in state)))
        directions, finals = 2 if self.bidirectional else 1, []
        for layer in range(self.num_layers):
            outputs = []
            for index in range(layer * directions, (layer + 1) * directions):
                output, final = self.layers[index](input, states[index], batch_sizes)
                outputs.append(output)
                finals.append(final)
            input = torch.cat(outputs, -1) if directions == 2 else outputs[0]
            if layer < self.num_layers - 1:
                input = self.layer_dropout(input)
        return input, tuple(torch.stack(parts, 0) for parts in zip(*finals))

    # -- ATen's own kernel, where nothing could tell ------------------------------------
    def _native(self):
        """ATen's native kernel for this stack (never oneDNN's), where it is bitwise what the
        modules compute; ``None`` where it is not (an LSTM: ``nn.LSTM`` calls oneDNN's)."""
        return None

    def _native_kernel(self, input: Tensor):
        """The native kernel, where calling it is indistinguishable from calling the modules:
        every layer, cell and gate op as built and unobserved (no hook of any kind, none
        replaced, no patched ``forward``, no global hook, no tracing or compiling), on the CPU,
        float32 or float64, and no dropout to draw between layers. Anything else, and the
        modules are called, so a quantizer's observers see every op."""
        kernel = self._native()
        if kernel is None or not _aten_exact(input) or not plain_calls_allowed():
            return None
        dropout = self.layer_dropout
        if not _as_is(dropout, nn.Dropout) or (dropout.training and dropout.p > 0 and self.num_layers > 1):
            return None
        directions = 2 if self.bidirectional else 1
        if len(self.layers) != self.num_layers * directions:
            return None
        for index, layer in enumerate(self.layers):
            if not _as_is(layer, ModularRecurrentLayer) or layer.reverse != (index % directions == 1) \
                    or type(layer.cell) is not self._cell_cls or not _as_built(layer.cell):
                return None
            weights = (layer.cell.input_linear.weight, layer.cell.hidden_linear.weight)
            if any(w.dtype != input.dtype or w.device != input.device for w in weights):
                return None  # the modules' own error, not the kernel's
        return kernel

    def _run_native(self, kernel, input: Tensor, state: tuple, batch_sizes: list[int] | None):
        """:meth:`_run` by ``kernel``, on the same (possibly transposed) input the layers take."""
        weights = []
        for layer in self.layers:
            cell = layer.cell
            weights += [cell.input_linear.weight, cell.hidden_linear.weight]
            if self.bias:
                weights += [cell.input_linear.bias, cell.hidden_linear.bias]
        hx = state[0] if len(state) == 1 else list(state)
        dropout = (self.layer_dropout.p, self.layer_dropout.training)
        if batch_sizes is None:  # time-major, as the layers see it
            output, *final = kernel(input, hx, weights, self.bias, self.num_layers, *dropout, self.bidirectional, False)
        else:
            output, *final = kernel(input, torch.tensor(batch_sizes, dtype=torch.long), hx, weights, self.bias,
                                    self.num_layers, *dropout, self.bidirectional)
        return output, tuple(final)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {"proj_size": 0, "num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0, "bidirectional": False}
        for attr, default in defaults.items():
            if getattr(self, attr, default) != default:
                s += f", {attr}={getattr(self, attr)}"
        return s


class ModularLSTM(_ModularStack):
    """``nn.LSTM`` built from :class:`ModularLSTMCell`\\ s; same arguments, call and state dict.

    ``forward(input, hx=None) -> (output, (h_n, c_n))``; ``input`` may be a PackedSequence.
    """

    _float_cls = nn.LSTM
    _cell_cls = ModularLSTMCell
    _config_attrs = _ModularStack._config_attrs + ("proj_size",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__(nn.LSTM(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size, device, dtype))

    def _state_sizes(self) -> tuple:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _user_state(self, hx) -> tuple | None:
        if hx is None:
            return None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(s, Tensor) for s in hx):
            raise TypeError(f"ModularLSTM: expected hx to be a tuple (h_0, c_0) of tensors, got {type(hx).__name__}")
        return tuple(hx)

    def _user_result(self, state: tuple):
        return state


class ModularGRU(_ModularStack):
    """``nn.GRU`` built from :class:`ModularGRUCell`\\ s. ``forward(input, hx=None) -> (output, h_n)``."""

    _float_cls = nn.GRU
    _cell_cls = ModularGRUCell

    def _native(self):
        return NATIVE_RNN["gru"]  # what nn.GRU calls (ATen has no oneDNN GRU on the CPU)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None):
        super().__init__(nn.GRU(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device=device, dtype=dtype))


class ModularRNN(_ModularStack):
    """``nn.RNN`` (tanh or relu) built from :class:`ModularRNNCell`\\ s. ``forward(input, hx=None) -> (output, h_n)``."""

    _float_cls = nn.RNN
    _cell_cls = ModularRNNCell
    _config_attrs = _ModularStack._config_attrs + ("nonlinearity",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh", bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None):
        super().__init__(nn.RNN(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional,
                                device=device, dtype=dtype))

    def _cell_config(self) -> dict:
        return {"nonlinearity": self.nonlinearity}

    def _native(self):
        return NATIVE_RNN[f"rnn_{self.nonlinearity}"]  # what nn.RNN calls

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", nonlinearity={self.nonlinearity}" if self.nonlinearity != "tanh" else "")


def _record_methods() -> None:
    cells = [ModularLSTMCell(1, 1, device="meta"), ModularGRUCell(1, 1, device="meta"),
             ModularRNNCell(1, 1, device="meta"), ModularRNNCell(1, 1, nonlinearity="relu", device="meta")]
    classes = {ModularLSTM, ModularGRU, ModularRNN, ModularRecurrentLayer, nn.Dropout}
    classes.update(type(m) for cell in cells for m in cell.modules())
    _METHODS.update((cls, _methods(cls)) for cls in classes)


_record_methods()
