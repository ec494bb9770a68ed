"""qprep's tracer: torch.fx, value-aware, with guards, source lines and clear errors.

Differences from ``torch.fx.symbolic_trace``:

* **Example values.** With example inputs, every node carries its example's value
  (:mod:`.values`: meta tensors in ``node.meta["val"]``, ``["tensor_meta"]``). Values stay
  symbolic in the graph (``x.view(x.size(0), -1)`` works at any batch size); where Python
  needs a concrete one (``if``, ``bool()``, ``int()``, ``range()``, ``len()``, iteration,
  indexing a list, ``math.sqrt``), the example's value is used and a **guard** is recorded
  (:mod:`.guards`), checked when the prepared model runs. A branch on tensor *data*
  (``if x.sum() > 0``) is not specialised: it fails with a :class:`~qprep.core.errors.TraceError`
  naming the line, or keeps the module opaque with ``on_untraceable="leaf"``.
* ``y += z`` is recorded as ``operator.iadd`` and ``y[i] = v`` as ``operator.setitem``
  (:mod:`.proxy`); tensor factories with traced sizes (``torch.ones(t, t)``) and random
  factories (``torch.rand(3, 4)``, never a trace-time constant) are recorded as calls;
  ``pack_padded_sequence`` & co are recorded as calls, not traced into; ``len(x)`` in a
  traced ``forward`` stays symbolic.
* Every node records the user's stack trace and module scope; ``torch.nn`` leaf modules
  and qprep's own modules (by type) are leaves; compound ``torch.nn`` modules are traced
  into when possible and kept opaque, with a note, when not.
* Patching is scoped: names are shadowed through torch.fx's patcher for the length of one
  trace, and every patched function, module call and attribute read behaves as torch's own
  in any thread but the tracing one. Traces run one at a time (a lock), because torch.fx
  patches ``nn.Module.__call__`` for the whole process while it traces.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import dis
import functools
import importlib
import inspect
import linecache
import operator
import os
import sys
import threading
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.utils.rnn as rnn_utils
from torch.fx.node import map_aggregate

from ..core import meta
from ..core._compat import (
    apply_autograd_function, enter_autocast, exit_autocast, graph_module, last_node, mha_fastpath, new_patcher,
    patch_class_attribute, set_grad_enabled, switch_grad_mode, wrapped_function_registry,
)
from ..core.config import PrepareConfig
from ..core.errors import InputError, TraceError
from ..core.guards import CONVERSIONS, Guard, check_guard, update_buffer
from ..core.graph import constants_out_of_state
from ..core.provenance import location_text
from ..core.records import TraceNote
from ..core.runtime import plain_object, python_draw, rebuild_object, structure_kept
from ..core.template import tree_any
from ..modules import MODULE_TYPES
from .blocks import Blocks
from .compound import COMPOUND_NN, TRACEABLE_FORWARDS
from .guards import GuardRecorder, describe, insert_guards, is_metadata_read, module_output, reads_metadata_only
from .integrations import runtime_classes
from .proxy import QprepAttribute, QprepProxy
from .values import UNKNOWN, Values, value_of

__all__ = ["QprepTracer", "QprepProxy", "trace", "TraceNote", "Traced"]

_QPREP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_LIBRARY_DIRS = (os.path.join(_TORCH_DIR, ""), os.path.join(_QPREP_DIR, ""))  # code that is not the model's


def _library_code(filename: str) -> bool:
    """Whether ``filename`` is torch's or qprep's code, not the model's."""
    return os.path.abspath(filename).startswith(_LIBRARY_DIRS)
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
    os.path.join(_TORCH_DIR, "utils", "_contextlib.py"),
)
_EXAMPLES = os.path.join(_QPREP_DIR, "examples.py")

@functools.cache
def _import_lazy_torch_modules() -> None:
    """Import, before the first trace patches ``torch.ones``/``torch.finfo``/..., the torch
    modules that torch imports lazily and that keep torch's functions and classes in tables
    when they are imported: torch._dynamo (any ``torch._disable_dynamo`` function imports it on
    its first call, e.g. a meta kernel that computes an example value). Imported during a
    trace, it kept qprep's stand-in for ``torch.finfo`` as a type, and every later
    ``torch.compile``/``torch.export`` in the process failed (seen on torch 2.13)."""
    importlib.import_module("torch._dynamo")


# Containers: never leaves.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: Tensor factories recorded as calls when a size is traced (``torch.ones(t, t)``), and the
#: dtype queries code applies to a traced dtype (``torch.finfo(x.dtype).min``).
FACTORIES = ("ones", "zeros", "empty", "full", "eye", "arange", "linspace", "logspace", "tensor", "as_tensor",
             "scalar_tensor", "empty_strided", "tril_indices", "triu_indices", "finfo", "iinfo")
#: Random factories: always recorded as calls, so each run draws its own numbers.
RANDOM_FACTORIES = ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
                    "rand_like", "randn_like", "randint_like")
#: Functions recorded as one call instead of being traced into.
PACKING = (rnn_utils.pack_padded_sequence, rnn_utils.pad_packed_sequence, rnn_utils.pack_sequence,
           rnn_utils.pad_sequence, rnn_utils.unpack_sequence, rnn_utils.unpad_sequence)

# torch.fx patches nn.Module.__call__ for the whole process while it traces: one trace at a time.
_TRACE_LOCK = threading.RLock()


class ConcreteValueError(Exception):
    """Python needed a concrete value the tracer cannot give (unknown, or tensor data)."""


