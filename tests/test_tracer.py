"""The tracer: source lines, scopes, in-place semantics, leaves, opaque fallbacks, errors."""

import operator
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import qprep
import qprep.examples
from qprep.capture import trace
from qprep.core import provenance
from tests.models import DistillerBlock


def _line_of(text: str, path: str) -> int:
    lines = open(path).read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.strip() == text)


def test_nodes_record_source_lines_and_scopes():
    import qprep.examples as examples_file

    gm, _ = trace(nn.Sequential(DistillerBlock()))
    iadd = next(n for n in gm.graph.nodes if n.target is operator.iadd)
    expected = _line_of("out += identity", examples_file.__file__)
    assert provenance.source_location(iadd).endswith(f"qprep/examples.py:{expected}")
    assert provenance.source_code(iadd) == "out += identity"
    assert provenance.module_scope(iadd) == "0"


def test_augmented_assignment_is_recorded_in_place():
    class M(nn.Module):
        def forward(self, x, y):
            x += y
            x -= 1
            x *= y
            x /= 2
            return x

    gm, _ = trace(M())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [operator.iadd, operator.isub, operator.imul, operator.itruediv]
    a, b = torch.rand(3), torch.rand(3)
    a2 = a.clone()
    out = gm(a2, b)
    assert out is a2 and torch.equal(out, M()(a.clone(), b))


def test_plain_fx_differs_on_aliasing_qprep_does_not():
    class M(nn.Module):
        def forward(self, x):
            y = x * 1
            alias = y
            y += 1
            return alias

    x = torch.zeros(2)
    assert torch.equal(trace(M())[0](x), M()(x))
    assert not torch.equal(torch.fx.symbolic_trace(M())(x), M()(x))


def test_user_leaf_modules_by_type_and_name():
    model = nn.Sequential(DistillerBlock(), DistillerBlock())
    gm, _ = trace(model, qprep.PrepareConfig(leaf_modules=(DistillerBlock,)))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    gm, _ = trace(model, qprep.PrepareConfig(leaf_modules=("1",)))
    assert "1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "0.conv1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_compound_transformer_layer_is_traced_into():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)

        def forward(self, x):
            return self.layer(x)

    model = M().eval()
    gm = qprep.prepare(model, (torch.randn(2, 5, 16),))
    names = {n for n, _ in gm.named_modules()}
    assert "layer.linear1" in names and "layer.self_attn" in names
    assert any(isinstance(m, qprep.modules.Add) for m in gm.modules())
    assert qprep.verify(model, gm, torch.randn(3, 4, 16)).equal
    assert qprep.verify(model, gm, torch.randn(3, 4, 16), train=True).equal


def test_transformer_encoder_decoder_and_transformer_are_traced_into():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
            self.t = nn.Transformer(16, 2, 1, 1, 32, batch_first=True)

        def forward(self, x, y):
            mask = nn.Transformer.generate_square_subsequent_mask(y.size(1))
            return self.t(self.enc(x) * 2, y, tgt_mask=mask, tgt_is_causal=True)

    model = M().eval()
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 4, 16))
    gm = qprep.prepare(model, inputs)
    assert gm.meta["qprep"]["preparation"].trace_notes == ()
    names = {n for n, _ in gm.named_modules()}
    assert {"enc.layers.0.linear1", "t.decoder.layers.0.multihead_attn", "t.encoder.layers.0.add"} <= names
    assert isinstance(gm.get_submodule("enc.layers.1.self_attn"), qprep.modules.ModularMultiheadAttention)
    fresh = (torch.randn(3, 6, 16), torch.randn(3, 3, 16))
    assert qprep.verify(model, gm, fresh).equal
    assert qprep.verify(model, gm, fresh, train=True).equal


def test_untraceable_compound_module_kept_opaque_with_note():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x, mask):
            return self.enc(x, mask=mask) * 2  # is_causal=None: torch compares the mask's values

    model = M().eval()
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    gm = qprep.prepare(model, (torch.randn(2, 5, 16), mask))
    notes = gm.meta["qprep"]["preparation"].trace_notes
    assert [n.module for n in notes] == ["enc"] and notes[0].module_type == "TransformerEncoder"
    assert "enc" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert qprep.verify(model, gm, (torch.randn(2, 5, 16), mask)).equal


def test_untraceable_leaf_mode_keeps_rest_prepared():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else -x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Branchy()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(self.a(x)) + 1)

    model = M()
    gm = qprep.prepare(model, (torch.randn(2, 4),), on_untraceable="leaf")
    assert isinstance(gm.get_submodule("add"), qprep.modules.Add)
    assert isinstance(gm.get_submodule("relu"), nn.ReLU)
    assert qprep.verify(model, gm, torch.randn(3, 4)).equal


def test_root_untraceable_error_names_line():
    class M(nn.Module):
        def forward(self, x):
            for _ in range(int(x.sum())):
                x = x + 1
            return x

    with pytest.raises(qprep.TraceError) as info:
        qprep.prepare(M())
    assert "test_tracer.py" in str(info.value) and "for _ in range(int(x.sum()))" in str(info.value)
    assert "Traceback" not in str(info.value)


def test_trace_rejects_non_module():
    with pytest.raises(qprep.InputError):
        trace(lambda x: x)


