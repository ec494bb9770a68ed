"""Value-aware tracing (issue 8): each pattern that needs a concrete value prepares, is
bitwise equal on the example and on other inputs, and refuses (GuardError naming the guard)
the inputs its specialisation does not cover."""

from __future__ import annotations

import collections
import copy
import dataclasses
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_packed_sequence

import qprep
from qprep import serialize
from qprep.core import meta
from qprep.core.dual import DualGraphModule
from qprep.core.errors import GuardError
from tests.models import compute_ops_outside_modules


def guards(gm):
    return [g.text() for g in meta.graph_fact(gm, meta.GUARDS) or ()]


def equal(model, gm, *inputs, **kw):
    result = qprep.verify(model, gm, inputs, **kw)
    return result.equal


class CellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(4, 6)

    def forward(self, x):
        h = torch.zeros(x.size(1), 6)
        outs = []
        for i in range(x.shape[0]):
            h = self.cell(x[i], h)
            outs.append(h)
        return torch.stack(outs)


def test_time_loop_over_a_traced_length_is_unrolled_and_guarded():
    model = CellLoop()
    gm = qprep.prepare(model, (torch.randn(5, 2, 4),))
    assert guards(gm) == ["x.shape[0] == 5"]
    assert equal(model, gm, torch.randn(5, 3, 4))  # another batch: the loop length is the same
    with pytest.raises(GuardError, match=r"x.shape\[0\]` gave 7, the model was prepared for 5"):
        gm(torch.randn(7, 2, 4))


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(0)
        return self.fc(x.view(x.size(0), -1))


def test_sizes_stay_symbolic_and_a_rank_check_is_a_guard_at_the_top():
    model = Flatten()
    gm = qprep.prepare(model, (torch.randn(2, 3, 4),))
    assert guards(gm) == ["x.dim() == 2 is False"]
    assert equal(model, gm, torch.randn(5, 3, 4))  # batch 2 -> 5: x.size(0) is not fixed
    first_calls = [n for n in gm.graph.nodes if n.op != "placeholder"][:3]
    assert [n.target for n in first_calls][-1] is qprep.core.guards.check_guard  # checked first
    with pytest.raises(GuardError, match=r"`x.dim\(\) == 2` gave True"):
        gm(torch.randn(3, 4))


class AttentionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        att = (q @ k.transpose(-1, -2)) / (d ** 0.5)
        mask = torch.ones(t, t).tril() == 0
        return att.masked_fill(mask, float("-inf")).softmax(-1) @ v


def test_sequence_length_and_batch_are_free():
    model = AttentionLike()
    gm = qprep.prepare(model, (torch.randn(2, 16, 8),))
    assert equal(model, gm, torch.randn(5, 24, 8))
    assert "torch.ones(getitem_1, getitem_1)" in gm.code  # the factory takes the traced size


def test_iteration_varargs_kwargs_and_containers():
    class CatIter(nn.Module):
        def forward(self, x):
            return torch.cat(tuple(v for v in x), dim=1)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Bilinear(3, 3, 2)

        def forward(self, *args, **kwargs):
            return self.layer(*args, **kwargs)

    class DictIn(nn.Module):
        def forward(self, x):
            return x["a"] + sum(x["z"])

    cat = CatIter()
    gm = qprep.prepare(cat, (torch.randn(3, 2, 4),))
    assert equal(cat, gm, torch.randn(3, 5, 4)) and guards(gm) == ["len(x) == 3"]
    with pytest.raises(GuardError, match=r"len\(x\)` gave 4"):
        gm(torch.randn(4, 2, 4))
    wrapper = Wrapper()
    gm = qprep.prepare(wrapper, (torch.randn(2, 3), torch.randn(2, 3)))
    assert equal(wrapper, gm, torch.randn(5, 3), torch.randn(5, 3))
    dict_in = DictIn()
    example = {"a": torch.randn(3), "z": [torch.randn(3), torch.randn(3)]}
    gm = qprep.prepare(dict_in, (example,))
    assert equal(dict_in, gm, {"a": torch.randn(3), "z": [torch.randn(3), torch.randn(3)]})
    with pytest.raises(GuardError, match=r"len\(x\['z'\]\)"):
        gm({"a": torch.randn(3), "z": [torch.randn(3)] * 3})


class SetItems(nn.Module):
    def forward(self, x, mask):
        y = x * 2
        alias = y
        y[:, 0] = 0.0
        y[mask] = 7.0
        return alias + 1


def test_setitem_is_an_in_place_module_and_aliases_see_it():
    model = SetItems()
    gm = qprep.prepare(model, (torch.randn(3, 4), torch.randn(3, 4) > 0))
    setitems = [m for m in gm.modules() if isinstance(m, qprep.modules.SetItem)]
    assert len(setitems) == 2 and all(m.inplace for m in setitems)
    assert equal(model, gm, torch.randn(5, 4), torch.randn(5, 4) > 0)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, tokens, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))
        return self.out(out)


def test_packed_sequences_in_forward_with_unsorted_lengths():
    model = Tagger().eval()
    gm = qprep.prepare(model, (torch.randint(0, 10, (3, 6)), torch.tensor([6, 2, 4])))
    assert isinstance(gm.lstm, qprep.modules.ModularLSTM)
    assert equal(model, gm, torch.randint(0, 10, (3, 6)), torch.tensor([3, 6, 1]), grad=True)


class TrainBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            y = self.drop(y) + 1
        return self.fc(y)


@pytest.mark.parametrize("start", ["eval", "train"])
def test_training_branch_gives_two_graphs_over_the_same_modules(start):
    model = TrainBranch().train(start == "train")
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert isinstance(gm, DualGraphModule) and gm.training == model.training
    assert list(gm.state_dict()) == list(model.state_dict())
    x = torch.randn(3, 4)
    assert equal(model, gm, x, train=True) and equal(model, gm, x, train=False)
    gm.train()
    assert gm.graph is gm.train_graph and "self.add" in gm.code
    gm.eval()
    assert gm.graph is gm.eval_graph and "self.add" not in gm.code
    train_modules = {n.target for n in gm.train_graph.nodes if n.op == "call_module"}
    eval_modules = {n.target for n in gm.eval_graph.nodes if n.op == "call_module"}
    assert {"fc", "fc_1"} <= train_modules & eval_modules  # the same instances in both graphs
    report = qprep.diff(model, gm)
    assert set(report.after["modes"]) == {"train", "eval"}
    assert any("branches on self.training" in c.reason for c in report.notes)


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    aux: torch.Tensor


Pair = collections.namedtuple("Pair", "a b")


