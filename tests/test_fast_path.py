"""The fast call paths switch themselves off, correctly, the moment anything could tell.

Three fast paths skip ``nn.Module.__call__`` while nothing observes the call (issue 12):

* ``TensorOp.__call__`` (every wrapper), which calls the op directly;
* the prepared GraphModule's generated ``forward`` (``qprep.fast_forward``), which finds
  each submodule through ``_modules`` and calls its ``forward``;
* the recurrent layers' time loop (``qprep.modules.rnn._direct_calls``), which calls the
  gate ops' underlying functions.

Each must produce the same bits as the module calls it skips, and must give way to the
module call as soon as a hook (forward, forward-pre, backward, global) is attached or a
submodule is replaced, so that the new hook or module is the one that runs.
"""

from __future__ import annotations

import copy
import operator
import pickle
import re

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules import module as torch_module

import qprep
from qprep.modules.fast_forward import fast_forward_source, has_fast_forward, install_fast_forward
from qprep.modules import (
    Add, Cat, Eq, Input, MaskedFill, ModularGRU, ModularLSTM, ModularRNN, Mul, Sub, Sum, TensorOp,
)
from qprep.modules.rnn import _direct_calls
from qprep.modules.rnn import _stepper as rnn_stepper
from tests.models import AttentionBlock

pytestmark = [
    pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN"),
    pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning"),
]

T, B, I, H = 6, 3, 5, 20


def native():
    return torch.backends.mkldnn.flags(enabled=False)


class Counter:
    """A hook that counts its calls and optionally replaces what it sees."""

    def __init__(self, result=None):
        self.calls, self.result = 0, result

    def __call__(self, *args):
        self.calls += 1
        return self.result(*args) if self.result else None


# ----------------------------------------------------------------------------- TensorOp.__call__
WRAPPERS = {
    "direct": (lambda: Add(), lambda a, b: a + b, 2),
    "flat": (lambda: Eq(operator.eq, (Input(0), 0.5)), lambda a, b: a == 0.5, 1),
    "pack": (lambda: Cat(dim=1), lambda a, b: torch.cat([a, b], dim=1), 2),
    "nested": (lambda: Cat(torch.cat, ([Input(0), Input(1)],), {"dim": 0}), lambda a, b: torch.cat([a, b], dim=0), 2),
    "method": (lambda: MaskedFill("masked_fill", (Input(0), Input(1), -1.0)), lambda a, b: a.masked_fill(b > 0, -1.0), 2),
    "kwargs": (lambda: Sum(torch.sum, (Input(0),), {"dim": 1, "keepdim": True}), lambda a, b: torch.sum(a, dim=1, keepdim=True), 1),
    "inplace": (lambda: Add(operator.iadd), lambda a, b: a.clone().__iadd__(b), 2),
}


def _wrapper_inputs(name):
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    return (a, b > 0) if name == "method" else (a, b)


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_fast_call_is_bitwise_the_op_and_the_module_call(name):
    build, plain, arity = WRAPPERS[name]
    op = build()
    both = _wrapper_inputs(name)
    inputs = both[:arity]
    expected = plain(both[0].clone(), both[1].float())
    fresh = lambda: tuple(t.clone() for t in inputs)  # noqa: E731  (in-place ops mutate)
    assert torch.equal(op(*fresh()), expected)
    assert torch.equal(nn.Module.__call__(op, *fresh()), expected)
    assert torch.equal(op.forward(*fresh()), expected)


def test_wrapper_forward_hooks_run_from_the_first_call_after_attaching():
    op, x, y = Add(), torch.randn(4), torch.randn(4)
    op(x, y)  # the fast path has run
    post = Counter(lambda m, args, out: out * 2)
    handle = op.register_forward_hook(post)
    assert torch.equal(op(x, y), (x + y) * 2) and post.calls == 1
    handle.remove()
    pre = Counter(lambda m, args: (args[0], torch.zeros_like(args[1])))
    handle = op.register_forward_pre_hook(pre)
    assert torch.equal(op(x, y), x) and pre.calls == 1
    handle.remove()
    kw = Counter(lambda m, args, kwargs, out: out + 1)
    handle = op.register_forward_hook(kw, with_kwargs=True)
    assert torch.equal(op(x, y), x + y + 1) and kw.calls == 1
    handle.remove()
    assert torch.equal(op(x, y), x + y)


def test_wrapper_backward_hooks_run():
    op = Mul()
    x, y = torch.randn(4, requires_grad=True), torch.randn(4)
    grads, pre = [], Counter()
    op.register_full_backward_hook(lambda m, grad_in, grad_out: grads.append(grad_out[0]))
    op.register_full_backward_pre_hook(pre)
    op(x, y).sum().backward()
    assert len(grads) == 1 and pre.calls == 1 and torch.equal(x.grad, y)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "full_backward_pre"])
def test_wrapper_global_hooks_run(kind):
    register = getattr(torch_module, f"register_module_{kind}_hook")
    op, x = Mul(), torch.randn(4, requires_grad=True)
    op(x, x)
    hook = Counter()
    handle = register(hook)
    try:
        op(x, x).sum().backward()
    finally:
        handle.remove()
    assert hook.calls == 1


def test_wrapper_patched_forward_and_subclass_forward_are_called():
    op, x = Add(), torch.randn(3)
    op(x, x)
    op.forward = lambda a, b: a - b  # a tool patching the instance, as accelerate does
    assert torch.equal(op(x, x), torch.zeros(3))
    del op.forward
    assert torch.equal(op(x, x), x + x)

    class Doubled(Add):
        def forward(self, a, b):
            return super().forward(a, b) * 2

    assert torch.equal(Doubled()(x, x), (x + x) * 2)


def test_wrapper_reassigned_call_and_arguments_are_used():
    op, x = Add(), torch.randn(3)
    op(x, x)
    op.call = operator.sub
    assert torch.equal(op(x, x), torch.zeros(3))
    op.call, op.args = operator.add, (Input(0), 1.0)
    assert torch.equal(op(x), x + 1)
    op.kwargs["alpha"] = 2  # read at every call
    op.call, op.args = torch.add, None
    assert torch.equal(op(x, x), torch.add(x, x, alpha=2))


def test_wrapper_survives_pickle_and_deepcopy():
    op = Eq(operator.eq, (Input(0), 0.5))
    x = torch.rand(5)
    for clone in (copy.deepcopy(op), pickle.loads(pickle.dumps(op))):
        assert torch.equal(clone(x), x == 0.5)
    add = pickle.loads(pickle.dumps(Add()))
    assert add._run is operator.add and torch.equal(add(x, x), x + x)


class _WrapperLeaves(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, TensorOp) or super().is_leaf_module(m, qualname)


def test_wrapper_calls_are_seen_by_fx_and_jit_tracing():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.add, self.mul = Add(), Mul()

        def forward(self, x):
            return self.mul(self.add(x, x), x)

    model, x = Model(), torch.randn(4)
    model(x)
    # fx patches nn.Module.__call__: a tracer that keeps wrappers as leaves records them ...
    graph = _WrapperLeaves().trace(model)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["add", "mul"]
    # ... and fx's default tracer (torch.nn modules only are leaves) traces into them.
    graph = torch.fx.symbolic_trace(model).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [operator.add, operator.mul]
    traced = torch.jit.trace(model, (x,))
    assert torch.equal(traced(x), (x + x) * x)
    assert any(n.kind() == "aten::mul" for n in traced.inlined_graph.nodes())


def test_wrapper_compiled_call_is_not_skipped():
    pytest.importorskip("torch._dynamo")
    compiled = Counter(lambda gm, inputs: gm.forward)
    op, x = Add(), torch.randn(3)
    op.compile(backend=compiled)
    try:
        assert torch.equal(op(x, x), x + x)
    finally:
        torch._dynamo.reset()
    assert compiled.calls == 1


# ----------------------------------------------------------------------------- recurrent layers
STACKS = {"lstm": (nn.LSTM, ModularLSTM), "gru": (nn.GRU, ModularGRU), "rnn": (nn.RNN, ModularRNN)}


def _stack(kind, **kwargs):
    module = STACKS[kind][0](I, H, **kwargs)
    return module, STACKS[kind][1].from_float(module)


def _outputs(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _outputs(v)]


