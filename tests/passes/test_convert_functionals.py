"""convert_functionals: every spec entry, parametric functionals, dropout and mode."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qprep
from qprep.core.dual import DualGraphModule
from qprep.passes.functional_table import FUNCTIONAL_SPECS, METHOD_SPECS
from qprep.core._compat import boolean_dispatch_parts
from qprep.passes.functional_table import WITHOUT_MODULE
from tests.models import CallModel, FunctionalNet
from tests.op_cases import FUNCTIONAL_CASES, TWIN_CASES

PARAMETRIC = {F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
              F.conv_transpose3d, F.batch_norm, F.layer_norm, F.rms_norm, F.group_norm, F.instance_norm,
              F.embedding, F.prelu}
MODE = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


def _inputs(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(*s, generator=g) + 0.5 for s in shapes)


def _functional_nodes(gm):
    return [n for n in gm.graph.nodes if (n.op == "call_function" and n.target in FUNCTIONAL_SPECS)
            or (n.op == "call_method" and n.target in METHOD_SPECS)]


DISPATCHED = {pick for fn in FUNCTIONAL_CASES for pick in boolean_dispatch_parts(fn)}
# Calls whose spec rightly keeps them in an exact wrapper (training fixed to its default).
WRAPPED = {F.rrelu}


# torch.* twins taking the model's weights or a training flag: TwinNet below calls each.
PARAMETRIC_TWINS = {torch.batch_norm, torch.instance_norm, torch.layer_norm, torch.group_norm, torch.embedding,
                    torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout, torch.ops.aten.conv1d,
                    torch.ops.aten.conv2d, torch.ops.aten.conv3d, torch.ops.aten.layer_norm, torch.ops.aten.group_norm,
                    torch.ops.aten.batch_norm, torch.ops.aten.dropout, torch.ops.aten.embedding}


def test_every_spec_has_a_case():
    covered = set(FUNCTIONAL_CASES) | set(TWIN_CASES) | PARAMETRIC | MODE | DISPATCHED | PARAMETRIC_TWINS
    assert set(FUNCTIONAL_SPECS) <= covered


@pytest.mark.parametrize("fn", list(TWIN_CASES), ids=lambda f: str(getattr(f, "__name__", f)))
def test_twin_entry_bit_exact(fn):
    call, shapes = TWIN_CASES[fn]
    model = CallModel(call, len(shapes))
    gm = qprep.prepare(model, _inputs(shapes, 1))
    assert not _functional_nodes(gm) and not any(isinstance(m, qprep.modules.Functional) for m in gm.modules()), gm
    assert qprep.verify(model, gm, _inputs(shapes, 2)).equal


class TwinNet(nn.Module):
    """The torch.* and aten twins that take the model's own weights or follow self.training."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv1d(3, 3, 1), nn.Conv2d(3, 3, 3), nn.Conv3d(3, 3, 1)
        self.bn, self.inorm = nn.BatchNorm2d(3), nn.InstanceNorm2d(3, affine=True)
        self.ln, self.gn = nn.LayerNorm(6), nn.GroupNorm(1, 3)
        self.emb = nn.Embedding(10, 6, padding_idx=2)

    def forward(self, x, tokens):
        a = torch.ops.aten.conv2d(x, self.conv2.weight, self.conv2.bias)
        a = torch.batch_norm(a, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var, self.training,
                             0.1, 1e-5, True)
        a = torch.ops.aten.batch_norm(a, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var,
                                      self.training, 0.1, 1e-5, True)
        a = torch.instance_norm(a, self.inorm.weight, self.inorm.bias, None, None, True, 0.1, 1e-5, True)
        a = torch.group_norm(a, 1, self.gn.weight, self.gn.bias, 1e-5, True)
        a = torch.ops.aten.group_norm(a, 1, self.gn.weight, self.gn.bias)
        a = torch.layer_norm(a, (6,), self.ln.weight, self.ln.bias, 1e-5, True)
        a = torch.ops.aten.layer_norm(a, [6], self.ln.weight, self.ln.bias)
        a = torch.dropout(a, 0.2, self.training) + torch.alpha_dropout(a, 0.1, self.training)
        a = torch.feature_alpha_dropout(a, 0.1, self.training) + torch.ops.aten.dropout(a, 0.3, self.training)
        b = torch.ops.aten.conv1d(x[:, :, 0], self.conv1.weight, self.conv1.bias)
        c = torch.ops.aten.conv3d(x.unsqueeze(2), self.conv3.weight, self.conv3.bias)
        e = torch.embedding(self.emb.weight, tokens, 2) + torch.ops.aten.embedding(self.emb.weight, tokens)
        return a, b, c, e


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_parametric_and_mode_twins_become_modules_sharing_the_weights(mode):
    model = TwinNet().train(mode == "train")
    example = (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5)))
    gm = qprep.prepare(model, example)
    assert not _functional_nodes(gm) and not any(isinstance(m, qprep.modules.Functional) for m in gm.modules()), gm
    assert set(gm.state_dict()) == set(model.state_dict())
    assert gm.batchnorm2d.weight is gm.bn.weight and gm.embedding.weight is gm.emb.weight
    assert gm.embedding.padding_idx == 2 and gm.embedding_1.padding_idx is None
    fresh = (torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3, 4)))
    assert qprep.verify(model, gm, fresh, train=False).equal and qprep.verify(model, gm, fresh, train=True).equal