class StatefulForwardError(ConcreteValueError):
    """``forward`` keeps state between calls or draws from a generator outside torch: no
    graph reproduces it, whatever the inputs (so no ``concrete_args`` would help)."""


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is user code (not torch, not qprep)."""
    frames = traceback.extract_tb(tb)
    for skip in (_LIBRARY_DIRS, _SKIP_FRAMES):
        for frame in reversed(frames):
            path = os.path.abspath(frame.filename)
            if not path.startswith(skip) or path == _EXAMPLES:
                return frame
    return frames[-1] if frames else None


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ConcreteValueError):
        return text
    if "control flow" in text or "cannot be iterated" in text or "len' is not supported" in text:
        return f"data-dependent Python control flow on a traced value ({text})"
    return f"{type(exc).__name__}: {text}"


_SKIPPED: dict[str, bool] = {}  # file name -> whether its frames are left out (asked per node, per frame)


def _user_frames(depth: int) -> list[tuple[str, int, str]]:
    frames = []
    frame = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        skipped = _SKIPPED.get(filename)
        if skipped is None:
            skipped = _SKIPPED[filename] = filename.startswith(_SKIP_FRAMES) and filename != _EXAMPLES
        if not skipped:
            frames.append((filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    frames.reverse()
    return frames


def _stack_text(depth: int) -> str:
    """The user's stack at node creation, formatted as fx formats ``node.stack_trace``,
    from the first ``forward`` frame on, without torch.fx's and qprep's own frames.

    Walking frames directly costs a fraction of ``traceback`` extraction per node."""
    frames = _user_frames(depth + 1)
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


def _here(depth: int) -> tuple[str, str]:
    """``(file:line, code)`` of the innermost user frame outside torch and qprep."""
    frames = _user_frames(depth + 1)
    for filename, lineno, _ in reversed(frames):
        if not os.path.abspath(filename).startswith(os.path.join(_TORCH_DIR, "")):
            return location_text(filename, lineno), linecache.getline(filename, lineno).strip()
    if frames:
        filename, lineno, _ = frames[-1]
        return location_text(filename, lineno), linecache.getline(filename, lineno).strip()
    return "", ""


class QprepTracer(torch.fx.Tracer):
    """The tracer :func:`trace` uses; see the module docstring.

    Args:
        config: the preparation's config (leaves, ``on_untraceable``, compound modules).
        examples: forward parameter name -> example value (``*args``/``**kwargs`` by their
            names); ``None`` traces purely symbolically.
    """

    def __init__(self, config: PrepareConfig | None = None, examples: dict[str, Any] | None = None):
        # PACKING: also where a traced module imported them by name (fx patches its globals)
        super().__init__(autowrap_functions=PACKING, param_shapes_constant=False)
        self.proxy_buffer_attributes = True  # buffers are graph values: `self.ids[:, :n]` traces
        self.config = config or PrepareConfig()
        self.examples = examples
        self.notes: list[TraceNote] = []
        self._cached: list[tuple[dict, str, Any]] = []  # attributes (or buffers) set to traced caches
        self.state_changes: list[StateChange] = []  # plain attributes forward gave a new value
        self._parsed: list = []  # index reads that may be torch's argument parser's (_drop_parsed_guards)
        self.guards = GuardRecorder()
        self.values: Values | None = None
        self._leaf_types = tuple(t for t in self.config.leaf_modules if isinstance(t, type))
        self._leaf_names = frozenset(n for n in self.config.leaf_modules if isinstance(n, str))
        self._opaque: set[str] = set()
        self._regrouped: set[nn.Module] = set()  # containers made in forward of installed modules
        self._thread = threading.get_ident()
        self._evaluating = 0
        self._patcher = None
        self._tensor_names: dict[int, str] | None = None
        self._unbound: set[str] = set()  # torch.Tensor methods patched for unbound calls
        self._shadows: tuple | None = None  # the len / isinstance that namespaces get for this trace
        self.blocks: Blocks | None = None  # repeated blocks replayed (config.dedup), while tracing
        self.replayed: tuple = ()  # ... and, after the trace, the calls it replayed

    # -- who is tracing ----------------------------------------------------------------
    def recording(self) -> bool:
        """Whether the current call belongs to this trace: the tracing thread, not
        evaluating an example value."""
        return not self._evaluating and threading.get_ident() == self._thread

    @contextlib.contextmanager
    def passthrough(self) -> Iterator[None]:
        """Module calls, attribute reads and patched functions run as plain Python."""
        self._evaluating += 1
        try:
            yield
        finally:
            self._evaluating -= 1

    # -- tracing -------------------------------------------------------------------------
    def trace(self, root, concrete_args=None) -> torch.fx.Graph:
        _import_lazy_torch_modules()
        with _TRACE_LOCK, new_patcher() as patcher, mha_fastpath(False):
            # The math path of nn.MultiheadAttention / nn.Transformer* is traced (the fused
            # fast path is one opaque kernel); verification measures the difference to it.
            self._patcher = patcher
            self.values = Values(root, self.examples, self.passthrough)
            if self.config.dedup and self.examples is not None and isinstance(root, nn.Module):
                self.blocks = Blocks(self, root)
            self._install_wrappers(patcher)
            self._shadow_len(getattr(type(root), "forward", None))
            self._shadow_packages(root)
            try:
                with self._tracing_into_wrapped_functions(patcher), self._runtime_construction():
                    return super().trace(root, concrete_args)
            finally:
                self._patcher = None
                self._restore_cached()
                if self.blocks is not None:  # the recordings hold the graph: not kept past the trace
                    self.replayed, self.blocks = tuple(self.blocks.replayed), None

    @contextlib.contextmanager
    def _runtime_construction(self) -> Iterator[None]:
        """Classes whose objects ``forward`` creates and updates (a Hugging Face KV cache) are
        made when the prepared model runs: for this trace, the names that refer to them in the
        library's modules refer to a stand-in whose construction is recorded as a call, and
        which ``isinstance`` and ``issubclass`` treat as the class itself. (Patching the
        class's own ``__new__`` cannot be undone cleanly in CPython.)"""
        bases = runtime_classes()
        if bases:
            stand_ins: dict[type, type] = {}
            for module in list(sys.modules.values()):
                namespace = getattr(module, "__dict__", None)
                if not isinstance(namespace, dict) or not str(namespace.get("__name__", "")).startswith(
                        tuple(b.__module__.split(".")[0] + "." for b in bases)):
                    continue
                for name, value in list(namespace.items()):
                    if isinstance(value, type) and issubclass(value, bases) and not name.startswith("__"):
                        if value not in stand_ins:
                            stand_ins[value] = self._recorded_class(value)
                        self._patcher.patch(namespace, name, stand_ins[value])
        yield

    def _install_wrappers(self, patcher) -> None:
        patcher.patch_method(nn.Module, "__setattr__", self._module_setattr(nn.Module.__setattr__), deduplicate=False)
        for name in FACTORIES + RANDOM_FACTORIES:
            fn = getattr(torch, name, None)
            if fn is not None:
                patcher.patch(torch.__dict__, name, self._recorded(fn, always=name in RANDOM_FACTORIES))
        for fn in PACKING:
            patcher.patch(rnn_utils.__dict__, fn.__name__, self._recorded(fn, always=False))
        patcher.patch(torch._C.__dict__, "_set_grad_enabled", self._grad_mode(set_grad_enabled))  # noqa: SLF001
        self._install_grad_scopes(patcher)
        self._install_autocast(patcher)
        for name in ("is_grad_enabled", "is_autocast_enabled"):
            patcher.patch(torch.__dict__, name, self._mode_read(getattr(torch, name)))
        patch_class_attribute(patcher, torch.autograd.Function, "apply", classmethod(self._function_apply()))
        patcher.patch(builtins.__dict__, "callable", self._callable(builtins.callable))
        patcher.patch(torch.__dict__, "is_tensor", lambda obj: self.isinstance_of(obj, torch.Tensor, 2))
        self._install_python_rng(patcher)
        # `torch._check_with(ValueError, cond, msg)` on a traced condition (transformers 5's
        # torch_compilable_check): recorded as the same check, raised where the original raises
        for name in ("_check", "_check_with", "_check_tensor_all", "_check_tensor_all_with"):
            if hasattr(torch, name):
                patcher.patch(torch.__dict__, name, self._recorded(getattr(torch, name), always=False))

    def _install_python_rng(self, patcher) -> None:
        """A draw from Python's or NumPy's global random generator in a traced ``forward`` is
        recorded as a call (:func:`~qprep.core.runtime.python_draw`), made again on every
        call of the prepared model, as torch's generators are. It has no example value: Python
        that needs it (``if random.random() < p``) is refused with the line, since the trace
        would fix the draw; LayerDrop's ``self.training and np.random.uniform(0, 1) < p``
        prepares in eval mode, where the draw is made and not read."""
        for module_name, names in _PYTHON_RNG.items():
            namespace = getattr(sys.modules.get(module_name), "__dict__", None)
            for name in names if namespace is not None else ():
                if callable(namespace.get(name)):
                    patcher.patch(namespace, name, self._recorded_draw(namespace[name], module_name, name))

    def _recorded_draw(self, original, module_name: str, name: str):
        def draw(*args, **kwargs):
            if self.recording() and not _library_code(sys._getframe(1).f_code.co_filename):  # noqa: SLF001
                return self.create_proxy("call_function", python_draw, (module_name, name, *args), kwargs)
            return original(*args, **kwargs)

        return draw

    def _callable(self, original):
        """``callable(x)`` of a traced value gives the example's answer (a Proxy is callable,
        so ``cond = cond() if callable(cond) else cond`` called a bool)."""
        def traced_callable(obj):
            if isinstance(obj, torch.fx.Proxy) and self.recording():
                value = value_of(obj.node)
                # a value not known on the example (data-dependent): callable only if it is a
                # method read off a traced value (fx's Attribute proxy)
                return original(value) if value is not UNKNOWN else isinstance(obj, torch.fx.proxy.Attribute)
            return original(obj)

        return traced_callable

    def _function_apply(self):
        """``MyFunction.apply(x)`` of a user's ``torch.autograd.Function`` on traced values is
        recorded as one call (:func:`apply_autograd_function`), not traced into: tracing into
        its ``forward`` would drop its ``backward`` (a straight-through estimator's gradient).
        torch's own Functions (checkpointing) are traced into as before."""
        descriptor = torch.autograd.Function.__dict__["apply"]

        def apply(cls, *args, **kwargs):
            if self.recording() and not cls.__module__.startswith("torch.") \
                    and tree_any((args, kwargs), _is_proxy):
                return self.create_proxy("call_function", apply_autograd_function, (cls, *args), kwargs)
            return descriptor.__get__(None, cls)(*args, **kwargs)

        return apply

    def _mode_read(self, original):
        """``torch.is_grad_enabled()`` / ``torch.is_autocast_enabled(device_type)`` read by
        the model's own code answer the trace's mode and guard it: a prepared model called in
        another mode is refused, as the code may have branched on it (Hugging Face's
        ``maybe_autocast``). A traced argument (``x.device.type``) is the example's, guarded.
        torch's own reads (kernel choices, such as the attention fast path) are not guarded."""
        def read(*args):
            if not self.recording() or _library_code(sys._getframe(1).f_code.co_filename):  # noqa: SLF001
                return original(*args)
            args = tuple(self.concrete(a, "value") if isinstance(a, torch.fx.Proxy) else a for a in args)
            mode = original(*args)
            node = self.create_proxy("call_function", original, args, {}).node
            location, code = _here(1)
            self.guards.record(node, "value", mode, location, code)
            return mode

        return read

    def _grad_mode(self, original):
        """``with torch.no_grad():`` in a traced ``forward`` switches grad mode when the
        prepared model runs too: the switch is recorded (and made, for the example values)."""
        def switch(mode):
            if self.recording():
                self.create_proxy("call_function", original, (bool(mode),), {})
            return original(mode)

        return switch

    def _install_grad_scopes(self, patcher) -> None:
        """``with torch.no_grad():`` / ``enable_grad()`` / ``set_grad_enabled(m)`` in a traced
        ``forward``: entering records :func:`switch_grad_mode`, which returns the mode of the
        call, and leaving restores that (not the mode the trace ran in, which a prepared model
        called under ``torch.no_grad()`` would otherwise switch back on)."""
        tracer = self

        def enter_with(cls, mode):
            enter = cls.__enter__

            def __enter__(ctx):
                if not tracer.recording():
                    return enter(ctx)
                ctx.prev = torch.is_grad_enabled()
                ctx._qprep_previous = tracer.create_proxy("call_function", switch_grad_mode, (mode,), {})
                set_grad_enabled(mode)
                return None

            patcher.patch_method(cls, "__enter__", __enter__, deduplicate=False)

        def restoring_exit(cls):
            exit_ = cls.__exit__

            def __exit__(ctx, *exc_info):
                previous = ctx.__dict__.pop("_qprep_previous", None)
                if previous is None or not tracer.recording():
                    return exit_(ctx, *exc_info)
                tracer.create_proxy("call_function", set_grad_enabled, (previous,), {})
                set_grad_enabled(ctx.prev)
                return None

            patcher.patch_method(cls, "__exit__", __exit__, deduplicate=False)

        init = torch.set_grad_enabled.__init__

        def __init__(ctx, mode):  # set_grad_enabled switches when made, with or without a `with`
            if not tracer.recording():
                return init(ctx, mode)
            ctx.prev, ctx.mode = torch.is_grad_enabled(), mode
            ctx._qprep_previous = tracer.create_proxy("call_function", switch_grad_mode, (bool(mode),), {})
            set_grad_enabled(mode)
            return None

        enter_with(torch.no_grad, False)
        enter_with(torch.enable_grad, True)
        patcher.patch_method(torch.set_grad_enabled, "__init__", __init__, deduplicate=False)
        for cls in (torch.no_grad, torch.enable_grad, torch.set_grad_enabled):
            restoring_exit(cls)

    def _install_autocast(self, patcher) -> None:
        """``with torch.autocast(...)`` in a traced ``forward`` is recorded as torch's own
        ``_enter_autocast``/``_exit_autocast`` calls (as torch.export records it), its
        arguments read from the example with guards."""
        tracer = self
        autocast, autocast_init = torch.autocast, torch.autocast.__init__
        autocast_enter, autocast_exit = torch.autocast.__enter__, torch.autocast.__exit__

        def autocast_init_(ctx, device_type, dtype=None, enabled=True, cache_enabled=None):
            # `torch.autocast(device_type=x.device.type)`: the example's values, with guards
            values = [device_type, dtype, enabled, cache_enabled]
            if tracer.recording():
                values = [tracer.concrete(v, "value") if isinstance(v, torch.fx.Proxy) else v for v in values]
                ctx._qprep_values = tuple(values)
            return autocast_init(ctx, *values)

        def autocast_enter_(ctx):
            values = ctx.__dict__.get("_qprep_values")
            if values is not None and tracer.recording():
                ctx._qprep_mode = tracer.create_proxy("call_function", enter_autocast, values, {})
            return autocast_enter(ctx)

        def autocast_exit_(ctx, *exc_info):
            mode = ctx.__dict__.pop("_qprep_mode", None)
            if mode is not None and tracer.recording():
                tracer.create_proxy("call_function", exit_autocast, (mode,), {})
            return autocast_exit(ctx, *exc_info)

        patcher.patch_method(autocast, "__init__", autocast_init_, deduplicate=False)
        patcher.patch_method(autocast, "__enter__", autocast_enter_, deduplicate=False)
        patcher.patch_method(autocast, "__exit__", autocast_exit_, deduplicate=False)

    def _module_setattr(self, original):
        """``self.x = <traced value>`` in a traced ``forward``: state the prepared graph cannot
        hold (it has no assignments), so it is refused with the line, unless it re-binds a
        buffer to the result of its own in-place update (``self.steps += 1``: the same tensor,
        updated in place, which the graph records)."""
        tracer = self

        def setattr_(module, name, value):
            if tracer.recording() and (isinstance(value, torch.fx.Proxy) or _proxies_in(value)):
                # a traced value, or a container of them (AnchorGenerator's `self.cell_anchors = [...]`)
                if isinstance(value, torch.fx.Proxy) and tracer._updates_in_place(module, name, value):
                    return
                if tracer._caches(module, name, value):
                    return
                if tracer._rebinds_buffer(module, name, value):
                    return
                raise StatefulForwardError(
                    f"forward assigns a traced value to {type(module).__name__}.{name}: a prepared graph "
                    f"holds no state between calls; update a buffer in place (self.{name}.copy_(...)) or keep "
                    f"the module a leaf")
            if tracer.recording() and _changes_plain_state(module, name, value, sys._getframe(1)):  # noqa: SLF001
                try:
                    path = tracer.path_of_module(module)
                except NameError:  # a module forward makes (BigBird's new attention): its own __init__ writing
                    path = None
                if path is not None:
                    location, code = _here(1)
                    tracer.state_changes.append(
                        StateChange(module, path, name, vars(module).get(name, _MISSING), value, location, code))
            original(module, name, value)

        return setattr_

    def _rebinds_buffer(self, module: nn.Module, name: str, value: Any) -> bool:
        """``self.ema = self.ema * 0.9 + m * 0.1`` re-binds a buffer to a new tensor of its
        shape, dtype and device that needs no gradient: recorded as an in-place update
        (:func:`~qprep.core.guards.update_buffer`), so the buffer holds the new values after
        each call, as the original's does (the buffer
        stays the same tensor object, updated in place, where the original's is a new one;
        :func:`update_buffer` refuses a call whose new value would not fit)."""
        old = module._buffers.get(name) if isinstance(value, torch.fx.Proxy) else None  # noqa: SLF001
        new = value_of(value.node) if old is not None else None
        if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype \
                or new.requires_grad or old.requires_grad or self.values is None \
                or self.values.device(new) != old.device:
            return False
        buffer = getattr(module, name)  # the buffer's get_attr node
        if not isinstance(buffer, torch.fx.Proxy):
            return False
        path = self.path_of_module(module)
        location = _here(2)[0]
        self.create_proxy("call_function", update_buffer, (buffer, value, f"{path + '.' if path else ''}{name}",
                                                            location), {})
        self.notes.append(TraceNote(
            "", type(module).__name__,
            f"self.{path + '.' if path else ''}{name} is re-bound to a new tensor of its shape and dtype: the "
            "prepared model updates the buffer in place", location))
        return True

    def _caches(self, module: nn.Module, name: str, value: Any) -> bool:
        """``self.rel_indices = self.get_rel_indices(N)``: a plain attribute (or a buffer kept
        out of the state_dict) set to a value
        computed from nothing but the inputs' shapes and constants (no input data, no
        Parameter or buffer, no random draw) is a cache of a pure function of what the
        prepared graph has at every call, so the graph recomputes it instead. For the rest
        of this trace the attribute is the traced value; the module gets its own back after."""
        persistent = name in module._buffers and name not in module._non_persistent_buffers_set  # noqa: SLF001
        if persistent or name in module._parameters or name in module._modules:  # noqa: SLF001
            return False  # a persistent buffer's new value would be in the original's state_dict
        if not isinstance(value, torch.fx.Proxy) and name in module._buffers:  # noqa: SLF001
            return False
        if not all(_from_shapes_and_constants(p.node, self._is_constant_attribute) for p in _proxies_in(value)):
            return False
        where = module._buffers if name in module._buffers else vars(module)  # noqa: SLF001
        self._cached.append((where, name, where.get(name, _MISSING)))
        where[name] = value
        path = self.path_of_module(module)
        self.notes.append(TraceNote(
            "", type(module).__name__,
            f"self.{path + '.' if path else ''}{name} caches a value computed from input shapes and constants: "
            "the prepared model recomputes it on every call", _here(1)[0]))
        return True

    def _owner_of(self, target: str) -> tuple[nn.Module | None, str]:
        """The module holding the ``get_attr`` target (the module itself, not its proxy), and
        the attribute's name in it; ``None`` when there is no such module."""
        owner_path, _, name = target.rpartition(".")
        with self.passthrough():
            try:
                return self.root.get_submodule(owner_path), name
            except AttributeError:
                return None, name

    def _is_constant_attribute(self, target: str) -> bool:
        """Whether the ``get_attr`` target is a plain tensor attribute (``Detect.stride =
        torch.tensor([8., 16., 32.])``): neither a Parameter nor a buffer, so no optimizer
        step or ``load_state_dict`` changes it between calls."""
        owner, name = self._owner_of(target)
        return owner is not None and isinstance(vars(owner).get(name), torch.Tensor)

    def _restore_cached(self) -> None:
        while self._cached:
            where, name, old = self._cached.pop()
            if old is _MISSING:
                where.pop(name, None)
            else:
                where[name] = old

    def _updates_in_place(self, module: nn.Module, name: str, value: torch.fx.Proxy) -> bool:
        node = value.node
        if name not in module._buffers and name not in module._parameters:  # noqa: SLF001
            return False
        path = self.path_of_module(module)
        qualified = f"{path}.{name}" if path else name
        first = node.args[0] if node.args else None
        return _mutates_first_argument(node) and isinstance(first, torch.fx.Node) and first.op == "get_attr" \
            and first.target == qualified

    def _recorded_class(self, real: type) -> type:
        tracer = self

        class Meta(type(real)):
            def __instancecheck__(cls, obj):
                return isinstance(obj, real)

            def __subclasscheck__(cls, sub):
                return issubclass(sub, real)

        def new(klass, *args, **kwargs):
            if tracer.recording():
                return tracer.create_proxy("call_function", real, args, kwargs)
            return real(*args, **kwargs)  # not an instance of the stand-in: __init__ does not run again

        return Meta(real.__name__, (real,), {"__new__": new, "__module__": real.__module__,
                                            "__qualname__": real.__qualname__})


    @contextlib.contextmanager
    def _tracing_into_wrapped_functions(self, patcher) -> Iterator[None]:
        """Functions registered with ``torch.fx.wrap`` (torchvision's
        ``shifted_window_attention``, a user's helper) are traced into when the example's
        values make them traceable, so their ops are prepared too; a function that still
        cannot be traced is rolled back and recorded as one call (the passes keep it whole
        in a ``Functional`` module). fx's own registry is set aside for this trace, so fx
        does not record them as calls first."""
        registry = wrapped_function_registry()
        saved = dict(registry)
        ours = {key: namespace for key, namespace in saved.items() if not _own(namespace.get(key[1]))}
        for key in ours:
            del registry[key]
        try:
            for (_, name), namespace in ours.items():
                fn = namespace.get(name, getattr(builtins, name, None))
                if callable(fn):
                    patcher.patch(namespace, name, self._traced_into(fn))
            yield
        finally:
            registry.clear()
            registry.update(saved)

    def _traced_into(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not (self.recording() and tree_any((args, kwargs), _is_proxy)):
                return fn(*args, **kwargs)
            mark, guards, stack = last_node(self.graph), self.guards.mark(), dict(self.module_stack)
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (cannot be traced into: kept as one call)
                self.module_stack.clear()
                self.module_stack.update(stack)
                if not self._rollback(mark, guards):
                    raise
                frame = _user_frame(exc.__traceback__)
                self.notes.append(TraceNote(
                    getattr(fn, "__qualname__", str(fn)), "function", f"kept whole: {_describe_failure(exc)}",
                    location_text(frame.filename, frame.lineno) if frame else ""))
                return self.create_proxy("call_function", fn, args, kwargs)

        return wrapper

    def _recorded(self, fn, always: bool):
        """``fn`` recorded as a call node when the tracing thread calls it with a traced
        argument (or always, for random factories); torch's own ``fn`` otherwise."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.recording() and (always or tree_any((args, kwargs), _is_proxy)):
                return self.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return wrapper

    def isinstance_of(self, obj: Any, classinfo: Any, depth: int) -> bool:
        """``isinstance(x, torch.Tensor)`` (or ``torch.is_tensor(x)``) of a traced value: the
        example's answer (a Proxy is no Tensor, so the trace took the other branch before).
        Only an input's type can differ between calls (the graph fixes the rest):
        ``isinstance(input, torch.Tensor)`` is guarded, at the caller ``depth`` frames up."""
        if not (isinstance(obj, torch.fx.Proxy) and self.recording()) or builtins.isinstance(obj, classinfo):
            return builtins.isinstance(obj, classinfo)  # `isinstance(x, torch.fx.Proxy)`: code asks if it is traced
        value = value_of(obj.node)
        if value is UNKNOWN:
            return builtins.isinstance(obj, classinfo)
        answer = builtins.isinstance(value, classinfo)
        if obj.node.op == "placeholder" and classinfo is torch.Tensor:
            location, code = _here(depth)
            self.guards.record(obj.node, "is_tensor", answer, location, code)
        return answer

    def _shadow_len(self, fn) -> None:
        """``len(x)`` of a traced value in ``fn``'s module stays symbolic, and ``isinstance(x,
        ...)`` gives the example's answer with a guard: both are shadowed in that module's
        globals for this trace, and so are its TorchScript functions (recorded as calls)."""
        namespace = getattr(fn, "__globals__", None)
        if namespace is not None:
            self._shadow_namespace(namespace)
            self._unbound_tensor_methods(fn, namespace)

    def _unbound_tensor_methods(self, fn, namespace: dict) -> None:
        """``torch.Tensor.add(x, y)`` in ``fn``: torch's C method rejects a proxy, so for this
        trace each such name on ``torch.Tensor`` is a function that records the method call
        (``x.add(y)``) for a traced value and calls torch's method on anything else."""
        code = getattr(fn, "__code__", None)
        if code is None or self._patcher is None:
            return
        for name in _unbound_method_names(code, namespace):
            if name not in self._unbound:
                self._unbound.add(name)
                patch_class_attribute(self._patcher, torch.Tensor, name, self._unbound_method(name))

    def _unbound_method(self, name: str):
        original = getattr(torch.Tensor, name)

        def method(receiver, *args, **kwargs):
            if isinstance(receiver, torch.fx.Proxy) and self.recording():
                return getattr(receiver, name)(*args, **kwargs)
            return original(receiver, *args, **kwargs)

        method.__name__ = name
        return method

    def _shadow_packages(self, root: nn.Module) -> None:
        """:meth:`_shadow_len` for every loaded module of the packages the model's classes
        come from (not torch's, not qprep's): helpers that are no ``forward``, such as
        torchvision's ``BoxCoder.decode`` asserting ``isinstance(rel_codes, torch.Tensor)``,
        see traced values too."""
        packages = {type(m).__module__.split(".")[0] for m in root.modules()}
        packages |= {type(v).__module__.split(".")[0] for m in root.modules() for v in vars(m).values()
                     if plain_object(v)}
        packages -= {"torch", "qprep", "builtins"}
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] in packages and isinstance(getattr(module, "__dict__", None), dict):
                self._shadow_namespace(module.__dict__, script_functions=False)

    def _shadow_namespace(self, namespace: dict, script_functions: bool = True) -> None:
        if self._patcher is None or not self._patcher.visit_once(namespace):
            return
        if self._shadows is None:  # one pair of functions for every namespace of this trace
            def traced_len(obj):
                if isinstance(obj, torch.fx.Proxy) and self.recording():
                    return self.create_proxy("call_function", builtins.len, (obj,), {})
                return builtins.len(obj)

            def traced_isinstance(obj, classinfo):
                return self.isinstance_of(obj, classinfo, 2)

            self._shadows = (traced_len, traced_isinstance)
        self._patcher.patch(namespace, "len", self._shadows[0])
        self._patcher.patch(namespace, "isinstance", self._shadows[1])
        if script_functions:  # `@torch.jit.script` functions cannot take a Proxy: each is recorded as one call
            for name, value in list(namespace.items()):
                if isinstance(value, torch.jit.ScriptFunction):
                    self._patcher.patch(namespace, name, self._recorded(value, always=False))

    # -- the root's arguments -------------------------------------------------------------
    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """One placeholder per parameter of ``forward``'s signature (``inspect.signature``
        follows ``functools.wraps``, so a decorated ``forward(*args, **kwargs)`` wrapper, as
        Hugging Face's are, shows its real parameters), and a call of ``forward`` by
        keyword. A parameter fixed at trace time (``concrete_args``, or a default the
        example leaves out) keeps its placeholder, with the signature's default, and a guard:
        a call that passes, or defaults to, another value is refused."""
        if not is_module:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        root = self.root
        fixed = dict(concrete_args or {})
        positional, keywords, star, starstar = [], {}, None, None
        parameters = list(inspect.signature(root.forward).parameters.values())
        # Placeholders are the generated forward's parameters, so Python's rules hold: once one
        # has a default, a later one without (an object default the code cannot write) must
        # be keyword-only, and so must those after an argument fixed to an object (no
        # placeholder any more), or a positional call would bind them one place off. A `*name`
        # placeholder that must stay empty starts the keyword-only ones.
        open_star = not any(p.kind == p.VAR_POSITIONAL for p in parameters)
        defaulted = False

        def keyword_only_from(name: str, why: str) -> None:
            nonlocal open_star
            if open_star:
                open_star = False
                rest = self.create_proxy("placeholder", f"*{name}", (), {}).node
                self.guards.record(rest, "len", 0, why, "")

        for p in parameters:
            if p.kind == p.VAR_POSITIONAL:
                star = self.create_proxy("placeholder", f"*{p.name}", (), {})
            elif p.kind == p.VAR_KEYWORD:  # its keys are guarded: another keyword is refused, not ignored
                starstar = self._keyword_arguments(self.create_proxy("placeholder", f"**{p.name}", (), {}))
            elif p.name in fixed and not _simple_constant(fixed[p.name]):
                keywords[p.name] = fixed[p.name]  # a tensor or an object: not an argument any more
                if p.kind != p.KEYWORD_ONLY:
                    keyword_only_from(p.name, f"`{p.name}` was fixed at trace time; pass the arguments after it by keyword")
            else:
                default = _default_of(p)
                if p.kind == p.KEYWORD_ONLY:
                    keyword_only_from(f"before_{p.name}", f"`{p.name}` and the arguments after it are keyword-only")
                if defaulted and not default and p.kind != p.KEYWORD_ONLY:
                    keyword_only_from(f"before_{p.name}", f"`{p.name}` and the arguments after it are keyword-only")
                defaulted = defaulted or bool(default)
                if p.name in fixed:
                    keywords[p.name] = self._fixed_placeholder(p.name, fixed[p.name], default)
                    continue
                value = self.create_proxy("placeholder", p.name, default, {})
                if p.kind == p.POSITIONAL_ONLY:
                    positional.append(value)
                else:
                    keywords[p.name] = value
        forward = type(root).forward

        def call(*_):
            return forward(root, *positional, *(star if star is not None else ()), **keywords,
                           **(starstar if starstar is not None else {}))

        return call, []

    def _keyword_arguments(self, starstar: torch.fx.Proxy) -> Any:
        """The ``**kwargs`` a traced ``forward`` gets: its example's keys, guarded; a flag or
        other plain constant (Hugging Face's ``output_hidden_states=True``) as itself, fixed
        at trace time and guarded (library code tests it with ``isinstance``); a tensor as a
        traced value. Without an example, the placeholder as it is."""
        example = value_of(starstar.node)
        if not isinstance(example, dict) or not example:
            return starstar
        self.guards.record(starstar.node, "keys", tuple(example), "", "")
        out = {}
        for key, value in example.items():
            item = self.create_proxy("call_function", operator.getitem, (starstar, key), {})
            if _simple_constant(value):
                self.guards.record(item.node, "value", value, "argument fixed at trace time", "")
                out[key] = value
            else:
                out[key] = item
        return out

    def _fixed_placeholder(self, name: str, value: Any, default: tuple) -> Any:
        """The placeholder of an argument fixed to ``value`` (``default``: ``()`` or the
        signature's default, in a tuple); returns ``value`` itself."""
        node = self.create_proxy("placeholder", name, default, {}).node
        how = "is_none" if value is None else "value"
        self.guards.record(node, how, True if value is None else value, "argument fixed at trace time", "")
        return value

    # -- proxies, nodes, values ---------------------------------------------------------
    def proxy(self, node: torch.fx.Node) -> QprepProxy:
        return QprepProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output", "get_attr"):
            node.meta[meta.STACK_TRACE] = _stack_text(2)
        if self.values is not None and kind != "output":
            self.values.record(node)
        return node

    def replay_node(self, kind, target, args, kwargs, type_expr, node_meta: dict) -> torch.fx.Node:
        """A node replayed from another call's recording (:mod:`.blocks`), with its meta."""
        node = torch.fx.Tracer.create_node(self, kind, target, args, kwargs, None, type_expr)
        node.meta.update(node_meta)
        if self.values is not None:
            self.values.record(node)
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if self._parsed:
            self._drop_parsed_guards(args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if value_of(node) is None and _reads(node):
            location, code = _here(2)
            self.guards.record(node, "is_none", True, location, code)
            return None  # `if out.attentions is not None:` sees the example's None
        return proxy

    def create_arg(self, a: Any):
        if isinstance(a, torch.fx.Proxy):
            return a.node
        if isinstance(a, dict) and hasattr(a, "to_tuple") and type(a) is not dict:  # a Hugging Face ModelOutput
            fields = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        if type(a) is collections.OrderedDict:  # torchvision's segmentation models return one
            return self.create_node("call_function", collections.OrderedDict, (self.create_arg(dict(a)),), {})
        if plain_object(a) and not dataclasses.is_dataclass(a) and type(vars(a)) is dict \
                and tree_any(list(vars(a).values()), _is_proxy):
            # an object of a user's class holding traced values (torchvision's ImageList): made
            # again from its attributes when the graph runs, not kept as a constant of proxies
            cls = self._constant(type(a))  # a class is no literal the generated code can write
            return self.create_node("call_function", rebuild_object, (cls, self.create_arg(dict(vars(a)))), {})
        if dataclasses.is_dataclass(a) and not isinstance(a, type) and not tree_any(
                [getattr(a, f.name, None) for f in dataclasses.fields(a)], _is_proxy):
            return self._constant(a)  # a config object passed along: a constant, not rebuilt per call
        try:
            return super().create_arg(a)
        except NotImplementedError:  # an object fx has no form for: held by the module, read by get_attr
            return self._constant(a)
        except NameError as exc:  # fx: "parameter is not a member of this module"
            raise ConcreteValueError(
                f"a Parameter that is not one of {type(self.root).__name__}'s reaches the graph (another module's, "
                "held in a container or given as an argument); the graph can only read its own") from exc

    def _constant(self, value: Any) -> torch.fx.Node:
        name = self.get_fresh_qualname("_qprep_constant")
        setattr(self.root, name, value)
        return self.create_node("get_attr", name, (), {})

    def attribute(self, proxy: torch.fx.Proxy, name: str) -> Any:
        """``proxy.name``: a method is called later (fx's lazy ``Attribute``); any other
        attribute of a known value is recorded now, so its value is known (and ``None``
        stays ``None``)."""
        value = value_of(proxy.node)
        if value is UNKNOWN or not self.recording():
            return QprepAttribute(proxy, name)
        try:
            with self.passthrough():
                found = getattr(value, name)
        except AttributeError:
            if self._lacks_attribute(proxy.node, value, name):
                raise  # `hasattr(weight, "SCB")` is False, as on the original's tensor
            return QprepAttribute(proxy, name)  # perhaps an example's own attribute: fails when run
        except Exception:  # noqa: BLE001  (not an attribute of the example: traced, and fails when run)
            return QprepAttribute(proxy, name)
        if callable(found) and not isinstance(found, torch.Tensor):
            return QprepAttribute(proxy, name)
        return self.create_proxy("call_function", builtins.getattr, (proxy, name), {})

    def _lacks_attribute(self, node: torch.fx.Node, value: Any, name: str) -> bool:
        """Whether the tensor ``node`` lacks ``name`` when the prepared model runs too: a
        plain tensor an op made (no attributes of its own), or a parameter or buffer whose
        real tensor lacks it (its example is a meta copy without instance attributes)."""
        if type(value) not in (torch.Tensor, nn.Parameter):
            return False
        if node.op == "get_attr":
            owner, field = self._owner_of(node.target)
            with self.passthrough():  # the tensor itself, not its proxy
                real = getattr(owner, field, None)
            return isinstance(real, torch.Tensor) and not hasattr(real, name)
        return node.op in ("call_function", "call_method", "call_module")

    def tensor_name(self, t: torch.Tensor) -> str | None:
        """``t``'s name in the traced model, if it is one of its parameters or buffers (a
        parameter's own name wins over a buffer alias), from a table made once per trace."""
        if self._tensor_names is None:
            self._tensor_names = {}
            for name, tensor in (*self.root.named_buffers(), *self.root.named_parameters()):
                self._tensor_names[id(tensor)] = name
        return self._tensor_names.get(id(t))

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """A parameter or buffer read in a traced ``forward`` is a ``get_attr`` node (one per
        tensor); names are looked up in a table made once (fx scans every parameter per read)."""
        if not self.recording() or not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self.tensor_name(attr_val)
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    # -- where Python needs a concrete value ------------------------------------------
    def concrete(self, proxy: torch.fx.Proxy, how: str) -> Any:
        """The example's value of ``proxy`` read as ``how`` (:data:`CONVERSIONS`), with a guard."""
        value = self._known(proxy, how)
        result = CONVERSIONS[how](value)
        location, code = _here(2)
        added = self.guards.record(proxy.node, how, result, location, code)
        if how == "index" and added:  # perhaps torch's argument parser: see _drop_parsed_guards
            caller = sys._getframe(2)  # noqa: SLF001  (the frame that asked for the index)
            self._parsed.append((caller, caller.f_lasti, proxy.node, result))
        return result

    def _drop_parsed_guards(self, args: Any, kwargs: Any) -> None:
        """``torch.reshape(y, [n, -1])``: torch's argument parser reads ``n.__index__()`` to
        pick an overload, then hands the call, traced size and all, to ``__torch_function__``,
        which records it. The graph computes with ``n``, not with the example's value, so the
        guard that read recorded is dropped: one whose reading frame is still at the
        instruction that made this call, and whose node is an argument of it."""
        pending, self._parsed = self._parsed, []
        nodes: set = set()
        map_aggregate((args, kwargs), lambda v: nodes.add(v.node) if isinstance(v, torch.fx.Proxy) else None)
        for frame, lasti, node, result in pending:
            if frame.f_lasti == lasti and node in nodes:
                self.guards.drop(node, "index", result)

    def _known(self, proxy: torch.fx.Proxy, how: str) -> Any:
        node = proxy.node
        value = value_of(node)
        what = {"bool": "a bool", "index": "an index", "int": "an int", "float": "a float", "len": "a length",
                "keys": "its keys"}.get(how, how)
        if value is UNKNOWN:
            failed = self.values.failed_source(node) if self.values else None
            if failed is not None and failed.target is python_draw:  # no input would help: a new draw per call
                raise StatefulForwardError(
                    f"Python control flow needs {what} from `{describe(node)}`, a draw from "
                    f"{failed.args[0]}.{failed.args[1]}() that the prepared model makes anew on every call; the "
                    "trace would fix it: draw with torch (torch.rand) or keep the module a leaf")
            raise ConcreteValueError(
                f"Python control flow needs {what} from `{describe(node)}`, and its value is unknown: "
                f"{self.values.why_unknown(node) if self.values else 'no example inputs were given'}")
        if isinstance(value, torch.Tensor) and how != "len":
            raise ConcreteValueError(
                f"data-dependent control flow: Python needs {what} from the tensor `{describe(node)}`; "
                "qprep specialises shapes, ranks, dtypes and lengths, never tensor values")
        return value

    def iterate(self, proxy: torch.fx.Proxy, frame) -> Iterator:
        """``for v in x``, ``a, b = x``, ``f(*x)``: the example's length, with a guard."""
        node = proxy.node
        value = value_of(node)
        if value is UNKNOWN:
            unpacked = _unpacked_count(frame)
            if unpacked is not None:  # `a, b = proxy`: fx's rule, from the caller's bytecode
                return iter([proxy[i] for i in range(unpacked)])
            self._known(proxy, "len")
        if node.op == "call_method" and node.target in ("items", "keys", "values") and isinstance(value, _DICT_VIEWS):
            return self._iterate_dict_view(node, proxy)
        if isinstance(value, dict):
            return iter(self.concrete_keys(proxy))
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            raise TypeError("iteration over a 0-d tensor")
        if not isinstance(value, (torch.Tensor, list, tuple)):
            raise ConcreteValueError(f"cannot iterate over `{describe(node)}` ({type(value).__name__}) while tracing")
        count = len(value)
        if not module_output(node):  # a module's output structure is fixed by its code
            location, code = _here(2)
            self.guards.record(node, "len", count, location, code)
        return iter([proxy[i] for i in range(count)])

    def _iterate_dict_view(self, node: torch.fx.Node, proxy: torch.fx.Proxy) -> Iterator:
        owner = proxy.tracer.proxy(node.args[0])
        keys = self.concrete_keys(owner)
        if node.target == "keys":
            return iter(keys)
        if node.target == "values":
            return iter([owner[k] for k in keys])
        return iter([(k, owner[k]) for k in keys])

    def concrete_keys(self, proxy: torch.fx.Proxy) -> list:
        """``proxy.keys()`` / ``**proxy``: the example dict's keys, with a guard."""
        value = self._known(proxy, "keys")
        if not isinstance(value, dict):
            raise ConcreteValueError(f"`{describe(proxy.node)}` is a {type(value).__name__}, not a dict")
        keys = tuple(value.keys())
        location, code = _here(2)
        self.guards.record(proxy.node, "keys", keys, location, code)
        return list(keys)

    def truth(self, proxy: torch.fx.Proxy, frame) -> bool:
        """``bool(proxy)`` asked by ``frame``: the example's answer, guarded. Where ``frame``
        tests an ``assert`` on tensor data or on a value unknown on the example (XLM's ``assert
        lengths.max().item() <= slen``), recorded as ``torch._assert(cond, message)`` instead,
        as torch.fx rewrites asserts, so the prepared model raises ``AssertionError`` where the
        original does, and the trace goes on past it."""
        asserting, message = _assert_at(frame.f_code, frame.f_lasti)
        value = value_of(proxy.node)
        if not asserting or value is not UNKNOWN and not isinstance(value, torch.Tensor):
            return self.concrete(proxy, "bool")
        location, code = _here(2)
        message = message or f"assertion failed at {location}: {code}"
        self.create_proxy("call_function", torch._assert, (proxy, message), {})  # noqa: SLF001
        return True

    def contains(self, proxy: torch.fx.Proxy, item: Any) -> bool:
        """``item in proxy``: recorded, then read as a guarded bool."""
        found = self.create_proxy("call_function", operator.contains, (proxy, item), {})
        return self.concrete(found, "bool")

    # -- leaves ---------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or module_qualified_name in self._opaque:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if isinstance(m, torch.jit.ScriptModule):  # compiled TorchScript: no Python to trace into
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
        if not self.recording():
            return forward(*args, **kwargs)
        inner = _compiled_module(m)
        if inner is not None:  # `self.block = torch.compile(block)`: the module it compiles, traced as such
            return self.call_module(inner, inner.forward, args, kwargs)
        name = self._installed_path(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        self._shadow_len(getattr(type(m), "forward", None))
        mark, guards = last_node(self.graph), self.guards.mark()
        stack = dict(self.module_stack)
        if self.config.trace_compound_nn and type(m) in TRACEABLE_FORWARDS:
            forward = functools.partial(TRACEABLE_FORWARDS[type(m)], m)
        if self.blocks is not None and m not in self._regrouped:
            forward = self.blocks.wrap(m, name, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError as exc:
            if exc.module and not self._can_leaf(m):
                raise
            failure: BaseException = exc
        except Exception as exc:  # noqa: BLE001  (any failure in user code is reported below)
            failure = exc
        return self._fallback(m, name, forward, args, kwargs, (mark, guards), stack, failure)

    def _installed_path(self, m: nn.Module) -> str:
        """``m``'s name in the model; for a module ``forward`` installed or made itself:
        installed during the trace (BigBird's ``self.self = BigBirdSelfAttention(...)``), its
        name now; made and called at once without state (Canine's ``nn.MaxPool1d(k)(x)``), a
        new submodule of the traced model (the prepared model holds the same stateless module;
        the model itself gets its submodules back after the trace)."""
        try:
            return self.path_of_module(m)
        except NameError:
            pass
        installed = {id(found): name for name, found in self.root.named_modules()}
        if id(m) in installed:
            self.submodule_paths[m] = installed[id(m)]
            return installed[id(m)]
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            if _regroups(m, installed) and not self.is_leaf_module(m, ""):
                # `self.features[:4](x)`: a new container of installed modules, traced into
                # (its children are called by their own names); nothing is installed
                name = f"{installed[id(next(m.children()))]}.__slice_of_{type(m).__name__.lower()}"
                self.submodule_paths[m] = name
                self._regrouped.add(m)
                return name
            raise NameError(f"{type(m).__name__}, made in forward with parameters or buffers, is not a submodule "
                            "of the model: each call would make new ones")
        base = name = f"made_in_forward_{type(m).__name__.lower()}"
        taken, count = {n for n, _ in self.root.named_children()}, 0
        while name in taken:  # a second call site: made_in_forward_maxpool1d_1
            count += 1
            name = f"{base}_{count}"
        self.root.add_module(name, m)
        self.submodule_paths[m] = name
        return name

    def _can_leaf(self, m: nn.Module) -> bool:
        if m in self._regrouped:  # not installed: it cannot be called as one module
            return False
        return self.config.on_untraceable == "leaf" or self._tries_into(m)

    def _fallback(self, m, name, forward, args, kwargs, marks, stack, failure):
        """Roll the graph back to ``mark`` and call ``m`` as an opaque leaf, or raise."""
        self.module_stack.clear()
        self.module_stack.update(stack)
        location = ""
        if isinstance(failure, TraceError):
            location, reason = failure.location, str(failure)
        else:
            frame = _user_frame(failure.__traceback__)
            if frame is not None:
                location = location_text(frame.filename, frame.lineno)
            reason = _describe_failure(failure)
        if not self._can_leaf(m) or not self._rollback(*marks):
            if isinstance(failure, TraceError):
                raise failure
            raise _trace_error(name, m, location, reason, failure) from failure
        self._opaque.add(name)
        self.notes.append(TraceNote(name, type(m).__name__, reason, location))
        return super().call_module(m, forward, args, kwargs)

    def _rollback(self, mark: torch.fx.Node, guards: int) -> bool:
        """Erase the nodes created after ``mark``; False if one escaped (has outside users)."""
        created = []
        node = last_node(self.graph)
        while node is not mark:
            created.append(node)
            node = node.prev
        doomed = set(created)
        if any(user not in doomed for n in created for user in n.users):
            return False
        self.guards.rollback(guards)
        for node in created:  # newest first: users before what they use
            if node.op != "get_attr":  # get_attr proxies may be cached; DCE removes them
                self.graph.erase_node(node)
        return True


_DICT_VIEWS = (type({}.items()), type({}.keys()), type({}.values()))


def _own(fn: Any) -> bool:
    """torch.fx's and qprep's own wrapped functions (``check_guard``) stay calls."""
    return str(getattr(fn, "__module__", "")).startswith(("torch.fx", "qprep."))
_READS = (operator.getitem, builtins.getattr)


def _default_of(parameter: inspect.Parameter) -> tuple:
    """A placeholder's default: the parameter's own, when the generated code can write it."""
    return () if parameter.default is parameter.empty or not _simple_constant(parameter.default) else (parameter.default,)


def _simple_constant(value: Any) -> bool:
    """Whether ``value`` can be a placeholder's default in generated code (and be compared
    by a guard): None, a bool, number or string, or a tuple or list of them."""
    if type(value) in (tuple, list):
        return all(_simple_constant(item) for item in value)
    return value is None or type(value) in (bool, int, float, complex, str)


def _reads(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads an element or attribute, or calls a method of an object (a
    cache's ``get_linear_cache(i)``): its ``None`` is the example's ``None``."""
    if node.op == "call_function":
        return node.target in _READS
    return node.op == "call_method" and (node.target == "get" or plain_object(value_of(node.args[0])))


def _is_proxy(value: Any) -> bool:
    return isinstance(value, torch.fx.Proxy)


def _compiled_module(m: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (dynamo's ``OptimizedModule``) runs, or ``None``."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(dynamo, "OptimizedModule", None)
    return m._orig_mod if optimized is not None and isinstance(m, optimized) else None  # noqa: SLF001


@functools.lru_cache(maxsize=None)
def _assert_at(code, lasti: int) -> tuple[bool, str | None]:
    """Whether the jump at ``lasti`` in ``code`` is an ``assert``'s (the next instruction
    loads ``AssertionError``), and its message when it is a constant string."""
    instructions = list(dis.get_instructions(code))
    for i, inst in enumerate(instructions[:-1]):
        if inst.offset == lasti:
            if "JUMP" not in inst.opname or instructions[i + 1].opname != "LOAD_ASSERTION_ERROR":
                return False, None
            after = instructions[i + 2] if i + 2 < len(instructions) else None
            message = after.argval if after is not None and after.opname == "LOAD_CONST" \
                and isinstance(after.argval, str) else None
            return True, message
    return False, None


def _unpacked_count(frame) -> int | None:
    """``n`` when the caller's current instruction is ``UNPACK_SEQUENCE n`` (``a, b = x``)."""
    for inst in dis.get_instructions(frame.f_code):
        if inst.offset == frame.f_lasti:
            return inst.argval if inst.opname == "UNPACK_SEQUENCE" else None
    return None


def _trace_error(name: str, m: nn.Module, location: str, reason: str, exc: BaseException,
                 code: str | None = None) -> TraceError:
    """The error for module ``name`` (``""``: the root), naming the line: ``code``, or the
    innermost user frame of ``exc``'s traceback."""
    where = f"module '{name}' ({type(m).__name__})" if name else f"the model's forward ({type(m).__name__})"
    at = f" at {location}" if location else ""
    if code is None:
        frame = _user_frame(exc.__traceback__)
        code = frame.line if frame is not None and frame.line else ""
    code = f": `{code.strip()}`" if code else ""
    hints = [f"mark it as a leaf (PrepareConfig(leaf_modules=('{name}',)) or leaf_modules=[{type(m).__name__}])"] \
        if name else []
    if not isinstance(exc, StatefulForwardError):
        hints.append("pass concrete_args for the input the code branches on")
    hints.append("use on_untraceable='leaf' to keep untraceable submodules opaque")
    fix = f"{', '.join(hints[:-1])}, or {hints[-1]}" if len(hints) > 1 else hints[0]
    message = f"cannot trace {where}{at}{code}: {reason}.\nFix: {fix}."
    return TraceError(message, module=name, module_type=type(m).__name__, location=location)


def _regroups(m: nn.Module, installed: dict[int, str]) -> bool:
    """Whether ``m``, made in ``forward``, only regroups installed modules: no state of its own
    and every child installed (``nn.Sequential``'s ``self.features[:4]``)."""
    children = list(m.children())
    return bool(children) and all(id(c) in installed for c in children) \
        and not any(True for _ in m.parameters(recurse=False)) and not any(True for _ in m.buffers(recurse=False))


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


_INPLACE_FUNCTIONS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem,
})


_MISSING = object()

#: Global random generators outside torch: module -> its drawing functions.
_PYTHON_RNG = {
    "random": ("random", "uniform", "randint", "randrange", "choice", "choices", "sample", "shuffle", "gauss",
               "normalvariate", "lognormvariate", "expovariate", "vonmisesvariate", "gammavariate", "triangular",
               "betavariate", "paretovariate", "weibullvariate", "getrandbits", "randbytes", "binomialvariate"),
    "numpy.random": ("rand", "randn", "random", "random_sample", "ranf", "sample", "randint", "random_integers",
                     "uniform", "normal", "standard_normal", "choice", "permutation", "shuffle", "binomial", "beta",
                     "poisson", "exponential", "gamma", "laplace", "logistic", "lognormal", "geometric", "gumbel",
                     "multinomial", "dirichlet", "bytes"),
}

#: Values compared by value when ``forward`` re-assigns a plain attribute (``self.flag = True``).
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), tuple, frozenset, torch.dtype, torch.device)


