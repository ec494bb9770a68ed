"""Several example inputs: one graph per path through forward, one set of modules, chosen by guards."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import qprep
from qprep.core.variants import VariantGraphModule


class Branchy(nn.Module):
    """A batch of one takes another path (a branch on a size, as a decoder's q_len == 1)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if x.size(0) > 1:
            y = y + self.extra(x) * 2
        else:
            y = y - 1
        return torch.relu(y)


def test_one_example_is_specialised_and_refuses_the_other_path():
    model = Branchy().eval()
    gm = qprep.prepare(model, torch.randn(3, 4))
    with pytest.raises(qprep.GuardError, match=r"x.size\(0\) > 1"):
        gm(torch.randn(1, 4))


def test_variants_cover_both_paths_bitwise():
    model = Branchy().eval()
    gm = qprep.prepare(model, torch.randn(3, 4), variants=[torch.randn(1, 4)])
    assert isinstance(gm, VariantGraphModule) and len(gm.variant_graphs) == 2
    for batch in (1, 2, 7):
        x = torch.randn(batch, 4)
        assert torch.equal(gm(x), model(x))
    assert list(gm.state_dict()) == list(model.state_dict())


def test_a_call_site_is_one_module_in_every_graph():
    """The relu after the branch runs in both graphs on different values: one module (one
    quantizer) for its one line of source, not one per graph."""
    gm = qprep.prepare(Branchy().eval(), torch.randn(3, 4), variants=[torch.randn(1, 4)])
    relus = {n.target for g in gm.variant_graphs for n in g.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)}
    assert len(relus) == 1
    per_graph = [[n.target for n in g.nodes if n.op == "call_module"] for g in gm.variant_graphs]
    assert all(len(t) == len(set(t)) for t in per_graph)  # no module called twice within a graph


def test_examples_on_the_same_path_make_one_graph():
    model = Branchy().eval()
    gm = qprep.prepare(model, torch.randn(3, 4), variants=[torch.randn(5, 4)])
    assert not isinstance(gm, VariantGraphModule)


def test_a_call_no_graph_covers_names_each_graph_reason():
    class Ranks(nn.Module):
        def forward(self, x):
            return x.sum() if x.dim() == 2 else x * 2 if x.dim() == 3 else x - 1

    gm = qprep.prepare(Ranks(), torch.randn(2, 3), variants=[torch.randn(2, 3, 4)])
    for x in (torch.randn(5, 5), torch.randn(2, 2, 2)):
        assert torch.equal(gm(x), Ranks()(x))
    with pytest.raises(qprep.GuardError) as error:
        gm(torch.randn(4))
    text = str(error.value)
    assert "none of the prepared model's specialisations" in text and "example 1" in text and "example 2" in text


def test_variant_model_survives_deepcopy_and_pickle():
    model = Branchy().eval()
    gm = qprep.prepare(model, torch.randn(3, 4), variants=[torch.randn(1, 4)])
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert isinstance(other, VariantGraphModule)
        for batch in (1, 3):
            x = torch.randn(batch, 4)
            assert torch.equal(other(x), model(x))


def test_mode_dependent_forward_is_locked_to_its_mode():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            if self.training:
                y = y * 2
            return y + 1 if x.size(0) > 1 else y - 1

    model = Both().eval()
    gm = qprep.prepare(model, torch.randn(3, 4), variants=[torch.randn(1, 4)])
    for batch in (1, 3):
        x = torch.randn(batch, 4)
        assert torch.equal(gm(x), model(x))
    gm.train()
    with pytest.raises(qprep.GuardError, match="prepared in eval mode only"):
        gm(torch.randn(3, 4))


def test_variants_need_example_inputs():
    with pytest.raises(qprep.InputError, match="give example_inputs too"):
        qprep.prepare(Branchy(), variants=[torch.randn(1, 4)])


def test_the_data_format_refuses_a_model_of_several_graphs(tmp_path):
    from qprep import serialize

    gm = qprep.prepare(Branchy().eval(), torch.randn(3, 4), variants=[torch.randn(1, 4)])
    with pytest.raises(serialize.SerializationError, match="2 graphs chosen by guards"):
        serialize.save(gm, tmp_path / "m.qprep")
    assert not (tmp_path / "m.qprep").exists()
