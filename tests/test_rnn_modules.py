"""Tests for qprep.modules.rnn: bit-exact to torch's native RNN kernels, forward and backward."""

from __future__ import annotations

import contextlib
import operator
import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from qprep.modules import (
    ModularGRU, ModularGRUCell, ModularLSTM, ModularLSTMCell, ModularRNN, ModularRNNCell, TensorOp,
)
from qprep.modules import rnn as rnn_module
from qprep.modules.rnn import ONEDNN_LSTM_ATOL

T, B, I, H = 5, 3, 7, 20  # H=20: gate chunks mix vectorized and scalar kernel paths

STACKS = {
    "lstm": (nn.LSTM, ModularLSTM, {}),
    "gru": (nn.GRU, ModularGRU, {}),
    "rnn_tanh": (nn.RNN, ModularRNN, {}),
    "rnn_relu": (nn.RNN, ModularRNN, {"nonlinearity": "relu"}),
}
CELLS = {
    "lstm": (nn.LSTMCell, ModularLSTMCell, {}),
    "gru": (nn.GRUCell, ModularGRUCell, {}),
    "rnn_tanh": (nn.RNNCell, ModularRNNCell, {}),
    "rnn_relu": (nn.RNNCell, ModularRNNCell, {"nonlinearity": "relu"}),
}
# name -> (constructor kwargs, call options)
CASES = {
    "default": ({}, {}),
    "batch_first": ({"batch_first": True}, {"state": True}),
    "bidirectional_2_layers": ({"num_layers": 2, "bidirectional": True}, {}),
    "no_bias": ({"bias": False, "num_layers": 2}, {"state": True}),
    "given_state": ({"num_layers": 2}, {"state": True}),
    "unbatched": ({"num_layers": 2, "bidirectional": True}, {"unbatched": True, "state": True}),
    "unbatched_no_state": ({"batch_first": True}, {"unbatched": True}),
    "packed": ({"num_layers": 2, "bidirectional": True}, {"packed": True, "state": True}),
    "packed_no_state": ({}, {"packed": True}),
    "proj": ({"num_layers": 2, "bidirectional": True, "proj_size": 6}, {"state": True}),
    "proj_packed": ({"proj_size": 6}, {"packed": True}),
}
LSTM_ONLY = {"proj", "proj_packed"}


