"""qprep.coverage: which float compute ops a module-level quantizer can observe."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qprep
from qprep.report.coverage import coverage_lines
from qprep.examples import DistillerBlock, TinyLSTMLM
from tests.quant.tasks import SmallCNN


def _before_after(model: nn.Module, inputs: tuple):
    model.eval()
    before = qprep.coverage(model, inputs)
    after = qprep.coverage(qprep.prepare(model, inputs), inputs)
    return before, after


def test_distiller_block_names_the_three_missed_ops_and_the_shared_relu():
    before, after = _before_after(DistillerBlock(), (torch.randn(2, 8, 16, 16),))
    missed = [(op.op, op.source.rsplit(":", 1)[-1]) for op in before.unobserved]
    assert [m[0] for m in missed] == ["operator.iadd", "torch.cat", "Tensor.sigmoid"]
    assert all(op.source.startswith("qprep/examples.py:") or "examples.py:" in op.source for op in before.unobserved)
    assert [op.location for op in before.shared] == ["relu", "relu"]
    assert (before.observed, before.total) == (6, 9)
    assert (after.observed, after.total) == (9, 9) and after.fraction == 1.0 and not after.shared


def test_lstm_counts_gate_ops_of_the_fused_kernel():
    model = TinyLSTMLM(vocab=50, dim=16, layers=2, dropout=0.1)
    before, after = _before_after(model, model.example_inputs())
    lstm_ops = [op for op in before.ops if op.location.startswith("lstm.")]
    # 12 gate ops per cell x 2 layers + the inter-layer dropout; only the output is observed
    assert len(lstm_ops) == 25
    assert [op.location for op in lstm_ops if op.observed] == ["lstm.layers.1.cell.output_product"]
    assert after.total == before.total and after.fraction == 1.0


def test_fused_and_modular_totals_agree_for_gru_rnn_cells_and_attention():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(8, 8, 2, bidirectional=True)
            self.rnn = nn.RNN(16, 8, nonlinearity="relu")
            self.cell = nn.LSTMCell(8, 8)
            self.mha = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            y, _ = self.gru(x)
            y, _ = self.rnn(y)
            h, _ = self.cell(y[0])
            a, _ = self.mha(y, y, y)
            return a.sum(0) + h

    before, after = _before_after(Recurrent(), (torch.randn(5, 2, 8),))
    per_module = {name: sum(op.location.startswith(name + ".") for op in before.ops) for name in ("gru", "rnn", "cell", "mha")}
    # GRU: 11 gate ops x 2 layers x 2 directions + dropout; RNN: 4; LSTMCell: 12; attention: the ops it runs
    assert per_module["gru"] == 45 and per_module["rnn"] == 4 and per_module["cell"] == 12
    assert [op.location for op in before.ops if op.location.startswith("mha.") and op.observed] == ["mha.out_proj"]
    assert after.total == before.total and after.fraction == 1.0


class _Branchy(nn.Module):
    """Data-dependent control flow: cannot be traced, kept opaque and counted by running it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y * 2
        return y - 1


class _WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Branchy()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.inner(x)))


def test_opaque_submodule_is_counted_by_running_it():
    cov = qprep.coverage(_WithOpaque(), (torch.randn(3, 4),))
    assert any("inner" in note and "kept opaque" in note for note in cov.notes)
    inner = [op for op in cov.ops if op.location.startswith("inner")]
    # y.sum() feeds the branch: a float op too; then the branch taken (y * 2 or y - 1)
    assert [(op.op, op.observed) for op in inner][:2] == [("Linear", True), ("sum", False)]
    assert len(inner) == 3 and inner[2].op in ("mul", "sub") and not inner[2].observed
    assert inner[2].source.endswith(("test_coverage.py:77", "test_coverage.py:78"))
    assert [op.op for op in cov.unobserved if op.location.startswith("<root>")] == ["torch.relu"]


def test_untraceable_root_is_counted_by_running_it():
    cov = qprep.coverage(_Branchy(), (torch.randn(3, 4),))
    assert "root forward could not be traced" in cov.notes[0]
    assert cov.total == 3 and cov.observed == 1  # lin; y.sum() and the branch op unobserved


def test_non_float_and_data_movement_ops_are_not_counted():
    class Indexing(nn.Module):
        def forward(self, x, idx):
            y = x.view(2, -1).transpose(0, 1)[idx]     # data movement
            mask = y > 0                                # bool
            k = x.argmax()                              # int64
            return torch.where(mask, y, y.exp()), k + 1

    cov = qprep.coverage(Indexing(), (torch.randn(2, 3), torch.tensor([0, 2])))
    assert sorted(op.op for op in cov.ops) == ["Tensor.exp", "torch.where"]


def test_buffers_and_model_are_left_alone():
    model = SmallCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qprep.coverage(model, (torch.randn(4, 1, 12, 12),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_coverage_lines_for_qprep_check():
    cov = qprep.coverage(DistillerBlock().eval(), (torch.randn(1, 8, 8, 8),))
    lines = coverage_lines(cov)
    assert lines[0] == "coverage: 6 of 9 float compute ops observable by a module-level quantizer (66.7%)"
    assert "share one quantizer" in lines[1] and "relu" in lines[1]
    assert sum("operator.iadd" in line or "torch.cat" in line or "Tensor.sigmoid" in line for line in lines) == 3
    assert coverage_lines(cov, limit=1)[-1].startswith("    ... and 2 more")
    assert cov.as_dict()["schema"] == "qprep.coverage/1" and cov.as_dict()["total"] == 9
    assert "operator.iadd" in cov.table(unobserved_only=True) and "Conv2d" not in cov.table(unobserved_only=True)


def test_dict_inputs_and_defaults():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask=None):
            y = self.lin(x)
            return y if mask is None else y * mask

    cov = qprep.coverage(Masked(), {"x": torch.randn(2, 4)})
    assert (cov.observed, cov.total) == (1, 1)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_torchvision_models_reach_full_coverage(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)()
    before, after = _before_after(model, (torch.randn(1, 3, 64, 64),))
    assert before.fraction < 1.0 and after.fraction == 1.0 and after.total == before.total
    if name == "resnet18":
        assert [op.op for op in before.unobserved] == ["operator.iadd"] * 8


@pytest.mark.slow
def test_timm_model_reaches_full_coverage():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    before, after = _before_after(model, (torch.randn(1, 3, 64, 64),))
    assert before.fraction < 0.7 and after.fraction == 1.0 and after.total == before.total


def test_prepared_transformer_encoder_reaches_full_coverage():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 2)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(F.gelu(self.enc(x).mean(0)))

    before, after = _before_after(Encoder(), (torch.randn(5, 2, 16),))
    assert before.fraction < 0.5 and after.fraction == 1.0 and after.total == before.total