def _changes_plain_state(module: nn.Module, name: str, value: Any, frame) -> bool:
    """Whether the user's ``forward`` code (not torch's or qprep's) gives the plain attribute
    ``module.name`` a new value. The next call of the original would read the new value; the
    prepared graph keeps what the trace saw."""
    if name in module._parameters or name in module._buffers or name in module._modules:  # noqa: SLF001
        return False
    if _library_code(frame.f_code.co_filename):
        return False
    old = vars(module).get(name, _MISSING)
    if old is value:
        return False
    try:
        return not (type(old) is type(value) and isinstance(value, _PLAIN_VALUES) and bool(old == value))
    except Exception:  # noqa: BLE001  (an element without a plain ==)
        return True


def _unbound_method_names(code, namespace: dict) -> set[str]:
    """Names ``code`` (and the functions and comprehensions in it) reads off ``torch.Tensor``
    (``torch.Tensor.add``, or ``Tensor.add`` after ``from torch import Tensor``) that are
    torch's C methods, not functions of ``torch.Tensor``'s own (those take a proxy already)."""
    names: set[str] = set()
    if "Tensor" not in code.co_names:
        return names
    previous: list = []
    for inst in dis.get_instructions(code):
        if inst.opname in ("LOAD_ATTR", "LOAD_METHOD") and len(previous) >= 1:
            last = previous[-1]
            tensor = last.argval == "Tensor" and (
                last.opname in ("LOAD_ATTR", "LOAD_METHOD") and len(previous) >= 2 and previous[-2].argval == "torch"
                and namespace.get("torch") is torch
                or last.opname == "LOAD_GLOBAL" and namespace.get("Tensor") is torch.Tensor
                or last.opname in ("LOAD_FAST", "LOAD_DEREF"))  # `from torch import Tensor` in the function
            name = inst.argval
            if tensor and isinstance(name, str) and not name.startswith("__") and name not in torch.Tensor.__dict__ \
                    and callable(getattr(torch.Tensor, name, None)):
                names.add(name)
        previous = (previous + [inst])[-2:]
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= _unbound_method_names(const, namespace)
    return names


