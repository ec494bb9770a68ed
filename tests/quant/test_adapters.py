"""AIMET QuantSim and Brevitas on prepared models: a quantizer on every op.

Optional extras: each test skips, saying why, where its package is not installed."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qprep
from qprep.examples import DistillerBlock, TinyLSTMLM
from tests.quant.tasks import SmallCNN, cnn_accuracy

MODELS = [
    ("DistillerBlock", DistillerBlock, lambda: (torch.randn(2, 8, 8, 8),)),
    ("SmallCNN", SmallCNN, lambda: (torch.randn(2, 1, 12, 12),)),
    ("TinyLSTMLM", TinyLSTMLM, lambda: (torch.randint(0, 100, (6, 2)),)),
]


@pytest.fixture
def aimet():
    pytest.importorskip("aimet_torch", reason="aimet-torch not installed (pip install 'qprep[aimet]')")
    logging.getLogger("Quant").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from qprep.quant.adapters import aimet as adapter
    return adapter


@pytest.fixture
def brevitas():
    pytest.importorskip("brevitas", reason="brevitas not installed (pip install 'qprep[brevitas]')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from qprep.quant.adapters import brevitas as adapter
    return adapter


# ----------------------------------------------------------------------------- AIMET
@pytest.mark.parametrize("name, build, inputs", MODELS, ids=[m[0] for m in MODELS])
def test_aimet_quantsim_quantizes_every_op(aimet, name, build, inputs):
    model, x = build().eval(), inputs()
    gm = qprep.prepare(model, x)
    assert torch.equal(aimet.to_aimet(gm)(*x), gm(*x))  # the mapping computes the same, bit for bit
    sim = aimet.quantsim(gm, x)
    sim.compute_encodings(lambda m: m(*x))
    assert aimet.unquantized_ops(sim.model) == []
    assert qprep.coverage(gm, x).fraction == 1.0
    with torch.no_grad():
        out = sim.model(*x)
    assert not torch.equal(out, gm(*x)) and torch.allclose(out, gm(*x), atol=0.5)


def test_aimet_maps_wrappers_to_its_elementwise_modules(aimet):
    import aimet_torch.nn.modules.custom as ops

    class Ops(nn.Module):
        def forward(self, x, y):
            z = torch.cat([x * y, x + y], dim=1)
            return (1 - z).mean(dim=0, keepdim=True) @ z.transpose(0, 1)

    x = (torch.randn(3, 4), torch.randn(3, 4))
    gm = qprep.prepare(Ops(), x)
    mapped = aimet.to_aimet(gm)
    kinds = {n: type(m.op) for n, m in mapped.named_children() if isinstance(m, aimet.AimetCall)}
    # `1 - z` is traced as operator.sub(1, z): AIMET's Subtract (torch.sub) computes it too
    assert kinds == {"mul": ops.Multiply, "add": ops.Add, "cat": ops.Concat, "sub": ops.Subtract,
                     "mean": ops.Mean, "matmul": ops.MatMul}
    assert torch.equal(mapped(*x), gm(*x))
    sim = aimet.quantsim(gm, x)
    sim.compute_encodings(lambda m: m(*x))
    assert aimet.unquantized_ops(sim.model) == []


def test_aimet_generic_definition_for_wrappers_it_has_no_module_for(aimet):
    class Clamped(nn.Module):
        def forward(self, x):
            return torch.stack([x.clamp(-1, 1), x], dim=0)

    x = (torch.randn(3, 4),)
    gm = qprep.prepare(Clamped(), x)
    sim = aimet.quantsim(gm, x)
    sim.compute_encodings(lambda m: m(*x))
    assert {type(sim.model.clamp).__name__, type(sim.model.stack).__name__} == {"QuantizedClamp", "QuantizedStack"}
    assert aimet.unquantized_ops(sim.model) == []
    with torch.no_grad():
        assert torch.allclose(sim.model(*x), gm(*x), atol=0.05)


def test_aimet_recurrent_cells_reused_over_time_keep_their_quantizers(aimet):
    model, x = TinyLSTMLM().eval(), (torch.randint(0, 100, (6, 2)),)
    gm = qprep.prepare(model, x)
    kept_off = aimet.quantsim(gm, x, every_op=False)  # AIMET disables modules called more than once
    assert any("lstm.layers.0.cell" in op for op in aimet.unquantized_ops(kept_off.model))
    sim = aimet.quantsim(gm, x)
    assert "lstm.layers.0.cell.forget_gate" in sim.qprep_enabled


def test_aimet_accuracy_on_trained_cnn(aimet, cnn_task):
    model, test, batches = cnn_task
    gm = qprep.prepare(model, (batches[0][:2],))
    sim = aimet.quantsim(gm, (batches[0][:2],))
    sim.compute_encodings(lambda m: [m(b) for b in batches])
    assert cnn_accuracy(sim.model, test) >= cnn_accuracy(model, test) - 1.0


class _Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * torch.ones(len(x), x.size(1))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if y.sum() > 0 else y - 1


class _WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Branchy(), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) + x)


class _Aliasing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        w = y
        y += x
        return w * 2


@pytest.mark.slow
def test_models_aimets_preparer_cannot_handle(aimet):
    """The README's claims about aimet_torch.model_preparer.prepare_model (aimet-torch 2.42)."""
    from aimet_torch.model_preparer import prepare_model

    x = (torch.randn(3, 8),)
    for model, options in ((_Shapes(), {}), (_WithBranchy(), {"on_untraceable": "leaf"})):
        with pytest.raises(Exception):
            prepare_model(model)
        gm = qprep.prepare(model, x, **options)
        sim = aimet.quantsim(gm, x)
        sim.compute_encodings(lambda m: m(*x))
        assert aimet.unquantized_ops(sim.model) == []
    model, x = _Aliasing().eval(), (torch.randn(1, 4, 4, 4),)
    assert not torch.equal(prepare_model(model)(*x), model(*x))  # AIMET's rewrite breaks `w = y; y += x`
    assert torch.equal(qprep.prepare(model, x)(*x), model(*x))
    lstm = TinyLSTMLM().eval()
    assert qprep.coverage(prepare_model(lstm), lstm.example_inputs()).fraction < 0.2  # nn.LSTM stays fused


