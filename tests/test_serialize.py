"""qprep.serialize: the pickle-free file format for prepared models.

Round trips on real models (bitwise equal outputs, same state_dict, same Parameter sharing,
same training flags), and files written by hand that try to make the loader run code.
"""

import json
import os
import pickle
import zipfile
import typing
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qprep
from qprep import serialize
from qprep.examples import DistillerBlock, TinyLSTMLM
from qprep.serialize import SerializationError, UntrustedError


class Attention(nn.Module):
    """nn.MultiheadAttention (expanded into ModularMultiheadAttention) + a residual."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        y, weights = self.mha(x, x, x)
        return self.norm(y + x), weights


class KeptLSTM(nn.Module):
    """An nn.LSTM kept as is (expand_rnns=False): RNNBase's own __setstate__ runs on load."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 5, num_layers=2)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.head(out + h[-1])


class Annotated(nn.Module):
    """Annotated placeholders, a default and a specialised argument, a dict output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 2.0):
        y = self.lin(x) * scale
        if mask is not None:
            y = y + mask
        return {"y": y[..., 1:3], "n": x.shape[0]}


class Constants(nn.Module):
    """A non-persistent buffer, a traced tensor constant, a Functional wrapper (F.normalize),
    slicing and a method call left as graph nodes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x):
        y = self.lin(x) * self.scale + torch.tensor([1.0, 2.0, 3.0, 4.0])
        return F.normalize(y, dim=-1)[:, 1:], y.flip(0)


class MyBlock(nn.Module):
    """A user module the test keeps as an opaque leaf."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gain = 0.5

    def forward(self, x):
        return torch.relu(self.lin(x)) * self.gain


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = MyBlock()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.block(x) + x)


class UnlistedOp(nn.Module):
    """torch.erfinv is in none of qprep's tables: left alone as a call_function node."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.erfinv(torch.tanh(self.lin(x)) * 0.5)


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10)


CASES = {
    "distiller": (DistillerBlock, lambda m: m.example_inputs(), {}),
    "lstm_lm": (TinyLSTMLM, lambda m: m.example_inputs(), {}),
    "attention": (Attention, lambda m: (torch.randn(2, 5, 16),), {}),
    "kept_lstm": (KeptLSTM, lambda m: (torch.randn(7, 3, 6),), {"expand_rnns": False}),
    "annotated": (Annotated, lambda m: (torch.randn(3, 4),), {"concrete_args": {"mask": None}}),
    "constants": (Constants, lambda m: (torch.randn(3, 4),), {}),
    "resnet18": (_resnet18, lambda m: (torch.randn(2, 3, 32, 32),), {}),
}


def _prepared(name):
    build, inputs, options = CASES[name]
    model = build()
    x = inputs(model)
    return model, x, qprep.prepare(model, x, **options)


def _sharing(module: nn.Module) -> set:
    """Which state names share one tensor object: {frozenset(names), ...}."""
    groups: dict[int, set] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        groups.setdefault(id(t), set()).add(name)
    return {frozenset(g) for g in groups.values()}


def _modes(module: nn.Module) -> dict:
    return {name: m.training for name, m in module.named_modules(remove_duplicate=False)}


