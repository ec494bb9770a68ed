"""The one place where :mod:`qprep.coverage` and :mod:`qprep.quant` import qprep's internals.

When a name moves inside qprep, only this file changes. Everything else in ``coverage`` and
``quant`` uses the public API (``qprep.prepare``, ``qprep.modules``) or the names here.
"""

from __future__ import annotations

import operator
from typing import Any

from qprep.capture.specialise import trace_specialised
from qprep.core.config import PrepareConfig
from qprep.core.errors import QprepError, TraceError
from qprep.core.inputs import as_positional
from qprep.core.provenance import source_location
from qprep.passes.op_tables import DATA_MOVEMENT_FUNCTIONS, DATA_MOVEMENT_METHODS

__all__ = ["trace_specialised", "PrepareConfig", "QprepError", "TraceError", "as_positional", "source_location",
           "moves_data"]

# Tensor dunders that index, seen by a TorchFunctionMode (fx records them as operator.getitem).
_INDEXING = frozenset({"__getitem__", "__setitem__", "__get__", "__set__"})


def moves_data(target: Any) -> bool:
    """Whether a call only moves or reinterprets data (qprep's data-movement policy, the
    same the passes apply): a ``Tensor`` method by name, a function by identity."""
    if isinstance(target, str):
        return target in DATA_MOVEMENT_METHODS
    name = getattr(target, "__name__", "")
    if name in _INDEXING:
        return True
    try:
        if target in DATA_MOVEMENT_FUNCTIONS:
            return True
    except TypeError:  # unhashable
        return False
    # a Tensor method seen by a TorchFunctionMode (Tensor.view): by name, as the passes match methods
    owner = getattr(target, "__objclass__", None) or getattr(target, "__self__", None)
    return owner is not None and isinstance(owner, type) and issubclass(owner, object) \
        and name in DATA_MOVEMENT_METHODS and owner.__name__ in ("TensorBase", "Tensor")
