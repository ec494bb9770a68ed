"""qprep.prepare end to end on real models."""

import copy
import operator

import pytest
import torch
import torch.nn as nn

import qprep
import qprep.capture
from qprep.capture import trace
from qprep.core.graph import produces_tensor
from qprep.passes import pipeline, run_pipeline
from qprep import modules as qm
from qprep.passes.functional_table import is_functional as handles
from qprep.passes.op_tables import FUNCTION_TABLE, METHOD_TABLE
from tests.models import Aliasing, AttentionBlock, DistillerBlock, FunctionalNet, ReusedBlock, SharedConv, TinyResNet


def compute_ops_outside_modules(gm):
    """call_function/call_method nodes that compute (not data movement or shape arithmetic)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in FUNCTION_TABLE or handles(n)):
            out.append(n)
        if n.op == "call_method" and (n.target in METHOD_TABLE or handles(n)):
            out.append(n)
    return [n for n in out if produces_tensor(n)]


def call_sites(gm):
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    return targets


def test_distiller_example():
    model = DistillerBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qprep.prepare(model, (x,))
    assert isinstance(gm, torch.fx.GraphModule)
    mods = dict(gm.named_modules())
    add = [m for m in mods.values() if isinstance(m, qm.Add)]
    assert len(add) == 1 and add[0].inplace and add[0].call is operator.iadd
    relus = [n for n, m in mods.items() if isinstance(m, nn.ReLU)]
    assert relus == ["relu", "relu_1"] and mods["relu"] is not mods["relu_1"]
    assert isinstance(mods["cat"], qm.Cat) and mods["cat"].kwargs == {"dim": 1}
    assert isinstance(mods["sigmoid"], nn.Sigmoid)
    assert not compute_ops_outside_modules(gm)
    sites = call_sites(gm)
    assert len(sites) == len(set(sites))  # one instance per call site
    y = torch.randn(4, 3, 8, 8)
    assert torch.equal(gm(y), model(y))


def test_distiller_example_in_train_mode_updates_the_same_statistics():
    model = DistillerBlock().train()
    gm = qprep.prepare(model, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(4, 3, 8, 8)
    out_a, out_b = model(x), gm(x)
    assert torch.equal(out_a, out_b)
    assert torch.equal(model.bn1.running_mean, gm.bn1.running_mean)
    assert torch.equal(model.bn2.num_batches_tracked, gm.bn2.num_batches_tracked)


def test_aliasing_matches_eager():
    model = Aliasing()
    x = torch.randn(2, 4)
    gm = qprep.prepare(model, (x,))
    expected = model(x)
    assert torch.equal(expected[:2], expected[2:])  # ident saw the += in eager mode
    assert torch.equal(gm(x), expected)
    plain = torch.fx.symbolic_trace(model)  # plain fx gets this wrong
    assert not torch.equal(plain(x), expected)


def test_reused_conv_shares_parameters_and_trains_identically():
    model = SharedConv()
    x = torch.randn(2, 3, 8, 8)
    gm = qprep.prepare(model, (x,))
    assert call_sites(gm) == ["conv", "conv_1", "bn"]
    assert gm.conv is not gm.conv_1 and gm.conv.weight is gm.conv_1.weight
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(gm.state_dict(), strict=True)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(gm.parameters(), lr=0.1)
    for opt, net in ((opt_a, model), (opt_b, gm)):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
    for (name, a), (_, b) in zip(model.state_dict().items(), gm.state_dict().items()):
        assert torch.equal(a, b), name


def test_reused_block_and_module_registered_under_two_names():
    model = ReusedBlock()
    gm = qprep.prepare(model, (torch.randn(3, 8),))
    # golden names: first site keeps the name, later ones _1; the alias name is used
    assert call_sites(gm) == ["block.fc", "block.act", "block.add", "norm", "block.fc_1", "block.act_1", "block.add_1", "norm_again"]
    assert gm.get_submodule("block.fc_1").weight is gm.get_submodule("block.fc").weight
    assert gm.norm_again is not gm.norm and gm.norm_again.weight is gm.norm.weight
    assert list(gm.state_dict()) == list(model.state_dict())
    assert qprep.verify(model, gm, torch.randn(5, 8)).equal


def test_original_model_is_untouched():
    model = DistillerBlock().train()
    before_state = copy.deepcopy(model.state_dict())
    before_tree = [(n, type(m)) for n, m in model.named_modules()]
    forward = model.forward
    x = torch.randn(2, 3, 8, 8)
    gm = qprep.prepare(model, (x,))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert [(n, type(m)) for n, m in model.named_modules()] == before_tree
    assert model.forward == forward and model.training
    assert not any(p is q for p in model.parameters() for q in gm.parameters())


def test_inplace_true_shares_the_models_weights():
    model = DistillerBlock().eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 8, 8),), inplace=True)
    assert gm.conv1.weight is model.conv1.weight


def test_prepare_is_idempotent():
    model = TinyResNet().eval()
    x = torch.randn(1, 3, 16, 16)
    once = qprep.prepare(model, (x,))
    twice = qprep.prepare(once, (x,))
    assert twice.code == once.code
    assert not any(twice.meta["qprep"]["preparation"].changed.values())
    assert {n: type(m) for n, m in twice.named_modules() if n} == {n: type(m) for n, m in once.named_modules() if n}
    assert set(twice.state_dict()) == set(once.state_dict()) == set(model.state_dict())
    assert torch.equal(twice(x), model(x))


def test_pipeline_twice_changes_nothing():
    model = AttentionBlock().eval()
    gm = qprep.prepare(model, (torch.randn(2, 5, 16),))
    results = run_pipeline(gm, qprep.PrepareConfig())
    assert not any(r.changed for r in results)


def test_transformer_like_model():
    model = AttentionBlock().eval()
    x = torch.randn(2, 5, 16)
    gm = qprep.prepare(model, (x,))
    assert not compute_ops_outside_modules(gm)
    assert any(isinstance(m, qm.MatMul) for m in gm.modules())
    assert any(isinstance(m, qm.MaskedFill) for m in gm.modules())
    assert any(isinstance(m, nn.Softmax) for m in gm.modules())
    assert qprep.verify(model, gm, torch.randn(3, 7, 16)).equal


def test_resnet_style_model_bit_exact_and_unique_call_sites():
    model = TinyResNet().eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 16, 16),))
    sites = call_sites(gm)
    assert len(sites) == len(set(sites))
    assert not compute_ops_outside_modules(gm)
    assert qprep.verify(model, gm, torch.randn(2, 3, 12, 12)).equal
    assert qprep.verify(model, gm, torch.randn(2, 3, 12, 12), train=True, grad=True).equal


def test_gradients_match():
    model = FunctionalNet().train()
    gm = qprep.prepare(model, (torch.randn(2, 3, 6, 6),))
    result = qprep.verify(model, gm, torch.randn(2, 3, 6, 6), grad=True)
    assert result.equal and len(result.grads) == 1 + len(list(model.parameters()))


def test_no_example_inputs_still_prepares():
    model = DistillerBlock().eval()
    gm = qprep.prepare(model)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    assert gm.meta["qprep"]["preparation"].verification is None


@pytest.mark.parametrize("bad", [None, 3, "model", nn.Linear])
def test_not_a_module(bad):
    with pytest.raises(qprep.InputError, match="torch.nn.Module"):
        qprep.prepare(bad)


def test_untraceable_forward_names_module_line_and_fix():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.branchy = Branchy()

        def forward(self, x):
            return self.branchy(self.fc(x))

    with pytest.raises(qprep.TraceError) as info:
        qprep.prepare(Outer(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "'branchy' (Branchy)" in message and "test_prepare.py" in message
    assert "if x.sum() > 0:" in message and "leaf_modules" in message
    assert info.value.module == "branchy"
    # the fix the message names works
    gm = qprep.prepare(Outer(), (torch.randn(2, 3),), leaf_modules=("branchy",))
    assert "branchy" in call_sites(gm)
    gm = qprep.prepare(Outer(), (torch.randn(2, 3),), on_untraceable="leaf")
    notes = gm.meta["qprep"]["preparation"].trace_notes
    assert notes[0].module == "branchy" and "control flow" in notes[0].reason


@pytest.mark.parametrize("inputs,match", [
    ((torch.randn(2, 5),), "do not run"),
    ("not a tensor", "example_inputs must be"),
])
def test_wrong_example_inputs(inputs, match):
    with pytest.raises(qprep.InputError, match=match):
        qprep.prepare(DistillerBlock(), inputs)


def test_unknown_option():
    with pytest.raises(qprep.InputError, match="unknown prepare"):
        qprep.prepare(DistillerBlock(), bogus=True)


def test_defaulted_argument_is_specialised_when_needed():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None):
            if mask is not None:
                x = x.masked_fill(mask, 0.0)
            return self.fc(x) * 2

    model = Masked()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert qprep.verify(model, gm, torch.randn(3, 4)).equal


def test_first_bad_pass_is_named(monkeypatch):
    model = DistillerBlock().eval()
    monkeypatch.setattr(qm.Add, "forward", lambda self, x, y: x - y)
    with pytest.raises(qprep.NotEquivalentError) as info:
        qprep.prepare(model, (torch.randn(1, 3, 8, 8),))
    assert info.value.result.first_bad_pass == "wrap_tensor_ops"
    assert "wrap_tensor_ops" in str(info.value)


def test_first_bad_pass_is_named_for_a_model_with_a_training_branch(monkeypatch):
    """A forward that reads ``self.training`` has one graph per mode: the pass replay runs
    that graph as the prepared model does (one mode's path), not the graph of both."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            if self.training:
                y = y * 2
            return y + x

    monkeypatch.setattr(qm.Add, "forward", lambda self, x, y: x - y)
    for train in (True, False):
        with pytest.raises(qprep.NotEquivalentError) as info:
            qprep.prepare(Branchy().train(train), (torch.randn(3, 4),))
        assert info.value.result.first_bad_pass == "wrap_tensor_ops"


def test_forward_branching_on_training_is_reported():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if self.training:
                x = x * 0.5
            return self.fc(x)

    model = Noisy().eval()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    notes = [c for c in gm.meta["qprep"]["preparation"].changes if c.action == "note"]
    assert len(notes) == 1 and "self.training" in notes[0].reason and "eval mode" in notes[0].reason
    assert qprep.verify(model, gm, torch.randn(3, 4)).equal


def test_models_without_training_reads_are_traced_once(monkeypatch):
    calls = []
    real = qprep.capture.tracer.trace
    for module in (qprep.capture, qprep.capture.specialise):
        monkeypatch.setattr(module, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    qprep.prepare(DistillerBlock(), (torch.randn(1, 3, 8, 8),))
    assert len(calls) == 1


@pytest.mark.parametrize("model_cls", [SharedConv, FunctionalNet, ReusedBlock])
def test_state_dict_keys_survive_deepcopy_and_save_load(model_cls, tmp_path):
    model = model_cls().eval()
    x = torch.randn(2, 8) if model_cls is ReusedBlock else torch.randn(2, 3, 8, 8)
    gm = qprep.prepare(model, (x,))
    torch.save(gm, tmp_path / "gm.pt")
    for other in (copy.deepcopy(gm), torch.load(tmp_path / "gm.pt", weights_only=False)):
        assert list(other.state_dict()) == list(model.state_dict())
        other.load_state_dict(model_cls().state_dict(), strict=True)
        fresh = model_cls().eval()
        fresh.load_state_dict(other.state_dict(), strict=True)
        assert torch.equal(other(x), fresh(x))


def test_keyword_example_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=None, bias=None):
            out = self.fc(x)
            if scale is not None:
                out = out * scale
            return out + bias

    model = TwoInputs()
    x, b = torch.randn(2, 4), torch.randn(4)
    gm = qprep.prepare(model, {"x": x, "bias": b})
    assert torch.equal(gm(x, None, b), model(x, bias=b))
    with pytest.raises(qprep.InputError, match="does not take"):
        qprep.prepare(model, {"y": x})
    with pytest.raises(qprep.InputError, match="requires"):
        qprep.prepare(model, {"bias": b})


def test_specialised_argument_and_mode_following_dropout():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale: float = 2.0):
            return torch.nn.functional.dropout(self.fc(x) * scale, 0.3, self.training)

    model = Net().eval()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert not [c for c in gm.meta["qprep"]["preparation"].changes if c.action == "note"]
    assert isinstance(gm.get_submodule("dropout"), nn.Dropout)
    assert qprep.verify(model, gm, torch.randn(3, 4), train=True).equal


