"""qprep.capture.analysis: which calls follow self.training."""

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from qprep.capture import trace
from qprep.capture.analysis import (
    branch_note, has_mode_sensitive_calls, mark_training_dependence, may_depend_on_mode, same_structure,
)
from qprep.core import meta
from qprep.examples import DistillerBlock


class Drop(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, self.training) + F.dropout(x, 0.5, training=not self.training)


def _flip(model):
    for m in model.modules():
        m.training = not m.training


def test_mode_sensitive_calls_and_classes_that_read_training():
    gm, _ = trace(Drop())
    assert has_mode_sensitive_calls(gm)
    assert not has_mode_sensitive_calls(trace(DistillerBlock())[0])
    assert may_depend_on_mode(Drop())
    assert not may_depend_on_mode(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))  # torch.nn leaves only


def test_training_argument_that_follows_the_mode_is_marked_and_an_inverted_one_noted():
    model = Drop().train()
    gm, _ = trace(model)
    _flip(model)
    flipped, _ = trace(model)
    _flip(model)
    notes = mark_training_dependence(gm, flipped, "train", lambda node: model.training)
    dropouts = [n for n in gm.graph.nodes if n.target is F.dropout]
    assert meta.fact(dropouts[0], meta.FOLLOWS_TRAINING) and meta.fact(dropouts[0], meta.MODE_ARG) == "training"
    assert not meta.fact(dropouts[1], meta.FOLLOWS_TRAINING)
    assert len(notes) == 1 and "train-mode values" in notes[0].reason


def test_a_forward_that_branches_on_training_is_noted():
    class Branchy(nn.Module):
        def forward(self, x):
            return x + 1 if self.training else x * 2

    model = Branchy().eval()
    gm, _ = trace(model)
    _flip(model)
    flipped, _ = trace(model)
    assert not same_structure(gm, flipped) and same_structure(gm, trace(Branchy().eval())[0])
    assert "branches on self.training" in branch_note(gm).reason
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.mul]