def test_len_of_a_traced_tensor_is_recorded():
    class M(nn.Module):
        def forward(self, x):
            return x.view(len(x), -1) * 2

    model = M()
    gm = qprep.prepare(model, (torch.randn(2, 3, 4),))
    assert len in [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert qprep.verify(model, gm, torch.randn(5, 3, 2)).equal
    assert len([1, 2]) == 2  # the builtin is restored after tracing


def test_factories_with_traced_sizes_are_recorded():
    ones = torch.ones

    class M(nn.Module):
        def forward(self, x):
            t = x.size(1)
            return x * torch.ones(t, t).tril() + torch.full((t, t), 0.5)

    model = M()
    gm = qprep.prepare(model, (torch.randn(2, 3, 3),))
    assert qprep.verify(model, gm, torch.randn(4, 5, 5)).equal
    assert torch.ones is ones  # restored after tracing


def test_buffers_sliced_by_traced_sizes():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("ids", torch.arange(16).unsqueeze(0))
            self.emb = nn.Embedding(16, 4)

        def forward(self, x):
            return x + self.emb(self.ids[:, : x.size(1)])

    model = Positions()
    gm = qprep.prepare(model, (torch.randn(2, 5, 4),))
    assert qprep.verify(model, gm, torch.randn(3, 7, 4)).equal


def test_leaves_are_decided_by_type_not_by_module_name():
    """A model class defined under qprep (qprep.examples) is user code: traced into."""
    model = nn.Sequential(qprep.examples.DistillerBlock(), nn.ReLU())
    gm = qprep.prepare(model, (torch.randn(1, 8, 8, 8),))
    rewritten = [c for c in gm.meta["qprep"]["preparation"].changes if c.action == "rewritten"]
    assert {c.module_name for c in rewritten} == {"0.add", "0.relu_1", "0.cat", "0.sigmoid"}


def test_plain_pytest_collects_from_the_repository_root():
    """``pytest`` (the script, which does not put the working directory on sys.path, unlike
    ``python -m pytest``) finds the ``tests`` package."""
    script = pathlib.Path(sys.executable).with_name("pytest")
    if not script.exists():
        pytest.skip(f"no pytest script beside {sys.executable}")
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([str(script), "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_layers.py"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


class _ScriptedPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return (self.fc(self.scripted(x)) + x).view(x.shape[0], -1)


def test_a_torchscript_submodule_is_kept_whole():
    """Compiled TorchScript has no Python to trace into: it is one module call, and the
    state_dict keys are the original's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        model = _ScriptedPart().eval()
    gm = qprep.prepare(model, torch.randn(2, 4))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["scripted", "fc", "add"]
    assert list(gm.state_dict()) == list(model.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(gm(x), model(x))


class _RoundSTE(torch.autograd.Function):
    """A straight-through estimator: round forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad * ctx.alpha, None


class _CustomGradients(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return _RoundSTE.apply(_ReverseGrad.apply(self.fc(x), 0.5)) * 2


def test_a_users_autograd_function_is_one_call_and_keeps_its_backward():
    """Traced into, the Functions' forwards would be plain ops: equal outputs, but the
    straight-through and reversed gradients lost. Recorded whole, gradients are equal too."""
    from tests.models import compute_ops_outside_modules

    model = _CustomGradients().train()
    gm = qprep.prepare(model, torch.randn(2, 4))
    calls = [m for m in gm.modules() if isinstance(m, qprep.modules.Functional)]
    assert len(calls) == 2 and compute_ops_outside_modules(gm) == []
    result = qprep.verify(model, gm, torch.randn(3, 4), grad=True)
    assert result.equal and result.grads and all(g.equal for g in result.grads), result.table()
    assert _RoundSTE.apply(torch.tensor([0.4])).item() == 0.0  # Function.apply is torch's own again


class _HalvesItsGradient(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.requires_grad:
            y.register_hook(lambda grad: grad * 0.5)
        return y.relu()


def test_a_branch_on_requires_grad_is_verified_in_the_callers_grad_mode():
    """``y.requires_grad`` of a computed tensor follows the grad mode: verification runs such a
    model with gradients on (as prepared), and the tensor hook halves both models' gradients."""
    model = _HalvesItsGradient().train()
    gm = qprep.prepare(model, torch.randn(2, 4))
    result = qprep.verify(model, gm, torch.randn(3, 4), grad=True)
    assert result.equal and result.grads, result.table()
    with torch.no_grad(), pytest.raises(qprep.GuardError, match="requires_grad"):
        gm(torch.randn(3, 4))


class _RoundWithoutGradient(nn.Module):
    """A user's replacement for torch.round: the same values, but a straight-through
    gradient where torch.round's is zero."""

    def forward(self, x):
        return _RoundSTE.apply(x)


class _Rounds(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.round(self.fc(x)) * 2


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("inference only")


class _InferenceOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return _NoBackward.apply(self.fc(x))


def test_a_model_prepared_in_train_mode_is_verified_with_its_gradients():
    """Equal outputs with other gradients are refused in train mode (the model is to be
    trained), accepted in eval mode; a model whose own backward fails is compared on outputs."""
    options = {"op_modules": {torch.round: _RoundWithoutGradient}}
    x = torch.randn(2, 4)
    with pytest.raises(qprep.NotEquivalentError, match="grad"):
        qprep.prepare(_Rounds().train(), x, **options)
    qprep.prepare(_Rounds().eval(), x, **options)
    model = _InferenceOnly().train()
    assert torch.equal(qprep.prepare(model, x)(x), model(x))


class _CompiledPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), backend="eager")
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.block(x)) + x


def test_a_compiled_submodule_is_traced_as_the_module_it_compiles():
    model = _CompiledPart()
    gm = qprep.prepare(model, torch.randn(2, 4))  # fx traces the module torch.compile wraps
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
        "block._orig_mod.0", "block._orig_mod.1", "fc", "add"]
    assert list(gm.state_dict()) == list(model.state_dict())
    with pytest.raises(qprep.InputError, match=r"torch.compile\(\) wrapper.*model._orig_mod"):
        qprep.prepare(torch.compile(model, backend="eager"), torch.randn(2, 4))
