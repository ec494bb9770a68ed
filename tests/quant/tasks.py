"""Small models and synthetic tasks they learn to high accuracy in a few seconds on 2 CPU cores.

* :class:`SmallCNN` classifies 12x12 images of a bar (horizontal, vertical, diagonal or
  anti-diagonal) at a random place in noise. Its forward has each thing a module-level
  quantizer misses: ``out += identity``, a re-used ``nn.ReLU``, ``F.relu``/``F.max_pool2d``/
  ``F.adaptive_avg_pool2d``, ``x * torch.sigmoid(...)`` and ``torch.cat``.
* :class:`~qprep.examples.TinyLSTMLM` (qprep's own example, 2-layer ``nn.LSTM``) learns
  arithmetic sequences ``t[i+1] = (t[i] + k) mod V`` with a per-sequence stride ``k``: after
  two tokens the next one is determined, so a model that learned the task is right on
  (almost) every position from the second on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from qprep.examples import TinyLSTMLM


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.gate = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        x = F.max_pool2d(x, 2)
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = F.relu(out)
        out = out * torch.sigmoid(self.gate(out))
        pooled = torch.cat([F.adaptive_avg_pool2d(out, 1), F.adaptive_avg_pool2d(identity, 1)], dim=1)
        return self.head(torch.flatten(pooled, 1))


def bars(n: int, generator: torch.Generator, size: int = 12, noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 1, size, size)`` of one bar each in Gaussian noise, and labels 0..3."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = noise * torch.randn(n, 1, size, size, generator=generator)
    length = size // 2
    for i in range(n):
        r, c = torch.randint(0, size - length, (2,), generator=generator).tolist()
        steps = torch.arange(length)
        rows, cols = {
            0: (torch.full_like(steps, r), c + steps),
            1: (r + steps, torch.full_like(steps, c)),
            2: (r + steps, c + steps),
            3: (r + steps, c + length - 1 - steps),
        }[int(labels[i])]
        images[i, 0, rows, cols] += 2.0
    return images, labels


def sequences(n: int, generator: torch.Generator, vocab: int = 16, length: int = 16) -> torch.Tensor:
    """``(length, n)`` int64 token sequences ``t[i+1] = (t[i] + k) mod vocab``, ``k`` in 1..3."""
    start = torch.randint(0, vocab, (1, n), generator=generator)
    stride = torch.randint(1, 4, (1, n), generator=generator)
    return (start + stride * torch.arange(length).unsqueeze(1)) % vocab


def train_cnn(steps: int = 100, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = bars(64, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def cnn_accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Percent of ``data`` classified right."""
    x, y = data
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def train_lm(steps: int = 120, seed: int = 0, vocab: int = 16) -> TinyLSTMLM:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyLSTMLM(vocab=vocab, dim=32, layers=2, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        seq = sequences(64, gen, vocab)
        logits = model(seq[:-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), seq[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def lm_accuracy(model: nn.Module, seq: torch.Tensor) -> float:
    """Percent of next-token predictions right from the third token on (the first two fix
    the stride)."""
    with torch.no_grad():
        predicted = model(seq[:-1]).argmax(-1)
    return 100.0 * (predicted[1:] == seq[2:]).float().mean().item()