def _proxies_in(value: Any) -> list[torch.fx.Proxy]:
    """The traced values in ``value`` (itself, or in its lists, tuples and dicts)."""
    if isinstance(value, torch.fx.Proxy):
        return [value]
    if type(value) in (list, tuple, dict):
        found: list[torch.fx.Proxy] = []
        for v in value.values() if isinstance(value, dict) else value:
            found += _proxies_in(v)
        return found
    return []


@dataclasses.dataclass
class StateChange:
    """``forward`` gave the plain attribute ``module.name`` a new value (``old`` is
    ``_MISSING`` when it was unset)."""

    module: nn.Module
    path: str
    name: str
    old: Any
    new: Any
    location: str
    code: str

    def undo(self) -> None:
        if self.old is _MISSING:
            vars(self.module).pop(self.name, None)
        else:
            vars(self.module)[self.name] = self.old

    def redo(self) -> None:
        vars(self.module)[self.name] = self.new

    def describe(self) -> str:
        old = "unset" if self.old is _MISSING else _short(self.old)
        return f"forward changes {type(self.module).__name__}.{self.name} ({old} -> {_short(self.new)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
_RANDOM_CALLS = frozenset(getattr(torch, name) for name in RANDOM_FACTORIES if hasattr(torch, name))
_RANDOM_METHODS = frozenset({"uniform_", "normal_", "bernoulli", "bernoulli_", "random_", "exponential_",
                             "geometric_", "cauchy_", "log_normal_", "multinomial"})


