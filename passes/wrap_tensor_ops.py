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
in-place form), so outputs stay bitwise identical and aliasing behaves as in eager mode.
Only tensor-producing nodes are wrapped: ``x.size(0) // 2`` stays plain Python. Data
movement (views, reshapes, indexing, dtype conversion) stays as graph nodes; see
``passes/README.md`` for the exact policy.
"""

from __future__ import annotations

import torch.fx

from qprep.core.config import PrepareConfig
from qprep.core.errors import RewriteError
from qprep.core.guards import is_guard
from qprep.core.graph import ModuleNamer, lookup, member, produces_tensor, replace_with_module, target_text, type_name
from qprep.core.provenance import module_scope, record_change
from qprep.core.records import REWRITTEN, SKIPPED, PassResult
from qprep.core.template import call_template
from qprep.modules import TensorOp
from qprep.passes.functional_table import is_functional
from qprep.passes.op_tables import DATA_MOVEMENT_FUNCTIONS, DATA_MOVEMENT_METHODS, FUNCTION_TABLE, METHOD_TABLE

__all__ = ["wrap_tensor_ops"]

PASS_NAME = "wrap_tensor_ops"
REASON_DATA_MOVEMENT = "data movement: stays a graph node by policy"
REASON_SHAPE = "shape arithmetic: not a tensor, stays plain Python"
REASON_FUNCTIONAL = "a torch.nn.functional call (or its torch/Tensor twin): convert_functionals makes it a module"
REASON_UNSUPPORTED = ("unsupported op: no wrapper module in the tables "
                      "(map it to a module with PrepareConfig(op_modules={op: Module}))")


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
        cls = _user_module(node, config)
        if cls is None:
            cls = _wrapper_for(node)
            reason = _why_not(node, cls, config, tensors)
            if reason:
                changes.append(record_change(node, PASS_NAME, SKIPPED, op_text, op_text, reason=reason))
                continue
        module, args, kwargs = _build(cls, node)
        name = namer.name(module_scope(node), cls.__name__.lower())
        change = record_change(node, PASS_NAME, REWRITTEN, op_text, op_text, module_name=name,
                               module_type=type_name(module))
        replace_with_module(gm, node, name, module, args, PASS_NAME, kwargs)
        changes.append(change)
    changed = any(c.action == REWRITTEN for c in changes)
    return PassResult(PASS_NAME, gm, changed, tuple(changes))


def _why_not(node: torch.fx.Node, cls: type | None, config: PrepareConfig, tensors: dict) -> str:
    """Why ``node`` stays as it is, or ``""`` when it is wrapped in ``cls``."""
    if cls is not None:
        return "" if produces_tensor(node, tensors) else REASON_SHAPE
    if is_functional(node):
        return REASON_FUNCTIONAL
    if _data_movement(node):
        return REASON_DATA_MOVEMENT
    if not produces_tensor(node, tensors):
        return REASON_SHAPE
    if config.strict:
        change = record_change(node, PASS_NAME, SKIPPED, target_text(node))
        raise RewriteError(f"{PASS_NAME}: cannot rewrite {target_text(node)} ({node.name}) at "
                           f"{change.location or '?'}: {REASON_UNSUPPORTED}")
    return REASON_UNSUPPORTED
