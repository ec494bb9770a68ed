"""qprep's Proxy: fx's, plus what a value-aware tracer needs.

* Augmented assignment (``y += z``) is recorded as the in-place operator
  (``operator.iadd``); plain fx records ``operator.add``, which breaks aliasing.
* ``y[:, 0] = v`` is recorded as ``operator.setitem``; ``copy.copy`` / ``copy.deepcopy`` of a
  traced value as calls of them.
* ``math.ceil``/``floor``/``trunc``, ``round`` and ``divmod`` of a traced size stay symbolic.
* Where Python needs a concrete value, ``bool()``, ``int()``, ``float()``, ``operator.index``
  (``range``, indexing a list), ``len()``, iteration and ``**``-unpacking, the proxy asks its
  tracer (:meth:`QprepTracer.concrete` and friends), which answers with the example's value and
  records a guard, or raises when the value is unknown or is tensor data.
* The layout flags of :data:`CONSTANT_ATTRS` are answered as dense (``x.is_nested`` is
  ``False``): qprep prepares dense strided tensors.
"""

from __future__ import annotations

import builtins
import copy
import math
import operator
import sys

import torch
import torch.fx

__all__ = ["QprepProxy", "QprepAttribute", "CONSTANT_ATTRS"]

#: Tensor layout flags that torch.nn code branches on; qprep prepares dense strided tensors.
CONSTANT_ATTRS = {"is_nested": False, "is_sparse": False, "is_quantized": False, "is_mkldnn": False}

_INPLACE_MAGIC = {
    "iadd": operator.iadd, "isub": operator.isub, "imul": operator.imul,
    "itruediv": operator.itruediv, "ifloordiv": operator.ifloordiv, "imod": operator.imod,
    "ipow": operator.ipow, "imatmul": operator.imatmul, "iand": operator.iand,
    "ior": operator.ior, "ixor": operator.ixor, "ilshift": operator.ilshift,
    "irshift": operator.irshift,
}


class QprepProxy(torch.fx.Proxy):
    """See the module docstring."""

    @property
    def __class__(self):
        """``isinstance(proxy, Cache)`` answers as the example's object would (a Hugging Face
        cache, a ``PackedSequence``): the class of a known value that is neither a tensor nor
        a builtin. (Never a tensor's class: torch's C++ code would then take the proxy for a
        tensor.)"""
        value = self.node.meta.get("val")
        kind = type(value)
        if value is not None and not isinstance(value, torch.Tensor) and kind.__module__ != "builtins" \
                and kind.__name__ != "_Unknown":
            return kind
        return type(self)

    def __getattr__(self, k):
        if k in CONSTANT_ATTRS:
            return CONSTANT_ATTRS[k]
        if k.startswith("__"):  # copy, pickle and friends ask for dunders: not graph values
            raise AttributeError(k)
        return self.tracer.attribute(self, k)

    def __deepcopy__(self, memo):
        # `copy.deepcopy(cache_layer)` (transformers' Dory copies KV-cache layers in forward):
        # a recorded call; without this, copy's reduce protocol built a half-made object of the
        # example's class around this proxy's node
        return self._copy_call(copy.deepcopy)

    def __copy__(self):
        return self._copy_call(copy.copy)

    def _copy_call(self, how):
        recording = getattr(self.tracer, "recording", None)
        if recording is not None and recording():
            return self.tracer.create_proxy("call_function", how, (self,), {})
        return QprepProxy(self.node, self.tracer)  # (a QprepAttribute's class takes other arguments)

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    # -- where Python needs a concrete value -----------------------------------------
    def __bool__(self):
        return self.tracer.truth(self, sys._getframe(1))  # noqa: SLF001  (an `if`, or an `assert`)

    def __index__(self):
        return self.tracer.concrete(self, "index")

    def __int__(self):
        return self.tracer.concrete(self, "int")

    def __float__(self):
        return self.tracer.concrete(self, "float")

    def __len__(self):
        return self.tracer.concrete(self, "len")

    def __iter__(self):
        return self.tracer.iterate(self, sys._getframe(1))

    def __contains__(self, item):
        return self.tracer.contains(self, item)

    def keys(self):
        return self.tracer.concrete_keys(self)

    # -- math on traced sizes stays symbolic ------------------------------------------
    def __ceil__(self):
        return self.tracer.create_proxy("call_function", math.ceil, (self,), {})

    def __floor__(self):
        return self.tracer.create_proxy("call_function", math.floor, (self,), {})

    def __trunc__(self):
        return self.tracer.create_proxy("call_function", math.trunc, (self,), {})

    def __round__(self, ndigits=None):
        args = (self,) if ndigits is None else (self, ndigits)
        return self.tracer.create_proxy("call_function", builtins.round, args, {})

    def __divmod__(self, other):  # `q, r = divmod(x.shape[-1], 3)`: both parts stay symbolic
        return self // other, self % other

    def __rdivmod__(self, other):
        return other // self, other % self


def _make_inplace(op):
    def impl(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    impl.__name__ = f"__{op.__name__}__"
    return impl


for _name, _op in _INPLACE_MAGIC.items():
    setattr(QprepProxy, f"__{_name}__", _make_inplace(_op))


class QprepAttribute(torch.fx.proxy.Attribute, QprepProxy):
    """fx's lazy ``proxy.name`` (a method called later, or an attribute of a value the example
    does not give) with :class:`QprepProxy`'s operators: ``t = y.mT; t *= 0.5`` on a value of
    unknown example is an in-place update of ``y`` (fx's own ``Attribute`` has no ``__imul__``,
    so Python made it ``t = t * 0.5``, leaving ``y`` as it was)."""