def _from_shapes_and_constants(node: torch.fx.Node, constant: Callable[[str], bool] = lambda target: False) -> bool:
    """Whether ``node``'s value depends on nothing but the inputs' metadata and constants:
    no input or attribute data (placeholders and get_attr are read only through their
    metadata, but for the attributes ``constant`` accepts), no module call, no random draw."""
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if is_metadata_read(current) or current.op == "get_attr" and constant(current.target):
            continue  # x.size(1), w.shape: not the data behind them
        if current.op in ("placeholder", "get_attr", "call_module"):
            return False
        name = getattr(current.target, "__name__", "")
        if current.op == "call_method" and current.target in _RANDOM_METHODS \
                or current.target in _RANDOM_CALLS or "dropout" in name or "rrelu" in name:
            return False
        todo.extend(_data_inputs(current))
    return True


#: Tensor methods that read only the dtype and device of their tensor arguments at these
#: positions (``arange(w).type_as(x)``, ``x.new_full(size, v)``); ``*_like`` factories (but
#: the random ones) read only the metadata of their first.
_METADATA_ARGUMENTS = {"type_as": (1,), "new_full": (0,), "new_zeros": (0,), "new_ones": (0,), "new_empty": (0,),
                       "new_tensor": (0,)}
_LIKE_FACTORIES = frozenset({torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like})