def test_output_containers_keep_their_type():
    class DataOut(nn.Module):
        def forward(self, x):
            return Out(x * 2, x + 1)

    class TupleOut(nn.Module):
        def forward(self, x):
            return Pair(x * 2, [x + 1, {"k": x - 1}])

    for model in (DataOut(), TupleOut()):
        gm = qprep.prepare(model, (torch.randn(2),))
        out = gm(torch.randn(3))
        assert type(out) is type(model(torch.randn(3)))
        assert equal(model, gm, torch.randn(3))


def test_verify_compares_container_types():
    class AsDict(nn.Module):
        def forward(self, x):
            return {"a": x, "b": x}

    class AsPair(nn.Module):
        def forward(self, x):
            return Pair(x, x)

    result = qprep.verify(AsPair(), AsDict(), torch.randn(2), replay=False)
    assert not result.equal and "type differs" in result.outputs[0].note


def test_branch_on_tensor_data_is_refused_with_the_line():
    class Data(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(qprep.TraceError, match=r"test_value_tracing.py:\d+.*x.sum\(\) > 0.*data-dependent"):
        qprep.prepare(Data(), (torch.randn(3),))


def test_random_numbers_drawn_in_forward_are_drawn_at_run_time():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand(3, 4)

    model = Noisy().eval()
    gm = qprep.prepare(model, (torch.randn(3, 4),))  # verified: both runs draw from the same seed
    assert "torch.rand(3, 4)" in gm.code
    assert not torch.equal(gm(torch.zeros(3, 4)), gm(torch.zeros(3, 4)))


def test_constant_updated_in_place_is_fresh_each_call():
    class Accumulate(nn.Module):
        def forward(self, x):
            z = torch.zeros(3)
            z += x
            return z

    model = Accumulate()
    gm = qprep.prepare(model, (torch.ones(3),))
    gm(torch.ones(3))
    assert torch.equal(gm(torch.ones(3)), torch.ones(3))
    assert list(gm.state_dict()) == []


def test_example_values_are_meta_tensors_and_tensor_meta():
    model = Flatten()
    gm = qprep.prepare(model, (torch.randn(2, 3, 4),))
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    assert fc.meta["val"].is_meta and tuple(fc.meta["val"].shape) == (2, 3)
    assert fc.meta["tensor_meta"].shape == torch.Size([2, 3]) and fc.meta["tensor_meta"].requires_grad


def test_concrete_args_keep_other_defaults_fixed():
    class TwoDefaults(nn.Module):
        def forward(self, x, mask=None, scale=None):
            if mask is not None:
                x = x * mask
            return x * 2 if scale is None else x * scale

    gm = qprep.prepare(TwoDefaults(), (torch.randn(3),), concrete_args={"mask": None})
    prep = meta.graph_fact(gm, meta.PREPARATION)
    assert prep.specialised == {"mask": None, "scale": None}


def test_tracing_does_not_disturb_other_threads():
    class Busy(nn.Module):
        def forward(self, x):
            return x + torch.ones(len(x))

    seen, stop = [], threading.Event()

    def other():
        while not stop.is_set():
            y = torch.randn(4)
            seen.append(bool(torch.equal(Busy()(y), y + torch.ones(len(y)))) and type(torch.ones(2)) is torch.Tensor)

    results = {}

    def prepare(name, model, x):
        gm = qprep.prepare(model, (x,))
        results[name] = qprep.verify(model, gm, x).equal

    runner = threading.Thread(target=other)
    runner.start()
    try:
        workers = [threading.Thread(target=prepare, args=("attention", AttentionLike(), torch.randn(2, 16, 8))),
                   threading.Thread(target=prepare, args=("flatten", Flatten(), torch.randn(2, 3, 4)))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        runner.join()
    assert results == {"attention": True, "flatten": True}
    assert seen and all(seen)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


class DataBranchAtTheTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block()
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            y = self.b(y)
        return y * self.scale


def test_leaf_mode_with_an_untraceable_top_level_forward_prepares_the_submodules():
    model = DataBranchAtTheTop()
    gm = qprep.prepare(model, (torch.randn(3, 4),), on_untraceable="leaf")
    assert isinstance(gm.model.a, torch.fx.GraphModule) and isinstance(gm.model.b, torch.fx.GraphModule)
    assert "self.add(" in gm.model.a.code  # the submodule's own ops are modules
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    assert equal(model, gm, torch.randn(5, 4)) and equal(model, gm, -torch.ones(2, 4))
    note = qprep.diff(model, gm).notes[0]
    assert "stays opaque" in note.reason and "a, b" in note.reason
    with pytest.raises(qprep.TraceError, match="data-dependent"):
        qprep.prepare(model, (torch.randn(3, 4),))


def test_fx_wrapped_function_is_traced_into_or_kept_whole():
    model = pytest.importorskip("torchvision").models.swin_t(num_classes=10).eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 64, 64),))
    calls = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    import torchvision.models.swin_transformer as swin

    assert swin.shifted_window_attention not in calls  # traced into: its matmuls and softmax are modules
    assert compute_ops_outside_modules(gm) == []


@pytest.mark.parametrize("model, x", [(AttentionLike(), torch.randn(2, 6, 8)), (Flatten(), torch.randn(2, 3, 4)),
                                      (TrainBranch().eval(), torch.randn(2, 4))], ids=["factory", "guard", "dual"])
def test_pickle_round_trip_keeps_guards_factories_and_both_modes(model, x):
    import io

    gm = qprep.prepare(model, (x,))
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__mro__[1] is type(gm).__mro__[1]
    assert equal(model, loaded, x) and equal(model, loaded, x, train=True)
    if guards(gm):
        with pytest.raises(GuardError):
            loaded(torch.randn(3, 4))


class _Settings:
    pass


class _ObjectArgument(nn.Module):
    """A float with a default, an object argument, and a tensor after it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale=1.0, settings=_Settings(), y=None):
        out = self.fc(x) * scale
        return out if y is None else out + y


def test_fixed_arguments_keep_the_signature_default_and_refuse_another():
    model = _ObjectArgument().eval()
    x = torch.randn(3, 4)
    gm = qprep.prepare(model, (x,), concrete_args={"scale": 2.0})
    assert torch.equal(gm(x, 2.0), model(x, 2.0))
    with pytest.raises(qprep.GuardError, match="`scale` gave 1.0"):
        gm(x)  # the original would use its default, 1.0


def test_arguments_after_an_object_argument_are_keyword_only():
    model = _ObjectArgument().eval()
    x, y = torch.randn(3, 4), torch.randn(4)
    settings = _Settings()
    gm = qprep.prepare(model, (x, 1.0, settings, y))  # verified: the check passes y by keyword
    assert torch.equal(gm(x, settings=settings, y=y), model(x, y=y))
    with pytest.raises(TypeError):
        gm(x, 1.0, settings, y)  # `settings` has no default the generated code can write
    fixed = qprep.prepare(model, (x,))
    assert torch.equal(fixed(x), model(x))
    with pytest.raises(qprep.GuardError, match="pass the arguments after it by keyword"):
        fixed(x, 1.0, _Settings())  # a positional call must not bind `y` one place off


class _KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *, scale, bias=None):
        y = self.fc(x) * scale
        return y if bias is None else y + bias


class _OnlyKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, *, ids):
        return self.fc(ids).relu()


class _Extras(nn.Module):
    """Keywords collected by ``**kwargs`` (Hugging Face passes flags this way)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **kwargs):
        y = self.fc(x)
        if kwargs.get("double", False):
            y = y * 2
        return y + kwargs["shift"] if "shift" in kwargs else y