def _round_trip(gm, tmp_path, **load_options):
    path = tmp_path / "model.qprep"
    serialize.save(gm, path)
    return serialize.load(path, map_location="cpu", **load_options)


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name, tmp_path):
    model, x, gm = _prepared(name)
    loaded = _round_trip(gm, tmp_path)
    assert type(loaded).__name__ == type(gm).__name__
    assert loaded.code == gm.code
    for train in (True, False):
        result = qprep.verify(model, loaded, x, train=train)
        assert result.equal, result.table()
    assert list(loaded.state_dict()) == list(gm.state_dict())
    for (key, a), b in zip(gm.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == b.dtype, key
    assert _sharing(loaded) == _sharing(gm)
    assert _modes(loaded) == _modes(gm)
    assert [n.format_node() for n in loaded.graph.nodes] == [n.format_node() for n in gm.graph.nodes]
    assert [type(m) for m in list(loaded.modules())[1:]] == [type(m) for m in list(gm.modules())[1:]]
    loaded.load_state_dict(gm.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["lstm_lm", "attention"])
def test_the_original_checkpoint_loads_strictly(name, tmp_path):
    """The alias names (gate Linear weights, sliced projections) stay hidden after loading:
    qprep's state_dict hooks were re-created."""
    model, _, gm = _prepared(name)
    loaded = _round_trip(gm, tmp_path)
    assert list(loaded.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    loaded.load_state_dict(model.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class Typed(nn.Module):
    """Annotations of every form the format stores, traced with plain torch.fx."""

    def forward(self, x: torch.Tensor, a: Optional[torch.Tensor] = None, b: typing.Tuple[int, ...] = (1,),
                c: "torch.Tensor" = None, d: list[int] | None = None, e: typing.Dict[str, typing.Any] = None,
                f: torch.dtype = torch.float32):
        return x.to(f) + 1


def test_annotations_round_trip(tmp_path):
    gm = torch.fx.symbolic_trace(Typed())
    loaded = _round_trip(gm, tmp_path)
    assert loaded.code == gm.code
    assert [n.type for n in loaded.graph.nodes] == [n.type for n in gm.graph.nodes]
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x, f=torch.float64), gm(x, f=torch.float64))


def test_gradients_match(tmp_path):
    model, x, gm = _prepared("lstm_lm")
    result = qprep.verify(model, _round_trip(gm, tmp_path), x, train=True, grad=True)
    assert result.equal and result.grads, result.table()


def test_constants_and_functional_wrappers(tmp_path):
    _, _, gm = _prepared("constants")
    assert any(type(m).__name__ == "Functional" for m in gm.modules())
    assert any(n.op == "get_attr" for n in gm.graph.nodes)  # the traced torch.tensor constant
    loaded = _round_trip(gm, tmp_path)
    assert "scale" not in loaded.state_dict() and torch.equal(loaded.scale, gm.scale)


def test_tied_and_gate_weights_are_the_same_objects(tmp_path):
    _, _, gm = _prepared("lstm_lm")
    loaded = _round_trip(gm, tmp_path)
    assert loaded.decoder.weight is loaded.embed.weight
    cell = loaded.lstm.layers[1].cell
    assert cell.input_linear.weight is loaded.lstm.weight_ih_l1
    assert cell.hidden_linear.bias is loaded.lstm.bias_hh_l1
    assert loaded.drop_1 is not loaded.drop  # the clone of the re-used dropout stays a clone
    with torch.no_grad():
        loaded.embed.weight.add_(1.0)  # one object: the tied decoder sees it
    assert torch.equal(loaded.decoder.weight, loaded.embed.weight)


def test_attention_packed_projection_is_shared(tmp_path):
    _, _, gm = _prepared("attention")
    loaded = _round_trip(gm, tmp_path)
    assert loaded.mha.q_proj.packed_weight is loaded.mha.in_proj_weight
    assert loaded.mha.kv_proj.packed_bias is loaded.mha.in_proj_bias


def test_training_flags_survive(tmp_path):
    model, x, gm = _prepared("distiller")
    gm.eval()
    gm.bn2.train()
    loaded = _round_trip(gm, tmp_path)
    assert not loaded.training and loaded.bn2.training and not loaded.bn1.training
    model.eval()
    model.bn2.train()
    assert qprep.verify(model, loaded, x).equal


def test_requires_grad_and_buffers_survive(tmp_path):
    _, _, gm = _prepared("distiller")
    gm.conv1.weight.requires_grad_(False)
    loaded = _round_trip(gm, tmp_path)
    assert not loaded.conv1.weight.requires_grad and loaded.conv2.weight.requires_grad
    assert isinstance(loaded.conv1.weight, nn.Parameter)
    assert not isinstance(loaded.bn1.running_mean, nn.Parameter)
    assert loaded.bn1.num_batches_tracked.dtype == torch.int64


def test_file_members_and_readable_source(tmp_path):
    _, _, gm = _prepared("distiller")
    path = tmp_path / "model.qprep"
    serialize.save(gm, path)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["forward.py", "model.json", "weights.pt"]
        assert zf.read("forward.py").decode() == gm.code
        model = json.loads(zf.read("model.json"))
    assert model["format"] == serialize.FORMAT and model["version"] == serialize.VERSION
    classes = {m["class"] for m in model["modules"]}
    assert {"torch.fx.GraphModule", "torch.nn.Conv2d", "qprep.modules.Add", "qprep.modules.Cat"} <= classes
    add = next(m for m in model["modules"] if m["class"] == "qprep.modules.Add")
    assert add["attrs"]["call"] == {"$fn": "operator.iadd"}
    assert add["attrs"]["args"] == {"$tuple": [{"$input": 0}, {"$input": 1}]}
    # One weights entry per distinct tensor object.
    assert len(model["tensors"]) == len({id(t) for t in gm.state_dict(keep_vars=True).values()})


def test_leaf_user_module_needs_trust(tmp_path):
    model = WithLeaf()
    x = torch.randn(3, 4)
    gm = qprep.prepare(model, (x,), leaf_modules=[MyBlock])
    path = tmp_path / "model.qprep"
    serialize.save(gm, path)
    with pytest.raises(UntrustedError, match=r"MyBlock.*trusted=\[MyBlock\]") as info:
        serialize.load(path)
    assert info.value.name.endswith("MyBlock")
    loaded = serialize.load(path, trusted=[MyBlock])
    assert type(loaded.block) is MyBlock and loaded.block.gain == 0.5
    assert qprep.verify(model, loaded, (x,)).equal


def test_unlisted_function_needs_trust(tmp_path):
    model = UnlistedOp()
    x = torch.randn(3, 4)
    gm = qprep.prepare(model, (x,))
    path = tmp_path / "model.qprep"
    serialize.save(gm, path)
    with pytest.raises(UntrustedError, match=r"function 'torch.erfinv'.*trusted="):
        serialize.load(path)
    assert qprep.verify(model, serialize.load(path, trusted=[torch.erfinv]), (x,)).equal


def test_two_mode_model_keeps_both_graphs(tmp_path):
    """torchvision's StochasticDepth branches on the training flag (traced into, so its
    random draw and arithmetic are modules): the prepared model holds one graph per mode,
    and the file keeps both, each checked against its own reviewed source."""
    ops = pytest.importorskip("torchvision.ops")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.drop_path = ops.StochasticDepth(0.5, "row")

        def forward(self, x):
            return x + self.drop_path(self.lin(x))

    model, x = Block(), (torch.randn(8, 4),)
    gm = qprep.prepare(model, x)
    path = tmp_path / "model.qprep"
    serialize.save(gm, path)
    with zipfile.ZipFile(path) as zf:
        assert {"forward_train.py", "forward_eval.py"} <= set(zf.namelist())
    loaded = serialize.load(path)
    assert type(loaded).__mro__[1].__name__ == "DualGraphModule" and loaded.training == gm.training
    for train in (True, False):
        assert qprep.verify(model, loaded, x, train=train).equal
    _edit(path, source=None)  # untouched file still loads
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["forward_eval.py"] = members["forward_eval.py"].replace(b"return", b"return  ")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(SerializationError, match="forward_eval.py"):
        serialize.load(path)


# -- files that try to run code -----------------------------------------------------------------
def _edit(path, change_model=None, source=None, weights=None):
    """Rewrite a saved file: change model.json, forward.py or weights.pt."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    if change_model is not None:
        model = json.loads(members["model.json"])
        change_model(model)
        members["model.json"] = json.dumps(model).encode()
    if source is not None:
        members["forward.py"] = source(members["forward.py"].decode()).encode()
    if weights is not None:
        members["weights.pt"] = weights
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.fixture
def saved(tmp_path):
    _, _, gm = _prepared("distiller")
    path = tmp_path / "model.qprep"
    serialize.save(gm, path)
    return path


def _module(model, cls):
    return next(m for m in model["modules"] if m["class"] == cls)


def _node(model, name):
    return next(n for n in model["graph"] if n["name"] == name)


def test_refuses_unlisted_module_class(saved):
    _edit(saved, lambda m: _module(m, "torch.nn.ReLU").update({"class": "subprocess.Popen"}))
    with pytest.raises(UntrustedError, match=r"class 'subprocess.Popen' is not allowlisted.*trusted=\[Popen\]"):
        serialize.load(saved)


def test_refuses_allowlisted_class_that_is_not_a_module(saved):
    _edit(saved, lambda m: _module(m, "torch.nn.ReLU").update({"class": "torch.Tensor"}))
    with pytest.raises(UntrustedError, match="not an nn.Module class"):
        serialize.load(saved)


def test_refuses_unlisted_call_function(saved):
    def evil(model):
        _node(model, "add").update({"op": "call_function", "target": "builtins.exec",
                                    "args": {"$tuple": ["import os; os.system('touch /tmp/pwned')"]}})

    _edit(saved, evil)
    with pytest.raises(UntrustedError, match=r"function 'builtins.exec' is not allowlisted"):
        serialize.load(saved)


def test_refuses_unlisted_wrapper_call(saved):
    _edit(saved, lambda m: _module(m, "qprep.modules.Add")["attrs"].update({"call": {"$fn": "os.system"}}))
    with pytest.raises(UntrustedError, match="function 'os.system'"):
        serialize.load(saved)


def test_refuses_dangerous_operator_and_method(saved):
    def call(model):
        _node(model, "add").update({"op": "call_function", "target": "operator.call"})

    _edit(saved, call)
    with pytest.raises(UntrustedError, match="operator.call"):
        serialize.load(saved)


@pytest.mark.parametrize("method", ["__reduce_ex__", "__setattr__", "system", "_unsafe"])
def test_refuses_non_tensor_methods(tmp_path, method):
    _, _, gm = _prepared("distiller")
    path = tmp_path / "model.qprep"
    serialize.save(gm, path)
    _edit(path, lambda m: _node(m, "add").update({"op": "call_method", "target": method}))
    with pytest.raises(UntrustedError, match="not a public torch.Tensor method"):
        serialize.load(path)


def test_refuses_private_getattr(saved):
    def evil(model):
        _node(model, "add").update({"op": "call_function", "target": "builtins.getattr",
                                    "args": {"$tuple": [{"$node": "x"}, "__class__"]}})

    _edit(saved, evil)
    with pytest.raises(UntrustedError, match="getattr of a private"):
        serialize.load(saved)


def test_refuses_wrapper_method_call_that_is_not_a_tensor_method(saved):
    _edit(saved, lambda m: _module(m, "qprep.modules.Add")["attrs"].update({"call": "__init_subclass__"}))
    with pytest.raises(UntrustedError, match="__init_subclass__"):
        serialize.load(saved)


@pytest.mark.parametrize("where", ["placeholder", "member", "kwarg"])
def test_refuses_names_that_would_inject_code(saved, where):
    payload = "x=__import__('os').system('touch /tmp/pwned')"

    def evil(model):
        if where == "placeholder":
            _node(model, "x")["target"] = payload
        elif where == "member":
            root = model["modules"][0]
            root["children"][f'a"),{payload},("'] = root["children"].pop("conv1")
        else:
            _node(model, "cat")["kwargs"] = {"$dict": [[payload, 1]]}

    _edit(saved, evil)
    with pytest.raises(SerializationError, match="placeholder name|member name|identifiers"):
        serialize.load(saved)


def test_refuses_attribute_that_shadows_a_method(saved):
    _edit(saved, lambda m: _module(m, "torch.nn.ReLU")["attrs"].update({"forward": {"$fn": "torch.cat"}}))
    with pytest.raises(SerializationError, match="refusing the attribute name 'forward'"):
        serialize.load(saved)


def test_refuses_altered_source(saved):
    _edit(saved, source=lambda code: code.replace("return sigmoid", "return cat"))
    with pytest.raises(SerializationError, match="differs from forward.py"):
        serialize.load(saved)


def test_refuses_graph_that_differs_from_source(saved):
    # The graph is what runs; forward.py is what a reviewer reads. They must agree.
    _edit(saved, lambda m: _node(m, "relu_1").update({"target": "relu"}))
    with pytest.raises(SerializationError, match="differs from forward.py"):
        serialize.load(saved)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/qprep_pwned",))


def test_refuses_pickled_code_in_weights(saved, tmp_path):
    marker = "/tmp/qprep_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(saved) as zf:
        real = torch.load(zf.open("weights.pt"), weights_only=True)
    torch.save({**real, "t0": _Payload()}, evil)
    _edit(saved, weights=evil.read_bytes())
    with pytest.raises(SerializationError, match="weights_only=True"):
        serialize.load(saved)
    assert not os.path.exists(marker)


def test_refuses_missing_tensor_and_bad_reference(saved):
    _edit(saved, lambda m: _module(m, "torch.nn.Conv2d")["params"].update({"weight": "t999"}))
    with pytest.raises(SerializationError, match="t999"):
        serialize.load(saved)


def test_refuses_not_a_qprep_file(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(SerializationError, match="not a qprep model file"):
        serialize.load(path)
    (tmp_path / "junk").write_bytes(b"not a zip")
    with pytest.raises(SerializationError, match="cannot open"):
        serialize.load(tmp_path / "junk")


# -- what save refuses --------------------------------------------------------------------------
def test_save_refuses_hooks(tmp_path):
    _, _, gm = _prepared("distiller")
    gm.conv1.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(SerializationError, match="module 'conv1' has a forward hook"):
        serialize.save(gm, tmp_path / "m.qprep")


def test_save_refuses_objects_that_are_not_data(tmp_path):
    _, _, gm = _prepared("distiller")
    gm.relu.note = object()
    with pytest.raises(SerializationError, match="attribute 'note' of module 'relu'"):
        serialize.save(gm, tmp_path / "m.qprep")


def test_save_takes_a_graph_module(tmp_path):
    with pytest.raises(qprep.InputError, match="GraphModule"):
        serialize.save(nn.Linear(2, 2), tmp_path / "m.qprep")


def test_saved_file_is_not_a_pickle_of_code(saved):
    """The weights member holds tensors only: torch.load(weights_only=True) reads it, and the
    JSON member names no class outside the allowlist."""
    with zipfile.ZipFile(saved) as zf:
        weights = torch.load(zf.open("weights.pt"), weights_only=True)
        model = json.loads(zf.read("model.json"))
    assert all(type(t) is torch.Tensor for t in weights.values())
    assert all(m["class"] in serialize.ALLOWED_CLASSES or m["class"] == "torch.fx.GraphModule"
               for m in model["modules"])
    with pytest.raises(pickle.UnpicklingError):
        with zipfile.ZipFile(saved) as zf:
            pickle.loads(zf.read("model.json"))