def _data_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The input nodes whose data ``node`` reads (not only their dtype, device or shape)."""
    if node.op == "call_method":
        skip = _METADATA_ARGUMENTS.get(node.target, ())
    elif node.op == "call_function" and node.target in _LIKE_FACTORIES:
        skip = (0,)
    else:
        return node.all_input_nodes
    rest = [a for i, a in enumerate(node.args) if i not in skip]
    found: list[torch.fx.Node] = []
    map_aggregate((rest, node.kwargs), lambda a: found.append(a) if isinstance(a, torch.fx.Node) else None)
    return found


def _mutates_first_argument(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        name = node.target
        return name.endswith("_") and not name.endswith("__") or name in ("__iadd__", "__isub__", "__imul__",
                                                                           "__itruediv__", "__setitem__")
    if node.op == "call_function":
        try:
            return node.target in _INPLACE_FUNCTIONS
        except TypeError:
            return False
    return False


def _protect_constants(gm: torch.fx.GraphModule) -> bool:
    """A tensor made at trace time (``z = torch.zeros(3)``) is a constant of the graph; when
    the graph updates it in place (``z += x``), each call would see the last call's update.
    Such a constant is cloned where the graph reads it, as eager mode makes a fresh one.
    Returns whether the graph changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not node.target.startswith("_tensor_constant"):
            continue
        if not any(_mutates_first_argument(u) and u.args and u.args[0] is node for u in node.users):
            continue
        with gm.graph.inserting_after(node):
            fresh = gm.graph.call_method("clone", (node,))
        fresh.meta = dict(node.meta)
        node.replace_all_uses_with(fresh, delete_user_cb=lambda user: user is not fresh)
        changed = True
    return changed