def test_keyword_only_parameters_take_example_inputs_by_name():
    x, x5 = torch.randn(2, 4), torch.randn(5, 4)
    model = _KeywordOnly().eval()
    gm = qprep.prepare(model, {"x": x, "scale": torch.tensor(2.0), "bias": torch.ones(4)})
    assert torch.equal(gm(x5, scale=torch.tensor(3.0), bias=torch.zeros(4)),
                       model(x5, scale=torch.tensor(3.0), bias=torch.zeros(4)))
    left_out = qprep.prepare(model, {"x": x, "scale": 2.0})  # bias left to its default: fixed and guarded
    assert torch.equal(left_out(x5, scale=2.0), model(x5, scale=2.0))
    with pytest.raises(GuardError, match="argument fixed at trace time"):
        left_out(x5, scale=2.0, bias=torch.ones(4))
    fixed = qprep.prepare(model, {"x": x, "scale": 2.0}, concrete_args={"bias": torch.ones(4)})  # verified with it
    assert torch.equal(fixed(x5, scale=2.0), model(x5, scale=2.0, bias=torch.ones(4)))
    only = _OnlyKeywords().eval()
    assert qprep.verify(only, qprep.prepare(only, {"ids": x}), {"ids": x5}).equal
    with pytest.raises(qprep.InputError, match="missing a required argument: 'ids'"):
        qprep.prepare(only, {})
    with pytest.raises(qprep.InputError, match=r"names \['idz'\], which _OnlyKeywords.forward does not take"):
        qprep.prepare(only, {"idz": x})


def test_keywords_collected_by_star_star_kwargs_are_example_inputs():
    x, x5 = torch.randn(2, 4), torch.randn(5, 4)
    model = _Extras().eval()
    gm = qprep.prepare(model, {"x": x, "double": True, "shift": torch.ones(4)})
    assert torch.equal(gm(x5, double=True, shift=torch.zeros(4)), model(x5, double=True, shift=torch.zeros(4)))
    assert compute_ops_outside_modules(gm) == []
    with pytest.raises(GuardError, match="kwargs"):
        gm(x5, double=False, shift=torch.zeros(4))  # the branch taken on the example's True
    with pytest.raises(GuardError, match="kwargs"):
        gm(x5)  # other keys than the example's
    plain = qprep.prepare(model, (x,))
    assert torch.equal(plain(x5), model(x5))
    trained = _Extras().train()  # verified with gradients: the keywords reach both models
    qprep.prepare(trained, {"x": x, "shift": torch.ones(4, requires_grad=True)})


class _GradModeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if torch.is_grad_enabled() else y


def test_a_branch_on_the_grad_mode_is_guarded():
    model, x = _GradModeBranch().eval(), torch.randn(3, 4)
    gm = qprep.prepare(model, x)  # prepared (and verified) with gradients on
    assert "is_grad_enabled() == True" in guards(gm)
    assert torch.equal(gm(x), model(x))
    with torch.no_grad(), pytest.raises(GuardError, match=r"is_grad_enabled\(\)` gave False"):
        gm(x)
    with torch.no_grad():
        inference = qprep.prepare(model, x)
        assert torch.equal(inference(x), model(x))
    # torch's own reads (the attention fast path's checks) choose kernels, not results: not guarded
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    prepared = qprep.prepare(layer, torch.randn(2, 5, 16))
    assert not any("is_grad_enabled" in g for g in guards(prepared))
    with torch.no_grad():
        prepared(torch.randn(2, 5, 16))


class _MaybeAutocast(nn.Module):
    """Hugging Face's ``maybe_autocast`` (Nemotron's norm): autocast off only if it is on."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.fc(x.float())
        return self.fc(x)


def test_a_branch_on_the_autocast_state_is_guarded():
    model, x = _MaybeAutocast().eval(), torch.randn(3, 4)
    gm = qprep.prepare(model, x)
    assert "is_autocast_enabled('cpu') == False" in guards(gm)
    assert torch.equal(gm(x), model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(GuardError, match="is_autocast_enabled"):
        gm(x)  # the original would switch autocast off here: refused, not computed in bfloat16


class _Store:
    """A user state object (as a linear-attention cache): a method returns ``None`` when empty."""

    def __init__(self):
        self.saved = {}

    def lookup(self, key):
        return self.saved.get(key)

    def save(self, key, value):
        self.saved[key] = value


class _UsesStore(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, store):
        previous = store.lookup("h")
        h = self.fc(x) if previous is None else self.fc(x) + previous
        store.save("h", h)
        return h


def test_an_object_method_that_returns_none_takes_the_examples_branch_with_a_guard():
    model, x = _UsesStore().eval(), torch.randn(2, 4)
    gm = qprep.prepare(model, (x, _Store()))
    assert torch.equal(gm(x, _Store()), model(x, _Store()))
    filled = _Store()
    filled.save("h", torch.ones(2, 4))
    with pytest.raises(GuardError, match="is None"):
        gm(x, filled)  # the original adds the saved value: refused, not computed without it


class _SizesInTorchCalls(nn.Module):
    """Traced sizes in the list arguments of torch functions whose argument parser reads them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        n = x.shape[0]
        y = torch.reshape(self.fc(x), [n, -1, 3])
        return torch.tile(torch.narrow(y, 0, 0, n), (n, 1, 1))


class _IndexThenReshape(nn.Module):
    def forward(self, x):
        n = x.shape[0]
        scale = [10.0, 20.0, 30.0][n]  # a real use of the example's value
        return torch.reshape(x, [n, -1]) * scale


def test_sizes_torchs_argument_parser_reads_are_not_guarded():
    model = _SizesInTorchCalls().eval()
    gm = qprep.prepare(model, torch.randn(2, 6))
    assert guards(gm) == []  # the graph computes with the traced size, not the example's 2
    x5 = torch.randn(5, 6)
    assert torch.equal(gm(x5), model(x5))
    indexed = _IndexThenReshape()
    gm = qprep.prepare(indexed, torch.randn(1, 6))
    assert guards(gm) == ["x.shape[0] == 1"]  # the list index keeps its guard
    with pytest.raises(GuardError):
        gm(torch.randn(2, 6))


