"""Real models from torchvision, prepared and checked bit for bit (slow: run by .ci/run)."""

import pytest
import torch

import qprep

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x0_5",
          "convnext_tiny", "regnet_y_400mf", "vit_b_16", "swin_t", "googlenet"]


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_bit_exact(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = 224
    gm = qprep.prepare(model, (torch.randn(1, 3, size, size),))
    sites = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(sites) == len(set(sites))
    assert set(gm.state_dict()) == set(model.state_dict())
    result = qprep.verify(model, gm, torch.randn(2, 3, size, size))
    assert result.equal, result.table()


def test_torchvision_resnet_train_mode_and_gradients():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    gm = qprep.prepare(model, (torch.randn(2, 3, 64, 64),))
    result = qprep.verify(model, gm, torch.randn(2, 3, 64, 64), grad=True)
    assert result.equal and result.mode == "train", result.table()


def test_stochastic_depth_follows_train_mode_after_preparation():
    """torchvision's StochasticDepth branches on self.training: prepared in eval mode, the
    model gets a train graph too, where the noise is drawn and multiplied in modules."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=10).eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 64, 64),))
    train_targets = {n.target for n in gm.graph_of("train").nodes if n.op == "call_module"}
    eval_targets = {n.target for n in gm.graph_of("eval").nodes if n.op == "call_module"}
    noise = sorted(t for t in train_targets - eval_targets if ".stochastic_depth." in t)
    assert [t.rsplit(".", 1)[-1] for t in noise if t.startswith("features.2.1.")] == ["bernoulli", "div", "mul"], noise
    assert isinstance(gm.get_submodule(noise[0]), qprep.modules.Functional)
    assert qprep.verify(model, gm, torch.randn(2, 3, 64, 64), train=False).equal
    result = qprep.verify(model, gm, torch.randn(2, 3, 64, 64), train=True)
    assert result.equal, result.table()


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_torchvision_segmentation_keeps_its_ordered_dict(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3).eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 64, 64),))  # OrderedDict({"out": ...}) came back a dict
    x = torch.randn(2, 3, 96, 96)
    assert type(gm(x)) is type(model(x))
    result = qprep.verify(model, gm, x)
    assert result.equal, result.table()


def test_torchvision_feature_extractor_keeps_its_modes():
    """create_feature_extractor's DualGraphModule deep-copies into train mode (its own
    __deepcopy__): the copy qprep prepares gets the original's modes back, so BatchNorm uses
    its running statistics as in the original."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    extractor = create_feature_extractor(model, return_nodes={"layer3": "mid", "layer4": "feat"})
    gm = qprep.prepare(extractor, torch.randn(1, 3, 64, 64))
    assert not any(m.training for m in gm.modules())  # fx's path containers and qprep's wrappers too
    assert qprep.verify(extractor, gm, torch.randn(2, 3, 64, 64)).equal
    model.train()
    model.layer1.eval()  # a frozen part inside a training model
    gm = qprep.prepare(model, torch.randn(2, 3, 64, 64))
    assert {n for n, m in gm.named_modules() if n and not m.training and "." not in n} == {"layer1"}
