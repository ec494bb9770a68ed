"""Example values keep the example's device: Python code that reads ``x.device`` or
``x.is_cuda`` while tracing sees the real device (values themselves are meta tensors), and a
tensor moved to another device is a new value on that device."""

from __future__ import annotations

import torch
import torch.nn as nn

import qprep
from qprep.capture import capture
from qprep.core import meta
from qprep.core.config import PrepareConfig


class BranchOnDevice(nn.Module):
    def forward(self, x):
        if x.device.type == "cpu" and x.is_cpu and not x.is_cuda:
            return x + 1
        return x - 1


class Moves(nn.Module):
    def forward(self, x):
        y = x.to("cuda")
        z = x.cuda()
        w = x.to("cpu")
        return y.is_cuda, z.is_cuda, w.is_cuda, x.is_cuda


def test_a_branch_on_the_device_sees_the_examples_device_and_is_guarded():
    model = BranchOnDevice()
    gm = qprep.prepare(model, (torch.randn(3),))
    assert torch.equal(gm(torch.ones(3)), torch.full((3,), 2.0))
    texts = [g.text() for g in meta.graph_fact(gm, meta.GUARDS) or ()]
    assert any("x.device.type == 'cpu'" in t for t in texts), texts


def test_moving_to_another_device_is_a_new_value_on_that_device():
    gm = capture(Moves(), PrepareConfig(), (torch.randn(3),)).graph_module  # traced on meta tensors: no GPU needed
    flags = [n.meta["val"] for n in gm.graph.nodes if n.op == "call_function" and n.args[1:] == ("is_cuda",)]
    assert flags == [True, True, False, False]
    values = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op == "call_method"}
    assert values["to"] is not values["cuda"] and values["to_1"] is not values["to"]
