"""Example values during tracing.

When example inputs are given, every traced node also carries what its example produced,
in ``node.meta["val"]`` as torch.fx's own ``FakeTensorProp`` writes it, and, for tensors,
``node.meta["tensor_meta"]`` as ``ShapeProp`` writes it. Tensors are **meta tensors**: shape,
dtype, strides and ``requires_grad``, no data, so no real compute runs and a model built on
the meta device needs no weights. The real device of each tensor is kept beside it
(:meth:`Values.device`), so Python code that reads ``x.device`` or ``x.is_cuda`` sees the
example's device. Python values (sizes, dtypes, lengths, flags) are kept as they are.

Each op is run on the meta values of its inputs: functions and methods directly, leaf modules
through a structural twin that holds meta copies of their parameters (the real module never
runs), ``torch.nn`` modules that keep the shape of their input (activations, norms, dropout)
by a rule. An op that cannot run on meta tensors (an op without a meta kernel, ``.item()``,
an output shape that depends on data) gives no value (:data:`UNKNOWN`); the trace goes on
symbolically from there, and Python code that needs a concrete value from it fails with a
clear error rather than a guess.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from ..core import meta
from ..core._compat import ORIGINAL_MODULE_CALL, enter_autocast, exit_autocast, extract_tensor_metadata, nonzero_assumed_all
from ..core.runtime import copy_object, plain_object, python_draw
from ..core.template import tree_any
from .memo import Results, current_results, function_key, method_key, module_key

__all__ = ["UNKNOWN", "Values", "value_of", "is_known"]


class _Unknown:
    """The value of a node qprep could not compute on the example."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self):
        return (_Unknown, ())


UNKNOWN = _Unknown()

#: ``torch.nn`` modules whose output has the shape, dtype and device of their (first) input.
SHAPE_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.RReLU, nn.Identity,
    nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
)

#: Functionals whose output has the shape, dtype and device of their first argument: their
#: meta kernels (batch norm's decomposition above all) cost far more than the answer.
SHAPE_PRESERVING_FUNCTIONS = frozenset({
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm, F.relu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.mish, F.dropout, F.softmax, F.log_softmax,
    torch.relu, torch.sigmoid, torch.tanh, torch.softmax, torch.log_softmax,
})


