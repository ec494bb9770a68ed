"""The base of qprep's wrapper modules: a module that reproduces one call exactly.

A wrapper stores *how* the user called the op (the callable, or a ``Tensor`` method name)
and a template of its arguments, in which every runtime value is an :class:`Input` slot and
every constant (a scalar, a dim, ``keepdim``) is kept as it was and shown in ``extra_repr``.
Its ``forward`` makes exactly that call with the runtime values put back in their slots,
so the wrapper is bit-exact by construction, in-place forms included (``x += y`` stays
``operator.iadd``, which mutates ``x`` and returns it, as in eager mode).

Built directly, with no template, a wrapper calls its class's plain form on its inputs:
``Add()(x, y)`` is ``x + y`` and ``Cat(dim=1)(a, b)`` is ``torch.cat([a, b], dim=1)``.

Calls are cheap while nothing observes them. ``nn.Module.__call__`` costs about 1 us, as
much as a small op; ``TensorOp.__call__`` makes the same no-hook checks in one frame and
then calls the op directly (``operator.add(x, y)``) when its inputs pass straight through.
Any forward, forward-pre, backward or global hook, a compiled call, fx or jit tracing,
dynamo/export, or a subclass or instance that replaces ``forward``, and the call goes
through ``nn.Module.__call__`` as usual (``tests/test_fast_path.py``).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, ClassVar

import torch.nn as nn

from ..core._compat import call_is_plain
from ..core.template import Input, fill, has_slot
from ..core.text import callable_name

__all__ = ["Input", "TensorOp"]


_DIRECT, _FLAT, _PACK, _NESTED = "direct", "flat", "pack", "nested"
_PLAN_ATTRS = ("call", "args", "kwargs", "mode_arg")


def _plan(args: tuple | None, kwargs: dict) -> tuple[str, tuple]:
    """How ``forward`` puts its inputs into the call, decided once: as they come
    (``_DIRECT``), into top-level positions (``_FLAT``), as one list (``_PACK``, a wrapper
    built directly for ``torch.cat``), or through nested containers (``_NESTED``)."""
    if has_slot(kwargs):
        return _NESTED, ()
    if args is None:
        return _DIRECT, ()
    if any(isinstance(a, (list, tuple, dict, slice)) and has_slot(a) for a in args):
        return _NESTED, ()
    slots = tuple((pos, a.index) for pos, a in enumerate(args) if isinstance(a, Input))
    if len(slots) == len(args) and all(pos == index for pos, index in slots):
        return _DIRECT, ()
    return _FLAT, slots


class TensorOp(nn.Module):
    """Reproduces one op call; subclasses name the op (``Add``, ``Cat``, ...).

    Args:
        call: the callable the user called (``operator.add``, ``torch.cat``,
            ``F.normalize``) or the name of the ``Tensor`` method (``"add_"``); defaults
            to the class's plain form :attr:`default_call`.
        args, kwargs: the argument template; :class:`Input` slots take the ``forward``
            inputs in order. ``None`` means "the inputs, positionally" plus ``kwargs``.
    """

    #: the plain form, used when the wrapper is built directly.
    default_call: ClassVar[Callable | str | None] = None
    #: names of the op's positional parameters, for ``extra_repr``.
    arg_names: ClassVar[tuple[str, ...]] = ()
    #: calls that mutate their first argument and return it.
    inplace_calls: ClassVar[frozenset] = frozenset()
    #: built directly, pass the inputs as one list (``torch.cat([a, b])``).
    pack_inputs: ClassVar[bool] = False

    def __init__(self, call: Callable | str | None = None, args: tuple | None = None, kwargs: dict | None = None,
                 *, mode_arg: str | int | None = None, **constants):
        super().__init__()
        call = call if call is not None else self.default_call
        if call is None:
            raise TypeError(f"{type(self).__name__} needs the call it reproduces")
        self.call = call
        self.args = tuple(args) if args is not None else None
        self.kwargs = {**(kwargs or {}), **constants}
        #: the argument (keyword name or position) that is ``self.training`` at call time:
        #: ``F.dropout(x, p, training=self.training)`` keeps following ``.train()``/``.eval()``.
        self.mode_arg = mode_arg  # the last of _PLAN_ATTRS: runs _refresh_plan

    #: ``call`` where ``forward`` passes its inputs straight to it, else None (an instance
    #: attribute set by ``_refresh_plan``; this class default serves older pickles).
    _run = None

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _PLAN_ATTRS and all(attr in self.__dict__ for attr in _PLAN_ATTRS):
            self._refresh_plan()

    def _refresh_plan(self) -> None:
        """Decides, from ``call``, ``args``, ``kwargs`` and ``mode_arg``, how ``forward``
        fills the call; re-run whenever one of them is assigned."""
        self._plan, self._slots = _plan(self.args, self.kwargs)
        if self.args is None and self.pack_inputs:
            self._plan = _PACK
        call = self.call
        direct = self._plan == _DIRECT and self.mode_arg is None and not isinstance(call, str)
        self.__dict__["_run"] = call if direct else None
        self.inplace = (call in self.inplace_calls) or (isinstance(call, str) and call.endswith("_") and not call.endswith("__"))

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if all(attr in self.__dict__ for attr in _PLAN_ATTRS):
            self._refresh_plan()

    def __call__(self, *args, **kwargs):
        # ``nn.Module.__call__`` minus its Python frames while nothing can tell the
        # difference: its own no-hook checks, plus no patched ``nn.Module.__call__`` (fx
        # tracing), no jit trace, no compiled call, and ``forward`` neither overridden nor
        # patched, so that calling the op is what ``forward`` would do.
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or self._compiled_call_impl is not None or not call_is_plain()):
            return nn.Module.__call__(self, *args, **kwargs)
        run = self._run
        if (run is not None and not kwargs and not self.kwargs and type(self).forward is _FORWARD
                and "forward" not in self.__dict__):
            return run(*args)
        return self.forward(*args, **kwargs)

    def forward(self, *inputs):
        run = self._run
        if run is not None and not self.kwargs:
            return run(*inputs)
        plan = self._plan
        if plan == _DIRECT:
            args, kwargs = inputs, self.kwargs
        elif plan == _FLAT:
            args, kwargs = list(self.args), self.kwargs
            for position, index in self._slots:
                args[position] = inputs[index]
        elif plan == _PACK:
            args, kwargs = (list(inputs),), self.kwargs
        else:
            args, kwargs = fill(self.args, inputs), fill(self.kwargs, inputs)
        if self.mode_arg is not None:
            args, kwargs = self._with_mode(args, kwargs)
        call = self.call
        if isinstance(call, str):
            return getattr(args[0], call)(*args[1:], **kwargs)
        return call(*args, **kwargs)

    def _with_mode(self, args, kwargs):
        if isinstance(self.mode_arg, str):
            return args, {**kwargs, self.mode_arg: self.training}
        args = list(args)
        args[self.mode_arg] = self.training
        return tuple(args), kwargs

    def constants(self) -> dict[str, Any]:
        """The constant (non-input) arguments, by parameter name where known."""
        out: dict[str, Any] = {}
        for i, value in enumerate(self.args or ()):
            if not has_slot(value) and i != self.mode_arg:
                name = self.arg_names[i] if i < len(self.arg_names) else f"arg{i}"
                out[name] = value
        for key, value in self.kwargs.items():
            if not has_slot(value) and key != self.mode_arg:
                out[key] = value
        return out

    def extra_repr(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.constants().items()]
        if self.call is not self.default_call:
            parts.append(f"call={callable_name(self.call)}")
        if self.inplace:
            parts.append("inplace=True")
        if self.mode_arg is not None:
            parts.append(f"{self.mode_arg if isinstance(self.mode_arg, str) else 'arg' + str(self.mode_arg)}=self.training")
        return ", ".join(parts)


_FORWARD = TensorOp.forward


def _inplace_ops(*names: str) -> frozenset:
    return frozenset(getattr(operator, n) for n in names)
