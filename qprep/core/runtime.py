"""Running a model to inspect or verify it without leaving a trace on it: buffers restored,
the caller's random streams untouched, inputs cloned (a model may update them in place)."""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .inputs import Arguments, keywords_of
from .template import tree_any

__all__ = ["rebuild_object", "preserved_state", "forked_rng", "clone_tree", "copy_object", "plain_object", "map_tensors", "seeded", "structure_kept",
           "shallow_copy", "on_meta_device", "python_draw"]


@contextlib.contextmanager
def preserved_state(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm statistics, counters) of ``modules`` on exit, and
    everything :func:`structure_kept` restores of each of their submodules: a forward that
    re-binds a buffer (``self.ema = self.ema * 0.9 + ...``), sets a plain attribute
    (``self.cache = ...``) or swaps a submodule leaves no trace."""
    owners = list(dict.fromkeys(owner for module in modules for owner in module.modules()))
    values = [(buf, buf.detach().clone()) for buf in dict.fromkeys(
        buf for owner in owners for buf in owner._buffers.values() if buf is not None)]  # noqa: SLF001
    with structure_kept(owners):
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, value in values:
                    buf.copy_(value)


_CONTAINERS = (dict, set)  # OrderedDict is a dict: _modules, _parameters, _buffers, every hook dict


def _structure(module: nn.Module) -> tuple:
    attrs = dict(vars(module))
    contents = {k: v.copy() for k, v in attrs.items() if isinstance(v, _CONTAINERS)}
    return module, type(module), attrs, contents


def _restore(saved: tuple) -> None:
    module, cls, attrs, contents = saved
    current = vars(module)
    for key in [k for k in current if k not in attrs]:
        del current[key]
    for key, value in attrs.items():
        if key in contents and not _same_contents(value, contents[key]):  # the same object, its old contents
            _refill(value, contents[key])
        current[key] = value
    if type(module) is not cls:
        module.__class__ = cls


def _refill(container: dict | set, saved: dict | set) -> None:
    """``container`` holding ``saved`` again, through its base type's own methods, past a
    subclass that refuses updates (diffusers' ``FrozenDict``, an ``OrderedDict``)."""
    if isinstance(container, set):
        set.clear(container)
        set.update(container, saved)
        return
    base = collections.OrderedDict if isinstance(container, collections.OrderedDict) else dict
    base.clear(container)
    for k, v in saved.items():
        base.__setitem__(container, k, v)


def _same_contents(current: dict | set, saved: dict | set) -> bool:
    if isinstance(current, dict):
        return current.keys() == saved.keys() and all(current[k] is saved[k] for k in saved)
    return current == saved


@contextlib.contextmanager
def structure_kept(modules, *, on_success: bool = True) -> Iterator[None]:
    """Put back, on exit, every attribute of each of ``modules``: its submodules, Parameters
    and buffers (the registrations, not the tensor values), hooks of every kind, training
    flag, ``forward`` and other instance attributes, and its class; containers such as
    ``_modules`` and ``_forward_hooks`` stay the same objects, with their old contents.
    ``on_success=False``: only when the block raises (a failed step is undone, a successful
    one kept). A shallow record: no tensor is copied."""
    saved = [_structure(m) for m in dict.fromkeys(modules)]
    try:
        yield
    except BaseException:
        for entry in saved:
            _restore(entry)
        raise
    if on_success:
        for entry in saved:
            _restore(entry)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of ``module``'s class with the same attributes, submodules,
    Parameters, buffers and hooks (the objects themselves, not copies), in containers of its
    own: setting or registering something on the copy leaves ``module`` as it is."""
    new = copy.copy(module)
    for key, value in vars(new).items():
        if isinstance(value, _CONTAINERS):
            vars(new)[key] = value.copy()
    return new


def forked_rng():
    """``torch.random.fork_rng`` over the CPU and every visible CUDA device."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with every random stream seeded with ``seed`` (torch's, Python's ``random`` and
    NumPy's global generator), the caller's streams restored after."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with forked_rng():
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def python_draw(module: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """``module.name(*args, **kwargs)``: a draw from Python's ``random`` or NumPy's global
    generator in a traced ``forward`` (LayerDrop's ``np.random.uniform(0, 1)``), made again on
    every call of the prepared model, as the original makes it."""
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any], other: Callable[[Any], Any] | None = None) -> Any:
    """``value`` with ``fn`` applied to every tensor (and ``other``, if given, to every other
    leaf), containers rebuilt with their own types (lists stay lists, namedtuples stay
    namedtuples; unlike ``map_aggregate``, which makes them immutable, so that a model may
    still append to a list it is given)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Arguments):
        return Arguments((map_tensors(v, fn, other) for v in value), map_tensors(value.keywords, fn, other))
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn, other) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn, other) for v in value)
    if isinstance(value, dict):
        out = dict.fromkeys(value) if type(value) is dict else value.copy()
        for k, v in value.items():
            out[k] = map_tensors(v, fn, other)
        return out
    return other(value) if other is not None else value


def on_meta_device(model: nn.Module, examples: list) -> bool:
    """Whether a parameter, buffer or example tensor (of ``examples``, argument tuples) is on
    the meta device."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return True
    return any(tree_any((ex, keywords_of(ex)), lambda v: isinstance(v, torch.Tensor) and v.is_meta)
               for ex in examples)


def clone_tree(value: Any) -> Any:
    """``value`` with every tensor cloned (a model may update its inputs in place), and
    every other object (an instance of a user class, as a KV cache) deep-copied."""
    return map_tensors(value, torch.Tensor.clone,
                       lambda v: copy_object(v, torch.Tensor.clone, always=True) if plain_object(v) else v)


def plain_object(value: Any) -> bool:
    """An instance of a user class (not a tensor, module, container, class or function)."""
    return (hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, nn.Module, type, list, tuple, dict))
            and not callable(value))


def copy_object(obj: Any, fn: Callable[[torch.Tensor], Any], always: bool = False) -> Any:
    """A deep copy of ``obj`` with each tensor it holds (a few levels down) replaced by
    ``fn(tensor)``; ``obj`` itself when it cannot be copied, or holds no tensor (unless
    ``always``)."""
    memo: dict[int, Any] = {}

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            memo[id(value)] = fn(value)
        elif depth >= 8 or isinstance(value, (nn.Module, type)):
            return
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                visit(item, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)
        elif hasattr(value, "__dict__") and not callable(value):
            for item in vars(value).values():
                visit(item, depth + 1)

    visit(obj, 0)
    if not memo and not always:
        return obj
    try:
        return copy.deepcopy(obj, memo)
    except Exception:  # noqa: BLE001  (an object that cannot be copied: as it is)
        return obj


def rebuild_object(cls: type, state: dict) -> Any:
    """A new ``cls`` object whose attributes are ``state``, made without calling ``__init__``:
    how a prepared graph returns an object of a user's class that holds computed tensors
    (torchvision's ``ImageList``), as ``copy.copy`` would make it."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj
