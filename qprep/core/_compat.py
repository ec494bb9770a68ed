"""Every use of private torch API in qprep, in one place."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx
import torch.fx._lazy_graph_module as _fx_lazy
import torch.fx._symbolic_trace as _fx_trace
import torch.fx.graph_module as _fx_graph_module
from torch.fx.experimental import _config as _fx_config
import torch.nn.functional as F
from torch.fx.passes import shape_prop as _shape_prop
from torch.nn.modules import transformer as _transformer

__all__ = [
    "last_node", "boolean_dispatch_parts", "rename_like_fx", "has_call_hooks", "plain_calls_allowed", "call_is_plain",
    "forward_from_source", "add_deepcopy_hook", "profiler_metadata_enabled", "global_hook_dicts",
    "canonical_mask", "none_or_dtype", "detect_is_causal_mask", "mha_fastpath", "assert_is_none",
    "ORIGINAL_MODULE_CALL", "extract_tensor_metadata", "new_patcher", "patch_class_attribute",
    "wrapped_function_registry",
    "autowrap_search", "set_grad_enabled", "switch_grad_mode", "apply_autograd_function", "enter_autocast", "exit_autocast",
    "has_forward_pre_hooks", "graph_module", "NATIVE_RNN", "any_autocast_enabled", "nonzero_assumed_all",
]

#: ATen's native recurrent kernels, as ``nn.GRU``/``nn.RNN`` call them: ``kernel(input, hx, flat_weights,
#: has_biases, num_layers, dropout, train, bidirectional, batch_first)``, or for a PackedSequence
#: ``kernel(data, batch_sizes, hx, flat_weights, has_biases, num_layers, dropout, train, bidirectional)``.
NATIVE_RNN = {"gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh, "rnn_relu": torch._VF.rnn_relu}  # noqa: SLF001

#: Whether autocast is on for any device type.
any_autocast_enabled = torch._C._is_any_autocast_enabled  # noqa: SLF001

#: What ``torch.no_grad()``/``enable_grad()``/``set_grad_enabled()`` call to switch grad mode.
set_grad_enabled = torch._C._set_grad_enabled  # noqa: SLF001


@torch.fx.node.has_side_effect
def switch_grad_mode(mode: bool) -> bool:
    """Switch grad mode and return the mode it replaced: what ``with torch.no_grad():`` in a
    traced ``forward`` becomes, so that its exit restores the mode of the *call*, not the
    mode at trace time."""
    previous = torch.is_grad_enabled()
    set_grad_enabled(mode)
    return previous


def apply_autograd_function(function: type, *args: Any, **kwargs: Any) -> Any:
    """``function.apply(*args, **kwargs)``: a user's ``torch.autograd.Function`` (a
    straight-through estimator, a gradient reversal) called as one op, so its own
    ``backward`` computes the gradients (fx cannot name ``function.apply`` in code)."""
    return function.apply(*args, **kwargs)


#: What ``with torch.autocast(...)`` records in a graph (torch.export records the same calls).
enter_autocast = torch.amp.autocast_mode._enter_autocast  # noqa: SLF001
exit_autocast = torch.amp.autocast_mode._exit_autocast  # noqa: SLF001

#: The function torch.fx records for ``assert x is None`` checks on concrete arguments.
assert_is_none = torch.fx._symbolic_trace._assert_is_none  # noqa: SLF001


def last_node(graph: torch.fx.Graph) -> torch.fx.Node:
    """The graph's last node (the root sentinel when the graph is empty), in O(1)."""
    return graph._root.prev  # noqa: SLF001  (fx keeps nodes in a linked list behind _root)


def boolean_dispatch_parts(fn) -> tuple:
    """For ``F.max_pool2d``-style ``boolean_dispatch`` wrappers: the two functions it picks
    between, so a table keyed by callable can find calls traced to either."""
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None) or ()
    if code is None or "if_true" not in code.co_freevars:
        return ()
    cells = dict(zip(code.co_freevars, closure))
    return tuple(cells[name].cell_contents for name in ("if_true", "if_false") if name in cells)