def test_unused_parameters_and_modules_keep_their_state_dict_keys():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            self.spare = nn.Parameter(torch.ones(3))
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            return self.used(x)

    model = Partial()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(Partial().state_dict(), strict=True)


def test_op_without_a_table_entry_is_kept_whole_in_a_module_and_strict_raises():
    class TopK(nn.Module):
        def forward(self, x):
            return torch.topk(x * 2, 2).values

    model = TopK()
    gm = qprep.prepare(model, (torch.randn(3, 5),))
    generic = [c for c in gm.meta["qprep"]["preparation"].changes if "no dedicated wrapper" in c.reason]
    assert [(c.op, c.action, c.module_type) for c in generic] == [
        ("torch.topk", "rewritten", "qprep.modules.Functional")]
    assert "test_prepare.py" in generic[0].location
    assert isinstance(gm.topk, qprep.modules.Functional) and gm.topk.call is torch.topk
    assert qprep.verify(model, gm, torch.randn(4, 5)).equal
    with pytest.raises(qprep.RewriteError, match="torch.topk"):
        qprep.prepare(model, (torch.randn(3, 5),), strict=True)


def test_pass_failure_names_the_pass(monkeypatch):
    def broken(gm, config):
        raise ValueError("boom")

    monkeypatch.setattr(pipeline, "PIPELINE", (pipeline.PIPELINE[0], pipeline.PIPELINE[1], broken))
    with pytest.raises(qprep.PassError, match=r"pass broken failed after \[expand_rnns, convert_functionals\]: ValueError: boom"):
        run_pipeline(trace(DistillerBlock())[0], qprep.PrepareConfig())


def test_config_object_and_options_combine():
    config = qprep.PrepareConfig(expand_rnns=False)
    gm = qprep.prepare(DistillerBlock(), (torch.randn(1, 3, 8, 8),), config=config, strict=True)
    assert gm.meta["qprep"]["preparation"].config == qprep.PrepareConfig(expand_rnns=False, strict=True)
    with pytest.raises(qprep.InputError, match="unknown prepare"):
        qprep.prepare(DistillerBlock(), config=config, bogus=1)
    with pytest.raises(qprep.InputError, match="PrepareConfig"):
        qprep.prepare(DistillerBlock(), config={"strict": True})
    with pytest.raises(qprep.InputError, match="on_untraceable"):
        qprep.prepare(DistillerBlock(), on_untraceable="ignore")


class _UnusedAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))
        self.block_alias = self.block  # a second name, never called
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def test_an_uncalled_second_name_of_a_module_keeps_its_state_dict_keys():
    model = _UnusedAlias()
    gm = qprep.prepare(model, torch.randn(2, 4))
    assert list(gm.state_dict()) == list(model.state_dict())
    assert gm.block_alias is gm.block