@pytest.mark.parametrize("fn", [F.max_pool2d, F.adaptive_max_pool1d], ids=lambda f: f.__name__)
@pytest.mark.parametrize("indices", [True, False])
def test_boolean_dispatch_picks_are_converted(fn, indices):
    model = CallModel(lambda x: fn(x, 2, return_indices=indices))
    shape = (1, 2, 6, 6) if fn is F.max_pool2d else (1, 2, 6)
    gm = qprep.prepare(model, (torch.rand(*shape),))
    pools = [m for m in gm.modules() if "Pool" in type(m).__name__]
    assert len(pools) == 1 and pools[0].return_indices is indices
    assert qprep.verify(model, gm, torch.rand(*shape)).equal


@pytest.mark.parametrize("fn", list(FUNCTIONAL_CASES), ids=lambda f: getattr(f, "__name__", str(f)))
def test_spec_entry_bit_exact(fn):
    call, shapes = FUNCTIONAL_CASES[fn]
    model = CallModel(call, len(shapes))
    gm = qprep.prepare(model, _inputs(shapes, 1))
    gm.graph.lint()
    assert not _functional_nodes(gm), gm.code
    expected = qprep.modules.Functional if fn in WRAPPED else FUNCTIONAL_SPECS[fn].module
    names = {type(m).__name__ for m in gm.modules()} | {type(m) for m in gm.modules()}
    assert expected in names or (expected == "Pad" and any("Pad" in str(n) for n in names)), gm
    assert qprep.verify(model, gm, _inputs(shapes, 2)).equal


@pytest.mark.parametrize("name,call,module", [
    ("relu", lambda x: (x - 1).relu(), nn.ReLU), ("relu_", lambda x: (x - 1).relu_(), nn.ReLU),
    ("sigmoid", lambda x: x.sigmoid(), nn.Sigmoid), ("tanh", lambda x: x.tanh(), nn.Tanh),
    ("softmax", lambda x: x.softmax(-1), nn.Softmax), ("log_softmax", lambda x: x.log_softmax(dim=0), nn.LogSoftmax),
    ("flatten", lambda x: x.flatten(1), nn.Flatten),
    ("sigmoid_", lambda x: (x * 1).sigmoid_(), qprep.modules.Functional),
    ("tanh_", lambda x: (x * 1).tanh_(), qprep.modules.Functional),
])
def test_method_spec_bit_exact(name, call, module):
    assert name in METHOD_SPECS
    model = CallModel(call)
    gm = qprep.prepare(model, (torch.rand(3, 4, 2),))
    assert any(type(m) is module for m in gm.modules()), gm
    assert qprep.verify(model, gm, torch.rand(3, 4, 2)).equal