def rename_like_fx(node: torch.fx.Node, *freed: str) -> None:
    """Rename a ``call_module`` node as tracing would name it (``blocks_0_add`` for target
    ``blocks.0.add``), so preparing a prepared model yields the same code. ``freed``:
    names of erased nodes that may be reused."""
    graph = node.graph
    for name in (node.name, *freed):
        graph._graph_namespace._used_names.discard(name)  # noqa: SLF001
    node._rename(graph._target_to_str(node.target))  # noqa: SLF001


_MODULE_CALL = torch.nn.Module.__call__  # as torch defines it, before anyone patches it
#: ``nn.Module.__call__`` as torch defines it (torch.fx patches it while tracing).
ORIGINAL_MODULE_CALL = _MODULE_CALL


def extract_tensor_metadata(t: torch.Tensor):
    """``node.meta["tensor_meta"]`` for ``t``, as ``torch.fx.passes.shape_prop.ShapeProp`` writes it."""
    return _shape_prop._extract_tensor_metadata(t)  # noqa: SLF001


def new_patcher():
    """torch.fx's patcher: shadows names in a namespace (a module's globals) and restores
    them on exit."""
    return _fx_trace._Patcher()  # noqa: SLF001


def patch_class_attribute(patcher, cls: type, name: str, new: Any) -> None:
    """Set ``cls.name`` to ``new`` until ``patcher`` exits, restoring the class's own entry
    (a descriptor, such as ``Function.apply``'s classmethod; fx's ``patch_method`` would put
    back the bound method it read, which binds every subclass to ``cls``), or removing it
    again when ``cls`` only inherits ``name`` (``torch.Tensor.add`` is ``TensorBase``'s)."""
    if name in cls.__dict__:
        patch = _fx_trace._PatchedFnSetAttr(cls, name, cls.__dict__[name], new)  # noqa: SLF001
    else:
        patch = _ClassAttributeAdded(cls, name, None, new)
    patcher.patches_made.append(patch)
    patch.patch()


class _ClassAttributeAdded(_fx_trace._PatchedFn):  # noqa: SLF001
    """A class attribute set for one trace where the class had none of its own."""

    def patch(self):
        setattr(self.frame_dict, self.fn_name, self.new_fn)

    def revert(self):
        delattr(self.frame_dict, self.fn_name)


def wrapped_function_registry() -> dict:
    """``torch.fx.wrap``'s registry: ``{(id(globals), name): globals}`` of the functions it wraps."""
    return _fx_trace._wrapped_fns_to_patch  # noqa: SLF001


def autowrap_search(tracer) -> list:
    """The namespaces a ``torch.fx.Tracer`` patches its autowrapped functions in (by identity)."""
    return tracer._autowrap_search  # noqa: SLF001


def has_call_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module``'s own state makes ``nn.Module.__call__`` do more than call
    ``forward``: a forward, forward-pre, backward or backward-pre hook on it, or a compiled
    call (``module.compile()``). Global hooks: :func:`plain_calls_allowed`."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks  # noqa: SLF001  (read as _call_impl reads them)
        or module._backward_hooks or module._backward_pre_hooks  # noqa: SLF001
        or module._compiled_call_impl is not None  # noqa: SLF001
    )


def has_forward_pre_hooks(module: torch.nn.Module) -> bool:
    """Whether a forward pre-hook (the module's own or a global one) may change the
    arguments ``module.forward`` gets."""
    return bool(module._forward_pre_hooks or torch.nn.modules.module._global_forward_pre_hooks)  # noqa: SLF001


_GLOBAL_HOOKS = (
    torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks,  # noqa: SLF001
    torch.nn.modules.module._global_backward_hooks, torch.nn.modules.module._global_backward_pre_hooks,  # noqa: SLF001
)
_tracing_state = torch._C._get_tracing_state  # noqa: SLF001


