"""Test helpers for users' own test suites.

>>> from qprep.testing import assert_equivalent
>>> gm = assert_equivalent(model, (x,), trials=3, train=True, grad=True)
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .api import prepare, verify
from .core.errors import InputError
from .core.inputs import as_positional
from .verify import random_inputs_like, run_trials, trials_table

__all__ = ["assert_equivalent", "random_inputs_like", "run_trials", "trials_table"]


def assert_equivalent(
    model: nn.Module,
    example_inputs: Any,
    *,
    trials: int = 1,
    train: bool = False,
    grad: bool = False,
    seed: int = 0,
    prepared: nn.Module | None = None,
    **prepare_options: Any,
) -> nn.Module:
    """Prepare ``model`` (or take ``prepared``) and assert it computes bitwise what
    ``model`` computes. ``example_inputs``: a tensor, a tuple of positional arguments or a
    dict of keyword arguments, as :func:`qprep.prepare` takes them.

    Runs :func:`run_trials`: trial 1 on ``example_inputs``, trials ``2..trials`` on
    seeded random inputs of the same shapes and dtypes; eval mode, plus train mode with
    ``train=True``; gradients too with ``grad=True``. ``prepare_options`` go to
    :func:`qprep.prepare` (``leaf_modules=...``, ``on_untraceable="leaf"``, ...).

    Returns the prepared model. Raises ``AssertionError`` with the verdict table (and each
    failing run's output table) when any run differs, and when the runs prove nothing
    (empty input tensors, or outputs with no element: :attr:`qprep.VerifyResult.caveats`).
    """
    args = as_positional(example_inputs, model)
    if prepared is None:
        prepare_options.pop("check", None)
        prepared = prepare(model, args, check=False, **prepare_options)
    elif prepare_options:
        raise InputError(f"prepare options {sorted(prepare_options)} given together with prepared=")
    runs = run_trials(model, prepared, args, trials=trials, train=train, grad=grad, seed=seed, check=verify)
    if not all(run.equal for run in runs):
        details = [f"trial {run.index} ({run.mode}, seed {run.seed}):\n{run.result.table()}"
                   for run in runs if not run.equal]
        raise AssertionError(
            "the prepared model is not bitwise equal to the original:\n"
            + trials_table(runs) + "\n\n" + "\n\n".join(details)
        )
    if all(run.result.caveats for run in runs):
        raise AssertionError("the comparison proves nothing:\n" + trials_table(runs))
    return prepared
