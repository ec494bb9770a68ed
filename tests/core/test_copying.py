"""qprep.core.copying.deepcopy_module returns what copy.deepcopy returns: same classes, same
values, same sharing (within the copy), nothing mutable shared with the original."""

from __future__ import annotations

import copy
import functools
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import qprep
from qprep.core.copying import deepcopy_module
from tests.models import Aliasing, ReusedBlock, SharedConv

ATOMS = (type(None), int, float, bool, complex, str, bytes, type, torch.dtype, torch.device, torch.layout,
         torch.memory_format)


def walk(original, a, b, seen_a: dict, seen_b: dict, path: str = "model") -> None:
    """Walk ``original`` and its two copies side by side; each original object must map to
    one object of each copy (and two originals to two), of the same type and value."""
    if isinstance(original, torch.fx.GraphModule):  # fx gives every instance a class of its own
        assert type(a).__bases__ == type(original).__bases__ == type(b).__bases__, path
        assert a.code == original.code == b.code, path
        for part in ("_modules", "_parameters", "_buffers"):
            walk(getattr(original, part), getattr(a, part), getattr(b, part), seen_a, seen_b, f"{path}.{part}")
        return
    assert type(a) is type(original) and type(b) is type(original), path
    if isinstance(original, ATOMS) or isinstance(original, types.FunctionType):
        assert a == original and b == original, path
        return
    if isinstance(original, types.MethodType):  # a hook: the same function, bound to the copy
        assert a.__func__ is original.__func__ is b.__func__, path
        walk(original.__self__, a.__self__, b.__self__, seen_a, seen_b, f"{path}.__self__")
        return
    if isinstance(original, functools.partial):
        walk((original.func, original.args, original.keywords), (a.func, a.args, a.keywords),
             (b.func, b.args, b.keywords), seen_a, seen_b, f"{path}.partial")
        return
    for seen, copied in ((seen_a, a), (seen_b, b)):
        if id(original) in seen:
            assert seen[id(original)] is copied, f"{path}: sharing differs"
            return
        seen[id(original)] = copied
    if not isinstance(original, tuple):  # a tuple of constants may be the original itself
        assert a is not original and b is not original, f"{path}: shared with the original"
    if isinstance(original, torch.Tensor):
        for t in (a, b):
            assert torch.equal(t, original) and t.stride() == original.stride(), path
            assert t.requires_grad == original.requires_grad and t.dtype == original.dtype, path
            assert t.untyped_storage().data_ptr() != original.untyped_storage().data_ptr() or original.numel() == 0
        walk_storage(original, a, b, seen_a, seen_b, path)
        return
    if isinstance(original, dict):
        assert list(a) == list(original) == list(b), path
        for k in original:
            walk(original[k], a[k], b[k], seen_a, seen_b, f"{path}[{k!r}]")
    elif isinstance(original, (list, tuple)):
        assert len(a) == len(original) == len(b), path
        for i, (x, y, z) in enumerate(zip(original, a, b)):
            walk(x, y, z, seen_a, seen_b, f"{path}[{i}]")
    if hasattr(original, "__dict__"):
        keys = list(vars(a))  # __setstate__ may rebuild some (nn.LSTM's weak references)
        assert keys == list(vars(b)), f"{path}: attributes differ"
        for k in keys:
            if k in vars(original):
                walk(vars(original)[k], vars(a)[k], vars(b)[k], seen_a, seen_b, f"{path}.{k}")
            else:
                assert type(vars(a)[k]) is type(vars(b)[k]), f"{path}.{k}"


def walk_storage(original, a, b, seen_a, seen_b, path):
    key = ("storage", original.untyped_storage().data_ptr())
    for seen, t in ((seen_a, a), (seen_b, b)):
        ptr = t.untyped_storage().data_ptr()
        if key in seen:
            assert seen[key] == ptr, f"{path}: storage sharing differs"
        seen[key] = ptr


class Hooked(nn.Module):
    """Hooks (a bound method, a partial), tensors sharing a storage, containers of all kinds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.tied = nn.Linear(4, 4)
        self.tied_again = nn.Linear(4, 4)
        self.tied_again.weight = self.tied.weight
        base = torch.randn(6)
        self.register_buffer("first", base[:3])
        self.register_buffer("second", base[3:])
        self.calls = [1, [2, 3], (4, 5)]
        self.table = {"a": torch.ones(2), "b": OrderedDict(x=1)}
        self.pair = (self.tied.weight, 3)
        self.conv.register_forward_hook(self.seen)
        self.conv.register_forward_pre_hook(functools.partial(Hooked.seen_before, self))
        self.log = []

    def seen(self, module, args, out):
        self.log.append(out.shape)

    def seen_before(self, module, args):
        self.log.append(len(args))

    def forward(self, x):
        return self.tied_again(self.tied(self.conv(x).mean((2, 3))))


class OwnCopy(nn.Module):
    """A class with its own ``__deepcopy__`` (taken through copy.deepcopy)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def __deepcopy__(self, memo):
        new = OwnCopy()
        new.lin.load_state_dict(self.lin.state_dict())
        new.copied = True
        return new


def torchvision_model(name):
    torchvision = pytest.importorskip("torchvision")
    return getattr(torchvision.models, name)(weights=None)


MODELS = {
    "hooked": Hooked,
    "aliasing": Aliasing,
    "reused": ReusedBlock,
    "shared_conv": SharedConv,
    "lstm": lambda: nn.Sequential(nn.LSTM(4, 8, num_layers=2, bidirectional=True), ),
    "own_copy": lambda: nn.Sequential(OwnCopy(), nn.ReLU()),
    "graph_module": lambda: torch.fx.symbolic_trace(SharedConv()),
    "mobilenet_v3_small": lambda: torchvision_model("mobilenet_v3_small"),
    "resnet18": lambda: torchvision_model("resnet18"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_deepcopy_module_is_copy_deepcopy(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    walk(model, deepcopy_module(model), copy.deepcopy(model), {}, {})


def test_hooks_are_bound_to_the_copy():
    model = Hooked()
    copied = deepcopy_module(model)
    copied(torch.randn(1, 3, 5, 5))
    assert model.log == [] and copied.log == [1, torch.Size([1, 4, 3, 3])]
    assert copied.tied_again.weight is copied.tied.weight is copied.pair[0]
    assert copied.first.untyped_storage().data_ptr() == copied.second.untyped_storage().data_ptr()


def test_a_tensor_autograd_made_is_copied_detached():
    """copy.deepcopy refuses a non-leaf tensor (a recurrent state a forward left on a module);
    the copy holds a detached clone, so the model can still be prepared without inplace=True."""
    model = nn.Sequential(nn.Linear(4, 4))
    model.state = model[0](torch.randn(2, 4))  # has a grad_fn
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    copied = deepcopy_module(model)
    assert copied.state.grad_fn is None and not copied.state.requires_grad
    assert torch.equal(copied.state, model.state) and copied.state.data_ptr() != model.state.data_ptr()
    x = torch.randn(3, 4)
    assert torch.equal(qprep.prepare(model, x)(x), model(x))
