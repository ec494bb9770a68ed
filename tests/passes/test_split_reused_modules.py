"""split_reused_modules on its own: clones share tensors, names are pinned, it is idempotent."""

import torch
import torch.nn as nn

import qprep
from qprep.passes.split_reused_modules import clone_sharing_tensors, split_reused_modules
from qprep.capture import trace
from tests.models import ReusedBlock, SharedConv


def test_clone_shares_parameters_and_buffers_but_not_the_module():
    bn = nn.BatchNorm2d(3)
    clone = clone_sharing_tensors(bn)
    assert clone is not bn
    assert clone.weight is bn.weight and clone.running_mean is bn.running_mean
    clone.train()(torch.randn(4, 3, 2, 2))
    assert torch.equal(clone.num_batches_tracked, bn.num_batches_tracked)  # the update landed in the shared buffer


def test_pass_alone_splits_call_sites_with_pinned_names_and_is_idempotent():
    gm, _ = trace(SharedConv())
    result = split_reused_modules(gm, qprep.PrepareConfig())
    gm.graph.lint()
    gm.recompile()
    assert result.changed
    assert [c.module_name for c in result.rewritten] == ["conv_1"]
    assert [c.op for c in result.rewritten] == ["self.conv (2nd call)"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "conv_1", "bn"]
    assert not split_reused_modules(gm, qprep.PrepareConfig()).changed


def test_second_registered_name_is_used_and_keeps_its_keys():
    model = ReusedBlock()
    gm, _ = trace(model)
    split_reused_modules(gm, qprep.PrepareConfig())
    assert "norm_again" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "norm_again.weight" in gm.state_dict() and "block.fc_1.weight" not in gm.state_dict()


def test_three_call_sites():
    class Thrice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.act(self.act(x)))

    model = Thrice()
    gm = qprep.prepare(model, (torch.randn(3),))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["act", "act_1", "act_2"]
    records = [c for c in gm.meta["qprep"]["preparation"].changes if c.pass_name == "split_reused_modules"]
    assert [c.op for c in records] == ["self.act (2nd call)", "self.act (3rd call)"]