def test_an_assert_on_tensor_data_is_kept_as_a_runtime_check():
    from tests.models import Asserts  # not in a test module: pytest rewrites the asserts there

    model = Asserts().eval()
    gm = qprep.prepare(model, (torch.randn(2, 5, 4), torch.tensor([3, 5])))
    assert guards(gm) == ["x.dim() == 3 is True"]
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert]
    assert len(asserts) == 2 and asserts[0].args[1] == "lengths too long"
    x, lengths = torch.randn(3, 7, 4), torch.tensor([1, 2, 7])
    assert torch.equal(gm(x, lengths), model(x, lengths))
    with pytest.raises(AssertionError, match="lengths too long"):
        gm(x, torch.tensor([9, 1, 1]))
    with pytest.raises(AssertionError, match=r"assert \(x > -100\).all\(\)"):
        gm(torch.full((3, 7, 4), -200.0), lengths)


class _RelativeIndices(nn.Module):
    """timm's ConViT: a buffer kept out of the state_dict re-made when the length changes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rel", torch.zeros(1, 1), persistent=False)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        n = x.shape[1]
        if self.rel.shape[1] != n:
            self.rel = (torch.arange(n).view(1, -1) - torch.arange(n).view(-1, 1)).float().to(self.proj.weight.dtype)
        return self.proj(x) + self.rel.sum(0).view(1, n, 1)


class _PlainCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = None

    def forward(self, x):
        if self.positions is None or len(self.positions) != x.size(1):
            self.positions = torch.arange(x.size(1), dtype=x.dtype)
        return x * self.positions.view(1, -1, 1)


class _Accumulates(nn.Module):
    def __init__(self):
        super().__init__()
        self.last = None

    def forward(self, x):
        self.last = x.mean()  # state from the data: not a cache
        return x - self.last


class _RandomCache(nn.Module):
    def forward(self, x):
        self.noise = torch.randn(x.size(1))  # a random draw kept between calls: not a cache
        return x + self.noise


@pytest.mark.parametrize("model", [_RelativeIndices(), _PlainCache()], ids=["buffer", "attribute"])
def test_a_cache_of_shapes_and_constants_is_recomputed_on_every_call(model):
    before = {k: v for k, v in vars(model).items() if k != "_buffers"}, dict(model._buffers)
    gm = qprep.prepare(model, (torch.randn(2, 5, 4),))
    assert ({k: v for k, v in vars(model).items() if k != "_buffers"}, dict(model._buffers)) == before
    notes = gm.meta["qprep"]["preparation"].trace_notes
    assert any("recomputes it on every call" in n.reason for n in notes), notes
    for shape in ((2, 5, 4), (3, 7, 4), (1, 3, 4)):
        x = torch.randn(shape)
        assert qprep.verify(model, gm, (x,)).equal, shape
    if isinstance(model, _RelativeIndices):  # length 1 keeps the size-1 buffer there: another path
        with pytest.raises(GuardError, match="self.rel.shape"):
            gm(torch.randn(1, 1, 4))


class _AnchorHead(nn.Module):
    """Ultralytics' YOLO Detect head: anchors cached per feature-map shape, computed from the
    shapes, a plain tensor attribute (the strides) and the features' dtype only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.stride = torch.tensor([8.0, 16.0])  # a plain attribute: no optimizer or checkpoint changes it
        self.shape = None

    def forward(self, x):
        feats = [self.conv(x), F.avg_pool2d(self.conv(x), 2)]
        shape = feats[0].shape
        if self.shape != shape:
            points, strides = [], []
            for i in range(len(feats)):
                h, w = feats[i].shape[2:]
                sx = torch.arange(w).type_as(feats[0]) + 0.5
                sy = torch.arange(h).type_as(feats[0]) + 0.5
                sy, sx = torch.meshgrid(sy, sx, indexing="ij")
                points.append(torch.stack((sx, sy), -1).view(-1, 2))
                strides.append(feats[0].new_full((h * w, 1), self.stride[i]))
            self.anchors, self.strides = torch.cat(points), torch.cat(strides)
            self.shape = shape
        flat = torch.cat([f.flatten(2) for f in feats], 2).transpose(1, 2)
        return flat[..., :2] * self.strides + self.anchors


def test_a_cache_of_shapes_dtypes_and_plain_tensor_attributes_is_recomputed():
    """``type_as`` / ``new_full`` read only their tensor argument's dtype and device, and a
    plain tensor attribute is a constant: the anchors are a cache, recomputed on every call
    (Ultralytics YOLOv8/11 detection, segmentation and pose heads prepare this way)."""
    model = _AnchorHead().eval()
    gm = qprep.prepare(model, (torch.randn(1, 4, 8, 8),))
    assert compute_ops_outside_modules(gm) == []
    for shape in ((2, 4, 8, 8), (1, 4, 12, 16)):
        assert qprep.verify(model, gm, (torch.randn(shape),)).equal, shape


@pytest.mark.parametrize("model", [_Accumulates(), _RandomCache()], ids=["data", "random"])
def test_state_kept_between_calls_is_still_refused(model):
    with pytest.raises(qprep.TraceError, match="assigns a traced value"):
        qprep.prepare(model, (torch.randn(2, 5),))


class _CallCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # a plain attribute the next call reads: one graph cannot hold it
        return self.fc(x) * self.calls


class _LazyInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.initialised = False

    def forward(self, x):
        if not self.initialised:  # a data-driven one-time initialisation (ActNorm, LSQ)
            with torch.no_grad():
                self.fc.bias.copy_(-self.fc(x).mean(0))
            self.initialised = True
        return self.fc(x)


