"""Repeated blocks traced once (qprep.capture.blocks): a call of a module identical to an
earlier one, on identical arguments, replays the earlier call's nodes and guards. The graph
must be exactly the one tracing gives (the same generated code with ``dedup=False``), and
anything a replay could get wrong (an attribute that differs, a hook, a shared submodule, a
tensor of the model's, a buffer updated in place) must be traced or replayed correctly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import qprep
from qprep.core import meta


def both(model, example, **options):
    """The model prepared with and without dedup; the generated code must be the same."""
    # one line: a guard on the call's own **kwargs is located at the caller's line
    on, off = (qprep.prepare(model, example, dedup=dedup, **options) for dedup in (True, False))
    assert on.code == off.code
    assert meta.graph_fact(on, meta.GUARDS) == meta.graph_fact(off, meta.GUARDS)
    assert not meta.graph_fact(off, meta.REPLAYED)
    return on, {r.path: r.source for r in meta.graph_fact(on, meta.REPLAYED) or ()}


def assert_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    else:
        assert a == b


class Block(nn.Module):
    def __init__(self, dim: int = 8, scale: float = 1.0, index: int = 0):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.scale, self.index = scale, index

    def forward(self, x):
        y = self.norm(x)
        if y.size(-1) > 4:  # a guard, replayed on the new block's value
            y = torch.relu(self.fc(y)) * self.scale
        return x + y, y.shape[0]


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        total = 0
        for block in self.blocks:
            x, n = block(x)
            total = total + n
        return x * total


def test_identical_blocks_are_replayed_and_equal_at_new_shapes():
    torch.manual_seed(0)
    model = Stack([Block() for _ in range(4)]).eval()
    gm, replayed = both(model, torch.randn(2, 8))
    # the first block's input is the model's, which needs no gradient; the others' need one
    assert replayed == {"blocks.2": "blocks.1", "blocks.3": "blocks.1"}
    for x in (torch.randn(2, 8), torch.randn(5, 8)):  # the batch is symbolic in the replayed blocks too
        assert_equal(gm(x), model(x))
    # each replayed block calls its own modules: their parameters are its own
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {f"blocks.{i}.fc" for i in range(4)} <= targets
    guards = meta.graph_fact(gm, meta.GUARDS)
    assert sum(g.how == "bool" and "size(-1)" in g.expression for g in guards) == 4  # replayed for each block


@pytest.mark.parametrize("differ", [
    pytest.param(dict(scale=2.0), id="attribute-in-graph"),
    pytest.param(dict(index=3), id="attribute-unused"),
])
def test_a_block_whose_attributes_differ_is_traced(differ):
    torch.manual_seed(0)
    model = Stack([Block(), Block(), Block(**differ), Block()]).eval()
    x = torch.randn(2, 8)
    gm, replayed = both(model, x)
    assert replayed == {"blocks.3": "blocks.1"}
    assert_equal(gm(x), model(x))


class Branching(nn.Module):
    """``layer_idx`` in a Python branch: each value gives another graph."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + 1 if self.index % 2 else self.fc(x)


def test_a_branch_on_an_attribute_that_differs():
    torch.manual_seed(0)
    model = nn.Sequential(*[Branching(i) for i in range(4)]).eval()
    x = torch.randn(3, 8)
    gm, replayed = both(model, x)
    assert replayed == {}
    assert_equal(gm(x), model(x))


def test_hooks_shared_modules_and_model_tensors_are_traced():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    blocks = [Block() for _ in range(5)]
    blocks[1].fc = shared  # shared with blocks[2]: not replayed from (or as) another block
    blocks[2].fc = shared
    blocks[3].register_forward_hook(lambda m, i, o: (o[0] * 2, o[1]))
    model = Stack(blocks).eval()
    x = torch.randn(2, 8)
    gm, replayed = both(model, x)
    # blocks 2 (its fc is registered first in block 1) and 3 (a hook) are traced
    assert set(replayed) <= {"blocks.4"} and all(src in ("blocks.0", "blocks.1") for src in replayed.values())
    assert_equal(gm(x), model(x))


