"""One config object for tracing and every pass (no long keyword lists)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch.nn as nn

from .errors import InputError

__all__ = ["PrepareConfig"]

_ON_UNTRACEABLE = ("raise", "leaf")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Options of :func:`qprep.prepare` and of every pass.

    Attributes:
        leaf_modules: module types, or qualified names (``"encoder.block3"``), that are kept
            as opaque ``call_module`` leaves: not traced into and not rewritten inside.
        concrete_args: passed to the tracer to specialise arguments (``{"mask": None}``).
        on_untraceable: ``"raise"`` (default) fails with a :class:`~qprep.errors.TraceError`
            naming the module and source line; ``"leaf"`` keeps each untraceable submodule
            as an opaque leaf, prepares the rest and reports the leaf.
        strict: raise :class:`~qprep.errors.RewriteError` instead of recording a skip when
            a compute node cannot be rewritten.
        expand_rnns: replace ``nn.LSTM``/``GRU``/``RNN`` and their cells by modular versions.
        expand_attention: replace ``nn.MultiheadAttention`` by a modular version.
        trace_compound_nn: trace into ``torch.nn`` modules whose ``forward`` is plain Python
            (``nn.TransformerEncoderLayer``, ...) so their ops are prepared too; a module
            that cannot be traced is kept opaque and reported.
        op_modules: extra op -> module mappings, which take precedence over qprep's tables:
            ``{torch.topk: MyTopK, "cumsum": MyCumsum, F.gelu: MyGELU}``. A key is a callable
            (matched by identity) or a ``Tensor`` method name. A value is an ``nn.Module``
            class: a :class:`qprep.modules.TensorOp` subclass is built from the call (its
            constants become attributes, as for qprep's own wrappers); any other module class
            is built with no arguments and called with the call's own arguments, tensors and
            constants alike (``self.topk(x, 3, dim=-1)``). Verification checks the result.
        dedup: trace a repeated block (a transformer layer) once and replay its nodes for
            each identical module called on identical arguments
            (:mod:`qprep.capture.blocks`); the graph is the same either way.
    """

    leaf_modules: tuple[Any, ...] = ()
    concrete_args: dict[str, Any] | None = None
    on_untraceable: str = "raise"
    strict: bool = False
    expand_rnns: bool = True
    expand_attention: bool = True
    trace_compound_nn: bool = True
    op_modules: Mapping[Any, type] = dataclasses.field(default_factory=dict)
    dedup: bool = True

    def __post_init__(self):
        if self.on_untraceable not in _ON_UNTRACEABLE:
            raise InputError(f"on_untraceable must be one of {_ON_UNTRACEABLE}, got {self.on_untraceable!r}")
        leaves = tuple(self.leaf_modules) if not isinstance(self.leaf_modules, (str, type)) else (self.leaf_modules,)
        for leaf in leaves:
            if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
                raise InputError(
                    f"leaf_modules entries must be nn.Module subclasses or qualified names, got {leaf!r}"
                )
        object.__setattr__(self, "leaf_modules", leaves)
        if self.concrete_args is not None and not isinstance(self.concrete_args, dict):
            raise InputError(f"concrete_args must be a dict of argument name -> value, got {type(self.concrete_args).__name__}")
        if not isinstance(self.op_modules, Mapping):
            raise InputError(f"op_modules must be a dict of op -> nn.Module class, got {type(self.op_modules).__name__}")
        for op, cls in self.op_modules.items():
            if not (isinstance(op, str) or callable(op)):
                raise InputError(f"op_modules keys must be callables or Tensor method names, got {op!r}")
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise InputError(f"op_modules[{op!r}] must be an nn.Module class, got {cls!r}")
        object.__setattr__(self, "op_modules", dict(self.op_modules))
