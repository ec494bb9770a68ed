"""Save and load prepared models without pickle.

``torch.save(gm)`` pickles the GraphModule, and ``torch.load(path, weights_only=False)``
runs whatever code the file names: a prepared model from an untrusted source is a
code-execution hole. :func:`save` writes a file that holds only data, and :func:`load`
rebuilds the model from that data, instantiating nothing and calling nothing it does not
find in an allowlist.

The file is a zip archive (suffix up to you; ``.qprep`` is suggested) with three members:

``forward.py``
    ``gm.code``, the generated ``forward``, for review. It is NEVER executed: :func:`load`
    rebuilds the graph from ``model.json``, regenerates the code and refuses the file
    unless the regenerated code equals this text, so what you read is what runs.
``model.json``
    the graph (each node's op, name, target, args and kwargs, with references to earlier
    nodes and tagged constants), the module tree (each distinct module once: its class as
    ``"module.QualName"``, its ``__getstate__`` attributes as data, its parameters, buffers
    and children by reference) and the tensor table.
``weights.pt``
    one entry per distinct tensor object, written with ``torch.save`` and read with
    ``torch.load(weights_only=True)``. Parameters and buffers are referenced by entry, so
    tied weights, clones of re-used modules and the gate ``Linear`` modules of a modular
    LSTM get the very same objects back, and ``state_dict()`` keys come out as they were.

What :func:`load` trusts: module classes from ``torch.nn``'s modules and
:mod:`qprep.modules`; ``call_function`` targets from qprep's op tables
(``FUNCTION_TABLE``, ``FUNCTIONAL_SPECS``, the functionals kept in ``Functional`` wrappers),
``operator`` (less ``call``/``attrgetter``/``itemgetter``/``methodcaller``), ``getattr`` of a
public attribute name, ``len`` and the data-movement functions of ``torch``; ``call_method``
names of ``torch.Tensor``; and whatever the caller passes as ``trusted=`` (classes,
functions, or method names). Anything else is a :class:`UntrustedError` naming it.
Forward and backward hooks are not stored (a model that has them is refused by
:func:`save`); qprep's own ``state_dict`` alias hooks are re-created. ``node.meta`` other
than ``stack_trace`` and ``gm.meta`` are not stored (``torch.save`` drops them too).
"""

from __future__ import annotations

import builtins
import collections
import io
import json
import math
import operator
import os
import pickle
import pkgutil
import importlib
import re
import types
import typing
import zipfile
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.immutable_collections import immutable_dict, immutable_list

from . import modules as qmodules
from .capture.tracer import FACTORIES, RANDOM_FACTORIES, QprepTracer
from .core._compat import assert_is_none
from .core.aliases import hide_aliases
from .core.errors import InputError, QprepError
from .core.dual import MODES, DualGraphModule
from .core.variants import VariantGraphModule
from .core.guards import check_guard
from .modules.fast_forward import install_fast_forward
from .modules import Input, TensorOp
from .passes.functional_table import FUNCTIONAL_SPECS, METHOD_SPECS, WITHOUT_MODULE
from .passes.op_tables import DATA_MOVEMENT_FUNCTIONS, FUNCTION_TABLE, METHOD_TABLE

__all__ = ["save", "load", "SerializationError", "UntrustedError", "FORMAT", "VERSION"]

FORMAT = "qprep.serialize"
VERSION = 1
_SOURCE, _MODEL, _WEIGHTS = "forward.py", "model.json", "weights.pt"
_MEMBER = re.compile(r"[A-Za-z0-9_\-]+")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*")
_OPS = frozenset({"placeholder", "get_attr", "call_function", "call_method", "call_module", "output"})


class SerializationError(QprepError):
    """A model cannot be saved as data, or a file is not a valid qprep model file."""


class UntrustedError(SerializationError):
    """A file names a class, function or method outside the allowlist; ``name`` says which."""

    def __init__(self, message: str, *, name: str = ""):
        super().__init__(message)
        self.name = name


# -- names ----------------------------------------------------------------------------------------
_NAMESPACES = (("operator", operator), ("builtins", builtins), ("torch", torch), ("torch.nn.functional", F))


