"""Shared fixtures: the synthetic tasks' models, trained once per session.

Every test here runs on one intra-op thread (restored after each test): on a small shared
CPU, two OpenMP threads spinning against other processes make these tiny kernels 10-30x
slower."""

from __future__ import annotations

import pytest
import torch

from tests.quant.tasks import bars, sequences, single_thread, train_cnn, train_lm


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def cnn_task():
    """(trained SmallCNN, test set, calibration batches)."""
    gen = torch.Generator().manual_seed(1234)
    with single_thread():
        model = train_cnn()
    return model, bars(1000, gen), [bars(64, gen)[0] for _ in range(4)]


@pytest.fixture(scope="session")
def lm_task():
    """(trained TinyLSTMLM, test sequences, calibration batches)."""
    gen = torch.Generator().manual_seed(1234)
    with single_thread():
        model = train_lm()
    return model, sequences(500, gen), [sequences(64, gen)[:-1] for _ in range(4)]
