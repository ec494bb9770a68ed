"""qprep's symbolic tracer: torch.fx with source lines, module scopes, eager in-place
semantics and clear errors.

Differences from ``torch.fx.symbolic_trace``:

* every node records the user's stack trace (``node.meta["stack_trace"]``) and module scope
  (``node.meta["nn_module_stack"]``);
* ``y += z`` on a traced tensor is recorded as ``operator.iadd`` (plain fx records
  ``operator.add``, which breaks aliasing: a tensor bound to ``y`` before the ``+=`` would
  see a different value than in eager mode);
* ``torch.nn`` leaf modules and qprep's own modules (by type) are leaves; compound ``torch.nn``
  modules whose ``forward`` is plain Python (``nn.TransformerEncoderLayer``) are traced
  into when possible and kept opaque, with a note, when not;
* a failure inside user code raises :class:`~qprep.errors.TraceError` naming the module,
  the source line and the fix; with ``on_untraceable="leaf"`` the failing submodule is
  kept as an opaque leaf instead and the rest is still traced.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import linecache
import operator
import os
import sys
import traceback

import torch
import torch.fx
import torch.nn as nn

from ..core import meta
from ..core._compat import last_node, mha_fastpath
from ..core.config import PrepareConfig
from ..core.errors import InputError, TraceError
from ..core.records import TraceNote
from ..core.template import tree_any
from ..modules import MODULE_TYPES
from .compound import COMPOUND_NN, TRACEABLE_FORWARDS

__all__ = ["QprepTracer", "QprepProxy", "trace", "TraceNote"]

_QPREP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# Frames never shown as a node's source: qprep's own machinery (not its examples) and
# torch's call plumbing. Directory prefixes end in a separator: torch/ is not torchvision/.
_SKIP_FRAMES = (
    os.path.join(_QPREP_DIR, ""),
    os.path.join(_TORCH_DIR, "fx", ""),
    os.path.join(_TORCH_DIR, "nn", "modules", "module.py"),
    os.path.join(_TORCH_DIR, "overrides.py"),
    os.path.join(_TORCH_DIR, "__init__.py"),
    os.path.join(_TORCH_DIR, "_compile.py"),
    os.path.join(_TORCH_DIR, "_dynamo", ""),
    os.path.join(_TORCH_DIR, "_jit_internal.py"),
)
_EXAMPLES = os.path.join(_QPREP_DIR, "examples.py")

# Containers: never leaves.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

_INPLACE_MAGIC = {
    "iadd": operator.iadd, "isub": operator.isub, "imul": operator.imul,
    "itruediv": operator.itruediv, "ifloordiv": operator.ifloordiv, "imod": operator.imod,
    "ipow": operator.ipow, "imatmul": operator.imatmul, "iand": operator.iand,
    "ior": operator.ior, "ixor": operator.ixor, "ilshift": operator.ilshift,
    "irshift": operator.irshift,
}


# Tensor layout flags that torch.nn code branches on; qprep prepares dense strided tensors.
_CONSTANT_ATTRS = {"is_nested": False, "is_sparse": False, "is_quantized": False, "is_mkldnn": False}


class QprepProxy(torch.fx.Proxy):
    """A Proxy that records augmented assignment as the in-place operator, and answers
    the layout flags of :data:`_CONSTANT_ATTRS` (dense tensors) instead of tracing them."""

    def __getattr__(self, k):
        if k in _CONSTANT_ATTRS:
            return _CONSTANT_ATTRS[k]
        return super().__getattr__(k)


def _make_inplace(op):
    def impl(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    impl.__name__ = f"__{op.__name__}__"
    return impl


for _name, _op in _INPLACE_MAGIC.items():
    setattr(QprepProxy, f"__{_name}__", _make_inplace(_op))


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is user code (not torch, not qprep)."""
    frames = traceback.extract_tb(tb)
    for skip in ((os.path.join(_TORCH_DIR, ""), os.path.join(_QPREP_DIR, "")), _SKIP_FRAMES):
        for frame in reversed(frames):
            path = os.path.abspath(frame.filename)
            if not path.startswith(skip) or path == _EXAMPLES:
                return frame
    return frames[-1] if frames else None


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "control flow" in text or "cannot be iterated" in text or "len' is not supported" in text:
        return f"data-dependent Python control flow on a traced value ({text})"
    return f"{type(exc).__name__}: {text}"