def _function_name(fn: Callable) -> str:
    """The public name of a callable: ``torch.cat``, ``operator.iadd``,
    ``torch.nn.functional.normalize``, ``torch.ops.aten.relu``; else ``module.qualname``."""
    if isinstance(fn, torch._ops.OpOverloadPacket):  # noqa: SLF001
        return f"torch.ops.aten.{fn.__name__}"
    short = getattr(fn, "__name__", None)
    for prefix, namespace in _NAMESPACES:
        if short and getattr(namespace, short, None) is fn:
            return f"{prefix}.{short}"
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', short or repr(fn))}"


def _class_name(cls: type) -> str:
    """``torch.nn.Conv2d``, ``qprep.modules.Add``; else ``module.QualName``."""
    for prefix, namespace in (("torch.nn", nn), ("qprep.modules", qmodules), ("torch", torch), ("builtins", builtins)):
        if getattr(namespace, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _by_name(objects: Iterable, namer: Callable) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for obj in objects:
        name = namer(obj)
        if out.setdefault(name, obj) is not obj:
            raise SerializationError(f"two allowlisted objects share the name {name!r}")
    return out


def _submodule_classes(package: types.ModuleType, base: type) -> list[type]:
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found += [v for v in vars(module).values()
                  if isinstance(v, type) and issubclass(v, base) and v.__module__ == module.__name__]
    return found


def _allowed_classes() -> dict[str, type]:
    torch_nn = _submodule_classes(torch.nn.modules, nn.Module)
    ours = _submodule_classes(qmodules, nn.Module)
    plain = [int, float, bool, str, bytes, complex, list, tuple, dict, collections.OrderedDict, set, frozenset, slice,
             type(None), object,
             torch.Tensor, torch.Size, torch.dtype, torch.device, nn.Parameter, torch.nn.utils.rnn.PackedSequence]
    return _by_name({*torch_nn, *ours, nn.Module, *plain}, _class_name)


_UNSAFE_OPERATOR = frozenset({"call", "attrgetter", "itemgetter", "methodcaller"})


def _allowed_functions() -> dict[str, Callable]:
    fns = set(FUNCTION_TABLE) | set(FUNCTIONAL_SPECS) | set(WITHOUT_MODULE) | set(DATA_MOVEMENT_FUNCTIONS)
    fns |= {v for k, v in vars(operator).items() if not k.startswith("_") and callable(v)
            and not isinstance(v, type) and k not in _UNSAFE_OPERATOR}
    fns |= {getattr(torch, name) for name in FACTORIES + RANDOM_FACTORIES if hasattr(torch, name)}
    fns |= {builtins.getattr, builtins.len, builtins.round, math.ceil, math.floor, math.trunc, assert_is_none,
            check_guard}
    # classes called to build an output container: OrderedDict (torchvision's segmentation models)
    return _by_name({fn for fn in fns if not isinstance(fn, type)} | {collections.OrderedDict}, _function_name)


#: Dunder Tensor methods the tables name (``x.__add__(y)``); other dunders are refused.
_TABLE_METHODS = frozenset(METHOD_TABLE) | frozenset(METHOD_SPECS)
ALLOWED_CLASSES = _allowed_classes()
ALLOWED_FUNCTIONS = _allowed_functions()
_STATE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_GM_INTERNALS = frozenset(vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()))) - {"training"}
_HIDDEN = "_qprep_hidden"  # qprep.aliases keeps the hidden state_dict names here
# A DualGraphModule's graphs are saved as graphs (``modes``); its recompile callback is qprep's.
_DUAL_INTERNALS = frozenset({"train_graph", "eval_graph", "after_recompile"})


def _tensor_method_ok(name: Any, trusted: dict) -> bool:
    if not isinstance(name, str) or not name.isidentifier():
        return False
    if name in trusted:
        return True
    if name.startswith("_") and name not in _TABLE_METHODS:
        return False
    return callable(getattr(torch.Tensor, name, None))


