"""expand_rnns (with split_reused_modules): recurrent modules become modular, bit for bit.

Bit-exactness is checked on ATen's native kernels (oneDNN off); with the default kernels
``nn.LSTM`` runs oneDNN's fused LSTM, which ``qprep.verify`` accepts within its bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import qprep
from qprep.modules import ModularGRU, ModularGRUCell, ModularLSTM, ModularLSTMCell, ModularRNN, ModularRNNCell
from qprep.modules.rnn import ONEDNN_LSTM_ATOL
from qprep.passes.expand_rnns import NOTE_REUSE, RNN_TABLE
from qprep.core.records import NOTE, REWRITTEN
from qprep.verify import KERNEL_BOUNDS

pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

T, B, I, H = 5, 2, 6, 8
VOCAB = 20


def onednn_off():
    return torch.backends.mkldnn.flags(enabled=False)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return [t for t in value if t is not None]  # data, batch_sizes, sorted and unsorted indices
    return [t for v in value for t in _tensors(v)]


def _assert_bitwise(expected, got):
    expected, got = _tensors(expected), _tensors(got)
    assert len(expected) == len(got)
    for index, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"output {index} differs by {(a - b).abs().max().item():.3g}"


def _equal_on_default_kernels(model, gm, args, train: bool) -> bool:
    """Whether the two models agree bitwise on the default kernels, run as verify() runs them."""
    modes, outputs = (model.training, gm.training), []
    try:
        for module in (model, gm):
            module.train(train)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(0)  # verify()'s default seed: the same dropout masks
                outputs.append(_tensors(module(*args)))
    finally:
        model.train(modes[0]), gm.train(modes[1])
    return all(torch.equal(a, b) for a, b in zip(*outputs))


def _assert_verified(result, model, gm, args):
    """Equal; and when the default kernels differ at all, equal on the native ones within the bound."""
    assert result.equal, result.table()
    if _equal_on_default_kernels(model, gm, args, result.mode == "train"):
        assert result.reference == "default kernels" and result.kernel_diff is None
    else:
        assert "native kernels" in result.reference
        assert 0 < result.kernel_diff <= result.kernel_bound


def _no_torch_rnn_left(gm):
    gm.graph.lint()
    return not any(type(m) in RNN_TABLE for m in gm.modules())


def _changes(gm, pass_name, action):
    return [c for c in gm.meta["qprep"]["preparation"].changes if c.pass_name == pass_name and c.action == action]


# ----------------------------------------------------------------------------- language model
class TiedLM(nn.Module):
    """Embedding -> 2-layer LSTM (dropout between layers) -> decoder tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, H)
        self.lstm = nn.LSTM(H, H, num_layers=2, dropout=0.5)
        self.decoder = nn.Linear(H, VOCAB)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        output, hidden = self.lstm(self.embedding(tokens))
        return self.decoder(output), hidden


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = TiedLM().eval()
    tokens = torch.randint(0, VOCAB, (T, B))
    return model, qprep.prepare(model, tokens), tokens


def test_lm_structure_tie_and_state_dict(lm):
    model, gm, _ = lm
    assert isinstance(gm.lstm, ModularLSTM) and _no_torch_rnn_left(gm)
    assert gm.decoder.weight is gm.embedding.weight
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(gm.state_dict(), strict=True)
    assert gm.lstm.layers[1].cell.hidden_linear.weight is gm.lstm.weight_hh_l1  # loaded in place, not copied


def test_lm_bit_exact_on_native_kernels_eval_train_and_grad(lm):
    model, gm, tokens = lm
    with onednn_off():
        with torch.no_grad():
            _assert_bitwise(model(tokens), gm(tokens))
        for train in (False, True):
            result = qprep.verify(model, gm, tokens, train=train, grad=True)
            assert result.equal and result.reference == "default kernels", result.table()
            assert result.grads and all(g.equal for g in result.grads)
    assert not model.training and not gm.training