class Traced(tuple):
    """What :func:`trace` returns: ``(graph_module, notes)``, plus ``.guards``,
    ``.failures`` (node name -> why its value could not be computed on meta tensors) and
    ``.replayed`` (the module calls replayed from an identical one's, :mod:`.blocks`)."""

    guards: tuple[Guard, ...]
    failures: dict
    replayed: tuple  # of qprep.capture.blocks.Replay

    def __new__(cls, gm, notes, guards, failures, replayed=()):
        self = super().__new__(cls, (gm, notes))
        self.guards = guards
        self.failures = failures
        self.replayed = replayed
        return self


def _traced_graph_module(tracer: QprepTracer, model: nn.Module, config: PrepareConfig,
                         code_on_demand: bool = False) -> tuple:
    """The graph (guards inserted) and its GraphModule over ``tracer.root``."""
    try:
        graph = tracer.trace(model, concrete_args=config.concrete_args)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001  (a failure in the root forward)
        frame = _user_frame(exc.__traceback__)
        location = location_text(frame.filename, frame.lineno) if frame else ""
        raise _trace_error("", model, location, _describe_failure(exc), exc) from exc
    guards = insert_guards(graph, tracer.guards)
    for node in graph.nodes:
        # fx marks the calls of functions it auto-wrapped, and its code generator then writes
        # `torch.fx.wrap(name)` into the generated code, registering the name process-wide,
        # for a torch function under a dotted name later traces cannot resolve (a KeyError in
        # every later trace); qprep's tracer records those calls anyway. Guards keep the mark.
        if node.target is not check_guard:
            node.meta.pop("is_wrapped", None)
    return guards, graph_module(tracer.root, graph, model.__class__.__name__, code_on_demand=code_on_demand)


