"""qprep.verify: structures, detection, modes, state restoration."""

import collections
import math
import sys

import torch
import torch.nn as nn

import qprep
import qprep.modules as qm
from qprep.verify import compare
from tests.models import DistillerBlock


class Multi(nn.Module):
    Out = collections.namedtuple("Out", "a b")

    def __init__(self, delta=0.0):
        super().__init__()
        self.delta = delta
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        y = self.fc(x)
        return {"pair": (y, y + self.delta), "named": self.Out(y * 2, [y, 3])}


def test_nested_structures_compared_leaf_by_leaf():
    a = Multi()
    b = Multi(1e-3)
    b.load_state_dict(a.state_dict())
    result = qprep.verify(a, b, torch.randn(2, 3))
    assert not result.equal
    by_path = {o.path: o for o in result.outputs}
    assert by_path["output['pair'][0]"].equal
    assert not by_path["output['pair'][1]"].equal
    assert math.isclose(by_path["output['pair'][1]"].max_abs_diff, 1e-3, rel_tol=1e-2)
    assert by_path["output['named'].b[1]"].equal
    assert "NOT EQUIVALENT" in result.table()


def test_structure_mismatch_is_not_equal():
    checks = compare((torch.ones(2),), (torch.ones(2), torch.ones(2)))
    assert not checks[0].equal and "keys differ" in checks[0].note


def test_nan_equal_to_nan():
    assert compare(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))[0].equal


def test_verify_restores_modes_and_buffers():
    model = DistillerBlock().eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 8, 8),))
    mean = model.bn1.running_mean.clone()
    result = qprep.verify(model, gm, torch.randn(2, 3, 8, 8), train=True, grad=True)
    assert result.equal and result.mode == "train" and result.grads
    assert not model.training and not gm.training
    assert torch.equal(model.bn1.running_mean, mean)


def test_inputs_modified_in_place_do_not_leak_between_runs():
    class Mutates(nn.Module):
        def forward(self, x):
            x += 1
            return x * 2

    model = Mutates()
    gm = qprep.prepare(model, (torch.zeros(2),))
    x = torch.zeros(2)
    assert qprep.verify(model, gm, x).equal
    assert torch.equal(x, torch.zeros(2))


def test_gradients_through_a_forward_that_updates_its_input_in_place():
    class Mutates(nn.Module):
        def forward(self, x, y):
            x.add_(y)
            return x * y

    model = Mutates()
    gm = qprep.prepare(model, (torch.randn(3), torch.randn(3)))
    result = qprep.verify(model, gm, (torch.randn(3), torch.randn(3)), grad=True)
    assert result.equal and len(result.grads) == 2


class _LocalNamedTuple(nn.Module):
    """AIMET's InputOutputDictModel: a namedtuple class made inside forward, a new class on
    every call."""

    def forward(self, inputs):
        output = collections.namedtuple("output", ["ab", "bc"])
        return output(inputs["a"] * inputs["b"], inputs["b"] * 2)


def test_a_namedtuple_class_made_in_forward_is_one_type_to_verify():
    model = _LocalNamedTuple().eval()
    gm = qprep.prepare(model, ({"a": torch.randn(2), "b": torch.randn(2)},))
    assert qprep.verify(model, gm, ({"a": torch.randn(3), "b": torch.randn(3)},)).equal
    other = collections.namedtuple("output", ["ab", "cd"])  # same name, other fields: still a difference
    checks = compare(model({"a": torch.ones(1), "b": torch.ones(1)}), other(torch.ones(1), 2 * torch.ones(1)))
    assert not all(c.equal for c in checks)


class FusedDropoutOfItsOwn(torch.overrides.TorchFunctionMode):
    """What SDPA's flash and memory-efficient kernels do on CUDA, on the CPU: with dropout,
    the default (fused) kernel draws its mask another way than the math kernel (here: it
    draws one number first), so the two differ by a mask, not by rounding."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and kwargs.get("dropout_p") \
                and torch.backends.cuda.flash_sdp_enabled():
            torch.rand(1)
        return func(*args, **kwargs)


def test_train_mode_fused_attention_with_its_own_dropout_masks_is_compared_with_dropout_off():
    """The prepared attention is the math kernel, masks included (bitwise on the unfused
    kernels); the fused kernel's own masks cannot be bounded, its rounding can: each call is
    re-run with its dropout off."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
            p = 0.3 if self.training else 0.0
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p)

    torch.manual_seed(0)
    model = Attention().train()
    x = torch.randn(2, 5, 16)
    gm = qprep.prepare(model, (x,))
    with FusedDropoutOfItsOwn():
        result = qprep.verify(model, gm, (x,))
        assert result.equal and result.kernel_diff > 0.1, result.table()  # another mask, not rounding
        assert "draw dropout masks of their own" in result.kernel_local
    r = qprep.verify(model, gm, (x,), train=False)  # the eval graph: no dropout
    assert r.equal, r.table()


def test_recurrent_modules_where_no_unfused_kernel_exists_are_checked_against_their_twins(monkeypatch):
    """On CUDA no torch kernel computes an LSTM in the modular ops' order (cuDNN; ATen's own
    fused cell adds both biases after both products), so there the unfused reference is each
    recurrent module's modular twin, holding its Parameters. Emulated on the CPU: declare it
    a device without unfused kernels."""
    from qprep.examples import TinyLSTMLM

    monkeypatch.setattr(sys.modules["qprep.verify.compare"], "UNFUSED_RECURRENT_DEVICES", ("no such device",))
    torch.manual_seed(0)
    model = TinyLSTMLM().eval()
    (x,) = model.example_inputs()
    gm = qprep.prepare(model, (x,))
    result = qprep.verify(model, gm, (x,), grad=True)
    assert result.equal and "modular twins" in result.reference, result.table()
    assert 0 < result.kernel_diff <= result.kernel_bound
    assert "forward" not in model.lstm.__dict__  # the module's own forward is back
    # The twins are the prepared model's own classes: a wrong op in them is in both runs,
    # and the bound on the fused kernel (each call on its own inputs) catches it.
    monkeypatch.setattr(qm.Add, "forward", lambda self, a, b: a - b)
    result = qprep.verify(model, gm, (x,))
    assert not result.equal and result.kernel_diff > result.kernel_bound and result.kernel_local is None