def test_lm_train_mode_dropout_draws_the_same_masks(lm):
    model, gm, tokens = lm
    result = qprep.verify(model, gm, tokens, train=True)
    assert result.mode == "train" and not model.training and not gm.training
    _assert_verified(result, model, gm, (tokens,))


def test_lm_default_kernels_within_the_documented_bound(lm):
    model, gm, tokens = lm
    assert KERNEL_BOUNDS["recurrent (oneDNN)"] == ONEDNN_LSTM_ATOL
    result = gm.meta["qprep"]["preparation"].verification  # prepare() verified on the default kernels
    _assert_verified(result, model, gm, (tokens,))
    if result.kernel_bound is not None:
        assert result.kernel_bound == ONEDNN_LSTM_ATOL


def test_lm_reuse_note_names_the_lstm(lm):
    _, gm, _ = lm
    notes = _changes(gm, "expand_rnns", NOTE)
    assert [(c.module_name, c.module_type) for c in notes] == [("lstm", "qprep.modules.ModularLSTM")]
    assert notes[0].reason == NOTE_REUSE and "by design" in notes[0].reason
    assert not _changes(gm, "split_reused_modules", REWRITTEN)
    rewritten = _changes(gm, "expand_rnns", REWRITTEN)
    assert [(c.module_name, c.target) for c in rewritten] == [("lstm", "torch.nn.LSTM")]


def test_lm_preparing_again_changes_nothing(lm):
    _, gm, tokens = lm
    again = qprep.prepare(gm, tokens)
    assert again.code == gm.code and isinstance(again.lstm, ModularLSTM)
    assert not any(again.meta["qprep"]["preparation"].changed.values())


def test_expand_rnns_false_keeps_nn_lstm():
    torch.manual_seed(0)
    model, tokens = TiedLM().eval(), torch.randint(0, VOCAB, (T, B))
    gm = qprep.prepare(model, tokens, expand_rnns=False)
    assert type(gm.lstm) is nn.LSTM
    assert not _changes(gm, "expand_rnns", REWRITTEN) and not _changes(gm, "expand_rnns", NOTE)
    verification = gm.meta["qprep"]["preparation"].verification
    assert verification.equal and verification.reference == "default kernels"


