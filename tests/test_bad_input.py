"""Bad input at the Python API: checked before any work, as an :class:`qprep.InputError`;
``concrete_args`` values reach both models when verifying; empty inputs make a verification
inconclusive (the CLI refuses them: tests/test_cli.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import qprep
from qprep.report import preparation_of
from qprep.testing import assert_equivalent


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale=1.0):
        y = self.fc(x) * scale
        if mask is not None:
            y = y * mask
        return y


class Star(nn.Module):
    def forward(self, *xs):
        return torch.stack(xs).sum(0) * 2


class Counting(nn.Module):
    """Counts its forward calls: a check made "before any work" leaves it at 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


X = torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize("call, message", [
    (lambda: qprep.prepare(One(), (X, X)), "2 example inputs given, but One.forward takes 1 positional input (x)"),
    (lambda: qprep.verify(One(), One(), (X, X)), "takes 1 positional input"),
    (lambda: assert_equivalent(One(), (X, X)), "takes 1 positional input"),
    (lambda: qprep.prepare(One(), ()), "missing a required argument: 'x'"),
    (lambda: qprep.prepare(Masked(), (torch.randn(2, 4),), concrete_args={"shift": 1.0}),
     "concrete_args names 'shift', which Masked.forward does not take (its arguments: x, mask, scale)"),
    (lambda: qprep.prepare(Masked(), None, concrete_args={"shift": 1.0}), "concrete_args names 'shift'"),
    (lambda: qprep.prepare(Masked(), (torch.randn(2, 4), torch.ones(2, 4)), concrete_args={"mask": None}),
     "argument 'mask' is given twice: as example input 2 and in concrete_args"),
    (lambda: qprep.prepare(One(), X, report="report.pdf"), "cannot tell the report format from 'report.pdf'"),
    (lambda: qprep.prepare(One(), X, report="/nonexistent_dir_qprep/r.html"), "does not exist"),
])
def test_bad_input_is_an_input_error(call, message):
    with pytest.raises(qprep.InputError) as info:
        call()
    assert message in str(info.value)
    assert isinstance(info.value, TypeError)  # as Python's own error for a bad call would be


def test_checks_come_before_any_work(monkeypatch):
    """Neither the model runs nor is it copied or traced before the inputs are checked."""
    model = Counting()
    copied = []
    monkeypatch.setattr("qprep.api._working_copy", lambda *a: copied.append(a) or pytest.fail("copied"))
    for bad in [dict(example_inputs=(torch.randn(2, 4), torch.randn(2, 4))),
                dict(example_inputs=torch.randn(2, 4), report="r.docx"),
                dict(example_inputs=torch.randn(2, 4), concrete_args={"y": 1})]:
        with pytest.raises(qprep.InputError):
            qprep.prepare(model, **bad)
    assert model.calls == 0 and not copied


def test_forward_with_star_args_takes_any_number():
    xs = tuple(torch.randn(3) for _ in range(4))
    gm = qprep.prepare(Star(), xs)
    assert torch.equal(gm(*xs), Star()(*xs))


def test_forward_pre_hooks_may_change_the_arguments():
    """A pre-hook that drops an argument: the count is the hook's business, not checked."""
    model = One()
    model.register_forward_pre_hook(lambda module, args: args[:1])
    assert qprep.verify(model, model, (X, X)).equal


def test_concrete_args_reach_both_models():
    model, x = Masked().eval(), torch.randn(2, 4)
    gm = qprep.prepare(model, (x,), concrete_args={"scale": 2.0})  # check=True: verified on scale=2.0
    assert preparation_of(gm).verification.equal
    assert torch.equal(gm(x, None, 2.0), model(x, None, 2.0))
    assert not torch.equal(model(x, None, 2.0), model(x))
    result = qprep.verify(model, gm, (x,))  # the prepared model's own concrete values are filled in
    assert result.equal and result.conclusive
    assert_equivalent(model, (x,), trials=3, concrete_args={"scale": 2.0, "mask": None})


def test_empty_inputs_make_verification_inconclusive():
    model = One().eval()
    empty = torch.randn(0, 3, 8, 8)
    with pytest.warns(qprep.InconclusiveWarning, match=r"input 1 \(shape 0x3x8x8\) is empty"):
        gm = qprep.prepare(model, empty)
    result = qprep.verify(model, gm, empty)
    assert result.equal and not result.conclusive
    assert any("input 1 (shape 0x3x8x8) is empty" in c for c in result.caveats)
    assert any("every output is empty" in c for c in result.caveats)
    assert "INCONCLUSIVE" in result.table() and result.as_dict()["conclusive"] is False
    with pytest.raises(AssertionError, match="proves nothing"):
        assert_equivalent(model, empty, prepared=gm)
    full = qprep.verify(model, gm, X)  # the same prepared model on real inputs: conclusive
    assert full.equal and full.conclusive and full.caveats == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error", qprep.InconclusiveWarning)
        qprep.prepare(model, X)


def test_one_empty_input_among_others_is_named():
    class Two(nn.Module):
        def forward(self, x, cache):
            return x * 2, torch.cat([cache, x], 0)

    x, cache = torch.randn(2, 4), torch.randn(0, 4)
    with pytest.warns(qprep.InconclusiveWarning, match=r"input 2 \(shape 0x4\)"):
        gm = qprep.prepare(Two(), (x, cache))
    result = qprep.verify(Two(), gm, (x, cache))
    assert result.caveats == ("input 2 (shape 0x4) is empty: ops on an empty tensor compute nothing, "
                              "so they were not checked",)


class _ReadsShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y.view(y.shape[0], -1)


def test_an_example_the_model_rejects_is_an_input_error_not_a_trace_error():
    """The linear layer cannot take 5 features: its meta kernel fails, the shape Python reads
    is unknown, and the trace stops; the error reported is the model's own on the example."""
    with pytest.raises(qprep.InputError, match=r"do not run through _ReadsShapes: RuntimeError: mat1 and mat2"):
        qprep.prepare(_ReadsShapes(), torch.randn(2, 5))