def test_inplace_relu_keeps_inplace():
    gm = qprep.prepare(CallModel(lambda x: F.relu(x * 1, inplace=True)), (torch.randn(4),))
    assert gm.get_submodule("relu").inplace is True


def test_method_specs_all_tested():
    tested = {"relu", "relu_", "sigmoid", "tanh", "softmax", "log_softmax", "flatten", "sigmoid_", "tanh_"}
    assert set(METHOD_SPECS) <= tested


def test_parametric_functionals_share_parameters_and_keys():
    model = FunctionalNet().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = qprep.prepare(model, (x,))
    types = {type(m) for m in gm.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear, nn.LayerNorm} <= types
    assert gm.get_submodule("conv2d").weight is gm.weight
    assert gm.get_submodule("batchnorm2d").running_mean is gm.mean
    # no copies, same state_dict keys, strict load of the original's checkpoint
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    assert not _functional_nodes(gm)
    assert qprep.verify(model, gm, torch.randn(3, 3, 6, 6)).equal


def test_batch_norm_buffer_updates_land_in_the_models_buffers():
    model = FunctionalNet().train()
    gm = qprep.prepare(model, (torch.randn(2, 3, 6, 6),))
    before = gm.mean.clone()
    gm(torch.randn(4, 3, 6, 6))
    assert not torch.equal(before, gm.mean)
    # the same update as the original, bit for bit
    model(torch.zeros(0, 3, 6, 6)) if False else None
    assert qprep.verify(model, gm, torch.randn(4, 3, 6, 6), train=True).equal


def test_dropout_follows_mode_after_preparation():
    model = FunctionalNet().eval()
    gm = qprep.prepare(model, (torch.randn(2, 3, 6, 6),))
    dropout = gm.get_submodule("dropout")
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.3
    x = torch.randn(4, 3, 6, 6)
    assert qprep.verify(model, gm, x, train=True).equal  # same RNG, same masks
    gm.train()
    torch.manual_seed(1)
    a = gm(x)
    gm.eval()
    b = gm(x)
    assert not torch.equal(a, b)  # dropout active in train mode only


def _dropout_shape(fn):
    return {F.dropout3d: (2, 4, 5, 5, 5), F.dropout1d: (2, 4, 5)}.get(fn, (2, 4, 5, 5))


