"""A faster ``forward`` for a prepared GraphModule, with the same calls and the same hooks.

fx's generated ``forward`` calls each submodule as ``getattr(self.blocks, "0").add(x, y)``.
On a model of small ops that line costs more than the add: each attribute step misses the
instance ``__dict__`` (submodules live in ``_modules``) and pays for an ``AttributeError``
before ``nn.Module.__getattr__`` runs (~0.7 us a step), and ``nn.Module.__call__`` adds two
Python frames before ``forward``. :func:`install_fast_forward` compiles the same code with
every ``call_module`` line rewritten as::

    _qprep_m = self._modules['blocks']._modules['0']._modules['add']
    blocks_0_add = _qprep_m.forward(x, y) if <nothing observes _qprep_m's call> else _qprep_m(x, y)

"Nothing observes the call" is exactly the condition under which ``nn.Module.__call__``
itself calls ``forward`` and nothing else: no forward, forward-pre, backward or
backward-pre hook on the module, no compiled call (``module.compile()``), the module's
class keeps ``nn.Module``'s ``__call__`` (or :class:`~qprep.modules.TensorOp`'s), and,
checked once per ``forward``, no global module hook, no ``torch.jit.trace`` and no patched
``nn.Module.__call__`` (fx tracing). Anything else, the module is called as usual.

The module is looked up at every call, so a submodule replaced afterwards (``setattr``,
``add_module``, ``set_submodule``, ``parent._modules[name] = ...``) is the one called.
``gm.code`` stays fx's readable text; :func:`fast_forward_source` gives the code that runs.
Editing the graph and calling ``gm.recompile()`` brings back fx's own ``forward`` (correct,
only slower): call :func:`install_fast_forward` again after it. ``copy.deepcopy`` keeps it.
"""

from __future__ import annotations

import ast
import warnings

import torch.fx
import torch.nn as nn

from ..core._compat import add_deepcopy_hook, call_is_plain, forward_from_source, global_hook_dicts, profiler_metadata_enabled
from .base import TensorOp

__all__ = ["install_fast_forward", "fast_forward_source", "has_fast_forward"]

_MARK = "_qprep_fast_forward"
_MODULE, _PLAIN, _PLAIN_CALLS, _IS_PLAIN = "_qprep_m", "_qprep_plain", "_qprep_plain_calls", "_qprep_call_is_plain"
_HOOK_NAMES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBALS = {
    _PLAIN_CALLS: (nn.Module.__call__, TensorOp.__call__), _IS_PLAIN: call_is_plain,
    **{f"_qprep_global{name}": hooks for name, hooks in zip(_HOOK_NAMES, global_hook_dicts())},
}
# Per call: the module's own hooks and the global ones (a hook may attach another mid-forward);
# per forward (``_qprep_plain``): no jit trace, no patched ``nn.Module.__call__``.
_UNOBSERVED = (
    f"{_PLAIN} and not ({' or '.join(f'{_MODULE}.{name}' for name in _HOOK_NAMES)}"
    f" or {' or '.join(f'_qprep_global{name}' for name in _HOOK_NAMES)})"
    f" and {_MODULE}._compiled_call_impl is None and {_MODULE}.__class__.__call__ in {_PLAIN_CALLS}"
)


def _fx_form(target: str) -> str:
    """The expression fx's code generator writes for ``self.<target>``."""
    text = "self"
    for name in target.split("."):
        text = f"{text}.{name}" if name.isidentifier() else f'getattr({text}, "{name}")'
    return text


def _found_through_modules(gm: torch.fx.GraphModule, target: str) -> bool:
    module = gm
    for name in target.split("."):
        module = getattr(module, "_modules", {}).get(name)
        if module is None:
            return False
    return module is gm.get_submodule(target)


def _rewrite(line: str, name: str, target: str) -> str | None:
    """``name = <fx form>(args);  rest`` -> the lookup and the guarded call; None if the
    line is not of that form."""
    indent = line[: len(line) - len(line.lstrip())]
    head = f"{name} = {_fx_form(target)}("
    body = line.strip()
    if not body.startswith(head):
        return None
    try:
        statement = ast.parse(body).body[0]
    except SyntaxError:
        return None
    if not (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call)):
        return None
    end = statement.value.end_col_offset  # the call's closing parenthesis, + 1
    args, rest = body[len(head): end - 1], body[end:]
    lookup = "self" + "".join(f"._modules[{part!r}]" for part in target.split("."))
    return (f"{indent}{_MODULE} = {lookup}\n"
            f"{indent}{name} = {_MODULE}.forward({args}) if {_UNOBSERVED} else {_MODULE}({args}){rest}")


def fast_forward_source(gm: torch.fx.GraphModule) -> tuple[str, dict]:
    """The source of the fast ``forward`` and its globals."""
    code = gm.graph.python_code(root_module="self")
    targets = {node.name: node.target for node in gm.graph.nodes
               if node.op == "call_module" and _found_through_modules(gm, node.target)}
    lines, out, started = code.src.split("\n"), [], False
    for line in lines:
        stripped = line.strip()
        if not started and stripped.startswith("def forward(") and stripped.endswith(":"):
            out.append(line)
            out.append(f"{line[: len(line) - len(line.lstrip())]}    {_PLAIN} = {_IS_PLAIN}()")
            started = True
            continue
        name = stripped.split(" ", 1)[0]
        new = _rewrite(line, name, targets.pop(name)) if started and name in targets else None
        out.append(line if new is None else new)
    if not started:
        raise ValueError("fast_forward_source: no 'def forward(...):' line in the generated code")
    return "\n".join(out), {**code.globals, **_GLOBALS}


def has_fast_forward(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` runs the fast ``forward`` (``recompile()`` removes it)."""
    return getattr(type(gm).forward, _MARK, False)


def install_fast_forward(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make ``gm`` run :func:`fast_forward_source`'s ``forward``; returns ``gm``.

    Does nothing while fx's profiler metadata is on (its code carries profiler markers).
    Where the generated code has a form this does not know, ``gm`` keeps fx's ``forward``
    (same results, only slower) and a warning says why.
    """
    if profiler_metadata_enabled():
        return gm
    try:
        src, globals_ = fast_forward_source(gm)
        forward = forward_from_source(src, globals_)
    except (ValueError, SyntaxError) as exc:
        warnings.warn(f"qprep: keeping fx's generated forward (the fast forward failed: {exc})", stacklevel=2)
        return gm
    setattr(forward, _MARK, True)
    type(gm).forward = forward  # fx gives every GraphModule its own class
    add_deepcopy_hook(gm, _reinstall)
    return gm


def _reinstall(copy: torch.fx.GraphModule) -> None:
    install_fast_forward(copy)
