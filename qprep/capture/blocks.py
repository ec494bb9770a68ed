"""Repeated blocks traced once: a module call replays what an identical call recorded.

Language models and vision transformers call one block class 12 to 100 times. When a module
is about to be traced into, and an earlier call of an **identical** module on **identical**
arguments was traced, :class:`Blocks` replays the nodes (and guards) that call recorded, with
this module's submodules, parameters and buffers in place of the first's, instead of running
its Python again. The graph is the one tracing would give, node for node (a test compares
the generated code with and without).

Identical means that everything the traced Python can read is the same:

* **the module:** the same class and submodule tree (names, classes, which submodules are one
  object), each module with the same plain attributes (``training``, sizes, flags; numbers,
  strings and containers of them compared by value, anything else, a config say, by
  identity), parameters and buffers of the same names, shapes, strides, dtypes, devices and
  ``requires_grad``, no hooks, and the same leaf decisions;
* **the arguments:** the same structure and constants, traced values with the same example
  metadata (shape, strides, dtype, device, ``requires_grad``, leaf or view, a module's output
  or not), repeated in the same pattern;
* **the context:** grad mode, inference mode, the default dtype; no autocast, no global hooks.

A call becomes a template only where replaying is what tracing would do: its nodes read
nothing of the graph but its arguments and its own module's submodules and tensors (no
constant the trace stored on the model, no other module's tensor), hold no constant but plain
values (numbers, strings, dtypes, functions), and the call changed nothing else the trace
tracks (attribute writes, caches, modules kept opaque). Its return value is traced values and
constants in tuples, lists and dicts; and made at least 8 nodes (a smaller call costs more to
match than to trace again). Anything else is traced as usual. Hugging Face decoder layers
differ in ``layer_idx``, which reaches the graph as the KV cache's index, so each layer's
attention is traced; its norms are replayed.

A module that appears once in the model is recorded at its second call (ALBERT's shared layer)
and replayed from its third.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import types
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx
import torch.nn as nn
from torch.fx.node import map_aggregate, map_arg

from ..core import meta
from ..core._compat import any_autocast_enabled, global_hook_dicts, has_call_hooks, last_node
from ..core.guards import Guard
from .guards import module_output
from .values import UNKNOWN, value_of

if TYPE_CHECKING:
    from .tracer import QprepTracer

__all__ = ["Blocks", "Replay"]

_ATOMS = frozenset({
    int, float, bool, str, bytes, complex, type(None), type(Ellipsis), torch.dtype, torch.device, torch.layout,
    torch.memory_format,
})
_SEQUENCES = (tuple, list, torch.Size)
#: ``nn.Module`` bookkeeping that ``forward`` does not read (compared apart: a module with a
#: call hook, :func:`has_call_hooks`, is traced, not replayed; or not at all).
_INTERNAL = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_is_full_backward_hook",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
})
_DEPTH = 4  # containers nested deeper are compared by identity
_SMALL = 8  # a call that made fewer nodes costs more to match than to trace again


class _Differs(Exception):
    """A call (or its recording) that cannot be matched; traced as usual."""


@dataclasses.dataclass(frozen=True)
class Replay:
    """One module call replayed from another's recording (``gm.meta["qprep"]["replayed"]``)."""

    path: str
    source: str
    nodes: int


@dataclasses.dataclass
class _Template:
    path: str
    depth: int  # entries of the module stack up to and including the recorded module
    inputs: list[torch.fx.Node]
    nodes: list[torch.fx.Node]
    guards: list[tuple[torch.fx.Node, Guard]]
    output: Any
    names: dict[str, torch.fx.Node]  # nodes whose names string constants quote ("... got Proxy(getattr_5)") ...
    quoting: set[torch.fx.Node]  # ... and the nodes that hold such strings


@dataclasses.dataclass
class _Recording:
    """A call as it was traced, checked (:meth:`Blocks._template`) when an identical one comes."""

    path: str
    depth: int
    inputs: list[torch.fx.Node]
    first: torch.fx.Node  # the last node before the call ...
    last: torch.fx.Node  # ... and the call's own last one
    guards: list[tuple[torch.fx.Node, Guard]]
    output: Any