class _WarnsOnce(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        if not getattr(self, "_warned", False):  # a one-time set-up the graph does not depend on
            self._warned = True
        return self.fc(x)


class _Outer(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.head = inner, nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.inner(x).relu())


@pytest.mark.parametrize("make", [_CallCounter, _LazyInit], ids=["counter", "one-time init"])
def test_plain_state_that_changes_the_next_call_is_refused_with_the_line(make):
    """A forward that gives a plain attribute a new value which changes what the next call
    computes (a call counter, a lazy initialisation) is refused with the line; leaving it
    alone used to fix the first call's graph, silently wrong from the second call on. The
    user's model is untouched, and ``on_untraceable="leaf"`` keeps such a submodule whole."""
    model = make().eval()
    before = dict(vars(model))
    with pytest.raises(qprep.TraceError, match=r"forward changes _\w+\.(calls|initialised) .*traces differently") as info:
        qprep.prepare(model, (torch.randn(4, 5),))
    assert info.value.location.endswith(str(_line_of(make, "self.calls += 1" if make is _CallCounter else
                                                      "self.initialised = True")))
    assert dict(vars(model)) == before
    outer = _Outer(make()).eval()
    gm = qprep.prepare(outer, (torch.randn(4, 5),), on_untraceable="leaf")
    reference = copy.deepcopy(outer)
    for _ in range(3):
        x = torch.randn(3, 5)
        assert torch.equal(gm(x), reference(x))


def _line_of(cls: type, text: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_a_one_time_setup_the_graph_does_not_depend_on_is_accepted():
    """Tracing again from the changed state changes nothing more and gives the same graph
    (Hugging Face's output capturing installs its hooks this way): prepared as usual."""
    model = _WarnsOnce().eval()
    gm = qprep.prepare(model, (torch.randn(4, 5),))
    assert qprep.verify(model, gm, (torch.randn(7, 5),)).equal
    assert not hasattr(model, "_warned")


class _PythonRandom(nn.Module):
    def __init__(self, source: str):
        super().__init__()
        self.fc, self.source = nn.Linear(5, 5), source

    def forward(self, x):
        import random

        import numpy as np

        draw = random.random() if self.source == "random" else np.random.rand()
        return self.fc(x) if draw < 0.5 else x


@pytest.mark.parametrize("source", ["random", "numpy"])
def test_a_branch_on_a_draw_from_python_or_numpy_random_is_refused(source):
    """The trace would fix the branch: the prepared model would take one side on every call."""
    with pytest.raises(qprep.TraceError, match=r"a draw from (random.random|numpy.random.rand)\(\)") as info:
        qprep.prepare(_PythonRandom(source), (torch.randn(4, 5),))
    assert "concrete_args" not in str(info.value)  # no input would help


class _NumpyLayerDrop(nn.Module):
    """VITS's and MusicGen's LayerDrop: a NumPy draw per layer, read in train mode only."""

    def __init__(self, source: str):
        super().__init__()
        self.layers, self.source = nn.ModuleList(nn.Linear(5, 5) for _ in range(3)), source

    def forward(self, x):
        import random

        import numpy as np

        for layer in self.layers:
            draw = np.random.uniform(0, 1) if self.source == "numpy" else random.uniform(0, 1)
            if self.training and draw < 0.3:
                continue
            x = layer(x) * (1.0 + 0.0 * random.random())
        return x


@pytest.mark.parametrize("source", ["random", "numpy"])
def test_a_draw_from_python_or_numpy_random_is_made_on_every_call(source):
    """Recorded as a call: the prepared model draws as the original does (so the generator
    ends in the same state), and verify seeds Python's and NumPy's generators too."""
    import random

    import numpy as np

    model = _NumpyLayerDrop(source).eval()
    gm = qprep.prepare(model, (torch.randn(4, 5),))
    assert equal(model, gm, torch.randn(7, 5))
    states = []
    for run in (model, gm):
        random.seed(3)
        np.random.seed(3)
        run(torch.randn(2, 5))
        states.append((random.random(), np.random.rand()))
    assert states[0] == states[1]
    with pytest.raises(qprep.TraceError, match="draw < 0.3"):  # the line that branches on it
        qprep.prepare(model.train(), (torch.randn(4, 5),))


class _ProbesAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        if hasattr(self.fc.weight, "SCB"):  # bitsandbytes' int8 weights (transformers' RWKV)
            x = x * 2
        y = self.fc(x)
        return y * getattr(y, "scale", 3.0)


def test_hasattr_on_a_parameter_or_an_op_result_answers_as_the_original():
    """A plain tensor an op made, or a parameter whose real tensor lacks the attribute, lacks
    it when the prepared model runs too (before, the read was traced and failed when run)."""
    model = _ProbesAttributes().eval()
    gm = qprep.prepare(model, (torch.randn(2, 5),))
    assert qprep.verify(model, gm, (torch.randn(3, 5),)).equal


class _Divmod(nn.Module):
    def forward(self, x):
        q, r = divmod(x.shape[-1], 3)
        return x[..., : q * 3].reshape(x.shape[0], q, 3).sum(-1) + r


def test_divmod_of_a_size_stays_symbolic():
    gm = qprep.prepare(_Divmod(), (torch.randn(2, 7),))
    for n in (7, 9, 11):
        x = torch.randn(3, n)
        assert torch.equal(gm(x), _Divmod()(x))


class _PlainTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale, self.index = torch.tensor(2.0), torch.tensor([0, 2])  # attributes, not buffers

    def forward(self, x):
        return self.fc(x)[:, self.index] * self.scale


def test_plain_tensor_attributes_stay_out_of_the_state_dict():
    """The graph reads them, so the GraphModule holds them as buffers: kept out of
    ``state_dict()`` as the original keeps them, so its checkpoint loads with strict=True."""
    model = _PlainTensors().eval()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(model.state_dict())
    assert qprep.verify(model, gm, (torch.randn(3, 4),)).equal


class _Batch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch):
        return self.fc(batch["image"]) * batch["mask"]


def test_a_dict_none_of_whose_keys_forward_takes_is_its_one_input():
    model = _Batch().eval()
    example = {"image": torch.randn(2, 4), "mask": torch.ones(2, 4)}
    gm = qprep.prepare(model, example)
    assert qprep.verify(model, gm, {"image": torch.randn(3, 4), "mask": torch.zeros(3, 4)}).equal


class _Autocast(nn.Module):
    def __init__(self, enabled: bool):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.enabled = enabled

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.enabled):
            y = self.fc(x)
        return y * 2, y.dtype == torch.bfloat16


@pytest.mark.parametrize("enabled", [False, True])
def test_autocast_block_is_recorded_with_the_examples_device(enabled):
    # timm's EfficientViT: `with torch.autocast(device_type=v.device.type, enabled=False)`
    model = _Autocast(enabled)
    x = torch.randn(3, 8)
    gm = qprep.prepare(model, (x,))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.amp.autocast_mode._enter_autocast in targets and torch.amp.autocast_mode._exit_autocast in targets
    out, expected = gm(torch.randn(5, 8)), model(torch.randn(5, 8))
    assert out[1] is expected[1] is enabled and out[0].dtype == expected[0].dtype
    assert qprep.verify(model, gm, (torch.randn(5, 8),)).equal
    assert not torch.is_autocast_enabled("cpu")