# -- save -----------------------------------------------------------------------------------------
class _Writer:
    """Turns modules, graph constants and types into JSON-able data, collecting tensors."""

    def __init__(self):
        self.tensors: dict[int, tuple[str, torch.Tensor]] = {}
        self.modules: dict[int, int] = {}
        self.module_data: list[dict] = []

    def tensor(self, t: torch.Tensor, where: str) -> str:
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise SerializationError(f"{where}: a {type(t).__name__} (tensor subclass) cannot be saved as data")
        if id(t) not in self.tensors:
            self.tensors[id(t)] = (f"t{len(self.tensors)}", t)
        return self.tensors[id(t)][0]

    def value(self, v: Any, where: str) -> Any:
        if v is None or type(v) in (bool, int, str):  # exact types: a str-valued Enum is not a str
            return v
        if type(v) is float:
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, torch.fx.Node):
            return {"$node": v.name}
        if isinstance(v, torch.Tensor):
            return {"$tensor": self.tensor(v, where)}
        if type(v) in (list, immutable_list):  # fx freezes the lists and dicts of node args
            return [self.value(x, where) for x in v]
        if type(v) in (tuple, set, frozenset):
            return {f"${type(v).__name__}": [self.value(x, where) for x in v]}
        if type(v) is torch.Size:
            return {"$size": list(v)}
        if type(v) in (dict, immutable_dict):
            return {"$dict": [[self.value(k, where), self.value(x, where)] for k, x in v.items()]}
        return self._atom(v, where)

    def _atom(self, v: Any, where: str) -> Any:
        if type(v) is slice:
            return {"$slice": [self.value(x, where) for x in (v.start, v.stop, v.step)]}
        if v is Ellipsis:
            return {"$ellipsis": None}
        if type(v) is complex:
            return {"$complex": [repr(v.real), repr(v.imag)]}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, (torch.memory_format, torch.layout)):
            return {f"${type(v).__name__}": str(v).removeprefix("torch.")}
        if isinstance(v, Input):
            return {"$input": v.index}
        if isinstance(v, type) or typing.get_origin(v) is not None or v is typing.Any:
            return {"$type": self.type(v, where)}
        if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.BuiltinMethodType)):
            return {"$fn": _function_name(v)}
        if isinstance(v, nn.Module):
            raise SerializationError(f"{where}: a module held outside _modules cannot be saved as data")
        raise SerializationError(
            f"{where}: a {type(v).__module__}.{type(v).__qualname__} cannot be saved as data "
            "(numbers, strings, containers, dtypes, devices, tensors, functions and classes can)")

    def type(self, t: Any, where: str) -> Any:
        """An annotation as data: a class, ``typing.X[...]``, ``list[...]``, ``A | B``, a string."""
        if t is None:
            return None
        if isinstance(t, str):  # a postponed annotation: fx binds the text to a global, never evaluates it
            return {"str": t}
        if t is Ellipsis:
            return {"ellipsis": None}
        if t is typing.Any:
            return {"typing": "Any", "args": []}
        args = [self.type(a, where) if not isinstance(a, list) else [self.type(x, where) for x in a]
                for a in typing.get_args(t)]
        if isinstance(t, types.UnionType):
            return {"union": args}
        if isinstance(t, types.GenericAlias):
            return {"alias": self.type(typing.get_origin(t), where), "args": args}
        if typing.get_origin(t) is typing.Union:
            return {"typing": "Union", "args": args}
        name = getattr(t, "_name", None)  # typing.List[int] and friends
        if typing.get_origin(t) is not None and name and getattr(typing, name, None) is not None:
            return {"typing": name, "args": args}
        if isinstance(t, type):
            return {"class": _class_name(t)}
        raise SerializationError(f"{where}: the annotation {t!r} cannot be saved as data")

    def module(self, m: nn.Module, where: str) -> int:
        """Index of ``m`` in the module table (each distinct module once)."""
        if id(m) in self.modules:
            return self.modules[id(m)]
        is_root = not self.module_data
        if isinstance(m, torch.fx.GraphModule) and not is_root:
            raise SerializationError(f"module {where!r}: a GraphModule inside the prepared model cannot be saved")
        _check_hooks(m, where)
        index = len(self.module_data)
        self.modules[id(m)] = index
        entry: dict[str, Any] = {"class": "torch.fx.GraphModule" if is_root else _class_name(type(m))}
        self.module_data.append(entry)
        internals = (_GM_INTERNALS | _DUAL_INTERNALS) if is_root else _STATE_INTERNALS
        state = m.__getstate__()
        entry["attrs"] = {k: self.value(v, f"attribute {k!r} of module {where!r}")
                          for k, v in state.items() if k not in internals and k != _HIDDEN}
        entry["hidden"] = sorted(getattr(m, _HIDDEN, ()))
        entry["params"] = {k: None if v is None else self.tensor(v, f"{where}.{k}") for k, v in m._parameters.items()}
        entry["buffers"] = {k: None if v is None else self.tensor(v, f"{where}.{k}") for k, v in m._buffers.items()}
        entry["non_persistent"] = sorted(m._non_persistent_buffers_set)
        entry["children"] = {k: None if c is None else self.module(c, f"{where}.{k}" if where else k)
                             for k, c in m._modules.items()}
        return index


