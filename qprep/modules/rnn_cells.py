"""Modular, bit-exact recurrent cells: ``nn.LSTMCell``, ``nn.GRUCell`` and ``nn.RNNCell``
with every gate op a named submodule.

A cell holds the ops of one time step and is a drop-in for the ``torch.nn`` cell (same
call, unbatched 1-D input too); the layers and stacks of :mod:`qprep.modules.rnn` run it
over time through :meth:`~ModularLSTMCell.step`. LSTM::

    gates = gates_add(hidden_linear(h), input_linear(x))            # chunked into i, f, g, o
    c' = cell_add(forget_product(forget_gate(f), c), input_product(input_gate(i), cell_candidate(g)))
    h' = output_product(output_gate(o), cell_tanh(c'))             # then hidden_projection(h')

GRU (``i_*``/``h_*`` are the chunks of ``input_linear(x)``/``hidden_linear(h)``)::

    r, z = reset_gate, update_gate of gates_add(h_rz, i_rz)         # split in two
    n = candidate(candidate_add(i_n, reset_product(h_n, r)))
    h' = hidden_add(update_product(hidden_sub(h, n), z), n)

RNN: ``h' = activation(gates_add(hidden_linear(h), input_linear(x)))``.

The cell's Parameters carry ``nn.*Cell``'s names and are the same objects as the gate
``Linear`` modules' weights (the second names are hidden from ``state_dict()``).
``from_float`` takes over the original Parameter objects (no copies) and ``to_float`` hands
them to a new ``torch.nn`` cell. Numerics: see :mod:`qprep.modules.rnn`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor

from ..core.aliases import hide_aliases
from .ops import Add, Mul, Sub

__all__ = ["ModularLSTMCell", "ModularGRUCell", "ModularRNNCell"]

# Cell parameter name -> (submodule, attribute) that holds the same Parameter.
_HOLDERS = {
    "weight_ih": ("input_linear", "weight"),
    "weight_hh": ("hidden_linear", "weight"),
    "bias_ih": ("input_linear", "bias"),
    "bias_hh": ("hidden_linear", "bias"),
    "weight_hr": ("hidden_projection", "weight"),
}


@torch.fx.wrap
def _cell_call_args(input: Tensor, hx, input_size: int, state_sizes: tuple, name: str):
    """Checks an ``nn.*Cell`` call and adds the batch dim: ``(input, state tuple, batched)``."""
    if not isinstance(input, Tensor) or input.dim() not in (1, 2):
        raise ValueError(f"{name}: expected input to be a 1-D or 2-D tensor, got {_describe(input)}")
    if input.size(-1) != input_size:
        raise ValueError(f"{name}: input.size(-1) must be input_size={input_size}, got {input.size(-1)}")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    if hx is None:
        state = tuple(input.new_zeros(input.size(0), size) for size in state_sizes)
        return input, state, batched
    state = tuple(hx) if len(state_sizes) > 1 and isinstance(hx, (tuple, list)) else (hx,)
    if len(state) != len(state_sizes) or not all(isinstance(s, Tensor) for s in state):
        kind = f"a tuple of {len(state_sizes)} tensors" if len(state_sizes) > 1 else "a tensor"
        raise TypeError(f"{name}: expected hx to be {kind}, got {_describe(hx)}")
    if not batched:
        state = tuple(s.unsqueeze(0) if s.dim() == 1 else s for s in state)
    for s, size in zip(state, state_sizes):
        if tuple(s.shape) != (input.size(0), size):
            raise ValueError(f"{name}: expected hidden state of size {(input.size(0), size)}, got {tuple(s.shape)}")
    return input, state, batched


@torch.fx.wrap
def _cell_result(state: tuple, batched: bool, as_tuple: bool):
    """The ``nn.*Cell`` return value: ``(h, c)`` or ``h``, unbatched like the input."""
    if not batched:
        state = tuple(s.squeeze(0) for s in state)
    return state if as_tuple else state[0]


def _describe(value) -> str:
    return f"{value.dim()}-D tensor" if isinstance(value, Tensor) else type(value).__name__


def _check_not_parametrized(module: nn.Module) -> None:
    if nn.utils.parametrize.is_parametrized(module):
        raise ValueError(f"{type(module).__name__} has parametrized weights; remove the parametrizations first")


class _ModularCell(nn.Module):
    """Parameters under ``nn.*Cell``'s names, shared with the gate ``Linear`` modules."""

    _float_cls: ClassVar[type[nn.Module]]
    _num_chunks: ClassVar[int]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, proj_size: int = 0):
        super().__init__()
        self.input_size, self.hidden_size, self.bias, self.proj_size = input_size, hidden_size, bias, proj_size
        gate_size, out_size = self._num_chunks * hidden_size, proj_size or hidden_size
        self.input_linear = nn.Linear(input_size, gate_size, bias, device="meta")
        self.hidden_linear = nn.Linear(out_size, gate_size, bias, device="meta")
        self._build_ops()
        shapes = {"weight_ih": (gate_size, input_size), "weight_hh": (gate_size, out_size)}
        if bias:
            shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if proj_size:
            shapes["weight_hr"] = (proj_size, hidden_size)
        self._set_params({n: nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for n, s in shapes.items()})
        self.reset_parameters()

    def _build_ops(self) -> None:
        raise NotImplementedError

    def _set_params(self, params: dict) -> None:
        for name, param in params.items():
            holder, attr = _HOLDERS[name]
            setattr(getattr(self, holder), attr, param)
            setattr(self, name, param)
        hide_aliases(self, {".".join(_HOLDERS[name]): name for name in params})

    def reset_parameters(self) -> None:
        """``nn.RNNCellBase``'s init: uniform in +-1/sqrt(hidden_size), same RNG order."""
        bound = self.hidden_size ** -0.5
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    @classmethod
    def _from_params(cls, params: dict, **config):
        weight_ih, bias_ih, bias_hh = params["weight_ih"], params.get("bias_ih"), params.get("bias_hh")
        if (bias_ih is None) != (bias_hh is None):
            raise ValueError(f"{cls.__name__}: give both bias_ih and bias_hh, or neither")
        hidden_size, rem = divmod(weight_ih.size(0), cls._num_chunks)
        if rem:
            raise ValueError(f"{cls.__name__}: weight_ih has {weight_ih.size(0)} rows, not a multiple of {cls._num_chunks}")
        weight_hr = params.get("weight_hr")
        proj = {"proj_size": weight_hr.size(0)} if weight_hr is not None else {}
        cell = cls(weight_ih.size(1), hidden_size, bias_ih is not None, device="meta", dtype=weight_ih.dtype, **proj, **config)
        cell._set_params({n: p if isinstance(p, nn.Parameter) else nn.Parameter(p) for n, p in params.items() if p is not None})
        return cell

    @classmethod
    def from_float(cls, module: nn.Module):
        """The modular cell holding ``module``'s own Parameter objects."""
        if type(module) is not cls._float_cls:
            raise TypeError(f"{cls.__name__}.from_float expects an nn.{cls._float_cls.__name__}, got {type(module).__name__}")
        _check_not_parametrized(module)
        params = {n: getattr(module, n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        return cls._from_params(params, **cls._float_config(module)).train(module.training)

    @classmethod
    def _float_config(cls, module: nn.Module) -> dict:
        return {}

    def to_float(self) -> nn.Module:
        """The ``torch.nn`` cell holding this cell's Parameter objects."""
        if self.proj_size:
            raise ValueError(f"{type(self).__name__} with proj_size={self.proj_size} has no torch.nn cell equivalent")
        module = self._float_cls(self.input_size, self.hidden_size, self.bias, device="meta", **self._float_config(self))
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            if getattr(self, name) is not None:
                setattr(module, name, getattr(self, name))
        return module.train(self.training)

    def _state_sizes(self) -> tuple:
        return (self.hidden_size,)

    def forward(self, input: Tensor, hx=None):
        input, state, batched = _cell_call_args(input, hx, self.input_size, self._state_sizes(), type(self).__name__)
        state = self.step(self.input_linear(input), state)
        return _cell_result(state, batched, len(self._state_sizes()) > 1)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if not self.bias:
            s += ", bias=False"
        return s


class ModularLSTMCell(_ModularCell):
    """``nn.LSTMCell`` with every gate op a submodule; ``proj_size`` adds ``hidden_projection``.

    ``forward(input, hx=None) -> (h', c')`` as ``nn.LSTMCell``; :meth:`step` is one time step
    on an already projected input, as the stacks call it.
    """

    _float_cls = nn.LSTMCell
    _num_chunks = 4

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, proj_size: int = 0):
        super().__init__(input_size, hidden_size, bias, device, dtype, proj_size)

    def _build_ops(self) -> None:
        self.gates_add = Add()
        self.input_gate, self.forget_gate = nn.Sigmoid(), nn.Sigmoid()
        self.cell_candidate, self.output_gate = nn.Tanh(), nn.Sigmoid()
        self.forget_product, self.input_product = Mul(), Mul()
        self.cell_add, self.cell_tanh, self.output_product = Add(), nn.Tanh(), Mul()
        self.hidden_projection = nn.Linear(self.hidden_size, self.proj_size, bias=False, device="meta") if self.proj_size else None

    @classmethod
    def from_params(cls, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None) -> ModularLSTMCell:
        """A cell whose Linear modules hold these Parameters (not copies)."""
        return cls._from_params(dict(weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh, weight_hr=weight_hr))

    def _state_sizes(self) -> tuple:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def step(self, input_gates: Tensor, state: tuple, ops=None) -> tuple:
        """``(h, c) -> (h', c')`` given ``input_linear(x)``, in ATen's op order.

        ``ops`` holds the gate ops to call: the cell itself by default; the layers pass
        the ops' bound ``forward`` methods where hooks cannot tell (see
        :mod:`qprep.modules.rnn`).
        """
        ops = self if ops is None else ops
        h, c = state
        gates = ops.gates_add(ops.hidden_linear(h), input_gates)
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = ops.input_gate(i), ops.forget_gate(f), ops.cell_candidate(g), ops.output_gate(o)
        c = ops.cell_add(ops.forget_product(f, c), ops.input_product(i, g))
        h = ops.output_product(o, ops.cell_tanh(c))
        if self.hidden_projection is not None:
            h = ops.hidden_projection(h)
        return h, c


class ModularGRUCell(_ModularCell):
    """``nn.GRUCell`` with every gate op a submodule. ``forward(input, hx=None) -> h'``."""

    _float_cls = nn.GRUCell
    _num_chunks = 3

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def _build_ops(self) -> None:
        self.gates_add = Add()
        self.reset_gate, self.update_gate = nn.Sigmoid(), nn.Sigmoid()
        self.reset_product, self.candidate_add, self.candidate = Mul(), Add(), nn.Tanh()
        self.hidden_sub, self.update_product, self.hidden_add = Sub(), Mul(), Add()

    @classmethod
    def from_params(cls, weight_ih, weight_hh, bias_ih=None, bias_hh=None) -> ModularGRUCell:
        """A cell whose Linear modules hold these Parameters (not copies)."""
        return cls._from_params(dict(weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh))

    def step(self, input_gates: Tensor, state: tuple, ops=None) -> tuple:
        """``(h,) -> (h',)`` given ``input_linear(x)``, in ATen's op order and layouts.

        ``ops`` as in :meth:`ModularLSTMCell.step`.
        """
        ops = self if ops is None else ops
        (h,) = state
        sizes = [2 * self.hidden_size, self.hidden_size]
        i_rz, i_n = input_gates.split_with_sizes(sizes, 1)
        h_rz, h_n = ops.hidden_linear(h).split_with_sizes(sizes, 1)
        r, z = ops.gates_add(h_rz, i_rz).chunk(2, 1)
        r, z = ops.reset_gate(r), ops.update_gate(z)
        n = ops.candidate(ops.candidate_add(i_n, ops.reset_product(h_n, r)))
        return (ops.hidden_add(ops.update_product(ops.hidden_sub(h, n), z), n),)


class ModularRNNCell(_ModularCell):
    """``nn.RNNCell`` (tanh or relu) with every op a submodule. ``forward(input, hx=None) -> h'``."""

    _float_cls = nn.RNNCell
    _num_chunks = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}; select from 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def _build_ops(self) -> None:
        self.gates_add = Add()
        self.activation = nn.Tanh() if self.nonlinearity == "tanh" else nn.ReLU()

    @classmethod
    def from_params(cls, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity: str = "tanh") -> ModularRNNCell:
        """A cell whose Linear modules hold these Parameters (not copies)."""
        return cls._from_params(dict(weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh), nonlinearity=nonlinearity)

    @classmethod
    def _float_config(cls, module: nn.Module) -> dict:
        return {"nonlinearity": module.nonlinearity}

    def step(self, input_gates: Tensor, state: tuple, ops=None) -> tuple:
        """``(h,) -> (h',)`` given ``input_linear(x)``; ``ops`` as in :meth:`ModularLSTMCell.step`."""
        ops = self if ops is None else ops
        return (ops.activation(ops.gates_add(ops.hidden_linear(state[0]), input_gates)),)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", nonlinearity={self.nonlinearity}" if self.nonlinearity != "tanh" else "")