def trace(model: nn.Module, config: PrepareConfig | None = None, examples: dict[str, Any] | None = None, *,
          code_on_demand: bool = False) -> Traced:
    """Trace ``model`` into a GraphModule whose leaves are ``model``'s own module objects.

    Args:
        examples: forward parameter name -> example value (see :class:`QprepTracer`).
        code_on_demand: the GraphModule generates its code only when run or read (for a
            trace that is compared and dropped).

    Returns ``(graph_module, notes on submodules kept opaque)``, with ``.guards``; the
    guards are also in ``gm.meta["qprep"]["guards"]`` and checked in the generated code.
    Raises :class:`~qprep.errors.TraceError` with the module, source line and fix.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"qprep prepares torch.nn.Module instances, got {type(model).__name__}")
    config = config or PrepareConfig()
    tracer = QprepTracer(config, examples)
    # fx's tracer stores the tensors it meets as constants on the root (``_tensor_constant0``)
    # and the GraphModule copies them; the model itself gets its attributes back.
    with structure_kept([model]):
        try:
            guards, gm = _traced_graph_module(tracer, model, config, code_on_demand)
        except BaseException:
            for change in reversed(tracer.state_changes):  # a failed trace leaves no state behind
                change.undo()
            raise
    if tracer.state_changes:
        refused = _state_refusal(model, config, examples, gm, tracer.state_changes)
        if refused is not None:
            if config.on_untraceable == "leaf" and refused.path:
                leaves = dataclasses.replace(config, leaf_modules=(*config.leaf_modules, refused.path))
                return trace(model, leaves, examples, code_on_demand=code_on_demand)
            raise _trace_error(
                refused.path, refused.module, refused.location,
                f"{refused.describe()}, and the next call traces differently: state kept between calls (a call "
                "counter, a one-time initialisation), which one graph cannot reproduce",
                StatefulForwardError(), code=refused.code)
    constants_out_of_state(gm)
    protected = _protect_constants(gm)
    if gm.graph.eliminate_dead_code(is_impure_node=_is_impure) or protected:
        gm.recompile()  # the code made with the GraphModule is stale only if the graph changed since
    aliases = _module_aliases(model)
    if aliases:
        meta.set_graph_facts(gm, **{meta.MODULE_ALIASES: aliases})
    if guards:
        meta.set_graph_facts(gm, **{meta.GUARDS: guards})
    return Traced(gm, tracer.notes, guards, dict(tracer.values.failures) if tracer.values else {}, tracer.replayed)


def _state_refusal(model: nn.Module, config: PrepareConfig, examples: dict | None, gm: torch.fx.GraphModule,
                   changes: list[StateChange]) -> StateChange | None:
    """``forward`` changed plain attributes (``self.initialised = True``, ``self.calls += 1``):
    the graph is the model's only if tracing again, from the changed state, changes nothing
    more and gives the same code (a one-time set-up that Hugging Face's output capturing does).
    Otherwise every change is undone and the first is returned, to be refused."""
    for change in changes:
        change.redo()  # the root's own attributes were put back after the first trace
    again = QprepTracer(config, examples)
    try:
        with structure_kept([model]):
            _, second = _traced_graph_module(again, model, config, code_on_demand=True)
        same = not again.state_changes and second.code == gm.code
    except TraceError:
        same = False
    if same:
        return None
    for change in reversed(changes + again.state_changes):  # the latest first
        change.undo()
    return changes[0]


def _is_impure(node: torch.fx.Node) -> bool:
    """Dead when unused: get_attr nodes left by a rollback, and reads of metadata (a size
    Python read and did not use); every other call is kept (it may update something)."""
    return node.op != "get_attr" and not (node.op != "placeholder" and reads_metadata_only(node))