class Counting(nn.Module):
    """A buffer updated in place: the replayed update must be this block's own buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        y = torch.relu(self.fc(x) * self.calls + 1)  # enough nodes to be worth replaying
        return (y - x).tanh() * 2 + x.sigmoid()


def test_buffers_updated_in_place_are_the_replayed_blocks_own():
    torch.manual_seed(0)
    model = nn.Sequential(*[Counting() for _ in range(3)]).eval()
    reference = Counting()
    x = torch.randn(2, 8)
    gm, replayed = both(model, x)
    assert replayed == {"2": "1"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm.load_state_dict(before)
    for _ in range(2):
        assert_equal(gm(x), model(x))
    assert_equal(gm.state_dict()["1.calls"], model.state_dict()["1.calls"])
    del reference


@dataclasses.dataclass
class Pair:
    a: torch.Tensor
    b: torch.Tensor


class ReturnsObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.offset = torch.tensor(0.5)  # a plain tensor: a constant the trace stores on the model

    def forward(self, x):
        return Pair(self.fc(x), x + self.offset)


class ObjectStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ReturnsObject() for _ in range(3)])

    def forward(self, x):
        outs = [block(x) for block in self.blocks]
        return sum(o.a + o.b for o in outs)


def test_calls_that_return_objects_or_read_model_constants_are_traced():
    torch.manual_seed(0)
    model = ObjectStack().eval()
    x = torch.randn(2, 8)
    gm, replayed = both(model, x)
    assert replayed == {}
    assert_equal(gm(x), model(x))


class SharedTwice(nn.Module):
    """One module called at several sites (ALBERT): recorded at its second call, replayed after."""

    def __init__(self):
        super().__init__()
        self.layer = Block()

    def forward(self, x):
        for _ in range(4):
            x, _ = self.layer(x)
        return x


def test_one_module_called_again_and_again():
    torch.manual_seed(0)
    model = SharedTwice().eval()
    x = torch.randn(3, 8)
    gm, replayed = both(model, x)
    assert replayed == {"layer": "layer"} and len(meta.graph_fact(gm, meta.REPLAYED)) == 2
    assert_equal(gm(x), model(x))
    # one instance per call site, as without dedup
    assert len({n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("layer.fc")}) == 4


def test_arguments_of_other_shapes_are_traced():
    torch.manual_seed(0)

    class Growing(nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = nn.ModuleList([nn.Identity() for _ in range(3)])

        def forward(self, x):
            for norm in self.norms:
                x = torch.cat([norm(x), x], dim=1)
            return x

    x = torch.randn(2, 8)
    model = Growing().eval()
    gm, replayed = both(model, x)
    assert replayed == {}  # each call sees a wider input
    assert_equal(gm(x), model(x))


@pytest.mark.parametrize("name, attn", [
    pytest.param("llama", "sdpa", id="llama"),
    pytest.param("albert", "sdpa", id="albert"),
    pytest.param("vit", "eager", id="vit"),
    pytest.param("gpt2", "sdpa", id="gpt2", marks=pytest.mark.slow),
    pytest.param("t5", "sdpa", id="t5", marks=pytest.mark.slow),
    pytest.param("bert", "eager", id="bert", marks=pytest.mark.slow),
])
def test_hugging_face_blocks(name, attn):
    pytest.importorskip("transformers")
    from tests import hf_models

    if name == "albert":  # its one shared layer, called 4 times: recorded at the second call
        config = hf_models.CONFIGS[name]()
        config.num_hidden_layers = 4
        torch.manual_seed(0)
        model = hf_models.T.AutoModel.from_config(config, attn_implementation=attn).eval()
    else:
        model = hf_models.build(name, attn)
    gm, replayed = both(model, hf_models.example(name))
    # BERT's layers differ in layer_idx, and what is the same in them is too small to replay
    assert bool(replayed) == (name != "bert")
    if name == "llama":  # each layer's attention reads its layer_idx: traced; its norms are replayed
        assert "model.layers.1.input_layernorm" in replayed and "model.layers.1.self_attn" not in replayed
    other = hf_models.example(name, batch=3, seq=11, pad=True, seed=1)
    result = qprep.verify(model, gm, other)
    assert result.equal, result.table()