class _TensorArithmeticOnSizes(nn.Module):
    """Longformer: sizes computed with torch.div, then used as view/new_zeros sizes."""

    def forward(self, x):
        chunks = torch.div(x.size(1), 4, rounding_mode="trunc")
        padded = x.new_zeros((x.size(0), chunks + 1, 4))
        padded[:, :chunks] = x.view(x.size(0), chunks, 4)
        return padded * 2


def test_sizes_computed_as_tensors_are_known_while_tracing():
    model = _TensorArithmeticOnSizes()
    gm = qprep.prepare(model, (torch.randn(2, 8),))
    for shape in ((2, 8), (3, 12), (1, 4)):
        x = torch.randn(shape)
        assert qprep.verify(model, gm, (x,)).equal, shape


class _SliceBoundFromShape(nn.Module):
    def forward(self, x):
        y = torch.zeros(x.size(0), x.size(1) + 2)
        y[:, :x.size(1)] = x  # a traced bound inside a slice inside the key
        return y


def test_setitem_with_a_traced_slice_bound():
    model = _SliceBoundFromShape()
    gm = qprep.prepare(model, (torch.randn(2, 5),))
    assert qprep.verify(model, gm, (torch.randn(3, 7),)).equal


class _LayerDrop(nn.Module):
    """fairseq/Hugging Face LayerDrop: in train mode a random draw decides whether a layer runs."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand([]) < 0.1:
                continue
            x = layer(x)
        return x


def test_a_mode_that_cannot_be_traced_is_refused_and_the_other_prepared():
    model = _LayerDrop().eval()
    x = torch.randn(2, 4)
    gm = qprep.prepare(model, (x,))
    notes = gm.meta["qprep"]["preparation"].trace_notes
    assert any("eval mode only" in n.reason and "train mode cannot be traced" in n.reason for n in notes), notes
    for copy_ in (gm, copy.deepcopy(gm)):
        assert torch.equal(copy_(x), model(x))
        copy_.train()
        with pytest.raises(GuardError, match=r"eval mode only \(train mode cannot be traced: .*torch.rand|rand\("):
            copy_(x)


class _MadeInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        pooled = nn.MaxPool1d(kernel_size=2, stride=2)(self.fc(x).unsqueeze(1))  # Canine
        return pooled.squeeze(1) * 2


class _InstallsInForward(nn.Module):
    """BigBird: forward swaps in another attention module at short sequence lengths."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if isinstance(self.inner, nn.Identity):
            self.inner = nn.Tanh()
        return self.inner(self.fc(x))


@pytest.mark.parametrize("model_type", [_MadeInForward, _InstallsInForward])
def test_modules_made_or_installed_by_forward(model_type):
    model = model_type()
    x = torch.randn(2, 8)
    children = dict(model.named_children())
    gm = qprep.prepare(model, (x,))
    assert dict(model.named_children()) == children  # the user's model is as it was
    assert qprep.verify(model, gm, (torch.randn(3, 8),)).equal
    assert compute_ops_outside_modules(gm) == []


class _ParametersMadeInForward(nn.Module):
    def forward(self, x):
        return nn.Linear(4, 4)(x)  # new random weights on every call


def test_a_module_with_parameters_made_in_forward_is_refused():
    with pytest.raises(qprep.TraceError, match="made in forward with parameters"):
        qprep.prepare(_ParametersMadeInForward(), (torch.randn(2, 4),))