def global_hook_dicts() -> tuple[dict, dict, dict, dict]:
    """torch's global module hook dicts (forward, forward-pre, backward, backward-pre), as
    the objects ``register_module_*_hook`` mutates (torch never rebinds them)."""
    return _GLOBAL_HOOKS


def call_is_plain(_hooks=_GLOBAL_HOOKS, _tracing=_tracing_state, _module=torch.nn.Module, _call=_MODULE_CALL,
                  _compiling=torch.compiler.is_compiling) -> bool:
    """Whether calling modules' ``forward`` directly, skipping ``nn.Module.__call__``, is
    unobservable process-wide: no global module hooks (``register_module_forward_hook`` &
    co), no ``torch.jit.trace`` running, ``nn.Module.__call__`` not patched (as ``torch.fx``
    tracing does), and neither dynamo nor ``torch.export`` tracing (which record each module
    call in ``nn_module_stack``). Cheap enough to ask on every module call. Per-module
    state: :func:`has_call_hooks`."""
    if _compiling():  # first: dynamo evaluates it to True without tracing what follows
        return False
    forward, forward_pre, backward, backward_pre = _hooks
    return not (forward or forward_pre or backward or backward_pre) and _tracing() is None and _module.__call__ is _call


plain_calls_allowed = call_is_plain


def forward_from_source(src: str, globals_: dict):
    """A ``forward`` function compiled from generated source, as ``GraphModule.recompile``
    compiles its own (the source registered with linecache for tracebacks)."""
    return _fx_graph_module._forward_from_src(src, globals_)  # noqa: SLF001


def graph_module(root, graph: torch.fx.Graph, class_name: str, *, code_on_demand: bool = False) -> torch.fx.GraphModule:
    """``torch.fx.GraphModule(root, graph, class_name)``; with ``code_on_demand``, one that
    generates and compiles its code only when it is first run or its code is read (fx's
    ``_LazyGraphModule``): for a graph module that is analysed and dropped, never run."""
    cls = _fx_lazy._LazyGraphModule if code_on_demand else torch.fx.GraphModule  # noqa: SLF001
    return cls(root, graph, class_name)


def add_deepcopy_hook(gm: torch.fx.GraphModule, hook) -> None:
    """Run ``hook(copy)`` on every ``copy.deepcopy`` of ``gm`` (once per hook)."""
    if hook not in gm._deepcopy_hooks:  # noqa: SLF001
        gm._register_deepcopy_hook(hook)  # noqa: SLF001


def profiler_metadata_enabled() -> bool:
    """Whether fx generates code with profiler markers (``enrich_profiler_metadata``)."""
    return bool(getattr(_fx_config, "enrich_profiler_metadata", False))


def canonical_mask(**kwargs):
    """``torch.nn.functional._canonical_mask``: a bool mask as the float mask attention adds."""
    return F._canonical_mask(**kwargs)  # noqa: SLF001


def none_or_dtype(value):
    return F._none_or_dtype(value)  # noqa: SLF001


def detect_is_causal_mask(mask, is_causal, size):
    """``torch.nn.modules.transformer._detect_is_causal_mask``."""
    return _transformer._detect_is_causal_mask(mask, is_causal, size)  # noqa: SLF001


@contextlib.contextmanager
def mha_fastpath(enabled: bool) -> Iterator[None]:
    """The ``nn.MultiheadAttention`` / ``nn.Transformer*`` fused fast path on or off, restored after."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def nonzero_assumed_all():
    """Meta kernels of ``nonzero`` (so boolean mask indexing) answer as if every element were
    set, instead of refusing: a stand-in size for an output whose size depends on data."""
    if hasattr(_fx_config, "meta_nonzero_assume_all_nonzero"):
        return _fx_config.patch(meta_nonzero_assume_all_nonzero=True)
    return contextlib.nullcontext()