def _equal(a, b):
    a, b = _outputs(a), _outputs(b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_time_loop_uses_plain_functions_only_while_unobserved():
    _, modular = _stack("lstm")
    cell = modular.layers[0].cell
    ops = _direct_calls(cell)
    assert ops is not cell and ops.input_gate is torch.sigmoid and ops.gates_add is operator.add
    handle = cell.cell_tanh.register_forward_hook(lambda *a: None)
    assert _direct_calls(cell) is cell
    handle.remove()
    handle = torch_module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert _direct_calls(cell) is cell
    finally:
        handle.remove()
    assert _direct_calls(cell) is not cell


@pytest.mark.parametrize("kind", STACKS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fast_loop_is_bitwise_the_module_calls_and_native_forward_and_backward(kind, bidirectional):
    module, modular = _stack(kind, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(T, B, I)
    results = []
    for observed in (False, True):
        handles = [m.register_forward_hook(lambda *a: None) for m in modular.modules() if isinstance(m, TensorOp)] if observed else []
        xi = x.clone().requires_grad_()
        out = modular(xi)
        (out[0].sum() + _outputs(out[1])[0].sum()).backward()
        results.append((out, xi.grad, [p.grad.clone() for p in modular.parameters()]))
        modular.zero_grad()
        for h in handles:
            h.remove()
    (fast, fast_grad, fast_params), (slow, slow_grad, slow_params) = results
    assert _equal(fast, slow) and torch.equal(fast_grad, slow_grad)
    assert all(torch.equal(a, b) for a, b in zip(fast_params, slow_params))
    with native(), torch.no_grad():
        assert _equal(module(x), modular(x))


def test_replaced_gate_op_is_called_at_every_step():
    module, modular = _stack("lstm", num_layers=2)
    x = torch.randn(T, B, I)
    plain = modular(x)

    class CountingSigmoid(nn.Sigmoid):
        calls = 0

        def forward(self, input):
            CountingSigmoid.calls += 1
            return super().forward(input)

    modular.layers[1].cell.input_gate = CountingSigmoid()
    assert _equal(modular(x), plain) and CountingSigmoid.calls == T

    class Rounded(nn.Module):  # what a fake-quant replacement does: changes the values
        def forward(self, input):
            return torch.sigmoid(input).mul(16).round().div(16)

    modular.layers[0].cell._modules["forget_gate"] = Rounded()  # swapped as torch.ao's convert does
    changed = modular(x)
    assert not _equal(changed, plain)
    handle = modular.layers[0].cell.output_gate.register_forward_hook(lambda *a: None)  # forces module calls
    assert _equal(modular(x), changed)
    handle.remove()


def test_patched_gate_forward_and_new_weights_are_used():
    _, modular = _stack("gru")
    x = torch.randn(T, B, I)
    plain = modular(x)
    cell = modular.layers[0].cell
    calls = []
    cell.candidate.forward = lambda input: calls.append(1) or torch.tanh(input)
    assert _equal(modular(x), plain) and len(calls) == T
    del cell.candidate.forward
    with torch.no_grad():
        cell.hidden_linear.weight.mul_(0.5)  # in place: the stack's weight_hh_l0 is the same tensor
    halved = modular(x)
    assert not _equal(halved, plain)
    cell.hidden_linear.weight = nn.Parameter(cell.hidden_linear.weight * 2)  # a new Parameter object
    doubled = modular(x)
    handle = cell.reset_gate.register_forward_pre_hook(lambda *a: None)
    assert _equal(modular(x), doubled)  # the module calls see the same new weight
    handle.remove()


def test_hooks_on_gates_see_every_step_in_train_mode_too():
    _, modular = _stack("rnn", num_layers=2, bidirectional=True)
    modular.train()
    counter = Counter()
    modular.layers[3].cell.activation.register_forward_hook(counter)
    modular(torch.randn(T, B, I))
    assert counter.calls == T


# GRU and RNN stacks call ATen's native kernel (what nn.GRU / nn.RNN call) while every op is as
# built and unobserved; it must be bitwise the module calls, and give way to them at once.
NATIVE_CASES = [
    pytest.param("gru", {}, {}, id="gru"),
    pytest.param("gru", dict(num_layers=2, bidirectional=True, batch_first=True), {}, id="gru-2-bi-batch_first"),
    pytest.param("gru", dict(bias=False), dict(hx=True), id="gru-nobias-hx"),
    pytest.param("rnn", dict(num_layers=2, nonlinearity="relu"), {}, id="rnn-relu-2"),
    pytest.param("rnn", dict(bidirectional=True), dict(packed=True), id="rnn-bi-packed"),
    pytest.param("gru", dict(num_layers=2, bidirectional=True), dict(packed=True, hx=True), id="gru-packed-hx"),
    pytest.param("gru", {}, dict(unbatched=True), id="gru-unbatched"),
    pytest.param("gru", dict(num_layers=2, dtype=torch.float64), {}, id="gru-float64"),
]


def _native_input(modular, packed=False, hx=False, unbatched=False, dtype=torch.float32):
    directions = 2 if modular.bidirectional else 1
    if packed:  # unsorted lengths
        seqs = [torch.randn(n, I, dtype=dtype) for n in (3, T, 1)]
        x = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
        h = torch.randn(modular.num_layers * directions, 3, H, dtype=dtype) if hx else None
    elif unbatched:
        x, h = torch.randn(T, I, dtype=dtype), None
    else:
        x = torch.randn(B, T, I, dtype=dtype) if modular.batch_first else torch.randn(T, B, I, dtype=dtype)
        h = torch.randn(modular.num_layers * directions, B, H, dtype=dtype) if hx else None
    return x, h


@pytest.mark.parametrize("kind, options, call", NATIVE_CASES)
def test_native_kernel_is_bitwise_the_module_calls_forward_and_backward(kind, options, call):
    _, modular = _stack(kind, **options)
    x, h = _native_input(modular, dtype=options.get("dtype", torch.float32), **call)
    tensor = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
    assert modular._native_kernel(tensor) is not None
    results = []
    for observed in (False, True):
        handle = modular.layers[-1].cell.gates_add.register_forward_pre_hook(lambda *a: None) if observed else None
        assert (modular._native_kernel(tensor) is None) == observed
        leaf = tensor.clone().requires_grad_()
        xi = x._replace(data=leaf) if isinstance(x, nn.utils.rnn.PackedSequence) else leaf
        out, state = modular(xi, h)
        out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
        (out.sum() + state.sum()).backward()
        results.append((out, state, leaf.grad, [p.grad.clone() for p in modular.parameters()]))
        modular.zero_grad()
        if handle is not None:
            handle.remove()
    (out, state, grad, params), (out2, state2, grad2, params2) = results
    assert torch.equal(out, out2) and torch.equal(state, state2) and torch.equal(grad, grad2)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_native_kernel_on_a_transposed_batch_first_input_is_the_original(kind):
    """Sizes where the input projection's GEMM depends on the input's layout (a batch-first
    input is transposed, not copied, before it): the kernel sees the layers' own input."""
    torch.manual_seed(0)
    module = STACKS[kind][0](256, 256, 2, batch_first=True).eval()
    modular = STACKS[kind][1].from_float(copy.deepcopy(module)).eval()
    x = torch.randn(8, 32, 256)
    with torch.no_grad():
        assert modular._native_kernel(x.transpose(0, 1)) is not None
        fast = modular(x)
        with modular.layers[0].cell.gates_add.register_forward_pre_hook(lambda *a: None):
            slow = modular(x)
        assert _equal(fast, slow) and _equal(fast, module(x))


@pytest.mark.parametrize("options, call", [
    pytest.param(dict(num_layers=2, bidirectional=True), {}, id="2-bi"),
    pytest.param(dict(bias=False, batch_first=True), dict(hx=True), id="nobias-batch_first-hx"),
    pytest.param(dict(bidirectional=True), dict(packed=True, hx=True), id="bi-packed"),
    pytest.param(dict(num_layers=2, dtype=torch.float64), {}, id="float64"),
])
def test_lstm_native_step_is_bitwise_the_module_calls(options, call):
    """Without gradients, an unobserved LSTM layer runs ATen's own step (in place, where the
    modules are out of place): the same bits as the module calls and as ATen's native kernel."""
    module, modular = _stack("lstm", **options)
    x, h = _native_input(modular, dtype=options.get("dtype", torch.float32), **call)
    hx = None if h is None else (h, torch.randn_like(h))
    layer = modular.layers[0]
    with torch.no_grad():
        gates = layer.cell.input_linear(torch.randn(T, B, I, dtype=options.get("dtype", torch.float32)))
        state = (torch.zeros(B, H, dtype=gates.dtype), torch.zeros(B, H, dtype=gates.dtype))
        assert rnn_stepper(layer.cell, gates, state)[1] is None  # the fused step
        fast = modular(x, hx)
        with layer.cell.cell_tanh.register_forward_hook(lambda *a: None):
            assert rnn_stepper(layer.cell, gates, state)[1] is layer.cell  # observed: the modules
            slow = modular(x, hx)
        with native():
            reference = module(x, hx)
    assert _equal(fast, slow) and _equal(fast, reference)
    assert rnn_stepper(layer.cell, gates.requires_grad_(), state)[1] is not None  # gradients: the modules' ops


def test_native_kernel_gives_way_to_anything_that_could_tell():
    _, modular = _stack("gru", num_layers=2, dropout=0.5)
    x = torch.randn(T, B, I)
    cell = modular.layers[1].cell
    assert modular.eval()._native_kernel(x) is not None
    assert modular.train()._native_kernel(x) is None  # dropout between layers: drawn by the module
    modular.eval()
    handle = torch_module.register_module_forward_hook(lambda *a: None)
    try:
        assert modular._native_kernel(x) is None  # a global hook sees every op
    finally:
        handle.remove()
    for change in (
        lambda: setattr(cell, "reset_gate", nn.Hardsigmoid()),  # a replaced gate op
        lambda: setattr(cell, "candidate", type("MyTanh", (nn.Tanh,), {})()),  # a subclass of it
        lambda: setattr(cell.candidate, "forward", torch.tanh),  # a patched forward
        lambda: setattr(cell, "step", cell.step),  # a patched step
        lambda: setattr(cell.gates_add, "call", operator.sub),  # a wrapper given another op
        lambda: setattr(modular, "layer_dropout", nn.Identity()),
        lambda: modular.layers[0].register_forward_hook(lambda *a: None),
        lambda: nn.utils.parametrize.register_parametrization(cell.hidden_linear, "weight", nn.Identity()),
    ):
        fresh = copy.deepcopy(modular)
        cell_before = cell
        change()
        assert modular._native_kernel(x) is None
        modular, cell = fresh, fresh.layers[1].cell
        del cell_before
    assert modular._native_kernel(x.double()) is None  # the weights are float32: the modules say so
    assert modular._native_kernel(torch.randn(T, B, I).to(torch.bfloat16)) is None
    counter = Counter()
    modular.layers[0].cell.update_gate.register_forward_hook(counter)
    modular(x)
    assert counter.calls == T  # observed: the modules run, step by step


@pytest.mark.parametrize("kind", STACKS)
@pytest.mark.parametrize("patched", ["op", "cell", "layer"])
def test_a_method_patched_on_the_class_turns_the_fast_paths_off(kind, patched, monkeypatch):
    """A quantizer may patch a class for every instance (``nn.Sigmoid.forward``); the fast
    paths (the native kernel, the LSTM's in-place step, the plain time loop) stand in for
    the modules as imported, so they give way and the patched method runs at every step."""
    _, modular = _stack(kind, num_layers=2)
    x = torch.randn(T, B, I)
    with torch.no_grad():
        plain = modular(x)
    calls = []
    cell = modular.layers[0].cell
    target = {"op": type(cell.hidden_linear), "cell": type(cell), "layer": type(modular.layers[0])}[patched]
    method = "step" if patched == "cell" else "forward"
    original = getattr(target, method)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(target, method, counted)
    assert modular._native_kernel(x) is None
    with torch.no_grad():
        assert _equal(modular(x), plain)
    assert len(calls) >= (T if patched != "layer" else 2)
    monkeypatch.undo()
    if kind != "lstm":
        assert modular._native_kernel(x) is not None


def test_native_kernel_uses_the_weights_the_modules_hold():
    _, modular = _stack("gru")
    x = torch.randn(T, B, I)
    plain = modular(x)
    cell = modular.layers[0].cell
    cell.hidden_linear.weight = nn.Parameter(cell.hidden_linear.weight * 2)  # not the stack's weight_hh_l0 any more
    doubled = modular(x)
    assert not _equal(doubled, plain)
    handle = cell.reset_gate.register_forward_pre_hook(lambda *a: None)
    assert _equal(modular(x), doubled)
    handle.remove()


# ----------------------------------------------------------------------------- prepared GraphModule
class Blocks(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList([AttentionBlock(16, 2) for _ in range(depth)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x).relu()


@pytest.fixture
def prepared():
    model = Blocks().eval()
    x = torch.randn(2, 5, 16)
    return model, qprep.prepare(model, (x,)), x


def _fx_forward(gm):
    """The same module with fx's own generated forward."""
    slow = copy.deepcopy(gm)
    slow.recompile()
    assert not has_fast_forward(slow)
    return slow


def test_prepared_model_runs_the_fast_forward_bitwise(prepared):
    model, gm, x = prepared
    assert has_fast_forward(gm)
    src, _ = fast_forward_source(gm)
    assert "getattr(self.blocks" not in src and "self._modules['blocks']._modules['0']._modules['add']" in src
    assert "getattr(self.blocks" in gm.code  # gm.code stays fx's text
    slow = _fx_forward(gm)
    y = torch.randn(2, 5, 16)
    assert torch.equal(gm(y), model(y)) and torch.equal(gm(y), slow(y))
    assert torch.equal(gm.get_submodule("blocks.0.add")(y, y), y + y)


def test_prepared_hooks_attached_after_a_call_are_called(prepared):
    _, gm, x = prepared
    expected = gm(x)
    add = gm.get_submodule("blocks.1.add")
    post = Counter(lambda m, args, out: out * 0)
    handle = add.register_forward_hook(post)
    assert torch.equal(gm(x), gm.head(torch.zeros_like(x)).relu()) and post.calls == 1
    handle.remove()
    pre = Counter(lambda m, args: (args[0] * 2,))
    handle = gm.head.register_forward_pre_hook(pre)
    assert not torch.equal(gm(x), expected) and pre.calls == 1
    handle.remove()
    assert torch.equal(gm(x), expected)


def test_prepared_backward_hooks_are_called(prepared):
    _, gm, x = prepared
    softmax = gm.get_submodule("blocks.0.softmax")
    full, pre = Counter(), Counter()
    softmax.register_full_backward_hook(full)
    gm.get_submodule("blocks.0.matmul").register_full_backward_pre_hook(pre)
    gm(x.clone().requires_grad_()).sum().backward()
    assert full.calls == 1 and pre.calls == 1


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_prepared_global_hooks_see_every_call(prepared, kind):
    _, gm, x = prepared
    register = getattr(torch_module, f"register_module_{kind}_hook")
    seen = []
    handle = register(lambda module, *rest: seen.append(module))
    try:
        gm(x.clone().requires_grad_()).sum().backward()
    finally:
        handle.remove()
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    if kind == "full_backward":  # not the mask ops: their outputs are not differentiable
        called -= {"blocks.0.eq", "blocks.1.eq"}
    assert {gm.get_submodule(target) for target in called} <= set(seen)


def test_a_hook_attached_during_the_forward_runs_in_that_forward(prepared):
    _, gm, x = prepared
    late_local, seen, handles = Counter(), [], []

    def attach(module, args):
        handles.append(gm.head.register_forward_hook(late_local))
        handles.append(torch_module.register_module_forward_hook(lambda m, args, out: seen.append(m)))

    handles.append(gm.get_submodule("blocks.0.norm").register_forward_pre_hook(attach))
    try:
        gm(x)
    finally:
        for h in handles:
            h.remove()
    assert late_local.calls == 1
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert [id(m) for m in seen] == [id(gm.get_submodule(t)) for t in called]  # blocks.0.norm onwards: all


def test_prepared_replaced_submodules_are_called(prepared):
    model, gm, x = prepared
    expected = gm(x)

    class Minus(nn.Module):
        def forward(self, a, b):
            return a - b

    block = gm.get_submodule("blocks.1")
    for replace in (lambda new: setattr(block, "add", new),
                    lambda new: gm.set_submodule("blocks.1.add", new),
                    lambda new: block.add_module("add", new),
                    lambda new: block._modules.__setitem__("add", new)):
        new = Minus()
        replace(new)
        assert block.add is new
        assert not torch.equal(gm(x), expected)
        block.add = Add()
        assert torch.equal(gm(x), expected)
    gm.head = nn.Identity()  # a different module type at the same path
    assert torch.equal(gm(x), model.blocks[1](model.blocks[0](x)).relu())


def test_prepared_custom_call_and_patched_forward_are_respected(prepared):
    _, gm, x = prepared
    expected = gm(x)

    class CustomCall(nn.Module):  # a module whose __call__ does more than forward
        calls = 0

        def forward(self, a, b):
            return a + b

        def __call__(self, *args):
            CustomCall.calls += 1
            return super().__call__(*args)

    gm.get_submodule("blocks.0").add = CustomCall()
    assert torch.equal(gm(x), expected) and CustomCall.calls == 1
    calls = []
    gm.head.forward = lambda input: calls.append(1) or nn.functional.linear(input, gm.head.weight, gm.head.bias)
    assert torch.equal(gm(x), expected) and calls == [1]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = torch.sigmoid(self.conv(x)) * x
        return torch.cat([y + x, y], 1).mean(dim=(2, 3))


def test_prepared_model_traces_with_fx_and_jit():
    x = torch.randn(2, 3, 8, 8)
    gm = qprep.prepare(Residual(), (x,))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    retraced = torch.fx.GraphModule(gm, _WrapperLeaves().trace(gm))
    assert [n.target for n in retraced.graph.nodes if n.op == "call_module"] == targets
    assert torch.equal(retraced(x), gm(x))
    jit = torch.jit.trace(gm, (x,))
    assert torch.equal(jit(x), gm(x))


def test_prepared_fast_forward_survives_deepcopy_not_recompile(prepared):
    model, gm, x = prepared
    clone = copy.deepcopy(gm)
    assert has_fast_forward(clone) and torch.equal(clone(x), gm(x))
    clone.get_submodule("blocks.0").add = Sub()
    assert not torch.equal(clone(x), gm(x)) and torch.equal(gm(x), model(x))
    gm.recompile()
    assert not has_fast_forward(gm) and torch.equal(gm(x), model(x))
    install_fast_forward(gm)
    assert has_fast_forward(gm) and torch.equal(gm(x), model(x))


def test_prepared_model_pickles():
    x = torch.randn(2, 3, 8, 8)
    model = Residual()
    loaded = pickle.loads(pickle.dumps(qprep.prepare(model, (x,))))
    assert torch.equal(loaded(x), model(x))


def test_prepared_missing_submodule_is_an_error(prepared):
    _, gm, x = prepared
    del gm.get_submodule("blocks.1").add
    with pytest.raises((AttributeError, KeyError)):
        gm(x)


def test_prepared_lstm_model_fast_paths_compose():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(I, H, 2, bidirectional=True)
            self.out = nn.Linear(2 * H, 3)

        def forward(self, x):
            return self.out(self.lstm(x)[0]) * 2

    model, x = Tagger().eval(), torch.randn(T, B, I)
    with native():
        gm = qprep.prepare(model, (x,))
        expected = model(x)
        assert torch.equal(gm(x), expected)
        counter = Counter()
        gm.lstm.layers[2].cell.forget_product.register_forward_hook(counter)
        assert torch.equal(gm(x), expected) and counter.calls == T
        gm.get_submodule("mul").register_forward_hook(lambda m, args, out: out + 1)
        assert torch.equal(gm(x), expected + 1)


def _module_path(scope: str) -> str:
    path = re.sub(r"__dict__\['_modules'\]\['([^']+)'\]", r"\1", scope)
    return path.removeprefix("_export_root").removeprefix(".")


def test_export_records_every_module_call():
    """dynamo and export record each module call in ``nn_module_stack``: no fast path there."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.residual, self.lstm = Residual(), ModularLSTM(6, 3)

        def forward(self, x):
            return self.lstm(self.residual(x).unsqueeze(0))[0]

    x = torch.randn(2, 3, 8, 8)
    model = Model()
    gm = qprep.prepare(model, (x,), expand_rnns=False)
    program = torch.export.export(gm, (x,), strict=True)
    # dynamo may name a scope by how it reached the module (the first export in a process:
    # "__dict__['_modules']['_export_root'].residual.add"): compare the module paths
    scopes = {_module_path(next(reversed(n.meta["nn_module_stack"].values()))[0])
              for n in program.graph.nodes if n.op == "call_function"}
    wrappers = {n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("residual")}
    assert wrappers <= scopes and "lstm.layers.0.cell.input_gate" in scopes
    assert torch.equal(program.module()(x), model(x))


def test_odd_submodule_names_and_keyword_arguments():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("my-layer", nn.Linear(4, 4))
            self.add_module("it's", nn.ReLU())
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            y = getattr(self, "my-layer")(input=x)
            return getattr(self, "it's")(y) + self.drop(x)

    model, x = Odd().eval(), torch.randn(2, 4)
    gm = qprep.prepare(model, (x,))
    src, _ = fast_forward_source(gm)
    assert "self._modules['my-layer']" in src and '''self._modules["it's"]''' in src and "getattr(self" not in src
    assert torch.equal(gm(x), model(x))
    gm.get_submodule("my-layer").register_forward_hook(lambda m, args, kwargs, out: out * 0, with_kwargs=True)
    assert torch.equal(gm(x), model.drop(x))