# ----------------------------------------------------------------------------- GRU / RNN stacks
class Seq(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        output, h_n = self.rnn(x)
        return self.head(output), h_n


STACKS = {
    "gru": (lambda: nn.GRU(I, H, num_layers=2), ModularGRU),
    "rnn_tanh": (lambda: nn.RNN(I, H, num_layers=2, bidirectional=True), ModularRNN),
    "rnn_relu": (lambda: nn.RNN(I, H, nonlinearity="relu", batch_first=True), ModularRNN),
}


@pytest.mark.parametrize("kind", STACKS)
def test_gru_and_rnn_stacks(kind):
    build, modular_cls = STACKS[kind]
    torch.manual_seed(0)
    model, x = Seq(build()).eval(), torch.randn(T, B, I)
    gm = qprep.prepare(model, x)
    assert type(gm.rnn) is modular_cls and _no_torch_rnn_left(gm)
    assert getattr(gm.rnn, "nonlinearity", None) == getattr(model.rnn, "nonlinearity", None)
    assert [id(p) for p in gm.rnn.parameters()] == [id(p) for p in gm.rnn.layers.parameters()]
    assert list(gm.state_dict()) == list(model.state_dict())
    _assert_verified(gm.meta["qprep"]["preparation"].verification, model, gm, (x,))
    with onednn_off():
        result = qprep.verify(model, gm, x, grad=True)
    assert result.equal and result.grads, result.table()


# ----------------------------------------------------------------------------- cells in a Python loop
class CellLoop(nn.Module):
    """A decoder-style loop: the same cell called once per time step."""

    def __init__(self, cell: nn.Module, steps: int = 4):
        super().__init__()
        self.cell, self.steps = cell, steps

    def forward(self, x):
        state = self.cell(x[0])
        outputs = [state[0] if isinstance(self.cell, nn.LSTMCell) else state]
        for t in range(1, self.steps):
            state = self.cell(x[t], state)
            outputs.append(state[0] if isinstance(self.cell, nn.LSTMCell) else state)
        return torch.stack(outputs)


class HasLoop(nn.Module):
    def __init__(self, cell: nn.Module):
        super().__init__()
        self.loop = CellLoop(cell)

    def forward(self, x):
        return self.loop(x)


CELLS = {
    "lstm": (lambda: nn.LSTMCell(I, H), ModularLSTMCell),
    "gru": (lambda: nn.GRUCell(I, H), ModularGRUCell),
    "rnn_tanh": (lambda: nn.RNNCell(I, H), ModularRNNCell),
    "rnn_relu": (lambda: nn.RNNCell(I, H, nonlinearity="relu"), ModularRNNCell),
}


@pytest.mark.parametrize("kind", CELLS)
def test_cell_called_in_a_loop_is_split_per_step_sharing_parameters(kind):
    build, modular_cls = CELLS[kind]
    torch.manual_seed(0)
    model, x = HasLoop(build()).eval(), torch.randn(4, B, I)
    gm = qprep.prepare(model, x)
    names = ["loop.cell", "loop.cell_1", "loop.cell_2", "loop.cell_3"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and "cell" in n.target] == names
    cells = [gm.get_submodule(name) for name in names]
    assert all(type(c) is modular_cls for c in cells) and len({id(c) for c in cells}) == 4
    assert _no_torch_rnn_left(gm)
    for cell in cells[1:]:
        assert [id(p) for p in cell.parameters()] == [id(p) for p in cells[0].parameters()]
        assert cell.input_linear.weight is cells[0].weight_ih
    assert not _changes(gm, "expand_rnns", NOTE)  # cells are split, not noted
    assert list(gm.state_dict()) == list(model.state_dict())
    assert gm.meta["qprep"]["preparation"].verification.reference == "default kernels"
    with torch.no_grad():
        _assert_bitwise(model(x), gm(x))
    result = qprep.verify(model, gm, x, grad=True)
    assert result.equal and result.grads, result.table()


# ----------------------------------------------------------------------------- nested, re-used
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(I, H, batch_first=True, bidirectional=True)

    def forward(self, x):
        output, (h_n, c_n) = self.rnn(x)
        return output, h_n


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.proj = nn.Linear(2 * H, 4)

    def forward(self, x):
        output, h_n = self.encoder(x)
        return self.proj(output), h_n


def test_batch_first_bidirectional_lstm_two_levels_deep():
    torch.manual_seed(0)
    model, x = Nested().eval(), torch.randn(B, T, I)
    gm = qprep.prepare(model, x)
    assert type(gm.encoder.rnn) is ModularLSTM and _no_torch_rnn_left(gm)
    assert gm.encoder.rnn.batch_first and gm.encoder.rnn.bidirectional
    assert [c.module_name for c in _changes(gm, "expand_rnns", NOTE)] == ["encoder.rnn"]
    assert list(gm.state_dict()) == list(model.state_dict())
    _assert_verified(gm.meta["qprep"]["preparation"].verification, model, gm, (x,))
    with onednn_off():
        result = qprep.verify(model, gm, x, grad=True)
    assert result.equal and result.grads, result.table()


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H)

    def forward(self, a, b):
        return torch.cat([self.lstm(a)[0], self.lstm(b)[0]])


