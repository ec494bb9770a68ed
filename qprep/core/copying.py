"""``copy.deepcopy`` of a model, without most of its Python overhead.

:func:`deepcopy_module` returns what ``copy.deepcopy(module)`` returns: the same classes,
the same sharing (a Parameter or submodule registered twice is one copy, registered twice),
nothing shared with the original but immutable constants. It takes ``copy.deepcopy``'s own
path wherever it is not sure to do exactly what that path does, and a faster one for what a
module tree is mostly made of:

* a module whose class pickles and copies the default way (no ``__deepcopy__``,
  ``__reduce__``, ``__reduce_ex__`` or ``__getnewargs__`` of its own): made with
  ``cls.__new__``, its ``__getstate__()`` copied and given to its ``__setstate__``, as
  ``copy.deepcopy`` reconstructs it;
* plain dicts, ``OrderedDict`` (the hook tables), lists and tuples: copied item by item,
  memoised as ``copy.deepcopy`` memoises them;
* a plain ``nn.Parameter``: as ``Parameter.__deepcopy__`` copies it;
* immutable constants: kept;
* a tensor that autograd made (not a leaf: a recurrent state a forward left on a module),
  which ``copy.deepcopy`` refuses: a detached clone (the copy has no autograd history).

Everything else (tensors, which keep their storage sharing, any other object) goes through
``copy.deepcopy`` with the same memo.
"""

from __future__ import annotations

import copy
import copyreg
import types
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

__all__ = ["deepcopy_module"]

#: Types ``copy.deepcopy`` returns as they are (its atomic types, and torch's immutable ones).
_ATOMIC = frozenset({
    type(None), int, float, bool, complex, str, bytes, type, range, types.BuiltinFunctionType, types.FunctionType,
    type(Ellipsis), type(NotImplemented), property, types.CodeType, torch.dtype, torch.layout, torch.memory_format,
})


def deepcopy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)`` (see the module docstring)."""
    memo: dict[int, Any] = {}
    try:
        return _copy(module, memo)
    finally:
        memo.clear()


_DEFAULT_PROTOCOL: dict[type, bool] = {}


def _default_protocol(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies instances of ``cls`` through ``object.__reduce_ex__``
    with a state dict (and nothing else of the class's own)."""
    found = _DEFAULT_PROTOCOL.get(cls)
    if found is None:
        found = (
            cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__")
            and not hasattr(cls, "__slots__") and not issubclass(cls, (list, dict, tuple, set))
            and hasattr(cls, "__setstate__")
        )
        _DEFAULT_PROTOCOL[cls] = found
    return found


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    cls = value.__class__
    if cls in _ATOMIC:
        return value
    found = memo.get(id(value), memo)
    if found is not memo:
        return found
    if cls is dict or cls is OrderedDict and not value.__dict__:
        out = cls()
        memo[id(value)] = out
        _keep_alive(value, memo)
        for k, v in value.items():
            out[_copy(k, memo)] = _copy(v, memo)
        return out
    if cls is list:
        out_list: list = []
        memo[id(value)] = out_list
        _keep_alive(value, memo)
        out_list.extend([_copy(v, memo) for v in value])
        return out_list
    if cls is tuple:
        items = [_copy(v, memo) for v in value]
        found = memo.get(id(value), memo)  # a tuple that holds itself through a list
        if found is not memo:
            return found
        if all(a is b for a, b in zip(items, value)):
            return value
        out_tuple = tuple(items)
        memo[id(value)] = out_tuple
        return out_tuple
    if cls is nn.Parameter and not value.__dict__ and type(value.data) is torch.Tensor:
        out_param = nn.Parameter(value.data.clone(memory_format=torch.preserve_format), value.requires_grad)
        memo[id(value)] = out_param
        return out_param
    if cls is torch.Tensor and value.grad_fn is not None:
        out_tensor = value.detach().clone(memory_format=torch.preserve_format)
        memo[id(value)] = out_tensor
        return out_tensor
    if isinstance(value, nn.Module) and _default_protocol(cls):
        state = value.__getstate__()
        if not isinstance(state, dict):
            return copy.deepcopy(value, memo)
        out_module = cls.__new__(cls)
        memo[id(value)] = out_module
        _keep_alive(value, memo)
        out_module.__setstate__({k: _copy(v, memo) for k, v in state.items()})
        return out_module
    return copy.deepcopy(value, memo)


def _keep_alive(value: Any, memo: dict[int, Any]) -> None:
    """As ``copy.deepcopy`` does: the originals stay alive while the memo holds their ids."""
    try:
        memo[id(memo)].append(value)
    except KeyError:
        memo[id(memo)] = [value]
