"""Op results on meta tensors, remembered for one capture.

Running an op on meta tensors costs far more than the answer (a meta ``add`` or ``relu``
runs torch's Python reference, 100-700 us; ``hardswish_`` over 2 ms), and a model repeats
the same op on the same shapes many times, once more when it is traced in its other mode.
:class:`Results` runs an op once per **key** (the op; every input tensor's type, shape,
strides, storage offset, dtype, device and ``requires_grad``; every constant argument with
its type; grad mode and the default dtype) and afterwards builds fresh meta tensors of the
remembered shape, strides, dtype and ``requires_grad`` (not leaves when the op's were not),
without running the op.

Only what is a pure function of that key is remembered:

* the op is torch's own (a ``torch``/``operator``/``builtins``/``math`` function, a tensor
  method, a ``torch.nn`` module of a ``torch.nn`` class, keyed by its class, its constant
  attributes and its parameters' and buffers' metadata), never a user's function or module;
* no op that updates an input (a method ending in ``_``, ``out=``, ``inplace=True``, the
  ``operator.i*`` functions, ``setitem``);
* every output is a new tensor (not an input, not a view of one, at storage offset 0, that
  an empty tensor of its strides reproduces) or an immutable constant (a size, a dtype, an
  int), in plain tuples and lists.

Anything else runs every time, as without the cache. Failures are not remembered (they run
again and fail again, with their own error).
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import operator
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn as nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .analysis import class_reads_training as _class_reads_training

__all__ = ["Results", "shared_results", "current_results", "module_key", "function_key", "method_key"]

_META = torch.device("meta")

#: Constant argument types that are immutable and compared by value.
_ATOMS = frozenset({
    int, float, bool, str, type(None), complex, torch.dtype, torch.device, torch.memory_format, torch.layout,
    type(Ellipsis), torch.Size,
})
_SEQUENCES = frozenset({tuple, list, immutable_list})
_MAPPINGS = frozenset({dict, immutable_dict})
_TENSORS = frozenset({torch.Tensor, nn.Parameter})

#: Modules of functions whose result depends on their arguments only.
_PURE_MODULES = ("torch", "_operator", "operator", "builtins", "math")
_MUTATING_FUNCTIONS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.iconcat, operator.setitem, operator.delitem, builtins.setattr, builtins.delattr,
    builtins.print, builtins.id, builtins.next, builtins.iter,
})
#: Tensor methods with an effect beyond their result, whatever their name.
_MUTATING_METHODS = frozenset({
    "retain_grad", "register_hook", "register_post_accumulate_grad_hook", "backward", "record_stream",
    "share_memory_", "apply_", "map_", "map2_", "copy_", "set_", "resize_", "data_ptr", "item", "tolist",
    "numpy", "storage", "untyped_storage", "__setitem__", "__delitem__", "__iadd__", "__isub__", "__imul__",
    "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
    "__ilshift__", "__irshift__", "__imatmul__",
})

#: ``nn.Module.__dict__`` entries that are not the module's configuration.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}


class _Uncacheable(Exception):
    pass


# -- keys -------------------------------------------------------------------------------------
def _key(value: Any, tensors: list) -> Any:
    cls = value.__class__
    if cls in _ATOMS:
        return cls, value
    if cls in _TENSORS:
        if not value.is_meta or value.layout is not torch.strided or value.dtype.is_complex:
            raise _Uncacheable
        tensors.append(value)
        return cls, value.shape, value.stride(), value.storage_offset(), value.dtype, value.device, \
            value.requires_grad
    if cls in _SEQUENCES:
        return cls, tuple([_key(v, tensors) for v in value])
    if cls in _MAPPINGS:
        return cls, tuple([(k, _key(v, tensors)) for k, v in value.items()])
    if cls is slice:
        return cls, _key(value.start, tensors), _key(value.stop, tensors), _key(value.step, tensors)
    raise _Uncacheable


def _state_key(t: torch.Tensor) -> tuple:
    """A parameter's or buffer's key: its metadata (the module runs on a meta copy of it)."""
    if type(t) not in _TENSORS or t.layout is not torch.strided or t.dtype.is_complex:
        raise _Uncacheable
    return type(t), t.shape, t.stride(), t.storage_offset(), t.dtype, t.device, t.requires_grad


def _state() -> tuple:
    return torch.is_grad_enabled(), torch.get_default_dtype(), torch.is_inference_mode_enabled()


def _updates_inputs(kwargs: dict) -> bool:
    return "out" in kwargs or kwargs.get("inplace") is True


def function_key(target: Callable, args: tuple, kwargs: dict, tensors: list) -> tuple | None:
    """The key of ``target(*args, **kwargs)`` (meta arguments), or ``None`` when its result
    is not a pure function of the key. ``tensors`` collects the input tensors."""
    try:
        if target in _MUTATING_FUNCTIONS:
            return None
        module = getattr(target, "__module__", None) or ""
    except TypeError:  # an unhashable target
        return None
    if module.split(".")[0] not in _PURE_MODULES or _updates_inputs(kwargs):
        return None
    try:
        return ("f", target, _key(args, tensors), _key(kwargs, tensors), _state())
    except _Uncacheable:
        return None


def method_key(name: str, args: tuple, kwargs: dict, tensors: list) -> tuple | None:
    """The key of the tensor method call ``args[0].name(*args[1:], **kwargs)``, or ``None``."""
    if not args or args[0].__class__ not in _TENSORS or name in _MUTATING_METHODS or _updates_inputs(kwargs) \
            or name.endswith("_") and not name.endswith("__"):
        return None
    try:
        return ("m", name, _key(args, tensors), _key(kwargs, tensors), _state())
    except _Uncacheable:
        return None


def module_key(module: nn.Module, args: tuple, kwargs: dict, tensors: list) -> tuple | None:
    """The key of a call of the ``torch.nn`` module ``module`` (its class, constant
    attributes, parameters' and buffers' metadata and submodules, recursively; its
    ``training`` flag where its class's code mentions it), or ``None`` for a module of
    another class or with an attribute that is not a constant."""
    try:
        return ("c", _module_signature(module), _key(args, tensors), _key(kwargs, tensors), _state())
    except _Uncacheable:
        return None


def _module_signature(module: nn.Module) -> tuple:
    cls = type(module)
    if not cls.__module__.startswith("torch.nn.modules.") or getattr(module, "inplace", False) is True:
        raise _Uncacheable
    parts: list = [cls]
    reads_training = _class_reads_training(cls)
    for name, value in module.__dict__.items():
        if name in _MODULE_INTERNALS or name == "training" and not reads_training:
            continue
        parts.append((name, _key(value, [])))  # a tensor attribute (not meta) makes it uncacheable
    for name, t in (*module._parameters.items(), *module._buffers.items()):  # noqa: SLF001
        parts.append((name, None if t is None else _state_key(t)))
    for name, child in module._modules.items():  # noqa: SLF001
        parts.append((name, None if child is None else _module_signature(child)))
    return tuple(parts)


# -- results --------------------------------------------------------------------------------
class _Tensor:
    """What a fresh output tensor is made from."""

    __slots__ = ("shape", "stride", "dtype", "requires_grad", "is_leaf")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype
        self.requires_grad, self.is_leaf = t.requires_grad, t.is_leaf

    def build(self) -> torch.Tensor:
        with torch.no_grad():
            t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=_META)
        if not self.requires_grad:
            return t
        if self.is_leaf:
            return t.requires_grad_()
        with torch.enable_grad():
            return t.requires_grad_().clone()


class _Sequence:
    __slots__ = ("cls", "items")

    def __init__(self, cls: type, items: list):
        self.cls, self.items = cls, items

    def build(self) -> Any:
        return self.cls([_build(i) for i in self.items])


class _Constant:
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def build(self) -> Any:
        return self.value


def _build(template: Any) -> Any:
    return template.build()


def _template(out: Any, inputs: set[int], seen: set[int]) -> Any:
    """How to make ``out`` again without running the op; raises :class:`_Uncacheable`."""
    cls = out.__class__
    if cls is torch.Tensor:
        if id(out) in inputs or id(out) in seen or not out.is_meta or out._is_view() \
                or out.storage_offset() != 0 or out.layout is not torch.strided or out.dtype.is_complex:
            raise _Uncacheable
        seen.add(id(out))
        template = _Tensor(out)
        again = template.build()
        if again.stride() != out.stride() or again.requires_grad != out.requires_grad \
                or again.is_leaf != out.is_leaf:
            raise _Uncacheable
        return template
    if cls in _ATOMS:
        return _Constant(out)
    if cls is tuple or cls is list:
        return _Sequence(cls, [_template(v, inputs, seen) for v in out])
    raise _Uncacheable


_UNCACHEABLE = object()


class Results:
    """Op results remembered by key (see the module docstring)."""

    def __init__(self):
        self._entries: dict = {}
        self.tensor_meta: dict = {}  # for qprep.capture.values: shape, strides, dtype, grad -> TensorMetadata
        self.hits = 0
        self.misses = 0

    def run(self, key: tuple | None, tensors: list, op: Callable[[], Any]) -> Any:
        """``op()``, or its result made again when ``key`` was seen before."""
        if key is None:
            return op()
        try:
            entry = self._entries.get(key)
        except TypeError:  # an unhashable constant inside the key
            return op()
        if entry is not None and entry is not _UNCACHEABLE:
            self.hits += 1
            return entry.build()
        out = op()
        if entry is None:
            self.misses += 1
            try:
                self._entries[key] = _template(out, {id(t) for t in tensors}, set())
            except _Uncacheable:
                self._entries[key] = _UNCACHEABLE
        return out


_SHARED: contextvars.ContextVar[Results | None] = contextvars.ContextVar("qprep_results", default=None)


@contextlib.contextmanager
def shared_results() -> Iterator[Results]:
    """One :class:`Results` for every trace in the block (a model traced in both modes);
    inside another such block, that block's."""
    results = _SHARED.get()
    if results is not None:
        yield results
        return
    results = Results()
    token = _SHARED.set(results)
    try:
        yield results
    finally:
        _SHARED.reset(token)


def current_results() -> Results:
    """The block's :class:`Results` (:func:`shared_results`), or a new one."""
    return _SHARED.get() or Results()