def test_lstm_called_twice_is_cloned_sharing_parameters():
    torch.manual_seed(0)
    model, a, b = Twice().eval(), torch.randn(T, B, I), torch.randn(T + 2, B, I)
    gm = qprep.prepare(model, (a, b))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and "lstm" in n.target] == ["lstm", "lstm_1"]
    assert type(gm.lstm) is ModularLSTM and type(gm.lstm_1) is ModularLSTM and gm.lstm is not gm.lstm_1
    assert [id(p) for p in gm.lstm_1.parameters()] == [id(p) for p in gm.lstm.parameters()]
    assert gm.lstm_1.layers[0].cell.input_linear.weight is gm.lstm.weight_ih_l0
    assert [c.module_name for c in _changes(gm, "split_reused_modules", REWRITTEN)] == ["lstm_1"]
    assert [c.module_name for c in _changes(gm, "expand_rnns", NOTE)] == ["lstm"]
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    _assert_verified(gm.meta["qprep"]["preparation"].verification, model, gm, (a, b))
    with onednn_off():
        result = qprep.verify(model, gm, (a, b), grad=True)
    assert result.equal and result.grads, result.table()


# ----------------------------------------------------------------------------- PackedSequence
LENGTHS = [5, 3, 2]


class PackInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H)
        self.lengths = LENGTHS

    def forward(self, x):
        output, hidden = self.lstm(pack_padded_sequence(x, self.lengths))
        return pad_packed_sequence(output)[0], hidden


def test_pack_padded_sequence_in_forward_is_a_recorded_call():
    """The packing calls are recorded as calls (not traced into) and the modular LSTM
    consumes the PackedSequence."""
    model = PackInForward().eval()
    gm = qprep.prepare(model, torch.randn(T, len(LENGTHS), I))
    assert type(gm.lstm) is ModularLSTM
    called = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {pack_padded_sequence, pad_packed_sequence} <= called
    assert qprep.verify(model, gm, torch.randn(T, len(LENGTHS), I), grad=True).equal


class Direct(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H, num_layers=2, bidirectional=True)

    def forward(self, x):
        return self.lstm(x)


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_packed_sequence_through_the_prepared_lstm(enforce_sorted):
    torch.manual_seed(0)
    model = Direct().eval()
    gm = qprep.prepare(model, torch.randn(T, B, I))
    assert type(gm.lstm) is ModularLSTM
    x = torch.randn(T, len(LENGTHS), I)
    lengths = LENGTHS if enforce_sorted else [3, 5, 2]
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    with onednn_off(), torch.no_grad():
        expected, got = model.lstm(packed), gm.lstm(packed)
    assert type(got[0]) is nn.utils.rnn.PackedSequence
    _assert_bitwise(expected, got)
    result = qprep.verify(model, gm, (packed,))  # the packed path of nn.LSTM is ATen's native one
    assert result.equal and result.reference == "default kernels", result.table()


class Pack(nn.Module):
    def __init__(self):
        super().__init__()
        self.lengths = LENGTHS

    def forward(self, x):
        return pack_padded_sequence(x, self.lengths)


class Unpack(nn.Module):
    def forward(self, packed):
        return pad_packed_sequence(packed)[0]


class PackedLeaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.pack, self.lstm, self.unpack = Pack(), nn.LSTM(I, H), Unpack()

    def forward(self, x):
        output, hidden = self.lstm(self.pack(x))
        return self.unpack(output), hidden


def test_packing_in_leaf_modules_prepares_without_example_inputs():
    torch.manual_seed(0)
    model, x = PackedLeaves().eval(), torch.randn(T, len(LENGTHS), I)
    gm = qprep.prepare(model, leaf_modules=[Pack, Unpack])
    assert type(gm.lstm) is ModularLSTM
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["pack", "lstm", "unpack"]
    result = qprep.verify(model, gm, x, grad=True)
    assert result.equal, result.table()


def test_packing_in_leaf_modules_with_example_inputs():
    model, x = PackedLeaves().eval(), torch.randn(T, len(LENGTHS), I)
    gm = qprep.prepare(model, x, leaf_modules=[Pack, Unpack])
    assert type(gm.lstm) is ModularLSTM
    assert gm.meta["qprep"]["preparation"].verification.equal