@contextlib.contextmanager
def native_kernels():
    """ATen's native RNN kernels (nn.LSTM's default CPU kernel is oneDNN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "TF32 acceleration on top of oneDNN ..."
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.utils.rnn.PackedSequence):
        return [value.data]
    return [t for v in value for t in _tensors(v)]


def _state(kind, module, batch, unbatched, seed=1):
    generator = torch.Generator().manual_seed(seed)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    sizes = [getattr(module, "proj_size", 0) or module.hidden_size] + ([module.hidden_size] if kind == "lstm" else [])
    state = [torch.randn(layers, *([] if unbatched else [batch]), s, generator=generator, requires_grad=True) for s in sizes]
    return tuple(state) if kind == "lstm" else state[0]


def _inputs(module, options, seed=0):
    """(call input, leaf tensors to differentiate)."""
    generator = torch.Generator().manual_seed(seed)
    if options.get("unbatched"):
        x = torch.randn(T, module.input_size, generator=generator, requires_grad=True)
        return x, [x]
    x = torch.randn(B, T, module.input_size, generator=generator, requires_grad=True)
    if options.get("packed"):
        return pack_padded_sequence(x, torch.tensor([3, 5, 2]), batch_first=True, enforce_sorted=False), [x]
    return (x if module.batch_first else x.transpose(0, 1)), [x]


def _outputs_and_grads(module, call_input, hx, leaves):
    """Forward, then the gradient of a fixed random weighting of every output."""
    outputs = _tensors(module(call_input, hx))
    generator = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outputs)
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()), retain_graph=True)
    return outputs, grads


def _assert_all_equal(expected, got):
    assert len(expected) == len(got)
    for index, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"tensor {index} differs: max |diff| {(a - b).abs().max().item():.3g}"


def _pair(kind, **kwargs):
    float_cls, modular_cls, extra = STACKS[kind]
    torch.manual_seed(0)
    module = float_cls(I, H, **extra, **kwargs)
    return module, modular_cls.from_float(module)


CASE_GRID = [(kind, case) for kind in STACKS for case in CASES if kind == "lstm" or case not in LSTM_ONLY]


@pytest.mark.parametrize("kind,case", CASE_GRID)
def test_stack_bit_exact_forward_and_backward(kind, case):
    kwargs, options = CASES[case]
    module, modular = _pair(kind, **kwargs)
    call_input, leaves = _inputs(module, options)
    hx = _state(kind, module, B, options.get("unbatched")) if options.get("state") else None
    if hx is not None:
        leaves = leaves + _tensors(hx)
    with native_kernels():
        expected, expected_grads = _outputs_and_grads(module, call_input, hx, leaves)
    got, grads = _outputs_and_grads(modular, call_input, hx, leaves)
    _assert_all_equal(expected, got)
    _assert_all_equal(expected_grads, grads)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", STACKS)
def test_dropout_in_training_matches_with_same_seed(kind, packed):
    module, modular = _pair(kind, num_layers=3, dropout=0.5, bidirectional=True)
    module.train(), modular.train()
    call_input, leaves = _inputs(module, {"packed": packed})
    with native_kernels():
        torch.manual_seed(5)
        expected, expected_grads = _outputs_and_grads(module, call_input, None, leaves)
    torch.manual_seed(5)
    got, grads = _outputs_and_grads(modular, call_input, None, leaves)
    _assert_all_equal(expected, got)
    _assert_all_equal(expected_grads, grads)
    module.eval(), modular.eval()
    with native_kernels():
        expected_eval = _tensors(module(call_input))
    _assert_all_equal(expected_eval, _tensors(modular(call_input)))


@pytest.mark.parametrize("kind", STACKS)
def test_parameters_are_shared_not_copied(kind):
    module, modular = _pair(kind, num_layers=2, bidirectional=True, **({"proj_size": 4} if kind == "lstm" else {}))
    assert [id(p) for p in modular.parameters()] == [id(p) for p in module.parameters()]
    for name, param in module.named_parameters():
        assert getattr(modular, name) is param
    cell = modular.layers[3].cell  # layer 1, reverse
    assert cell.input_linear.weight is module.weight_ih_l1_reverse
    assert cell.hidden_linear.bias is module.bias_hh_l1_reverse
    if kind == "lstm":
        assert cell.hidden_projection.weight is module.weight_hr_l1_reverse


@pytest.mark.parametrize("kind", STACKS)
def test_state_dict_round_trips_strictly_both_ways(kind):
    float_cls, modular_cls, extra = STACKS[kind]
    kwargs = {"num_layers": 2, "bidirectional": True, "bias": kind != "gru", **extra}
    if kind == "lstm":
        kwargs["proj_size"] = 4
    torch.manual_seed(0)
    module = float_cls(I, H, **kwargs)
    modular = modular_cls(I, H, **kwargs)  # a different init
    assert list(modular.state_dict()) == list(module.state_dict())
    modular.load_state_dict(module.state_dict(), strict=True)
    for name, param in module.named_parameters():
        assert torch.equal(getattr(modular, name), param)
    assert torch.equal(modular.layers[1].cell.input_linear.weight, module.weight_ih_l0_reverse)
    assert modular.layers[1].cell.input_linear.weight is modular.weight_ih_l0_reverse
    x = torch.randn(T, B, I)
    with native_kernels():
        _assert_all_equal(_tensors(module(x)), _tensors(modular(x)))
    torch.manual_seed(1)
    fresh = modular_cls(I, H, **kwargs)
    back = float_cls(I, H, **kwargs)
    back.load_state_dict(fresh.state_dict(), strict=True)
    with native_kernels():
        _assert_all_equal(_tensors(back(x)), _tensors(fresh(x)))


@pytest.mark.parametrize("kind", STACKS)
def test_to_float_round_trip_shares_parameters(kind):
    module, modular = _pair(kind, num_layers=2, batch_first=True, dropout=0.25)
    assert modular.training
    module.eval()
    back = type(modular).from_float(module).to_float()
    assert type(back) is type(module) and not back.training
    assert repr(back) == repr(module)
    assert getattr(back, "nonlinearity", None) == getattr(module, "nonlinearity", None)
    assert [id(p) for p in back.parameters()] == [id(p) for p in module.parameters()]
    x = torch.randn(B, T, I)
    with native_kernels():
        _assert_all_equal(_tensors(module(x)), _tensors(back(x)))


def test_constructor_initialises_like_torch():
    for kind, (float_cls, modular_cls, extra) in STACKS.items():
        torch.manual_seed(3)
        expected = float_cls(I, H, 2, **extra)
        torch.manual_seed(3)
        got = modular_cls(I, H, 2, **extra)
        _assert_all_equal(list(expected.parameters()), list(got.parameters()))
    for kind, (float_cls, modular_cls, extra) in CELLS.items():
        torch.manual_seed(3)
        expected = float_cls(I, H, **extra)
        torch.manual_seed(3)
        got = modular_cls(I, H, **extra)
        _assert_all_equal(list(expected.parameters()), list(got.parameters()))
        assert list(got.state_dict()) == list(expected.state_dict())


def test_onednn_difference_is_bounded():
    worst = 0.0
    for num_layers, bidirectional, batch, hidden in ((1, False, 1, 16), (2, True, 4, 20), (2, False, 4, 64)):
        torch.manual_seed(0)
        module = nn.LSTM(I, hidden, num_layers, bidirectional=bidirectional).eval()
        modular = ModularLSTM.from_float(module)
        x = torch.randn(16, batch, I)
        with torch.no_grad():
            for a, b in zip(_tensors(module(x)), _tensors(modular(x))):
                worst = max(worst, (a - b).abs().max().item())
    assert worst <= ONEDNN_LSTM_ATOL


CELL_CASES = {
    "batched": {"batch": True, "state": True},
    "unbatched": {"batch": False, "state": True},
    "no_state": {"batch": True, "state": False},
    "no_bias": {"batch": True, "state": True, "bias": False},
}


@pytest.mark.parametrize("case", CELL_CASES)
@pytest.mark.parametrize("kind", CELLS)
def test_cell_bit_exact_forward_and_backward(kind, case):
    options = CELL_CASES[case]
    float_cls, modular_cls, extra = CELLS[kind]
    torch.manual_seed(0)
    cell = float_cls(I, H, bias=options.get("bias", True), **extra)
    modular = modular_cls.from_float(cell)
    batch_shape = [B] if options["batch"] else []
    x = torch.randn(*batch_shape, I, requires_grad=True)
    leaves = [x]
    hx = None
    if options["state"]:
        hx = tuple(torch.randn(*batch_shape, H, requires_grad=True) for _ in range(2 if kind == "lstm" else 1))
        leaves += list(hx)
        hx = hx if kind == "lstm" else hx[0]
    expected, expected_grads = _outputs_and_grads(cell, x, hx, leaves)
    got, grads = _outputs_and_grads(modular, x, hx, leaves)
    assert [t.shape for t in got] == [t.shape for t in expected]
    _assert_all_equal(expected, got)
    _assert_all_equal(expected_grads, grads)
    assert all(a is b for a, b in zip(modular.parameters(), cell.parameters()))
    assert list(modular.state_dict()) == list(cell.state_dict())
    back = modular.to_float()
    assert type(back) is float_cls and all(a is b for a, b in zip(back.parameters(), cell.parameters()))
    fresh = modular_cls(I, H, bias=options.get("bias", True), **extra)
    fresh.load_state_dict(cell.state_dict(), strict=True)
    _assert_all_equal(_tensors(cell(x, hx)), _tensors(fresh(x, hx)))


class _LeafOpsTracer(torch.fx.Tracer):
    def is_leaf_module(self, module, qualname):
        return isinstance(module, TensorOp) or super().is_leaf_module(module, qualname)


DATA_MOVEMENT = {
    "call_function": {operator.getitem, rnn_module._cell_call_args, rnn_module._cell_result},
    "call_method": {"chunk", "split", "split_with_sizes", "unbind", "narrow", "size"},
}
CELL_OPS = {
    "lstm": ["input_linear", "hidden_linear", "gates_add", "input_gate", "forget_gate", "cell_candidate", "output_gate",
             "forget_product", "input_product", "cell_add", "cell_tanh", "output_product"],
    "gru": ["input_linear", "hidden_linear", "gates_add", "reset_gate", "update_gate", "reset_product", "candidate_add",
            "candidate", "hidden_sub", "update_product", "hidden_add"],
    "rnn_tanh": ["input_linear", "hidden_linear", "gates_add", "activation"],
    "rnn_relu": ["input_linear", "hidden_linear", "gates_add", "activation"],
}


@pytest.mark.parametrize("kind,proj", [(kind, False) for kind in CELLS] + [("lstm", True)])
def test_every_cell_op_is_a_module(kind, proj):
    _, modular_cls, extra = CELLS[kind]
    cell = modular_cls(I, H, **extra, **({"proj_size": 6} if proj else {}))
    graph = _LeafOpsTracer().trace(cell)
    for node in graph.nodes:
        if node.op in DATA_MOVEMENT:
            assert node.target in DATA_MOVEMENT[node.op], f"{node.op} {node.target} is not a module"
    called = [node.target for node in graph.nodes if node.op == "call_module"]
    assert called == CELL_OPS[kind] + (["hidden_projection"] if proj else [])
    traced = torch.fx.GraphModule(cell, graph)
    x, hx = torch.randn(B, I), None
    _assert_all_equal(_tensors(cell(x, hx)), _tensors(traced(x, hx)))


def test_hooks_on_gate_ops_see_every_step():
    module, modular = _pair("lstm", num_layers=2)
    x = torch.randn(T, B, I)
    plain = modular(x)[0]
    calls = []
    handle = modular.layers[1].cell.cell_tanh.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    assert torch.equal(modular(x)[0], plain)
    assert calls == [torch.Size([B, H])] * T
    handle.remove()
    handle = modular.layers[0].cell.gates_add.register_forward_hook(lambda m, args, out: out * 0.5)
    assert not torch.equal(modular(x)[0], plain)
    handle.remove()
    assert torch.equal(modular(x)[0], plain)


def test_errors_are_clear():
    with pytest.raises(TypeError, match="expects an nn.LSTM"):
        ModularLSTM.from_float(nn.GRU(I, H))
    with pytest.raises(TypeError, match="expects an nn.GRUCell"):
        ModularGRUCell.from_float(nn.LSTMCell(I, H))
    modular = ModularLSTM(I, H)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        modular(torch.randn(2, T, B, I))
    with pytest.raises(ValueError, match="hidden"):
        modular(torch.randn(T, B, I), (torch.randn(1, B + 1, H), torch.randn(1, B + 1, H)))
    with pytest.raises(TypeError, match="tuple"):
        modular(torch.randn(T, B, I), torch.randn(1, B, H))
    with pytest.raises(ValueError, match="input_size"):
        ModularGRUCell(I, H)(torch.randn(B, I + 1))
    with pytest.raises(ValueError, match="nonlinearity"):
        ModularRNNCell(I, H, nonlinearity="gelu")
    with pytest.raises(ValueError, match="no torch.nn cell"):
        ModularLSTMCell(I, H, proj_size=4).to_float()
