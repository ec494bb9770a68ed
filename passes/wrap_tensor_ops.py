"""Pass: tensor ops (operators, ``torch.*`` functions, ``Tensor`` methods) -> wrapper modules.

Before::

    def forward(self, x):
        identity = x
        out = self.bn2(self.conv2(x))
        out += identity                      # operator.iadd
        return torch.cat([identity, out], dim=1)

After::

    def forward(self, x):
        bn2 = self.bn2(self.conv2(x))
        iadd = self.add(bn2, x)              # qprep.modules.Add(call=operator.iadd, inplace=True)
        return self.cat(x, iadd)             # qprep.modules.Cat(dim=1)

Each wrapper makes exactly the call the user made (same callable, same constants, same
in-place form), so outputs stay bitwise identical and aliasing behaves as in eager mode;
``y[i] = v`` becomes a ``SetItem`` that updates ``y`` in place. A tensor op in no table
(``torch.topk``, a user's ``torch.fx.wrap`` function) is kept whole in an exact
``qprep.modules.Functional`` wrapper, with the reason recorded (``strict=True`` raises
instead). Only tensor-producing nodes are wrapped: ``x.size(0) // 2`` stays plain Python.
Data movement (views, reshapes, indexing, dtype conversion) and guard checks stay as graph
nodes; see ``passes/README.md`` for the exact policy.
"""

from __future__ import annotations

import operator

import torch.fx

from qprep.core.config import PrepareConfig
from qprep.core.errors import RewriteError
from qprep.core.guards import is_guard
from qprep.core.graph import (
    ModuleNamer, lookup, member, produces_tensor, replace_with_module, short_name, target_text, type_name,
)
from qprep.core.provenance import module_scope, record_change
from qprep.core.records import REWRITTEN, SKIPPED, PassResult
from qprep.core.runtime import python_draw
from qprep.core.template import call_template
from qprep import modules as qm
from qprep.modules import TensorOp
from qprep.passes.functional_table import is_functional
from qprep.passes.op_tables import DATA_MOVEMENT_FUNCTIONS, DATA_MOVEMENT_METHODS, FUNCTION_TABLE, METHOD_TABLE

__all__ = ["wrap_tensor_ops"]

PASS_NAME = "wrap_tensor_ops"
REASON_DATA_MOVEMENT = "data movement: stays a graph node by policy"
REASON_SHAPE = "shape arithmetic: not a tensor, stays plain Python"
REASON_FUNCTIONAL = "a torch.nn.functional call (or its torch/Tensor twin): convert_functionals makes it a module"
REASON_GENERIC = ("no dedicated wrapper in the tables: kept whole in an exact qprep.modules.Functional wrapper "
                  "(map it to a module of your own with PrepareConfig(op_modules={op: Module}))")
REASON_NOT_TENSOR = "a method of a Python object, not of a tensor: stays a graph node"
REASON_PYTHON_DRAW = "a draw from Python's or NumPy's random generator, not a tensor: stays a graph node"


def _user_module(node: torch.fx.Node, config: PrepareConfig) -> type | None:
    if node.op in ("call_function", "call_method") and config.op_modules:
        return lookup(config.op_modules, node.target)
    return None


def _wrapper_for(node: torch.fx.Node) -> type | None:
    if node.op == "call_function":
        return lookup(FUNCTION_TABLE, node.target)
    if node.op == "call_method":
        return METHOD_TABLE.get(node.target)
    return None


def _data_movement(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in DATA_MOVEMENT_METHODS
    return member(DATA_MOVEMENT_FUNCTIONS, node.target)


def _build(cls: type, node: torch.fx.Node) -> tuple:
    """The module for ``node``, and the positional and keyword arguments of its call."""
    if issubclass(cls, TensorOp):
        args, kwargs, inputs = call_template(node)
        return cls(node.target, args, kwargs), inputs, {}  # the callable, or the Tensor method's name
    return cls(), node.args, dict(node.kwargs)  # a user's module takes the call's own arguments


def wrap_tensor_ops(gm: torch.fx.GraphModule, config: PrepareConfig) -> PassResult:
    """Replace each tensor-producing op of the tables (and of ``config.op_modules``) by a call
    of its own module; record every other call with the reason it stays."""
    namer = ModuleNamer(gm)
    changes = []
    tensors: dict = {}  # produces_tensor's memo, shared across the nodes in graph order
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or is_guard(node):
            continue
        op_text = target_text(node)
        cls, note = _user_module(node, config), ""
        if cls is None:
            cls = _wrapper_for(node)
            reason = _why_not(node, cls, config, tensors)
            if reason is REASON_GENERIC:
                cls, note = qm.Functional, reason
            elif reason:
                changes.append(record_change(node, PASS_NAME, SKIPPED, op_text, op_text, reason=reason))
                continue
        module, args, kwargs = _build(cls, node)
        base = cls.__name__.lower() if cls is not qm.Functional else (short_name(node).strip("_") or "functional")
        name = namer.name(module_scope(node), base)
        change = record_change(node, PASS_NAME, REWRITTEN, op_text, op_text, module_name=name,
                               module_type=type_name(module), reason=note)
        replace_with_module(gm, node, name, module, args, PASS_NAME, kwargs)
        changes.append(change)
    changed = any(c.action == REWRITTEN for c in changes)
    return PassResult(PASS_NAME, gm, changed, tuple(changes))


def _computes_tensor(node: torch.fx.Node, tensors: dict) -> bool:
    """Whether ``node`` computes a tensor; an in-place update that returns nothing
    (``y[i] = v``) computes the tensor it updates."""
    if node.op == "call_function" and node.target is operator.setitem:
        return isinstance(node.args[0], torch.fx.Node) and produces_tensor(node.args[0], tensors)
    return produces_tensor(node, tensors)


def _why_not(node: torch.fx.Node, cls: type | None, config: PrepareConfig, tensors: dict) -> str:
    """Why ``node`` stays as it is; ``""`` when it is wrapped in ``cls``, :data:`REASON_GENERIC`
    when it is wrapped whole in a ``Functional``."""
    if cls is not None:
        return "" if _computes_tensor(node, tensors) else REASON_SHAPE
    if is_functional(node):
        return REASON_FUNCTIONAL
    if node.op == "call_function" and node.target is python_draw:
        return REASON_PYTHON_DRAW
    if _data_movement(node) or (node.op == "call_function" and isinstance(node.target, type)):
        return REASON_DATA_MOVEMENT  # a class called: builds an output container (a namedtuple, a ModelOutput)
    if not produces_tensor(node, tensors):
        return REASON_SHAPE
    if node.op == "call_method" and not (isinstance(node.args[0], torch.fx.Node)
                                         and produces_tensor(node.args[0], tensors)):
        return REASON_NOT_TENSOR
    if config.strict:
        change = record_change(node, PASS_NAME, SKIPPED, target_text(node))
        raise RewriteError(f"{PASS_NAME}: no dedicated wrapper for {target_text(node)} ({node.name}) at "
                           f"{change.location or '?'} (strict=True; without it the op is kept whole in an exact "
                           "qprep.modules.Functional wrapper)")
    return REASON_GENERIC