def _check_hooks(m: nn.Module, where: str) -> None:
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks"):
        for hook in getattr(m, attr, {}).values():
            if getattr(hook, "__module__", None) == hide_aliases.__module__:
                continue  # qprep's alias hooks: re-created from the hidden names on load
            raise SerializationError(
                f"module {where or '<root>'!r} has a {attr.strip('_').replace('_', ' ')[:-1]} "
                f"({_function_name(hook)}); hooks are code and are not saved: remove it first")


def _node_data(node: torch.fx.Node, w: _Writer) -> dict:
    where = f"node {node.name!r}"
    target = _function_name(node.target) if node.op == "call_function" else node.target
    data = {"op": node.op, "name": node.name, "target": target,
            "args": w.value(node.args, where), "kwargs": w.value(node.kwargs, where)}
    if node.type is not None:
        data["type"] = w.type(node.type, f"the annotation of {where}")
    if isinstance(node.meta.get("stack_trace"), str):
        data["stack_trace"] = node.meta["stack_trace"]
    return data


def save(gm: torch.fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``gm`` (a prepared model) to ``path`` as data: no pickled code.

    Raises :class:`SerializationError` when the model holds something that is not data
    (a hook, an object attribute of an unknown type, a tensor subclass)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"save() takes a torch.fx.GraphModule (a prepared model), not {type(gm).__name__}")
    if isinstance(gm, VariantGraphModule):
        raise SerializationError(f"{gm._get_name()} holds {len(gm.variant_graphs)} graphs chosen by guards (prepared for "
                                 "several example inputs); this format stores one graph per training mode. Save its "
                                 "state_dict() and prepare the model again when loading, or use torch.save.")
    if type(gm.graph._codegen) is not torch.fx.graph.CodeGen:
        raise SerializationError(f"the graph uses {type(gm.graph._codegen).__name__}; only the default CodeGen is saved")
    w = _Writer()
    w.module(gm, "")
    nodes = [_node_data(n, w) for n in gm.graph.nodes]
    modes = {}
    if isinstance(gm, DualGraphModule):  # a forward that branches on self.training: both graphs
        modes = {mode: ([_node_data(n, w) for n in gm.graph_of(mode).nodes], gm.graph_of(mode).python_code("self").src)
                 for mode in MODES}
    tensors = [{"key": key, "param": isinstance(t, nn.Parameter), "requires_grad": t.requires_grad,
                "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for key, t in w.tensors.values()]
    model = {"format": FORMAT, "version": VERSION, "torch": torch.__version__,
             "class_name": gm._get_name(), "graph": nodes, "modules": w.module_data, "tensors": tensors,
             "modes": {mode: graph for mode, (graph, _) in modes.items()}, "training": gm.training}
    weights = {key: t.detach() for key, t in w.tensors.values()}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(_SOURCE, gm.code, compress_type=zipfile.ZIP_DEFLATED)
        for mode, (_, source) in modes.items():
            zf.writestr(_mode_source(mode), source, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(_MODEL, json.dumps(model, indent=1), compress_type=zipfile.ZIP_DEFLATED)
        with zf.open(_WEIGHTS, "w", force_zip64=True) as f:
            torch.save(weights, f)


# -- load -----------------------------------------------------------------------------------------
class _Reader:
    """Turns the data back into objects, through the allowlists only."""

    def __init__(self, trusted: Iterable, tensors: dict[str, torch.Tensor]):
        self.classes, self.functions, self.methods = dict(ALLOWED_CLASSES), dict(ALLOWED_FUNCTIONS), {}
        for obj in trusted:
            if isinstance(obj, str):
                self.methods[obj] = obj
            elif isinstance(obj, type):
                self.classes[_class_name(obj)] = obj
            elif callable(obj):
                self.functions[_function_name(obj)] = obj
            else:
                raise InputError(f"trusted= takes classes, functions and method names, not {obj!r}")
        self.tensors = tensors
        self.nodes: dict[str, torch.fx.Node] = {}

    def cls(self, name: Any, where: str) -> type:
        if isinstance(name, str) and name in self.classes:
            return self.classes[name]
        raise UntrustedError(
            f"{where}: class {name!r} is not allowlisted (torch.nn and qprep.modules classes are); "
            f"if you trust this file, pass trusted=[{str(name).rpartition('.')[2]}] to qprep.serialize.load", name=str(name))

    def function(self, name: Any, where: str) -> Callable:
        if isinstance(name, str) and name in self.functions:
            return self.functions[name]
        raise UntrustedError(
            f"{where}: function {name!r} is not allowlisted (qprep's op tables, operator, torch data movement are); "
            f"if you trust this file, pass trusted=[{str(name).rpartition('.')[2]}] to qprep.serialize.load", name=str(name))

    def method(self, name: Any, where: str) -> str:
        if _tensor_method_ok(name, self.methods):
            return name
        raise UntrustedError(
            f"{where}: method {name!r} is not a public torch.Tensor method; if you trust this file, "
            f"pass trusted=[{name!r}] to qprep.serialize.load", name=str(name))

    def value(self, v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.value(x, where) for x in v]
        if not (isinstance(v, dict) and len(v) == 1):
            raise SerializationError(f"{where}: malformed value {v!r}")
        (tag, body), = v.items()
        decode = _DECODERS.get(tag)
        if decode is None:
            raise SerializationError(f"{where}: unknown value tag {tag!r}")
        return decode(self, body, where)

    def type(self, t: Any, where: str) -> Any:
        if t is None:
            return None
        if not isinstance(t, dict):
            raise SerializationError(f"{where}: malformed annotation {t!r}")
        args = tuple([self.type(x, where) for x in a] if isinstance(a, list) else self.type(a, where)
                     for a in t.get("args", ()))
        if "class" in t:
            return self.cls(t["class"], where)
        if "str" in t:
            return str(t["str"])
        if "ellipsis" in t:
            return Ellipsis
        if "union" in t:
            return _union([self.type(a, where) for a in t["union"]])
        if "alias" in t:
            return types.GenericAlias(self.type(t["alias"], where), args)
        name = t.get("typing")
        if name not in ("Any", "Union", "Optional", "List", "Tuple", "Dict", "Set", "FrozenSet", "Sequence",
                        "Mapping", "Iterable", "Callable", "Type"):
            raise SerializationError(f"{where}: unsupported annotation {t!r}")
        form = getattr(typing, name)
        return form if not args else form[args if len(args) > 1 else args[0]]


def _union(parts: list) -> Any:
    out = parts[0]
    for p in parts[1:]:
        out = out | p
    return out


def _float(r: _Reader, body, where):
    if body not in ("inf", "-inf", "nan"):
        raise SerializationError(f"{where}: bad float {body!r}")
    return float(body)


def _dtype(r: _Reader, body, where):
    found = getattr(torch, str(body), None)
    if not isinstance(found, torch.dtype):
        raise SerializationError(f"{where}: {body!r} is not a torch dtype")
    return found


def _torch_enum(kind: type):
    def decode(r: _Reader, body, where):
        found = getattr(torch, str(body), None)
        if not isinstance(found, kind):
            raise SerializationError(f"{where}: {body!r} is not a torch.{kind.__name__}")
        return found

    return decode


def _node(r: _Reader, body, where):
    if body not in r.nodes:
        raise SerializationError(f"{where}: refers to node {body!r} before it is defined")
    return r.nodes[body]


def _tensor(r: _Reader, body, where):
    if body not in r.tensors:
        raise SerializationError(f"{where}: refers to tensor {body!r}, which weights.pt does not hold")
    return r.tensors[body]


def _int(body, where) -> int:
    if type(body) is not int:
        raise SerializationError(f"{where}: expected an int, got {body!r}")
    return body


_DECODERS: dict[str, Callable] = {
    "$float": _float,
    "$tuple": lambda r, b, w: tuple(r.value(x, w) for x in b),
    "$set": lambda r, b, w: {r.value(x, w) for x in b},
    "$frozenset": lambda r, b, w: frozenset(r.value(x, w) for x in b),
    "$size": lambda r, b, w: torch.Size([_int(x, w) for x in b]),
    "$dict": lambda r, b, w: {r.value(k, w): r.value(x, w) for k, x in b},
    "$slice": lambda r, b, w: slice(*(r.value(x, w) for x in b)),
    "$ellipsis": lambda r, b, w: Ellipsis,
    "$complex": lambda r, b, w: complex(float(b[0]), float(b[1])),
    "$dtype": _dtype,
    "$device": lambda r, b, w: torch.device(str(b)),
    "$memory_format": _torch_enum(torch.memory_format),
    "$layout": _torch_enum(torch.layout),
    "$input": lambda r, b, w: Input(_int(b, w)),
    "$type": lambda r, b, w: r.type(b, w),
    "$fn": lambda r, b, w: r.function(b, w),
    "$node": _node,
    "$tensor": _tensor,
}


def _read_tensors(zf: zipfile.ZipFile, table: list, map_location) -> dict[str, torch.Tensor]:
    with zf.open(_WEIGHTS) as f:
        data = io.BytesIO(f.read())
    try:
        raw = torch.load(data, weights_only=True, map_location=map_location)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise SerializationError(f"{_WEIGHTS} is not a plain tensor file (torch.load(weights_only=True) refused it: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    if not isinstance(raw, dict) or set(raw) != {t["key"] for t in table}:
        raise SerializationError(f"{_WEIGHTS} does not hold the tensors {_MODEL} lists")
    out = {}
    for entry in table:
        t = raw[entry["key"]]
        if type(t) is not torch.Tensor:
            raise SerializationError(f"{_WEIGHTS}: entry {entry['key']!r} is not a tensor")
        out[entry["key"]] = nn.Parameter(t, requires_grad=bool(entry["requires_grad"])) if entry["param"] \
            else t.requires_grad_(bool(entry["requires_grad"]))
    return out


class _ModuleBuilder:
    def __init__(self, reader: _Reader, data: list[dict], class_name: str):
        self.r, self.data, self.class_name = reader, data, class_name
        self.built: dict[int, nn.Module] = {}
        self.building: set[int] = set()
        self.attrs: dict[int, set[str]] = {}  # module id -> restored plain attribute names

    def build(self, index: Any, where: str) -> nn.Module:
        if type(index) is not int or not 0 <= index < len(self.data):
            raise SerializationError(f"module {where!r}: bad module reference {index!r}")
        if index in self.built:
            return self.built[index]
        if index in self.building:
            raise SerializationError(f"module {where!r}: the module tree has a cycle")
        self.building.add(index)
        entry = self.data[index]
        if index == 0:
            m = torch.fx.GraphModule(nn.Module(), torch.fx.Graph(), self.class_name)
        else:
            cls = self.r.cls(entry.get("class"), f"module {where!r}")
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, torch.fx.GraphModule):
                raise UntrustedError(f"module {where!r}: {entry.get('class')!r} is not an nn.Module class", name=str(cls))
            m = cls.__new__(cls)
            nn.Module.__init__(m)
        state = self._state(m, entry, where)
        if index:
            m.__setstate__({**m.__dict__, **state})  # the class's own protocol, as unpickling does
        else:
            m.__dict__.update(state)
        if entry.get("hidden"):
            hide_aliases(m, {name: None for name in entry["hidden"]})
        self.attrs[id(m)] = set(entry.get("attrs", {}))
        self.built[index] = m
        self.building.discard(index)
        return m

    def _state(self, m: nn.Module, entry: dict, where: str) -> dict:
        state: dict[str, Any] = {}
        for k, v in entry.get("attrs", {}).items():
            _check_attr_name(type(m), k, where)
            state[k] = self.r.value(v, f"attribute {k!r} of module {where!r}")
        if isinstance(m, TensorOp) and isinstance(state.get("call"), str):
            self.r.method(state["call"], f"module {where!r}")
        state["training"] = bool(state.get("training", True))
        params, buffers, children = (entry.get(k, {}) for k in ("params", "buffers", "children"))
        for name in (*params, *buffers, *children):
            _check_member_name(name, where)
        state["_parameters"] = {k: None if v is None else _param(self.r, v, f"{where}.{k}") for k, v in params.items()}
        state["_buffers"] = {k: None if v is None else _tensor(self.r, v, f"{where}.{k}") for k, v in buffers.items()}
        state["_non_persistent_buffers_set"] = set(entry.get("non_persistent", ())) & set(buffers)
        state["_modules"] = {k: None if v is None else self.build(v, f"{where}.{k}" if where else k)
                             for k, v in children.items()}
        return state


def _check_attr_name(cls: type, name: Any, where: str) -> None:
    bad = (not isinstance(name, str) or not name.isidentifier() or (name.startswith("__") and name.endswith("__"))
           or name in _GM_INTERNALS or name in (_HIDDEN, "_compiled_call_impl") or callable(getattr(cls, name, None)))
    if bad:
        raise SerializationError(f"module {where or '<root>'!r}: refusing the attribute name {name!r}")


def _check_member_name(name: Any, where: str) -> None:
    """Parameter, buffer and child names (``weight``, ``0``, ``conv-1``): they reach the
    generated code as ``self.a.b`` or ``getattr(self, "a-b")``, so no quotes, no dots."""
    if not isinstance(name, str) or not _MEMBER.fullmatch(name) or (name.startswith("__") and name.endswith("__")):
        raise SerializationError(f"module {where or '<root>'!r}: refusing the member name {name!r}")


def _param(r: _Reader, key: Any, where: str) -> nn.Parameter:
    t = _tensor(r, key, where)
    if not isinstance(t, nn.Parameter):
        raise SerializationError(f"{where}: registered as a parameter but stored as a plain tensor")
    return t


def _resolve_path(gm: nn.Module, target: Any, want_module: bool, known: dict, where: str) -> None:
    """``target`` must name a module (``call_module``) or a module's parameter, buffer,
    child or restored attribute (``get_attr``), walking ``_modules`` only."""
    if not isinstance(target, str) or not target:
        raise SerializationError(f"{where}: bad target {target!r}")
    *path, last = target.split(".")
    m = gm
    for part in (path if not want_module else path + [last]):
        child = m._modules.get(part) if isinstance(m, nn.Module) else None
        if child is None:
            raise SerializationError(f"{where}: target {target!r} is not a module of the file")
        m = child
    if not want_module and not (last in m._parameters or last in m._buffers or last in m._modules
                                or last in known.get(id(m), ())):
        raise SerializationError(f"{where}: target {target!r} is not an attribute of the file's modules")


def _add_node(graph: torch.fx.Graph, gm: nn.Module, r: _Reader, data: dict, known: dict) -> None:
    if not isinstance(data, dict):
        raise SerializationError(f"malformed node {data!r}")
    op, name, target = data.get("op"), data.get("name"), data.get("target")
    where = f"node {name!r}"
    if op not in _OPS or not isinstance(name, str) or not name.isidentifier() or name in r.nodes:
        raise SerializationError(f"{where}: bad op or name ({op!r})")
    if op == "call_function":
        target = r.function(target, where)
    elif op == "call_method":
        target = r.method(target, where)
    elif op in ("call_module", "get_attr"):
        _resolve_path(gm, target, op == "call_module", known, where)
    elif op == "placeholder" and not (isinstance(target, str) and _PLACEHOLDER.fullmatch(target)):
        raise SerializationError(f"{where}: bad placeholder name {target!r}")
    elif op == "output" and target != "output":
        raise SerializationError(f"{where}: bad output target {target!r}")
    args, kwargs = r.value(data.get("args"), where), r.value(data.get("kwargs"), where)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise SerializationError(f"{where}: args must be a tuple and kwargs a dict")
    if not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise SerializationError(f"{where}: keyword argument names must be identifiers")
    if target is builtins.getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")):
        raise UntrustedError(f"{where}: getattr of a private or computed attribute name is refused", name="getattr")
    node = graph.create_node(op, target, args, kwargs, name=name, type_expr=r.type(data.get("type"), where))
    if target is check_guard:
        node.meta["is_wrapped"] = True  # as the tracer marks it: fx writes wrap("...") for fx's re-trace
    if node.name != name:
        raise SerializationError(f"{where}: the rebuilt graph named it {node.name!r}")
    r.nodes[name] = node


def load(path: str | os.PathLike, *, trusted: Iterable = (), map_location=None) -> torch.fx.GraphModule:
    """Rebuild a model written by :func:`save`, without executing code from the file.

    Args:
        trusted: extra classes, functions (``call_function`` targets or wrapper calls)
            and ``call_method`` names to accept, for a file you trust that uses them (a
            user module kept as an opaque leaf, a function qprep left alone).
        map_location: passed to ``torch.load`` for the weights.

    Raises :class:`UntrustedError` for anything outside the allowlist and
    :class:`SerializationError` for a malformed file or when the regenerated code differs
    from the file's ``forward.py``.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SerializationError(f"cannot open {os.fspath(path)!r} as a qprep model file: {exc}") from exc
    with zf:
        names = set(zf.namelist())
        if not {_SOURCE, _MODEL, _WEIGHTS} <= names:
            raise SerializationError(f"{os.fspath(path)!r} is not a qprep model file (needs {_SOURCE}, {_MODEL}, {_WEIGHTS})")
        try:
            model = json.loads(zf.read(_MODEL).decode("utf-8"))
            source = zf.read(_SOURCE).decode("utf-8")
            mode_sources = {mode: zf.read(_mode_source(mode)).decode("utf-8") for mode in MODES
                            if _mode_source(mode) in names}
        except ValueError as exc:
            raise SerializationError(f"{os.fspath(path)!r}: unreadable {_MODEL} or {_SOURCE}: {exc}") from exc
        if not isinstance(model, dict) or model.get("format") != FORMAT or model.get("version") != VERSION:
            raise SerializationError(f"{os.fspath(path)!r}: not a {FORMAT} version {VERSION} file")
        reader = _Reader(trusted, _read_tensors(zf, model.get("tensors", []), map_location))
    try:
        return _rebuild(model, source, mode_sources, reader)
    except QprepError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise SerializationError(f"{os.fspath(path)!r} is malformed: {type(exc).__name__}: {exc}") from exc


def _mode_source(mode: str) -> str:
    return f"forward_{mode}.py"


def _graph(gm: nn.Module, nodes: Any, source: str, member: str, reader: _Reader, attrs: dict) -> torch.fx.Graph:
    """A graph rebuilt from its node data, checked against the reviewed source ``member``."""
    graph = torch.fx.Graph(owning_module=gm, tracer_cls=QprepTracer)
    reader.nodes = {}
    for data in nodes if isinstance(nodes, list) else ():
        _add_node(graph, gm, reader, data, attrs)
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001  (lint raises plain RuntimeErrors)
        raise SerializationError(f"the rebuilt graph is invalid: {exc}") from exc
    # Compare BEFORE the code is compiled: only the text of the reviewed source is ever executed.
    if graph.python_code(root_module="self").src != source:
        raise SerializationError(f"the code regenerated from {_MODEL} differs from {member}: the file was altered "
                                 "or written by an incompatible torch version")
    for node, data in zip(graph.nodes, nodes):
        trace = data.get("stack_trace")
        if isinstance(trace, str) and '"""' not in trace:  # fx can print it inside a docstring
            node.meta["stack_trace"] = trace
    return graph


def _rebuild(model: dict, source: str, mode_sources: dict, reader: _Reader) -> torch.fx.GraphModule:
    class_name = model.get("class_name")
    if not isinstance(class_name, str) or not class_name.isidentifier():
        raise SerializationError(f"bad class_name {class_name!r}")
    builder = _ModuleBuilder(reader, model.get("modules") or [{}], class_name)
    gm = builder.build(0, "")
    graph = _graph(gm, model.get("graph", []), source, _SOURCE, reader, builder.attrs)
    modes = model.get("modes") or {}
    if modes:
        if set(modes) != set(MODES) or set(mode_sources) != set(MODES):
            raise SerializationError(f"a two-mode model needs both graphs and both {_mode_source('train')} / "
                                     f"{_mode_source('eval')}")
        graphs = {mode: _graph(gm, modes[mode], mode_sources[mode], _mode_source(mode), reader, builder.attrs)
                  for mode in MODES}
        gm.training = bool(model.get("training", True))
        gm = DualGraphModule(gm, graphs["train"], graphs["eval"], class_name)
        gm.after_recompile = install_fast_forward
        if gm.code != mode_sources["train" if gm.training else "eval"]:
            raise SerializationError("the compiled code differs from the saved source")
    else:
        gm.graph = graph  # compiles forward
        if gm.code != source:
            raise SerializationError(f"the compiled code differs from {_SOURCE} (an fx code generation setting is on?)")
    install_fast_forward(gm)
    return gm
