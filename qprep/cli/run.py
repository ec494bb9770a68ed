"""Preparing for the command line: no exception on a difference (the commands print the
verdict and choose the exit status), and torch.fx's stderr noise held back on failure."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Iterator

import torch.fx
import torch.nn as nn

from ..api import prepare, verify
from ..core import meta
from ..core.inputs import with_concrete
from ..report import preparation_of

__all__ = ["prepared_unchecked", "prepared_with_verdict", "equal"]


@contextlib.contextmanager
def _stderr_kept_on_success() -> Iterator[None]:
    """Hold back what is written to stderr (a torch.fx GraphModule prints its generated
    code's traceback when a call fails, before qprep turns the failure into a clear error);
    let it through only on success."""
    held, real = io.StringIO(), sys.stderr
    sys.stderr = held
    try:
        yield
    finally:
        sys.stderr = real
    real.write(held.getvalue())


def prepared_unchecked(model: nn.Module, inputs: tuple | None, options: dict) -> torch.fx.GraphModule:
    """``qprep.prepare`` without the bitwise check (callers verify and report)."""
    with _stderr_kept_on_success():
        return prepare(model, inputs, check=False, **options)


def prepared_with_verdict(model: nn.Module, inputs: tuple | None, options: dict) -> torch.fx.GraphModule:
    """Prepare without raising on a difference; the verdict is stored in the record."""
    gm = prepared_unchecked(model, inputs, options)
    if inputs is not None:
        call = with_concrete(model, inputs, options.get("concrete_args"))
        preparation = preparation_of(gm).verified(verify(model, gm, call))
        meta.set_graph_facts(gm, **{meta.PREPARATION: preparation})
    return gm


def equal(gm: torch.fx.GraphModule) -> bool:
    """Whether the stored verdict is equal (or no verification ran)."""
    v = preparation_of(gm).verification
    return v is None or v.equal