def _grouped_mm_shape(mat_a: torch.Tensor, mat_b: torch.Tensor, *, offs: torch.Tensor | None = None,
                      bias: Any = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The meta output of ``torch._grouped_mm`` / ``F.grouped_mm``, whose meta kernel refuses
    the float32 operands that the CPU kernel runs (Mixture-of-Experts layers on the CPU). The
    output's shape never depends on the data: 2D x 3D gives ``(M, N)``, 3D x 3D ``(G, M, N)``,
    2D x 2D ``(len(offs), M, N)``, 3D x 2D ``(M, N)``."""
    dims = (mat_a.dim(), mat_b.dim())
    if dims == (2, 3) or dims == (3, 2):
        shape = (mat_a.shape[-2], mat_b.shape[-1])
    elif dims == (3, 3):
        shape = (mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    elif dims == (2, 2) and offs is not None:
        shape = (offs.shape[0], mat_a.shape[0], mat_b.shape[-1])
    else:
        raise RuntimeError(f"grouped_mm of {mat_a.dim()}D by {mat_b.dim()}D operands")
    return torch.empty(shape, dtype=out_dtype or mat_a.dtype, device=_META)


#: Ops whose meta kernel refuses inputs their CPU or CUDA kernel runs: the example value's
#: shape and dtype by a rule instead.
META_RULES: dict[Callable, Callable] = {
    f: _grouped_mm_shape for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f
}

# Keyword and positional device arguments are evaluated on the meta device.
_META = torch.device("meta")
_CPU = torch.device("cpu")


def value_of(node: Any) -> Any:
    """The example value of a node (a constant is its own value), or :data:`UNKNOWN`."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get(meta.VAL, UNKNOWN)
    return node


def is_known(value: Any) -> bool:
    return not tree_any(value, lambda v: v is UNKNOWN)


@dataclasses.dataclass
class _Failure:
    """Why a node has no value: the op that failed on meta tensors and its error."""

    node: str
    error: str


class Values:
    """The example values of one trace.

    Args:
        root: the module being traced (leaf modules and attributes are looked up on it).
        examples: placeholder name -> example value; ``None`` when no example inputs were given
            (then every value is :data:`UNKNOWN` and tracing is purely symbolic).
        passthrough: a context manager under which the tracer lets module calls and wrapped
            functions run as plain Python (the evaluation of a value must not be traced).
    """

    def __init__(self, root: nn.Module, examples: dict[str, Any] | None, passthrough: Callable):
        self.root = root
        self.examples = examples
        self.enabled = examples is not None
        self._passthrough = passthrough
        self._meta_of: dict[int, torch.Tensor] = {}  # id(real tensor) -> its meta twin
        self._real: list[torch.Tensor] = []  # keeps the real tensors alive so ids stay unique
        self._twins: dict[int, nn.Module] = {}
        # id(meta tensor) -> (the tensor, kept alive so that ids stay unique; the real device it stands for)
        self._devices: dict[int, tuple[torch.Tensor, torch.device]] = {}
        self._modules: dict[str, nn.Module] = {}  # call_module target -> module
        #: id(0-d meta tensor made from Python numbers) -> (the tensor, its real twin on the CPU)
        self._scalars: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.failures: dict[str, _Failure] = {}
        #: node name -> a stand-in for a value whose size depends on data (``x[mask]``, computed as
        #: if every mask element were set): never a node's value, only an input to the ops after it,
        #: whose values are stand-ins too but for the ops whose output is shaped by an input of known
        #: value (:data:`SHAPED_BY_RECEIVER`: ``h.masked_scatter(mask, norm(h[mask]))``).
        self._stand_ins: dict[str, Any] = {}
        self.results = current_results()  # op results remembered (shared by the traces of one capture)

    # -- what a node's value is --------------------------------------------------------
    def record(self, node: torch.fx.Node) -> None:
        """Compute ``node``'s example value and write it to ``node.meta``."""
        if not self.enabled or node.op == "output":
            return
        try:
            with self._passthrough():
                value = self._evaluate(node)
        except _NoValue:
            return
        except _StandIn as stand_in:  # computed from a stand-in: a stand-in itself
            self._stand_ins[node.name] = stand_in.value
            return
        except Exception as exc:  # noqa: BLE001  (an op meta tensors cannot run: no value, traced on symbolically)
            self.failures[node.name] = _Failure(node.name, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            self._stand_in_for(node)
            return
        node.meta[meta.VAL] = value
        if isinstance(value, torch.Tensor):
            node.meta[meta.TENSOR_META] = _tensor_meta(value, self.results.tensor_meta)
        meta.set_facts(node, **{meta.VALUE: {
            "type": torch.Tensor if isinstance(value, torch.Tensor) else type(value),
            "shape": tuple(value.shape) if isinstance(value, torch.Tensor) else None,
            "has_tensor": tree_any(value, lambda v: isinstance(v, torch.Tensor)),
        }})

    def why_unknown(self, node: torch.fx.Node) -> str:
        """Why ``node`` has no value, as text."""
        if not self.enabled:
            return "no example inputs were given (pass example_inputs)"
        failed = self.failed_source(node)
        if failed is not None:
            f = self.failures[failed.name]
            return f"`{failed.format_node()}` could not run on the example's meta tensors ({f.error})"
        return "it depends on a value qprep could not compute on the example"

    def failed_source(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The first node up the graph from ``node`` (itself included) that had no value
        because its op failed on the example's meta tensors, if any."""
        seen: set = set()
        todo = [node]
        while todo:
            current = todo.pop()
            if current.name in self.failures:
                return current
            seen.add(current)
            todo.extend(n for n in current.all_input_nodes if n not in seen)
        return None

    def device(self, value: torch.Tensor) -> torch.device:
        """The real device the meta tensor ``value`` stands for."""
        found = self._devices.get(id(value))
        return found[1] if found is not None else _CPU

    # -- evaluation ------------------------------------------------------------------
    def _stand_in_for(self, node: torch.fx.Node) -> None:
        """After ``node`` failed on meta tensors: a stand-in for its value if the op's output
        size is what depends on data (a boolean mask index, ``nonzero``), computed as if every
        element were set."""
        if node.op not in ("call_function", "call_method") or not self.enabled:
            return
        remembered, self.results = self.results, Results()  # a stand-in is never an op's remembered result
        try:
            with self._passthrough(), nonzero_assumed_all():
                self._stand_ins[node.name] = self._evaluate(node)
        except _StandIn as stand_in:
            self._stand_ins[node.name] = stand_in.value
        except Exception:  # noqa: BLE001  (not a data-dependent size: no stand-in)
            return
        finally:
            self.results = remembered

    def _evaluate(self, node: torch.fx.Node) -> Any:
        if node.op == "placeholder":
            return self._placeholder(node)
        stood_in: list[torch.fx.Node] = []

        def required(n: torch.fx.Node) -> Any:
            value = n.meta.get(meta.VAL, UNKNOWN)
            if value is UNKNOWN:
                if n.name not in self._stand_ins:
                    raise _NoValue
                stood_in.append(n)
                return self._stand_ins[n.name]
            return value

        args = torch.fx.node.map_arg(node.args, required)
        kwargs = torch.fx.node.map_arg(node.kwargs, required)
        value = self._evaluate_op(node, args, kwargs)
        if stood_in and not (_shaped_by_receiver(node) and node.args and node.args[0] not in stood_in):
            raise _StandIn(value)
        return value

    def _evaluate_op(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "get_attr":
            obj: Any = self.root
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return self.to_meta(obj)
        if node.op == "call_module":
            return self._call_module(node.target, args, kwargs)
        if node.op == "call_method":
            return self._call_method(node.target, args, kwargs)
        return self._call_function(node.target, args, kwargs)

    def _placeholder(self, node: torch.fx.Node) -> Any:
        name = node.target.lstrip("*")
        if name not in self.examples:
            if node.target.startswith("**"):
                return {}  # no extra keyword arguments in the example
            raise _NoValue
        value = self.examples[name]
        if plain_object(value):  # a KV cache, say: traced code calls it, so on a copy of meta tensors
            return self._object_to_meta(value)
        return self.to_meta(value)

    def _object_to_meta(self, obj: Any) -> Any:
        """A deep copy of ``obj`` with each tensor it holds replaced by its meta twin (the
        traced code may update the object: the user's own stays as it is)."""
        return copy_object(obj, self._tensor_to_meta, always=True)

    def _inputs_device(self, *values: Any) -> torch.device | None:
        for v in values[0]:  # the common case: a tensor among the positional arguments, before any container
            if isinstance(v, torch.Tensor):
                return self.device(v) if v.is_meta else v.device
            if isinstance(v, (list, tuple, dict, slice)):
                break
        found: list[torch.device] = []

        def visit(v):
            if isinstance(v, torch.Tensor) and not found:
                found.append(self.device(v) if v.is_meta else v.device)

        map_aggregate(values, visit)
        return found[0] if found else None

    def _call_function(self, target: Callable, args: tuple, kwargs: dict) -> Any:
        if target is enter_autocast or target is exit_autocast:
            return None  # the trace enters and leaves the real `with torch.autocast(...)` itself
        if target is python_draw:  # not drawn at trace time: the prepared model draws on every call
            raise RuntimeError(f"a draw from {args[0]}.{args[1]}(), made anew on every call: the trace cannot fix it")
        if target is builtins.getattr and len(args) == 2 and isinstance(args[0], torch.Tensor) \
                and args[1] in _DEVICE_ATTRIBUTES:  # the example's device, not the meta device
            return _DEVICE_ATTRIBUTES[args[1]](self.device(args[0]) if args[0].is_meta else args[0].device)
        if _in(SHAPE_PRESERVING_FUNCTIONS, target) and args and isinstance(args[0], torch.Tensor) \
                and not kwargs.get("inplace") and kwargs.get("dtype") is None:
            return self._like(self.to_meta(args[0]), self.to_meta(args[1:]), self.to_meta(kwargs))
        if kwargs.get("inplace") is True and _in(SHAPE_PRESERVING_FUNCTIONS, target) and args \
                and _updatable(args[0]):
            return args[0]  # an in-place activation returns its input, unchanged but for its data
        device = _requested_device(kwargs)
        args, kwargs = self.to_meta(args), _meta_devices(self.to_meta(kwargs))
        if _in(META_RULES, target):
            return self._outputs(META_RULES[target](*args, **kwargs), self._inputs_device(args, kwargs))
        if device is not None and "device" not in kwargs:
            kwargs["device"] = _META
        scalars = self._on_scalars(lambda a, k: target(*a, **k), args, kwargs, device)
        if scalars is not _NO_SCALARS:
            return scalars
        tensors: list = []
        key = function_key(target, args, kwargs, tensors)
        out = self._retrying(lambda: self.results.run(key, tensors, lambda: target(*args, **kwargs)),
                             lambda a, k: target(*a, **k), args, kwargs)
        return self._outputs(out, device or self._inputs_device(args, kwargs))

    def _on_scalars(self, call: Callable[[tuple, dict], Any], args: tuple, kwargs: dict,
                    device: torch.device | None) -> Any:
        """An op on Python numbers and 0-d tensors of known value only (``torch.div(n, 4,
        rounding_mode="floor") + 1``): run on real 0-d tensors, so its result's value is known
        too (Python code may read it: ``x.new_zeros((b, chunks + 1))``). ``_NO_SCALARS`` for
        any other op."""
        if device is not None:
            return _NO_SCALARS  # a factory on a requested device: not a CPU scalar
        found = []

        def real(v):
            if isinstance(v, torch.Tensor):
                entry = self._scalars.get(id(v))
                if entry is None or entry[0] is not v:
                    raise _NotScalar
                found.append(v)
                return entry[1]
            return v

        try:
            real_args, real_kwargs = map_aggregate(args, real), map_aggregate(kwargs, real)
        except _NotScalar:
            return _NO_SCALARS
        # no tensor: the arguments themselves (map_aggregate makes lists immutable copies, and
        # `cache.layers += [...]` must update the object's own list)
        out = call(tuple(real_args), dict(real_kwargs)) if found else call(args, kwargs)
        value = out if isinstance(out, torch.Tensor) and not out.is_meta and out.dim() == 0 else None
        out = self._outputs(out, self._inputs_device(args, kwargs) if found else None)
        if value is not None:
            self._scalars[id(out)] = (out, value)
        return out

    def _retrying(self, first: Callable[[], Any], call: Callable[[tuple, dict], Any], args: tuple,
                  kwargs: dict) -> Any:
        """``first()`` (the op on ``args``, remembered); if it fails on a 0-d meta tensor whose
        value is known (made from Python numbers: ``x.view(b, torch.div(n, 4, ...))`` reads it
        with ``.item()``), ``call`` with those values as Python numbers (not remembered)."""
        try:
            return first()
        except RuntimeError:
            known = [False]

            def swap(v):
                entry = self._scalars.get(id(v)) if isinstance(v, torch.Tensor) else None
                if entry is not None and entry[0] is v:
                    known[0] = True
                    return entry[1].item()
                return v

            swapped_args, swapped_kwargs = map_aggregate(args, swap), map_aggregate(kwargs, swap)
            if not known[0]:
                raise
            return call(tuple(swapped_args), dict(swapped_kwargs))

    def _call_method(self, name: str, args: tuple, kwargs: dict) -> Any:
        receiver = args[0]
        if isinstance(receiver, torch.Tensor) and name in ("to", "cuda", "cpu", "type"):
            return self._move(receiver, name, args[1:], kwargs)
        if isinstance(receiver, torch.Tensor) and name == "get_device":
            device = self.device(receiver)
            return device.index if device.type != "cpu" else -1
        device = _requested_device(kwargs)
        args, kwargs = self.to_meta(args), _meta_devices(self.to_meta(kwargs))
        scalars = self._on_scalars(lambda a, k: getattr(a[0], name)(*a[1:], **k), args, kwargs, device)
        if scalars is not _NO_SCALARS:
            return scalars
        tensors: list = []
        key = method_key(name, args, kwargs, tensors)
        method = lambda a, k: getattr(a[0], name)(*a[1:], **k)  # noqa: E731
        out = self._retrying(lambda: self.results.run(key, tensors, lambda: method(args, kwargs)), method, args, kwargs)
        return self._outputs(out, device or self._inputs_device(args))

    def _move(self, t: torch.Tensor, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """``x.to(...)``, ``x.cuda()``, ``x.cpu()``, ``x.type(...)`` on a meta tensor: the
        dtype change is run, the device change recorded."""
        t = self.to_meta(t)
        device = self.device(t)
        if name == "cuda":
            target = torch.device("cuda", args[0] if args and isinstance(args[0], int) else 0)
            return self._outputs(self._moved(t, t.clone() if kwargs.get("copy") else t, target), target)
        if name == "cpu":
            return self._outputs(self._moved(t, t, _CPU), _CPU)
        if name == "type":
            return self._outputs(t.type(*args, **kwargs), device)
        dtype, rest = t.dtype, dict(kwargs)
        device = torch.device(rest.pop("device")) if rest.get("device") is not None else device
        rest.pop("device", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = torch.device(a)
            elif isinstance(a, torch.Tensor):
                dtype, device = a.dtype, self.device(a) if a.is_meta else a.device
        dtype = rest.pop("dtype", dtype)
        out = t.to(dtype=dtype, **{k: v for k, v in rest.items() if k in ("copy", "memory_format", "non_blocking")})
        return self._outputs(self._moved(t, out, device), device)

    def _moved(self, t: torch.Tensor, out: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``out`` of moving ``t`` to ``device``: a new tensor when the device changes (as in
        eager mode), so that ``t`` keeps its own device."""
        if out is t and not _same_device(self.device(t), device):
            return t.clone()
        return out

    def _call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self._modules.get(target)
        if module is None:
            module = self._modules[target] = self.root.get_submodule(target)
        args, kwargs = self.to_meta(args), self.to_meta(kwargs)
        device = self._inputs_device(args, kwargs)
        if type(module) in SHAPE_PRESERVING and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            if not getattr(module, "inplace", False):
                return self._like(args[0], tuple(module.parameters(recurse=False)), {})
            if _updatable(args[0]) and not module._parameters:  # noqa: SLF001
                return args[0]  # an in-place activation returns its input, unchanged but for its data
        tensors: list = []
        key = module_key(module, args, kwargs, tensors)
        out = self.results.run(key, tensors, lambda: ORIGINAL_MODULE_CALL(self._twin(module), *args, **kwargs))
        return self._outputs(out, device)

    def _like(self, first: torch.Tensor, others: Any, kwargs: dict) -> torch.Tensor:
        """A new meta tensor shaped like ``first``, requiring grad when an input does (and,
        as in eager mode, not a leaf then)."""
        grads = torch.is_grad_enabled() and tree_any(
            (first, others, kwargs), lambda v: isinstance(v, torch.Tensor) and v.requires_grad)
        if first.stride() == _contiguous_strides(first.shape):  # empty_like's meta kernel is Python, ~25 us
            out = torch.empty_strided(first.shape, first.stride(), dtype=first.dtype, device=_META)
        else:
            out = torch.empty_like(first)
        return self._outputs(out.requires_grad_().clone() if grads else out, self.device(first))

    def _twin(self, module: nn.Module) -> nn.Module:
        """``module`` with every parameter and buffer a meta tensor, hooks removed (the
        module itself when it already lives on the meta device). A ``torch.nn`` module's
        twin is a shallow structural copy (torch's own forwards change no attribute of
        theirs); any other module's is a deep copy, which its forward may change freely."""
        twin = self._twins.get(id(module))
        if twin is None:
            state = [*module.parameters(), *module.buffers()]
            if all(t.is_meta for t in state):
                twin = module
            elif _torch_nn(module):
                twin = self._shallow_twin(module)
            else:
                twin = copy.deepcopy(module, {id(t): self.to_meta(t) for t in state})
                for m in twin.modules():
                    for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,  # noqa: SLF001
                                  m._backward_pre_hooks):  # noqa: SLF001
                        hooks.clear()
            self._twins[id(module)] = twin
            self._real.append(module)
        return twin

    def _shallow_twin(self, module: nn.Module) -> nn.Module:
        twin = object.__new__(type(module))
        state = {}
        for name, value in module.__dict__.items():
            if name in _HOOK_DICTS:
                value = type(value)()
            elif name == "_modules":
                value = {k: None if m is None else self._shallow_twin(m) for k, m in value.items()}
            elif name in ("_parameters", "_buffers"):
                value = {k: None if t is None else self.to_meta(t) for k, t in value.items()}
            elif isinstance(value, torch.Tensor) or isinstance(value, (list, tuple, dict)) and tree_any(
                    value, lambda v: isinstance(v, torch.Tensor)):
                value = self.to_meta(value)  # ``nn.LSTM._flat_weights``: the twin's own parameters
            state[name] = value
        twin.__dict__.update(state)
        return twin

    # -- meta tensors ----------------------------------------------------------------
    def to_meta(self, value: Any) -> Any:
        """``value`` with every real tensor replaced by its meta twin (cached, so one tensor
        has one twin); Parameters stay Parameters."""
        if isinstance(value, torch.Tensor):
            return self._tensor_to_meta(value)
        if isinstance(value, (list, tuple, dict, slice)) and tree_any(value, _real_tensor):
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                return type(value)(*(self.to_meta(v) for v in value))
            if isinstance(value, (list, tuple)):
                return type(value)(self.to_meta(v) for v in value)
            if isinstance(value, dict):
                out = value.copy()
                for k, v in value.items():
                    out[k] = self.to_meta(v)
                return out
        return value

    def _tensor_to_meta(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_meta:
            return t
        found = self._meta_of.get(id(t))
        if found is None:
            with torch.no_grad():
                found = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=_META)
            if isinstance(t, nn.Parameter):
                found = nn.Parameter(found, requires_grad=t.requires_grad)
            elif t.requires_grad:
                found.requires_grad_(True)
            self._devices[id(found)] = (found, t.device)
            self._meta_of[id(t)] = found
            self._real.append(t)
        return found

    def _outputs(self, out: Any, device: torch.device | None) -> Any:
        """Real tensors an op made (a constant) become meta; new meta tensors get ``device``."""
        out = self.to_meta(out)
        if device is not None:
            def mark(v):
                if isinstance(v, torch.Tensor) and id(v) not in self._devices:
                    self._devices[id(v)] = (v, device)

            map_aggregate(out, mark) if not isinstance(out, torch.Tensor) else mark(out)
        return out


class _NotScalar(Exception):
    """A tensor whose value is not known (see :meth:`Values._on_scalars`)."""


_NO_SCALARS = object()


class _NoValue(Exception):
    """The node has no example value (an input the example does not give, an unknown input)."""


class _StandIn(Exception):
    """The node's value was computed from a stand-in (see :attr:`Values._stand_ins`)."""

    def __init__(self, value: Any):
        super().__init__()
        self.value = value


#: Tensor methods (and their ``torch.*`` functions) whose output has the shape, dtype and device
#: of their receiver whatever the sizes of their other tensor arguments: put a gathered,
#: data-sized tensor back (``h.masked_scatter(mask, f(h[mask]))``, ``h.index_put_(idx, v)``).
SHAPED_BY_RECEIVER = frozenset({
    "masked_scatter", "masked_scatter_", "index_put", "index_put_", "index_add", "index_add_", "index_copy",
    "index_copy_", "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
})


def _shaped_by_receiver(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPED_BY_RECEIVER
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        return name in SHAPED_BY_RECEIVER and getattr(torch, name, None) is node.target
    return False


def _in(collection, target) -> bool:
    try:
        return target in collection
    except TypeError:  # an unhashable target
        return False


def _requested_device(kwargs: dict) -> torch.device | None:
    device = kwargs.get("device")
    return torch.device(device) if isinstance(device, (str, torch.device)) else None


def _meta_devices(kwargs: dict) -> dict:
    if "device" in kwargs and isinstance(kwargs["device"], (str, torch.device)):
        kwargs = {**kwargs, "device": _META}
    return kwargs


#: Hook dictionaries of ``nn.Module`` (a twin starts with none).
_HOOK_DICTS = frozenset(k for k, v in nn.Module().__dict__.items() if k.endswith("hooks") or "hooks_" in k)


def _torch_nn(module: nn.Module) -> bool:
    """Whether ``module`` and its submodules are of ``torch.nn``'s own classes, with
    parameters that are plain ``Parameter`` objects (not lazy ones)."""
    for m in module.modules():
        if not type(m).__module__.startswith("torch.nn.modules."):
            return False
        if any(p is not None and type(p) is not nn.Parameter for p in m._parameters.values()):  # noqa: SLF001
            return False
    return True


#: Tensor attributes that read the device, answered with the example's device.
_DEVICE_ATTRIBUTES: dict[str, Callable[[torch.device], Any]] = {
    "device": lambda d: d, "is_cuda": lambda d: d.type == "cuda", "is_cpu": lambda d: d.type == "cpu",
    "is_meta": lambda d: d.type == "meta", "is_mps": lambda d: d.type == "mps", "is_xpu": lambda d: d.type == "xpu",
}


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device (``cuda`` is ``cuda:0`` here)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _real_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_meta


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (which ``empty_like`` keeps as they are)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _updatable(t: Any) -> bool:
    """Whether an in-place op may update ``t`` (eager mode refuses a leaf that requires grad
    and a view of one: those run, and fail, as in eager mode)."""
    return isinstance(t, torch.Tensor) and (not t.requires_grad or not t.is_leaf and not t._is_view())  # noqa: SLF001


def _tensor_meta(t: torch.Tensor, memo: dict):
    """``extract_tensor_metadata(t)``, made once per shape, strides, dtype and grad flag
    in ``memo`` (the memory format it finds is the costly part)."""
    if not t.is_meta or t.is_quantized or t.layout is not torch.strided:
        return extract_tensor_metadata(t)
    key = (t.shape, t.stride(), t.dtype, t.requires_grad)
    found = memo.get(key)
    if found is None:
        found = memo[key] = extract_tensor_metadata(t)
    return found._replace(qparams={})