class Blocks:
    """The recordings of one trace, keyed by what the traced Python can read."""

    def __init__(self, tracer: QprepTracer, root: nn.Module):
        self.tracer = tracer
        self.replayed: list[Replay] = []
        #: call key -> [(module, state version, its recording or template; None if unusable)]
        self._recordings: dict[Any, list[tuple[nn.Module, tuple, _Recording | _Template | None]]] = {}
        self._kinds = collections.Counter(type(m) for m in root.modules())
        self._seen: set[int] = set()  # modules of a class that appears once, called before
        self._signatures: dict[int, int | None] = {}  # id(module) -> its signature's number
        self._numbers: dict[tuple, int] = {}  # signature -> number (a nested key hashes once)
        self._version: tuple = ()
        self._enabled = not any(global_hook_dicts())

    def wrap(self, m: nn.Module, path: str, forward: Callable, args: tuple, kwargs: dict) -> Callable:
        """``forward``, or a function that replays or records the call fx is about to trace."""
        if not self._enabled or not self._worth_keying(m) or self.tracer._parsed:  # noqa: SLF001
            return forward
        try:
            key, inputs = self._call_key(m, args, kwargs)
            earlier = self._recordings.setdefault(key, [])
            for i, (module, version, found) in enumerate(earlier):
                if found is None or not self._same(module, version, m):
                    continue
                if isinstance(found, _Recording):
                    try:
                        found = self._template(found)
                    except Exception:  # noqa: BLE001  (_Differs, or anything unforeseen: traced as usual)
                        found = None
                    earlier[i] = (module, version, found)
                if found is None or any(n._erased for n in found.nodes):  # noqa: SLF001  (rolled back since)
                    return forward
                return functools.partial(self._replay, found, path, inputs, forward)
        except _Differs:
            return forward
        return functools.partial(self._record, earlier, m, path, inputs, forward)

    def _worth_keying(self, m: nn.Module) -> bool:
        if self._kinds[type(m)] > 1:
            return True
        if id(m) in self._seen:  # the one module of its class, called again
            return True
        self._seen.add(id(m))
        return False

    def _same(self, recorded: nn.Module, version: tuple, m: nn.Module) -> bool:
        """Whether ``m`` is identical to ``recorded``, as it was when its call was recorded."""
        if self._tracked() != version:  # attributes or opaque modules changed since the recording
            return False
        try:
            return self._signature(recorded) == self._signature(m)
        except _Differs:
            return False

    # -- what the traced Python can read ----------------------------------------------
    def _call_key(self, m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """The module's class, the arguments and the context; the module itself is compared
        (:meth:`_signature`) only where an earlier call had the same key."""
        if any_autocast_enabled():
            raise _Differs
        inputs: dict[torch.fx.Node, int] = {}
        arguments = self._argument((args, kwargs), inputs, 0)
        context = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype())
        return (type(m), arguments, context), list(inputs)

    def _signature(self, m: nn.Module) -> int:
        """A number per distinct module tree (class, attributes, tensors, submodules), made
        from its children's numbers, so each module is looked at once per trace."""
        version = self._tracked()
        if version != self._version:  # state changed: attributes, opaque modules
            self._signatures.clear()
            self._version = version
        number = self._signatures.get(id(m), -1)
        if number == -1:
            try:
                number = self._numbers.setdefault(self._entry(m), len(self._numbers))
            except _Differs:
                number = None
            self._signatures[id(m)] = number
        if number is None:
            raise _Differs
        return number

    def _entry(self, m: nn.Module) -> tuple:
        paths = self.tracer.submodule_paths or {}
        path = paths.get(m)
        if path is None:
            raise _Differs
        children = []
        for name, child in m._modules.items():  # noqa: SLF001
            if child is not None and paths.get(child) != f"{path}.{name}":
                raise _Differs  # shared with another place in the model
            children.append((name, None if child is None else self._signature(child)))
        return (type(m), _attributes(m), self._tensors(m._parameters, path),  # noqa: SLF001
                self._tensors(m._buffers, path), tuple(sorted(m._non_persistent_buffers_set)),  # noqa: SLF001
                self.tracer.is_leaf_module(m, path), tuple(children))

    def _tensors(self, tensors: dict, path: str) -> tuple:
        found = []
        for name, t in tensors.items():
            if t is None:
                found.append((name, None))
            elif type(t) not in (torch.Tensor, nn.Parameter) or t.__dict__ \
                    or self.tracer.tensor_name(t) != f"{path}.{name}":
                raise _Differs  # a subclass, attributes hasattr may read, or shared with another module
            else:
                found.append((name, _tensor_key(t, t.device)))
        return tuple(found)

    def _argument(self, value: Any, inputs: dict, depth: int) -> Any:
        kind = type(value)
        if isinstance(value, torch.fx.Proxy):
            node = value.node
            if node in inputs:
                return ("again", inputs[node])
            inputs[node] = len(inputs)
            return ("traced", self._traced(node))
        if kind in _ATOMS:
            return (kind, repr(value))
        if depth > _DEPTH:
            raise _Differs
        if kind in _SEQUENCES:
            return (kind, tuple(self._argument(v, inputs, depth + 1) for v in value))
        if kind is dict:
            if not all(type(k) is str for k in value):
                raise _Differs
            return (kind, tuple((k, self._argument(v, inputs, depth + 1)) for k, v in value.items()))
        if kind is slice:
            return (kind, self._argument((value.start, value.stop, value.step), inputs, depth + 1))
        raise _Differs  # an object the call may update (a cache), or read in ways a key cannot tell

    def _traced(self, node: torch.fx.Node) -> tuple:
        if node.op == "get_attr":  # another module's tensor handed in: hasattr answers read the real one
            raise _Differs
        value = value_of(node)
        produced = module_output(node)
        if type(value) in (torch.Tensor, nn.Parameter):
            device = self.tracer.values.device(value) if value.is_meta else value.device
            return ("tensor", produced, value.is_leaf, value._is_view(), _tensor_key(value, device))  # noqa: SLF001
        if value is not UNKNOWN and type(value) in _ATOMS:
            return ("value", produced, type(value), repr(value))
        if type(value) is torch.Size:
            return ("size", produced, tuple(value))
        raise _Differs

    # -- recording ----------------------------------------------------------------------
    def _record(self, earlier: list, m: nn.Module, path: str, inputs: list, forward: Callable,
                *args: Any, **kwargs: Any) -> Any:
        tracer = self.tracer
        first, guards, tracked = last_node(tracer.graph), tracer.guards.mark(), self._tracked()
        depth = len(tracer.module_stack)
        output = forward(*args, **kwargs)  # a failure here is the trace's own, raised as it is
        last = last_node(tracer.graph)
        usable = self._tracked() == tracked and not tracer._parsed and _at_least(first, last, _SMALL)  # noqa: SLF001
        earlier.append((m, tracked, _Recording(path, depth, inputs, first, last, tracer.guards.guards[guards:], output)
                        if usable else None))
        return output

    def _tracked(self) -> tuple:
        """What the trace tracks besides the graph: a recording that changed any is unusable."""
        t = self.tracer
        return (len(t.notes), len(t._cached), len(t.state_changes), len(t._opaque),  # noqa: SLF001
                len(t.root._modules), len(t.root.__dict__))  # noqa: SLF001

    def _template(self, recording: _Recording) -> _Template:
        """The recording's nodes, if replaying them is what tracing would do."""
        nodes = []
        node = recording.first.next
        while node is not recording.last.next:
            if node.op == "root" or node._erased:  # noqa: SLF001
                raise _Differs
            nodes.append(node)
            node = node.next
        known = set(nodes) | set(recording.inputs)
        names: dict[str, torch.fx.Node] = {}
        quoting = set()
        for node in nodes:
            if any(n not in known for n in node.all_input_nodes):
                raise _Differs  # reads a node from outside the call: its own state, a shared get_attr
            if node.op in ("call_module", "get_attr"):
                _relative(node.target, recording.path)
            elif node.op == "call_function" and not _plain_function(node.target):
                raise _Differs
            quoted = len(names)
            _check_constants((node.args, node.kwargs), recording.path, names)
            if len(names) != quoted:
                quoting.add(node)
        by_name = {n.name: n for n in known}
        if any(name not in by_name for name in names) or any(n not in known for n, _ in recording.guards):
            raise _Differs
        return _Template(recording.path, recording.depth, recording.inputs, nodes, recording.guards,
                         _output(recording.output, known, 0), {name: by_name[name] for name in names}, quoting)

    # -- replaying ------------------------------------------------------------------------
    def _replay(self, template: _Template, path: str, inputs: list, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        tracer = self.tracer
        first, guards = last_node(tracer.graph), tracer.guards.mark()
        try:
            return self._replayed(template, path, inputs)
        except Exception:  # noqa: BLE001  (unforeseen: the nodes made so far go, and the call is traced)
            if not tracer._rollback(first, guards):  # noqa: SLF001
                raise
            return forward(*args, **kwargs)

    def _replayed(self, template: _Template, path: str, inputs: list) -> Any:
        tracer = self.tracer
        env: dict[torch.fx.Node, torch.fx.Node] = dict(zip(template.inputs, inputs))
        outer = dict(tracer.module_stack)
        for node in template.nodes:
            target = node.target
            if node.op in ("call_module", "get_attr"):
                target = _moved(target, template.path, path)
            node_args, node_kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
            if node in template.quoting:  # quotes earlier nodes by name
                renamed = {name: env[n].name for name, n in template.names.items() if n in env}
                node_args, node_kwargs = map_aggregate((node_args, node_kwargs), functools.partial(_rename, renamed))
            env[node] = tracer.replay_node(node.op, target, node_args, node_kwargs, node.type,
                                           self._meta(node, template, path, outer))
        for node, guard in template.guards:
            tracer.guards.record(env[node], guard.how, guard.expected, guard.location, guard.code)
        self.replayed.append(Replay(path, template.path, len(template.nodes)))
        return _rebuild(template.output, env, tracer)

    @staticmethod
    def _meta(node: torch.fx.Node, template: _Template, path: str, outer: dict) -> dict:
        copied = {k: v for k, v in node.meta.items() if k not in (meta.VAL, meta.TENSOR_META, meta.NAMESPACE)}
        stack = node.meta.get(meta.MODULE_STACK)
        if stack is not None:
            moved = dict(outer)
            for key, (name, kind) in list(stack.items())[template.depth:]:
                moved[_moved(key, template.path, path)] = (_moved(name, template.path, path), kind)
            copied[meta.MODULE_STACK] = moved
        return copied


def _at_least(first: torch.fx.Node, last: torch.fx.Node, count: int) -> bool:
    """Whether ``count`` nodes or more follow ``first``, up to ``last``."""
    node = first
    for _ in range(count):
        if node is last:
            return False
        node = node.next
    return True


def _relative(name: str, path: str) -> str:
    if name.startswith(f"{path}."):
        return name[len(path) + 1:]
    raise _Differs  # shared with a module outside the call


def _moved(name: str, old: str, new: str) -> str:
    return new + name[len(old):] if name == old or name.startswith((f"{old}.", f"{old}@")) else name


def _tensor_key(t: torch.Tensor, device: torch.device) -> tuple:
    return (type(t), tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, device, t.layout, t.requires_grad)


def _attributes(m: nn.Module) -> tuple:
    if has_call_hooks(m):
        raise _Differs
    return tuple((k, _fingerprint(v, 0)) for k, v in m.__dict__.items() if k not in _INTERNAL)


def _fingerprint(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind in _ATOMS:
        return (kind, repr(value))  # repr: -0.0 and nan compare as themselves
    if depth < _DEPTH:
        if kind in _SEQUENCES:
            return (kind, tuple(_fingerprint(v, depth + 1) for v in value))
        if kind is dict:
            return (kind, tuple((_fingerprint(k, depth + 1), _fingerprint(v, depth + 1)) for k, v in value.items()))
        if kind in (set, frozenset) and all(type(v) in _ATOMS for v in value):
            return (kind, frozenset(value))
    return ("object", id(value))  # alive for the whole trace: the same object, or not


def _plain_function(target: Any) -> bool:
    """A function the graph may call for any module: not a method bound to an object."""
    if isinstance(target, functools.partial):
        return False
    owner = getattr(target, "__self__", None)
    return owner is None or isinstance(owner, (types.ModuleType, type))


_QUOTED = re.compile(r"Proxy\((\w+)\)")


def _rename(names: dict, value: Any) -> Any:
    return _QUOTED.sub(lambda match: f"Proxy({names.get(match.group(1), match.group(1))})", value) \
        if type(value) is str else value


def _check_constants(value: Any, path: str, names: dict) -> None:
    kind = type(value)
    if isinstance(value, torch.fx.Node):
        return
    if kind is str:
        if value == path or value.startswith(f"{path}."):
            raise _Differs  # names the recorded module (a buffer to update, say)
        names.update(dict.fromkeys(_QUOTED.findall(value)))  # a message that formatted a traced value
        return
    if kind in _ATOMS or kind is torch.Size:
        return
    if kind in (tuple, list) or isinstance(value, (tuple, list)):  # fx's immutable_list too
        for v in value:
            _check_constants(v, path, names)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_constants(k, path, names)
            _check_constants(v, path, names)
        return
    if kind is slice:
        _check_constants((value.start, value.stop, value.step), path, names)
        return
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)) and _plain_function(value):
        return
    raise _Differs  # an object: a module, a tensor, a class instance this call may own


def _output(value: Any, known: set, depth: int) -> Any:
    if isinstance(value, torch.fx.Proxy):
        if value.node not in known:
            raise _Differs
        return ("node", value.node)
    kind = type(value)
    if kind in _ATOMS:
        return ("constant", value)
    if depth < _DEPTH:
        if kind in (tuple, list):
            return (kind, [_output(v, known, depth + 1) for v in value])
        if kind is dict:
            return (kind, [(k, _output(v, known, depth + 1)) for k, v in value.items()])
    raise _Differs  # a ModelOutput, a dataclass, an object


def _rebuild(recorded: tuple, env: dict, tracer: QprepTracer) -> Any:
    kind, content = recorded
    if kind == "node":
        return tracer.proxy(env[content])
    if kind == "constant":
        return content
    if kind is dict:
        return {k: _rebuild(v, env, tracer) for k, v in content}
    return kind(_rebuild(v, env, tracer) for v in content)
