"""qprep.testing: assert_equivalent, seeded random inputs, trials."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn

import qprep
from qprep.examples import DistillerBlock
from qprep.testing import assert_equivalent, random_inputs_like, run_trials, trials_table


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return torch.nn.functional.dropout(self.fc(x), 0.3, self.training) * 2.0 + self.drop(x)


class OnlyOnExample(nn.Module):
    """Computes what ``model`` computes on ``example`` only: trial 1 passes, later trials differ."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("example", example.clone())

    def forward(self, x):
        out = self.model(x)
        return out if torch.equal(x, self.example) else out + 1


def test_distiller_all_modes():
    torch.manual_seed(0)
    model = DistillerBlock().eval()
    inputs = model.example_inputs(batch=1, size=8)
    gm = assert_equivalent(model, inputs, trials=2, train=True, grad=True)
    assert isinstance(gm, torch.fx.GraphModule)
    assert not gm.training  # modes restored
    assert "self.add(" in gm.code
    assert torch.equal(gm(*inputs), model(*inputs))


def test_train_mode_dropout_masks_match():
    torch.manual_seed(0)
    model = DropNet().eval()
    assert_equivalent(model, torch.randn(4, 6), trials=3, train=True)


def test_failure_raises_with_the_verdict_table():
    torch.manual_seed(0)
    model = DistillerBlock(4, 4).eval()
    other = DistillerBlock(4, 4).eval()  # other weights
    x = model.example_inputs(batch=1, size=6)
    wrong = qprep.prepare(other, x)
    with pytest.raises(AssertionError) as info:
        assert_equivalent(model, x, trials=2, prepared=wrong)
    message = str(info.value)
    assert "NOT EQUIVALENT" in message and "max abs diff" in message
    assert "trial 1 (eval, seed 0)" in message and "trial 2 (eval, seed 1)" in message


def test_trial_one_uses_the_example_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3)
    cheat = OnlyOnExample(model, x)
    assert_equivalent(model, x, trials=1, prepared=cheat)
    runs = run_trials(model, cheat, x, trials=3, seed=5)
    assert [(r.index, r.mode, r.seed, r.equal) for r in runs] == [
        (1, "eval", 5, True), (2, "eval", 6, False), (3, "eval", 7, False)]
    table = trials_table(runs)
    assert "NOT EQUIVALENT (3 runs)" in table
    assert runs[1].as_dict()["result"]["equal"] is False


def test_prepare_options_are_passed_on():
    torch.manual_seed(0)
    model = DistillerBlock(4, 4).eval()
    x = model.example_inputs(batch=1, size=6)
    gm = assert_equivalent(model, x, leaf_modules=[nn.BatchNorm2d], check=True)
    assert isinstance(gm.bn1, nn.BatchNorm2d)
    with pytest.raises(qprep.InputError):
        assert_equivalent(model, x, prepared=gm, leaf_modules=["bn1"])
    with pytest.raises(qprep.InputError):
        run_trials(model, gm, x, trials=0)


def test_random_inputs_like():
    example = (torch.randn(2, 3, dtype=torch.float64), torch.tensor([[5, 9], [7, 6]]), torch.ones(4, dtype=torch.bool),
               3, None, [torch.zeros(1, 2, dtype=torch.float16)])
    first = random_inputs_like(example, seed=1)
    again = random_inputs_like(example, seed=1)
    other = random_inputs_like(example, seed=2)
    assert first[3] == 3 and first[4] is None and isinstance(first[5], list)
    for a, b, c, e in zip(first[:3] + tuple(first[5]), again[:3] + tuple(again[5]), other[:3] + tuple(other[5]),
                          example[:3] + tuple(example[5])):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert int(first[1].min()) >= 5 and int(first[1].max()) <= 9  # the range the example spans
    ranged = random_inputs_like(example, seed=1, int_range=(100, 103))[1]
    assert int(ranged.min()) >= 100 and int(ranged.max()) < 103


def test_keyword_example_inputs():
    torch.manual_seed(0)
    model = DistillerBlock(4, 4).eval()
    (x,) = model.example_inputs(batch=1, size=6)
    gm = assert_equivalent(model, {"x": x}, trials=2)
    assert torch.equal(gm(x), model(x))