def _stack_text(depth: int) -> str:
    """The user's stack at node creation, formatted as fx formats ``node.stack_trace``,
    from the first ``forward`` frame on, without torch.fx's and qprep's own frames.

    Walking frames directly costs a fraction of ``traceback`` extraction per node."""
    frames = []
    frame = sys._getframe(depth)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIP_FRAMES) or filename == _EXAMPLES:
            frames.append((filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    frames.reverse()
    first = next((i for i, f in enumerate(frames) if f[2] == "forward"), None)
    if first is None:
        return ""
    lines = []
    for filename, lineno, name in frames[first:]:
        lines.append(f'  File "{filename}", line {lineno}, in {name}')
        code = linecache.getline(filename, lineno).strip()
        if code:
            lines.append(f"    {code}")
    return "\n".join(lines)


class QprepTracer(torch.fx.Tracer):
    """The tracer :func:`trace` uses; see the module docstring."""

    def __init__(self, config: PrepareConfig | None = None):
        super().__init__(param_shapes_constant=False)
        self.proxy_buffer_attributes = True  # buffers are graph values: `self.ids[:, :n]` traces
        self.config = config or PrepareConfig()
        self.notes: list[TraceNote] = []
        self._leaf_types = tuple(t for t in self.config.leaf_modules if isinstance(t, type))
        self._leaf_names = frozenset(n for n in self.config.leaf_modules if isinstance(n, str))
        self._opaque: set[str] = set()

    # -- proxies and stack traces -------------------------------------------------------
    def proxy(self, node: torch.fx.Node) -> QprepProxy:
        return QprepProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output", "get_attr"):
            node.meta["stack_trace"] = _stack_text(2)
        return node

    # -- leaves -------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or module_qualified_name in self._opaque:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if isinstance(m, _CONTAINERS):
            return False
        if isinstance(m, MODULE_TYPES):
            return True
        if self.config.trace_compound_nn and isinstance(m, COMPOUND_NN):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def _tries_into(self, m: nn.Module) -> bool:
        """Compound torch.nn modules: traced into, kept opaque if that fails."""
        return self.config.trace_compound_nn and isinstance(m, COMPOUND_NN)

    # -- module calls -------------------------------------------------------------------
    def call_module(self, m: nn.Module, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        mark = last_node(self.graph)
        stack = dict(self.module_stack)
        if self.config.trace_compound_nn and type(m) in TRACEABLE_FORWARDS:
            forward = functools.partial(TRACEABLE_FORWARDS[type(m)], m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError as exc:
            if exc.module and not self._can_leaf(m):
                raise
            failure: BaseException = exc
        except Exception as exc:  # noqa: BLE001  (any failure in user code is reported below)
            failure = exc
        return self._fallback(m, name, forward, args, kwargs, mark, stack, failure)

    def _can_leaf(self, m: nn.Module) -> bool:
        return self.config.on_untraceable == "leaf" or self._tries_into(m)

    def _fallback(self, m, name, forward, args, kwargs, mark, stack, failure):
        """Roll the graph back to ``mark`` and call ``m`` as an opaque leaf, or raise."""
        self.module_stack.clear()
        self.module_stack.update(stack)
        location = ""
        if isinstance(failure, TraceError):
            location, reason = failure.location, str(failure)
        else:
            frame = _user_frame(failure.__traceback__)
            if frame is not None:
                location = f"{os.path.relpath(frame.filename)}:{frame.lineno}"
            reason = _describe_failure(failure)
        if not self._can_leaf(m) or not self._rollback(mark):
            if isinstance(failure, TraceError):
                raise failure
            raise _trace_error(name, m, location, reason, failure) from failure
        self._opaque.add(name)
        self.notes.append(TraceNote(name, type(m).__name__, reason, location))
        return super().call_module(m, forward, args, kwargs)

    def _rollback(self, mark: torch.fx.Node) -> bool:
        """Erase the nodes created after ``mark``; False if one escaped (has outside users)."""
        created = []
        node = last_node(self.graph)
        while node is not mark:
            created.append(node)
            node = node.prev
        doomed = set(created)
        if any(user not in doomed for n in created for user in n.users):
            return False
        for node in created:  # newest first: users before what they use
            if node.op != "get_attr":  # get_attr proxies may be cached; DCE removes them
                self.graph.erase_node(node)
        return True


def _trace_error(name: str, m: nn.Module, location: str, reason: str, exc: BaseException) -> TraceError:
    where = f"module '{name}' ({type(m).__name__})" if name else f"the model's forward ({type(m).__name__})"
    at = f" at {location}" if location else ""
    code = ""
    frame = _user_frame(exc.__traceback__)
    if frame is not None and frame.line:
        code = f": `{frame.line.strip()}`"
    leaf_hint = (
        f"mark it as a leaf (PrepareConfig(leaf_modules=('{name}',)) or leaf_modules=[{type(m).__name__}]), "
        if name else ""
    )
    message = (
        f"cannot trace {where}{at}{code}: {reason}.\n"
        f"Fix: {leaf_hint}pass concrete_args for the input the code branches on, "
        f"or use on_untraceable='leaf' to keep untraceable submodules opaque."
    )
    return TraceError(message, module=name, module_type=type(m).__name__, location=location)


def _module_aliases(root: nn.Module) -> dict[str, list[str]]:
    """For modules registered under several names: first name -> the other names."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if id(module) in first:
            aliases.setdefault(first[id(module)], []).append(name)
        else:
            first[id(module)] = name
    return aliases


_BUILTIN_LEN = builtins.len


def _traced_len(obj):
    """``len`` during tracing: recorded as a call on a traced value (``n = len(x)``), the
    builtin otherwise (``len(self.layers)``)."""
    if isinstance(obj, torch.fx.Proxy):
        return obj.tracer.create_proxy("call_function", _BUILTIN_LEN, (obj,), {})
    return _BUILTIN_LEN(obj)


# Tensor factories torch.fx cannot record when a size is traced (``torch.ones(t, t)``,
# ``torch.full((t, t), 0.0)``: its argument parser rejects the Proxy).
_FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn", "randint", "eye")


def _has_proxy(value) -> bool:
    return tree_any(value, lambda v: isinstance(v, torch.fx.Proxy))


def _traced_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if _has_proxy(a)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        while not isinstance(proxy, torch.fx.Proxy):
            proxy = next(p for p in proxy if _has_proxy(p))
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return factory


@contextlib.contextmanager
def _tracing_builtins():
    """While tracing: ``len`` and the tensor factories record traced sizes."""
    saved = {name: getattr(torch, name) for name in _FACTORIES}
    builtins.len = _traced_len
    for name, fn in saved.items():
        setattr(torch, name, _traced_factory(fn))
    try:
        yield
    finally:
        builtins.len = _BUILTIN_LEN
        for name, fn in saved.items():
            setattr(torch, name, fn)


def trace(model: nn.Module, config: PrepareConfig | None = None) -> tuple[torch.fx.GraphModule, list[TraceNote]]:
    """Trace ``model`` into a GraphModule whose leaves are ``model``'s own module objects.

    Returns the GraphModule and the notes on submodules kept opaque.
    Raises :class:`~qprep.errors.TraceError` with the module, source line and fix.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"qprep prepares torch.nn.Module instances, got {type(model).__name__}")
    config = config or PrepareConfig()
    tracer = QprepTracer(config)
    try:
        # Trace the math path of nn.MultiheadAttention / nn.Transformer* (the fused fast
        # path is one opaque kernel); verification measures the difference to it.
        with mha_fastpath(False), _tracing_builtins():
            graph = tracer.trace(model, concrete_args=config.concrete_args)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001  (a failure in the root forward)
        frame = _user_frame(exc.__traceback__)
        location = f"{os.path.relpath(frame.filename)}:{frame.lineno}" if frame else ""
        raise _trace_error("", model, location, _describe_failure(exc), exc) from exc
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    if gm.graph.eliminate_dead_code(is_impure_node=_is_impure):
        gm.recompile()
    aliases = _module_aliases(model)
    if aliases:
        meta.set_graph_facts(gm, **{meta.MODULE_ALIASES: aliases})
    return gm, tracer.notes


def _is_impure(node: torch.fx.Node) -> bool:
    """Only unused get_attr nodes left by a rollback are dead; every call is kept."""
    return node.op != "get_attr"
