"""A small shared zoo of models for the tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qprep import examples
from qprep.examples import AttentionBlock, ResidualBlock, TinyResNet  # noqa: F401  (the shared zoo)


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn


class _Call1(_Call):
    def forward(self, x):
        return self.fn(x)


class _Call2(_Call):
    def forward(self, x, y):
        return self.fn(x, y)


class _Call3(_Call):
    def forward(self, x, y, z):
        return self.fn(x, y, z)


def CallModel(fn, arity: int = 1) -> nn.Module:  # noqa: N802  (reads as a class)
    """A model whose forward calls ``fn`` on its ``arity`` inputs: one op under test."""
    return {1: _Call1, 2: _Call2, 3: _Call3}[arity](fn)


def positive(*shape, generator=None):
    return torch.rand(*shape, generator=generator) + 0.5


class DistillerBlock(examples.DistillerBlock):
    """The Distiller example (its forward, in qprep/examples.py), on 3 channels."""

    def __init__(self):
        super().__init__(3, 3, 3)


class Aliasing(nn.Module):
    """``ident = y; y += 1``: ident sees the update in eager mode."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        ident = y
        y += 1
        return torch.cat([ident, y])


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x)) + x


class ReusedBlock(nn.Module):
    """A non-leaf block called twice; one module registered under two names."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.norm = nn.LayerNorm(8)
        self.norm_again = self.norm

    def forward(self, x):
        x = self.block(x)
        x = self.norm(x)
        x = self.block(x)
        return self.norm_again(x)


class FunctionalNet(nn.Module):
    """Parametric functionals with the model's own weights, dropout following the mode."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(6))
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.beta = nn.Parameter(torch.randn(6))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.fc_w = nn.Parameter(torch.randn(10, 6))
        self.fc_b = nn.Parameter(torch.randn(10))
        self.ln_w = nn.Parameter(torch.rand(10))
        self.ln_b = nn.Parameter(torch.randn(10))

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, stride=1, padding=1)
        x = F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, self.training, 0.1, 1e-5)
        x = F.relu(x, inplace=True)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = F.dropout(x, 0.3, training=self.training)
        x = F.linear(x, self.fc_w, self.fc_b)
        return F.layer_norm(x, (10,), self.ln_w, self.ln_b)


def compute_ops_outside_modules(gm) -> list:
    """The nodes of a prepared graph that compute a tensor outside any module call: every
    call_function/call_method except data movement, guards and container constructors."""
    from qprep.core.graph import member
    from qprep.core.guards import is_guard
    from qprep.passes.op_tables import DATA_MOVEMENT_FUNCTIONS, DATA_MOVEMENT_METHODS

    found = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or is_guard(n):
            continue
        if n.op == "call_method" and n.target in DATA_MOVEMENT_METHODS:
            continue
        if n.op == "call_function" and (member(DATA_MOVEMENT_FUNCTIONS, n.target) or isinstance(n.target, type)):
            continue
        value = n.meta.get("val")
        if isinstance(value, torch.Tensor):
            found.append(n)
    return found


class Asserts(nn.Module):
    """Asserts on tensor data (XLM's check) and on metadata."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, lengths):
        assert lengths.max().item() <= x.size(1), "lengths too long"
        assert (x > -100).all()
        assert x.dim() == 3
        return self.fc(x) * lengths[:, None, None]
