"""Built-in example models for ``qprep demo``, the docs and the tests.

* :class:`DistillerBlock`: the residual block from Distiller's "Preparing a Model for
  Quantization" guide, copied faithfully (only ``padding`` added so that ``out += identity``
  and the concatenation have matching shapes). It has each of the four things a
  module-level quantizer misses: an overloaded operator (``out += identity``), a re-used
  module (``self.relu``), a ``torch`` function (``torch.cat``) and a functional
  (``F.sigmoid``).
* :class:`TinyLSTMLM`: a small word-level LSTM language model (embedding, 2-layer
  ``nn.LSTM``, linear decoder tied to the embedding weight), the "special case" of the
  same guide: ``nn.LSTM`` computes its gates inside one fused kernel.

Each class has an ``example_inputs()`` method; :data:`EXAMPLES` lists them for the demo.
:class:`TinyResNet` (a stack of :class:`ResidualBlock`) and :class:`AttentionBlock` (a
transformer-like block of bare matmuls, softmax and masks) are the benchmarks' models.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DistillerBlock", "TinyLSTMLM", "TinyResNet", "ResidualBlock", "AttentionBlock", "Example", "EXAMPLES"]


class DistillerBlock(nn.Module):
    """Distiller's ``BasicModule`` example (``in_ch`` must equal ``out_ch`` for ``+=``)."""

    def __init__(self, in_ch: int = 8, out_ch: int = 8, kernel_size: int = 3):
        super(DistillerBlock, self).__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size, padding=kernel_size // 2)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.in_ch = in_ch

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)

        # (1) Overloaded tensor addition operation
        # Alternatively, could be called via a tensor function: skip_1.add_(identity)
        out += identity
        # (2) Relu module re-used
        out = self.relu(out)

        # (3) Using operation from 'torch' namespace
        out = torch.cat([identity, out], dim=1)
        # (4) Using function from torch.nn.functional
        out = F.sigmoid(out)

        return out

    def example_inputs(self, batch: int = 2, size: int = 16) -> tuple:
        return (torch.randn(batch, self.in_ch, size, size),)


class TinyLSTMLM(nn.Module):
    """Embedding -> 2-layer ``nn.LSTM`` -> linear decoder tied to the embedding weight.

    Takes ``tokens`` of shape ``(seq_len, batch)`` (int64, ``< vocab``) and returns logits of
    shape ``(seq_len, batch, vocab)``.
    """

    def __init__(self, vocab: int = 100, dim: int = 32, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(dim, dim, layers, dropout=dropout)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embed.weight  # weight tying

    def forward(self, tokens):
        emb = self.drop(self.embed(tokens))
        out, _ = self.lstm(emb)
        return self.decoder(self.drop(out))

    def example_inputs(self, seq_len: int = 12, batch: int = 3) -> tuple:
        return (torch.randint(0, self.vocab, (seq_len, batch)),)


class TinyResNet(nn.Module):
    """A ResNet-style stack of residual blocks."""

    def __init__(self, width=16, blocks=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResidualBlock(nn.Module):
    """A ResNet basic block with one ReLU module re-used and an in-place residual add."""

    def __init__(self, ch):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class AttentionBlock(nn.Module):
    """Transformer-like block with bare matmuls, softmax, masks and shape arithmetic."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q = q.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / (d // self.heads) ** 0.5)
        mask = torch.ones(t, t).tril() == 0
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return x + self.proj(y)


@dataclasses.dataclass(frozen=True)
class Example:
    """One built-in example: a name, a one-line description and a factory."""

    name: str
    description: str
    build: Callable[[], nn.Module]


#: The examples ``qprep demo`` runs, in order.
EXAMPLES: tuple[Example, ...] = (
    Example("distiller", "Distiller's residual block: +=, re-used ReLU, torch.cat, F.sigmoid", DistillerBlock),
    Example("lstm", "word-level LSTM language model: 2-layer nn.LSTM, tied decoder", TinyLSTMLM),
)