class _Slices(nn.Module):
    """A perceptual loss's ``self.features[:k](x)``: a new ``nn.Sequential`` on every call,
    holding the installed layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        early = self.features[:2](x)
        late = self.features[2:](early)
        regrouped = nn.Sequential(self.features[0], self.features[1])(x)  # made anew, of installed modules
        return self.head(late.mean((2, 3))), early.mean() + regrouped.mean()


def test_containers_made_in_forward_of_installed_modules_are_traced_into():
    model = _Slices()
    gm = qprep.prepare(model, (torch.randn(1, 3, 8, 8),))
    assert list(gm.state_dict()) == list(model.state_dict())  # nothing installed twice
    assert qprep.verify(model, gm, (torch.randn(2, 3, 10, 10),), grad=True).equal
    assert compute_ops_outside_modules(gm) == []
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("features.0") == 1 and "features.0_1" in calls  # the re-used conv split per call site


class _OrderedOutputs(nn.Module):
    def forward(self, x):
        result = collections.OrderedDict()
        result["out"] = x * 2
        result["aux"] = x + 1
        return result


def test_an_ordered_dict_output_stays_one(tmp_path):
    model = _OrderedOutputs()
    x = torch.randn(2, 3)
    gm = qprep.prepare(model, (x,))  # verify compares container types: a dict would fail
    serialize.save(gm, tmp_path / "m.qprep")
    loaded = serialize.load(tmp_path / "m.qprep")
    assert type(gm(x)) is type(loaded(x)) is collections.OrderedDict


class _TensorOrNot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if isinstance(x, torch.Tensor):  # a Proxy is no Tensor: the trace took the other branch
            return self.fc(x)
        return torch.stack(list(x)).sum(0)


def test_isinstance_of_a_traced_value_is_the_examples_answer_and_guarded_on_inputs():
    model = _TensorOrNot()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert qprep.verify(model, gm, (torch.randn(3, 4),)).equal
    guard = next(g for g in gm.meta["qprep"]["preparation"].guards if g.how == "is_tensor")
    assert guard.text() == "isinstance(x, torch.Tensor) is True" and guard.inputs_only
    with pytest.raises(GuardError, match=r"isinstance\(x, torch.Tensor\)"):
        gm([torch.randn(4), torch.randn(4)])


@torch.jit.script
def _scripted_activation(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x) + 1


class _UsesScriptFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return _scripted_activation(self.fc(x))


def test_a_torchscript_function_is_one_call_in_a_module():
    """A ``@torch.jit.script`` function cannot take a Proxy: it is recorded as one call,
    kept whole in a Functional module (transformers' ViTDet has such functions)."""
    model = _UsesScriptFunction().eval()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert compute_ops_outside_modules(gm) == []
    assert qprep.verify(model, gm, (torch.randn(5, 4),)).equal


class _TimestepEmbedding(nn.Module):
    """diffusers' UNet2DModel: ``if not torch.is_tensor(timesteps): timesteps = torch.tensor(...)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 4)

    def forward(self, x, timesteps):
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=x.device)
        timesteps = timesteps * torch.ones(x.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        return x * self.fc(timesteps.float()[:, None])


def test_torch_is_tensor_of_a_traced_value_answers_as_isinstance_does():
    """A proxy is no tensor: ``torch.is_tensor`` took the other branch, and the prepared
    model made a tensor of a tensor. It now gives the example's answer, guarded on inputs."""
    model = _TimestepEmbedding().eval()
    gm = qprep.prepare(model, (torch.randn(1, 4), torch.tensor([10])))
    assert qprep.verify(model, gm, (torch.randn(3, 4), torch.tensor([500, 3, 7]))).equal
    with pytest.raises(GuardError, match="timesteps"):
        gm(torch.randn(2, 4), 5)


class _FrozenDict(collections.OrderedDict):
    """diffusers' ``FrozenDict`` config: no update after construction."""

    def update(self, *args, **kwargs):
        raise RuntimeError("frozen")

    def clear(self):
        raise RuntimeError("frozen")


class _HoldsFrozenConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self._internal_dict = _FrozenDict(scale=2.0)

    def forward(self, x):
        return self.fc(x) * self._internal_dict["scale"]


def test_a_dict_subclass_that_refuses_updates_is_left_as_it_is():
    """Putting the model's containers back after a trace touched only those that changed
    (diffusers' UNet, VAE: 'You cannot use update on a FrozenDict instance')."""
    model = _HoldsFrozenConfig().eval()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert qprep.verify(model, gm, (torch.randn(3, 4),)).equal


class _CacheLayer:
    def __init__(self, t: torch.Tensor):
        self.t = t


class _Memory:
    def __init__(self, tensors):
        self.layers = [_CacheLayer(t) for t in tensors]


class _CopiesCacheLayers(nn.Module):
    """transformers' Dory: ``cache.layers += [copy.deepcopy(c) for c in cache.layers[a:b]]``."""

    def forward(self, x, memory):
        memory.layers += [copy.deepcopy(layer) for layer in memory.layers]
        memory.layers[-1].t.mul_(2.0)  # the copy's tensor, not the original layer's
        return x + sum(layer.t for layer in memory.layers)


def test_deepcopy_of_a_traced_object_and_iadd_on_its_list_are_recorded():
    model = _CopiesCacheLayers().eval()
    gm = qprep.prepare(model, (torch.randn(2, 3), _Memory([torch.randn(2, 3), torch.randn(2, 3)])))
    memory = _Memory([torch.randn(2, 3), torch.randn(2, 3)])
    expected = model(torch.ones(2, 3), copy.deepcopy(memory))
    assert torch.equal(gm(torch.ones(2, 3), memory), expected)
    assert len(memory.layers) == 4 and torch.equal(memory.layers[3].t, memory.layers[1].t * 2)


class _UsesHelperObject(nn.Module):
    def __init__(self):
        from tests.capture.helpers_elsewhere import Decoder

        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.decoder = Decoder(2.0)

    def forward(self, x):
        return self.decoder.decode(self.fc(x))


def test_isinstance_in_a_helper_module_of_the_models_package_sees_the_example():
    """``isinstance`` answers from the example in every loaded module of the model's package,
    not only in the modules whose ``forward`` is traced (torchvision's BoxCoder.decode)."""
    model = _UsesHelperObject().eval()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    assert qprep.verify(model, gm, (torch.randn(3, 4),)).equal


class _ReturnsBoxes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        from tests.capture.helpers_elsewhere import Boxes

        return Boxes(self.fc(x), [tuple(x.shape[-1:])])


def test_an_object_of_a_users_class_holding_traced_values_is_rebuilt_per_call():
    """It used to be kept as a constant holding proxies, which the prepared model returned."""
    model = _ReturnsBoxes().eval()
    gm = qprep.prepare(model, (torch.randn(2, 4),))
    x = torch.randn(3, 4)
    out = gm(x)
    assert type(out).__name__ == "Boxes" and torch.equal(out.tensors, model(x).tensors) and out.sizes == [(4,)]
    assert qprep.verify(model, gm, (x,)).equal


class _CellAnchors(nn.Module):
    """torchvision's AnchorGenerator: ``self.cell_anchors = [a.to(dtype, device) for a in ...]``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.cell_anchors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]

    def forward(self, x):
        y = self.conv(x)
        self.cell_anchors = [a.to(dtype=y.dtype, device=y.device) for a in self.cell_anchors]
        return y.flatten(1).sum(1, keepdim=True) + torch.cat(self.cell_anchors)


class _KeepsDataInAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.history = []

    def forward(self, x):
        y = self.fc(x)
        self.history = [y.detach()]  # data kept between calls, in a container
        return y


def test_a_list_of_traced_values_assigned_to_an_attribute_is_a_cache_or_refused():
    """A container of traced values is judged as a traced value is: recomputed when made from
    shapes and constants, refused when made from data. Before, the list of proxies stayed on
    the module and leaked into later eager calls."""
    model = _CellAnchors().eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 4, 4),))
    assert qprep.verify(model, gm, (torch.randn(2, 3, 5, 5),)).equal
    assert all(type(a) is torch.Tensor for a in model.cell_anchors)
    keeper = _KeepsDataInAList().eval()
    with pytest.raises(qprep.TraceError, match="assigns a traced value to _KeepsDataInAList.history"):
        qprep.prepare(keeper, (torch.randn(2, 3),))
    assert keeper.history == []


class _CountsThenBranchesOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.fc(x)
        return y if y.sum() > 0 else -y


def test_a_failed_trace_leaves_no_plain_state_behind():
    """The trace itself puts a submodule's plain attributes back when it fails (the root's
    were already put back), before prepare checks the example on the model eagerly."""
    from qprep.capture.tracer import trace

    model = nn.Sequential(nn.Linear(3, 3), _CountsThenBranchesOnData()).eval()
    with pytest.raises(qprep.TraceError, match="y.sum"):
        trace(model, examples={"input": torch.randn(2, 3)})
    assert model[1].calls == 0


class _OpaqueRoot(nn.Module):
    """torchvision's GeneralizedRCNN: an untraceable root that calls another method of a child."""

    def __init__(self):
        super().__init__()
        self.pre = _PreAndPost()
        self.body = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

    def forward(self, x):
        y = self.body(self.pre(x))
        if y.sum() > 0:  # a branch on data: the root stays opaque
            y = y * 2
        return self.pre.post(y)


class _PreAndPost(nn.Module):
    def forward(self, x):
        return x * 0.5

    def post(self, y):
        return y + 1


def test_an_opaque_roots_child_whose_other_methods_it_calls_is_not_replaced():
    model = _OpaqueRoot().eval()
    gm = qprep.prepare(model, (torch.randn(2, 3),), on_untraceable="leaf")
    assert type(gm.model.pre) is _PreAndPost and isinstance(gm.model.body, torch.fx.GraphModule)
    notes = gm.meta["qprep"]["preparation"].trace_notes
    assert any("self.pre.post" in n.reason for n in notes), notes
    assert qprep.verify(model, gm, (torch.randn(4, 3),)).equal


