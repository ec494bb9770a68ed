"""qprep.core.graph.ModuleNamer: deterministic, scoped names that never collide."""

import torch.fx
import torch.nn as nn

from qprep.core.graph import ModuleNamer


def graph_module() -> torch.fx.GraphModule:
    gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    gm.add_submodule("layer1", nn.Sequential(nn.Linear(2, 2)))
    gm.add_submodule("add", nn.Identity())  # a name already taken at the root
    return gm


def test_names_are_scoped_and_counted_per_scope():
    namer = ModuleNamer(graph_module())
    assert namer.name("layer1", "add") == "layer1.add"
    assert namer.name("layer1", "add") == "layer1.add_1"
    assert namer.name("layer1.0", "mul") == "layer1.0.mul"
    assert namer.name("", "mul") == "mul"


def test_existing_attributes_and_taken_names_are_skipped():
    gm = graph_module()
    namer = ModuleNamer(gm)
    assert namer.exists("add") and namer.exists("layer1.0.weight") and not namer.exists("layer1.1")
    assert namer.name("", "add") == "add_1"
    namer.take("cat")
    assert namer.name("", "cat") == "cat_1"


def test_same_calls_give_same_names():
    first = [ModuleNamer(graph_module()).name("layer1", "add") for _ in range(2)]
    assert first == ["layer1.add", "layer1.add"]