# ----------------------------------------------------------------------------- Brevitas
@pytest.mark.parametrize("name, build, inputs", MODELS, ids=[m[0] for m in MODELS])
def test_brevitas_quantizes_every_op(brevitas, name, build, inputs):
    from brevitas.graph.calibrate import calibration_mode

    model, x = build().eval(), inputs()
    gm = qprep.prepare(model, x)
    q = brevitas.quantize(gm, x)
    with torch.no_grad(), calibration_mode(q):
        q(*x)
    assert brevitas.unquantized_ops(q) == [] and qprep.coverage(gm, x).fraction == 1.0
    with torch.no_grad():
        out = q.eval()(*x)
    assert not torch.equal(out, gm(*x)) and torch.allclose(out, gm(*x), atol=0.5)
    # on the original the same swap reaches its modules only: coverage shows the ops it misses
    # (and nn.LSTM, whose output is a tuple, gets no quantizer at all)
    raw = brevitas.quantize(model, x)
    assert brevitas.unquantized_ops(raw) == (["lstm (LSTM)"] if name == "TinyLSTMLM" else [])
    assert qprep.coverage(model, x).fraction < 1.0


def test_brevitas_keeps_tied_weights_and_reports_a_missing_quantizer(brevitas):
    model, x = TinyLSTMLM().eval(), (torch.randint(0, 100, (6, 2)),)
    q = brevitas.quantize(qprep.prepare(model, x), x)
    assert q.decoder.weight is q.embed.module.weight
    cell = q.lstm.layers[0].cell
    assert cell.input_linear.weight is q.lstm.weight_ih_l0  # the stack's Parameter, as before
    cell.forget_gate = nn.Sigmoid()
    assert brevitas.unquantized_ops(q) == ["lstm.layers.0.cell.forget_gate (Sigmoid)"]


def test_brevitas_accuracy_on_trained_cnn(brevitas, cnn_task):
    from brevitas.graph.calibrate import calibration_mode

    model, test, batches = cnn_task
    q = brevitas.quantize(qprep.prepare(model, (batches[0][:2],)), (batches[0][:2],))
    with torch.no_grad(), calibration_mode(q):
        for b in batches:
            q(b)
    assert cnn_accuracy(q.eval(), test) >= cnn_accuracy(model, test) - 1.0