class _UnboundTensorMethods(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, y):
        from torch import Tensor

        a = torch.Tensor.add(self.fc(x), y) + torch.Tensor.sigmoid(x) + Tensor.mul(x, 2.0)
        return [torch.Tensor.relu(t) for t in (a, y)]


def test_unbound_tensor_methods_are_method_calls():
    """``torch.Tensor.add(x, y)``: torch's C method rejects a proxy (plain fx fails too). For
    the trace, the names a forward reads off ``torch.Tensor`` record the method call; the class
    is as before afterwards."""
    model = _UnboundTensorMethods().eval()
    gm = qprep.prepare(model, (torch.randn(2, 3), torch.randn(2, 3)))
    assert compute_ops_outside_modules(gm) == []
    assert qprep.verify(model, gm, (torch.randn(4, 3), torch.randn(4, 3))).equal
    assert "add" not in torch.Tensor.__dict__ and torch.Tensor.add is torch._C.TensorBase.add


class _EmaRebound(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("ema", torch.zeros(3))
        self.register_buffer("count", torch.zeros(()), persistent=False)

    def forward(self, x):
        y = self.fc(x)
        self.ema = self.ema * 0.9 + y.detach().mean(0) * 0.1  # re-bound, not updated in place
        self.count = self.count + 1
        return y - self.ema * self.count


class _EmaPromoted(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x):
        self.ema = self.ema * 0.9 + x.mean(0)  # float64 input: the buffer would become float64
        return x - self.ema


def test_a_buffer_rebound_to_a_like_tensor_is_updated_in_place():
    """The buffer holds the original's values after every call; a re-binding that would change
    its dtype (or shape, or need a gradient) is still refused with the line."""
    model = _EmaRebound().eval()
    gm = qprep.prepare(model, (torch.randn(2, 3),))
    reference = copy.deepcopy(model)
    for _ in range(3):
        x = torch.randn(4, 3)
        assert torch.equal(gm(x), reference(x))
        assert torch.equal(gm.ema, reference.ema) and torch.equal(gm.count, reference.count)
    assert list(gm.state_dict()) == list(model.state_dict()) and float(model.count) == 0.0
    with pytest.raises(qprep.TraceError, match="assigns a traced value to _EmaPromoted.ema"):
        qprep.prepare(_EmaPromoted(), (torch.randn(2, 3, dtype=torch.float64),))
    follows = _LastRowSums().eval()
    gm = qprep.prepare(follows, (torch.randn(2, 3),))
    assert qprep.verify(follows, gm, (torch.randn(2, 3),)).equal
    with pytest.raises(GuardError, match=r"self.sums = \.\.\.` gives the buffer a tensor of shape \(5,\)"):
        gm(torch.randn(5, 3))  # the original re-binds to a longer buffer; an in-place copy cannot


class _LastRowSums(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sums", torch.zeros(2))

    def forward(self, x):
        self.sums = x.detach().sum(1)  # its length follows the batch
        return x * 2


class _Scaler(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor  # written by __init__ during the trace: not the model's state

    def forward(self, x):
        return x * self.factor


class _MakesAModuleInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return _Scaler(2.0)(self.fc(x))


def test_a_module_made_in_forward_may_set_its_own_attributes():
    """Its ``__init__`` writes plain attributes of a module not installed in the model: no
    state change of the model (transformers' BigBird builds attention modules in forward)."""
    model = _MakesAModuleInForward().eval()
    gm = qprep.prepare(model, (torch.randn(2, 3),))
    assert qprep.verify(model, gm, (torch.randn(4, 3),)).equal


class Routed(nn.Module):
    """Tokens routed by a boolean mask through their own norm and MLP, then put back
    (Hugging Face's Higgs Audio decoder layer): the gathered tensors' sizes depend on data,
    the result's do not, and Python reads the result's shape."""

    def __init__(self):
        super().__init__()
        self.audio_norm, self.text_norm, self.text_mlp = nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, h, mask):
        if self.training:
            h = h * 2
        h = h.masked_scatter(mask.unsqueeze(-1), self.audio_norm(h[mask]))
        h[~mask] += self.text_mlp(self.text_norm(h[~mask]))
        shape = (*h.shape[:-1], 2, -1)  # as attention splits heads: Python needs the rank
        if h.shape[-1] % 2:  # and a size
            raise ValueError("odd width")
        return h.view(shape)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_data_sized_values_put_back_into_a_known_shape_prepare(train):
    torch.manual_seed(0)
    model = Routed().train(train)
    h, mask = torch.randn(2, 5, 8), torch.rand(2, 5) > 0.5
    gm = qprep.prepare(model, (h, mask))
    assert compute_ops_outside_modules(gm) == []
    for other in (torch.zeros(2, 5, dtype=torch.bool), torch.ones(3, 7, dtype=torch.bool), torch.rand(3, 7) > 0.3):
        assert equal(model, gm, torch.randn(*other.shape, 8), other)


def test_a_size_that_depends_on_data_is_still_refused():
    """Only the ops that put such a tensor back into a known shape are given values: Python
    that reads a data-dependent size itself is refused, naming the line (never specialised
    to the example's mask)."""

    class Counts(nn.Module):
        def forward(self, h, mask):
            picked = h[mask] * 2
            sized = picked.new_zeros(picked.shape[0]) + picked.sum(-1)  # symbolic: fine at any count
            if picked.shape[0] > 3:  # Python needs the count
                sized = sized + 1
            return sized

    model, h = Counts(), torch.randn(2, 5, 8)
    with pytest.raises(qprep.TraceError, match=r"picked.shape\[0\] > 3"):
        qprep.prepare(model, (h, torch.rand(2, 5) > 0.5))


class PadToMultiple(nn.Module):
    """LongT5's ``_pad_to_multiple``: a Python list built from the rank, updated in place,
    then read; and a guard on it."""

    def forward(self, x):
        pad_len = -x.shape[1] % 8
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, pad_len)
        pad = sum(pad[::-1], ())
        return F.pad(x, pad) * 2


class InPlaceView(nn.Module):
    def forward(self, x):
        x.unsqueeze_(0)
        return x * 2 if x.dim() == 3 else x * 3


@pytest.mark.parametrize("model", [PadToMultiple, InPlaceView])
def test_metadata_reads_of_values_updated_in_place_stay_after_the_update(model):
    """Guards on input metadata run first, but a read of a list the graph updates, or of a
    tensor whose shape an in-place op changes, runs after that update (moved first, it read
    the value before it: the prepared model refused its own example)."""
    model = model()
    gm = qprep.prepare(model, (torch.randn(2, 5),))
    assert equal(model, gm, torch.randn(3, 13))
    assert any(not g.inputs_only for g in meta.graph_fact(gm, meta.GUARDS))