@pytest.mark.parametrize("fn", sorted(MODE, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_fixed_training_flag_is_kept_exactly(fn):
    """``F.dropout(x, 0.5)`` drops even in eval mode (training defaults to True)."""
    shape = _dropout_shape(fn)
    model = CallModel(lambda x: fn(x, 0.5, training=True)).eval()
    gm = qprep.prepare(model, (torch.randn(*shape),))
    wrapper = [m for m in gm.modules() if isinstance(m, qprep.modules.Functional)]
    assert len(wrapper) == 1
    record = [c for c in gm.meta["qprep"]["preparation"].changes if c.pass_name == "convert_functionals"]
    assert "fixed in the source" in record[0].reason
    assert qprep.verify(model, gm, torch.randn(*shape)).equal


@pytest.mark.parametrize("fn", sorted(MODE, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_training_flag_from_self_training_becomes_module(fn):
    class Net(nn.Module):
        def forward(self, x):
            return fn(x, 0.25, self.training)

    shape = _dropout_shape(fn)
    model = Net().eval()
    gm = qprep.prepare(model, (torch.randn(*shape),))
    assert not any(isinstance(m, qprep.modules.Functional) for m in gm.modules()), gm
    assert qprep.verify(model, gm, torch.randn(*shape), train=True).equal


def test_no_module_functional_uses_exact_wrapper():
    model = CallModel(lambda x: F.normalize(x, dim=0) + F.interpolate(x, scale_factor=1.0, mode="bilinear", antialias=True))
    x = torch.rand(1, 2, 4, 4)
    gm = qprep.prepare(model, (x,))
    wrappers = [m for m in gm.modules() if isinstance(m, qprep.modules.Functional)]
    assert {m.call for m in wrappers} == {F.normalize, F.interpolate}
    assert F.normalize in WITHOUT_MODULE
    assert "torch.nn.functional.normalize" in repr(gm.get_submodule("normalize"))
    assert qprep.verify(model, gm, torch.rand(1, 2, 4, 4)).equal


def test_computed_weight_is_kept_in_wrapper_with_reason():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return F.linear(x, self.w * 0.5)

    model = Masked()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    change = [c for c in gm.meta["qprep"]["preparation"].changes if c.pass_name == "convert_functionals"][0]
    assert "computed at run time" in change.reason
    assert qprep.verify(model, gm, torch.randn(3, 4)).equal


def test_dynamic_interpolate_size_is_wrapped():
    def f(x, y):
        return F.interpolate(x, size=y.shape[-2:], mode="nearest") + y

    model = CallModel(f, 2)
    gm = qprep.prepare(model, (torch.rand(1, 2, 3, 3), torch.rand(1, 2, 6, 6)))
    assert any(isinstance(m, qprep.modules.Functional) for m in gm.modules())
    assert qprep.verify(model, gm, (torch.rand(1, 2, 4, 4), torch.rand(1, 2, 8, 8))).equal


def _stochastic(x, p: float, training: bool = True):
    if not training or p == 0.0:
        return x
    return x * torch.bernoulli(torch.full_like(x, 1 - p)) / (1 - p)


torch.fx.wrap("_stochastic")


def test_any_function_with_training_from_self_training_follows_mode():
    """A torch.fx.wrap function taking training=self.training, like torchvision's
    stochastic_depth, is traced into (its ops become modules) in each mode, and the
    prepared model keeps following .train()/.eval()."""

    class Net(nn.Module):
        def forward(self, x):
            return _stochastic(x * 2, 0.5, training=self.training)

    model = Net().eval()
    gm = qprep.prepare(model, (torch.rand(4, 4),))
    assert isinstance(gm, DualGraphModule)
    train_calls = [n.target for n in gm.train_graph.nodes if n.op == "call_module"]
    assert [n.target for n in gm.eval_graph.nodes if n.op == "call_module"] == ["mul"]
    assert "mul" in train_calls and len(train_calls) > 3  # the random draw and its arithmetic, as modules
    x = torch.rand(4, 4)
    assert qprep.verify(model, gm, x, train=True).equal
    gm.train()
    assert not torch.equal(gm(x), x * 2)
    gm.eval()
    assert torch.equal(gm(x), x * 2)


def test_dropout_with_positional_self_training_inside_fallback():
    class Net(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, self.training, False) + F.alpha_dropout(x, 0.2, self.training)

    model = Net().eval()
    gm = qprep.prepare(model, (torch.rand(3, 5),))
    assert qprep.verify(model, gm, torch.rand(3, 5), train=True).equal


def _positional_flag(x, p: float, training: bool):
    if bool((x >= 0).all()):  # a branch on tensor data: cannot be traced into, kept as one call
        return x * (1 - p) if training else x
    return x


torch.fx.wrap("_positional_flag")


def test_positional_training_flag_of_any_function_follows_mode():
    """torchvision's StochasticDepth passes self.training positionally."""

    class Net(nn.Module):
        def forward(self, x):
            return _positional_flag(x + 1, 0.5, self.training)

    model = Net().eval()
    gm = qprep.prepare(model, (torch.rand(2, 3),))
    wrapper = [m for m in gm.modules() if isinstance(m, qprep.modules.Functional)]
    assert len(wrapper) == 1 and wrapper[0].mode_arg == 2
    x = torch.rand(2, 3)
    assert qprep.verify(model, gm, x).equal and qprep.verify(model, gm, x, train=True).equal


def test_inverted_training_flag_gives_one_graph_per_mode():
    """``not self.training`` cannot follow the mode as one flag: each mode gets its graph."""

    class Net(nn.Module):
        def forward(self, x):
            return _positional_flag(x + 1, 0.5, not self.training)

    model = Net().eval()
    gm = qprep.prepare(model, (torch.rand(2, 3),))
    assert isinstance(gm, DualGraphModule)
    x = torch.rand(2, 3)
    assert qprep.verify(model, gm, x).equal and qprep.verify(model, gm, x, train=True).equal
