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
    """torchvision's StochasticDepth passes self.training positionally to a wrapped function."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=10).eval()
    gm = qprep.prepare(model, (torch.randn(1, 3, 64, 64),))
    depth = torchvision.ops.stochastic_depth
    wrappers = [m for m in gm.modules() if isinstance(m, qprep.modules.Functional) and m.call is depth]
    assert wrappers and all(m.mode_arg == 3 for m in wrappers)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is depth]
    result = qprep.verify(model, gm, torch.randn(2, 3, 64, 64), train=True)
    assert result.equal, result.table()
