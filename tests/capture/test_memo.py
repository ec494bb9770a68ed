"""Op results remembered for one capture (qprep.capture.memo): every example value is what
running the op gives, an op runs once per key, and nothing that is not a pure function of its
key (in-place updates, views, a user's module) is remembered."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qprep
from qprep.capture import capture, memo
from qprep.core.config import PrepareConfig
from qprep.core.inputs import as_positional
from tests.models import Block, DistillerBlock, FunctionalNet, ReusedBlock


def describe(value):
    if isinstance(value, torch.Tensor):
        return (type(value), tuple(value.shape), value.stride(), value.storage_offset(), value.dtype,
                value.requires_grad, value.is_leaf, value._is_view())
    if isinstance(value, (list, tuple)):
        return type(value), tuple(describe(v) for v in value)
    return type(value), repr(value)


def example_values(model, args, config=None):
    gm = capture(model, config or PrepareConfig(), as_positional(args, model)).graph_module
    return [(n.name, describe(n.meta.get("val")), n.meta.get("tensor_meta")) for n in gm.graph.nodes]


class Repeated(nn.Module):
    """Four identical blocks, and a branch on self.training (traced in both modes)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                    nn.ReLU(inplace=True)) for _ in range(4)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.blocks(x) + x
        if self.training:
            y = F.dropout(y, 0.1)
        return self.fc(y.mean((2, 3)))


class InPlaceShapes(nn.Module):
    """The same in-place op on the same shapes twice: each updates its own input."""

    def forward(self, x):
        y = x * 2
        y.unsqueeze_(0)
        z = x * 2
        z.unsqueeze_(0)
        w = (y + z).transpose_(0, 2)
        v = (y + z).transpose_(0, 2)
        a, b = x.view(-1), x.view(-1)
        return w + v, a + b, x.contiguous()


class Grows(nn.Module):
    """A user's module whose output shape changes with every call (a leaf here)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.repeat(self.calls)


class CallsGrowsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.grows = Grows()

    def forward(self, x):
        return self.grows(x).sum() + self.grows(x).sum()


MODELS = [
    (Repeated, lambda: (torch.randn(2, 8, 6, 6),)),
    (InPlaceShapes, lambda: (torch.randn(3, 4),)),
    (DistillerBlock, lambda: (torch.randn(1, 3, 8, 8),)),
    (Block, lambda: (torch.randn(2, 8),)),
    (ReusedBlock, lambda: (torch.randn(2, 8),)),
    (FunctionalNet, lambda: (torch.randn(1, 3, 16, 16),)),
]


def _make(cls):
    try:
        return cls()
    except TypeError:
        pytest.skip(f"{cls.__name__} takes arguments")


@pytest.mark.parametrize("cls, inputs", MODELS, ids=[c.__name__ for c, _ in MODELS])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_values_are_those_of_running_every_op(cls, inputs, mode, monkeypatch):
    torch.manual_seed(0)
    model = getattr(_make(cls), mode)()
    args = inputs()
    remembered = example_values(model, args)
    monkeypatch.setattr(memo.Results, "run", lambda self, key, tensors, op: op())
    assert remembered == example_values(model, args)


def test_an_op_runs_once_per_key_across_both_modes(monkeypatch):
    calls = []
    conv_forward = nn.Conv2d._conv_forward

    def counted(self, *args):
        calls.append(self)
        return conv_forward(self, *args)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counted)
    model = Repeated().eval()
    with memo.shared_results() as results:
        capture(model, PrepareConfig(), (torch.randn(2, 8, 6, 6),))
    # four convolutions of one configuration, in two traces: the first one's input does not
    # require grad, the other three's do (two keys); a convolution's mode is not in its key
    assert len(calls) == 2
    assert results.hits > results.misses


def test_in_place_updates_and_views_are_never_remembered():
    model = InPlaceShapes()
    gm = qprep.prepare(model, (torch.randn(3, 4),))
    vals = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    unsqueezed = [v for k, v in vals.items() if k.startswith("unsqueeze_")]
    transposed = [v for k, v in vals.items() if k.startswith("transpose_")]
    assert len(unsqueezed) == 2 and all(tuple(v.shape) == (1, 3, 4) for v in unsqueezed)
    assert len(transposed) == 2 and all(tuple(v.shape) == (4, 3, 1) for v in transposed)
    views = [n.meta["val"] for n in gm.graph.nodes if n.meta.get("val") is not None
             and isinstance(n.meta["val"], torch.Tensor) and n.meta["val"]._is_view()]
    assert len(views) >= 2  # both x.view(-1) are views of x, as in eager mode


def test_a_users_module_is_never_remembered():
    model = CallsGrowsTwice()
    config = PrepareConfig(leaf_modules=(Grows,))
    gm = capture(model, config, (torch.randn(3),)).graph_module
    shapes = [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    assert shapes == [(3,), (6,)]


def test_what_has_a_key():
    x = torch.empty(2, 3, device="meta")
    assert memo.function_key(torch.add, (x, x), {}, []) is not None
    assert memo.function_key(torch.add, (x, x), {"out": x}, []) is None
    assert memo.function_key(F.relu, (x,), {"inplace": True}, []) is None
    assert memo.function_key(describe, (x,), {}, []) is None  # a user's function
    assert memo.method_key("add_", (x, x), {}, []) is None
    assert memo.method_key("view", (x, -1), {}, []) is not None
    assert memo.module_key(nn.Conv2d(3, 3, 1), (x,), {}, []) is not None
    assert memo.module_key(nn.ReLU(inplace=True), (x,), {}, []) is None
    assert memo.module_key(Grows(), (x,), {}, []) is None
    assert memo.function_key(torch.add, (torch.ones(2), x), {}, []) is None  # a real tensor's data may matter
