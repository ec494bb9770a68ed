"""Pass: ``torch.nn.functional`` calls (and ``torch.relu``/``x.sigmoid()`` twins) -> nn modules.

Before::

    def forward(self, x):
        out = F.relu(self.fc(x), inplace=True)
        out = F.linear(out, self.head_weight, self.head_bias)
        return F.sigmoid(out)                # traced as out.sigmoid()

After::

    def forward(self, x):
        out = self.relu(self.fc(x))           # nn.ReLU(inplace=True)
        out = self.linear(out)                # nn.Linear holding self.head_weight itself
        return self.sigmoid(out)              # nn.Sigmoid()

Calls are bound exactly as Python binds them (defaults included) and the module is built
from the constant arguments. Functionals that take weights from the model (``F.linear``,
``F.conv2d``, ``F.batch_norm``, ``F.embedding``, ...) get a module that holds the SAME
Parameter and buffer objects; the new names are hidden from ``state_dict()``
(:mod:`qprep.aliases`). Dropout-style calls become ``nn.Dropout`` only where their
``training`` argument follows ``self.training`` (found by tracing in both modes). When no
``nn`` module can reproduce the call (``F.normalize``, ``F.interpolate(antialias=True)``, a
weight computed at run time, a dtype argument), the exact call is kept in a
:class:`qprep.modules.Functional` wrapper and the record says why.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from qprep import modules as qm
from qprep.core import meta
from qprep.core.aliases import hide_aliases
from qprep.core.config import PrepareConfig
from qprep.core.graph import (
    ModuleNamer, erase_unused_attrs, example_value, lookup, replace_with_module, resolve_attr, short_name, target_text,
    type_name,
)
from qprep.core.provenance import module_scope, record_change
from qprep.core.records import REWRITTEN, SKIPPED, PassResult
from qprep.core.template import call_template
from qprep.passes.functional_spec import REQUIRED, BuildContext, Spec, Unconvertible
from qprep.passes.functional_table import follows_training, is_functional, spec_for

__all__ = ["convert_functionals"]

PASS_NAME = "convert_functionals"
REASON_USER_MAPPED = "mapped by PrepareConfig.op_modules: wrap_tensor_ops makes it the given module"

def _training_follows(spec: Spec, node: torch.fx.Node) -> bool:
    """Whether the argument that follows ``self.training`` is the spec's ``training``."""
    if not follows_training(node):
        return False
    where = meta.fact(node, meta.MODE_ARG)
    name = spec.params[where][0] if isinstance(where, int) and where < len(spec.params) else where
    return name in ("training", "train")  # torch.dropout's twin calls it train


def _bind(spec: Spec, node: torch.fx.Node) -> dict:
    names = [name for name, _ in spec.params]
    if len(node.args) > len(names):
        raise Unconvertible(f"{len(node.args)} positional arguments, the function takes {len(names)}")
    bound = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names:
            raise Unconvertible(f"unexpected argument {key!r}")
        bound[key] = value
    for name, default in spec.params:
        if name not in bound:
            if default is REQUIRED:
                raise Unconvertible(f"missing argument {name!r}")
            bound[name] = default
    return bound


def _has_node(value) -> bool:
    found = []
    torch.fx.node.map_arg(value, found.append)
    return bool(found)


def _rank(value) -> int | None:
    seen = example_value(value) if isinstance(value, torch.fx.Node) else None
    return len(seen["shape"]) if seen and seen["shape"] is not None else None


def _build(gm, spec: Spec, node: torch.fx.Node) -> tuple:
    bound = _bind(spec, node)
    for name, value in bound.items():
        if name not in spec.inputs and name not in spec.parametric and _has_node(value):
            raise Unconvertible(f"argument {name!r} is computed at run time; nn modules take it as a constant")
    attrs = {name: resolve_attr(gm, bound[name]) for name in spec.parametric}
    ctx = BuildContext(attrs=attrs, rank=_rank(bound[spec.inputs[0]]), follows_training=_training_follows(spec, node))
    module = spec.build(bound, ctx)
    aliases = {attr: bound[attr].target for attr in ctx.adopted}
    aliases.update({attr: None for attr in ctx.private})
    return module, [bound[name] for name in spec.inputs], aliases


def convert_functionals(gm: torch.fx.GraphModule, config: PrepareConfig) -> PassResult:
    """Replace each functional call by its ``nn`` module, or by an exact wrapper and a reason."""
    namer = ModuleNamer(gm)
    changes, aliases = [], {}
    for node in list(gm.graph.nodes):
        if not is_functional(node):
            continue
        op_text = target_text(node)
        if lookup(config.op_modules, node.target) is not None:
            changes.append(record_change(node, PASS_NAME, SKIPPED, op_text, op_text, reason=REASON_USER_MAPPED))
            continue
        spec = spec_for(node)
        reason = ""
        try:
            if spec is None:
                raise Unconvertible("no nn module with the same semantics")
            module, inputs, adopted = _build(gm, spec, node)
        except Unconvertible as exc:
            reason = f"kept as an exact qprep.modules.Functional wrapper: {exc}"
            args, kwargs, inputs = call_template(node)
            mode_arg = meta.fact(node, meta.MODE_ARG) if follows_training(node) else None
            if mode_arg is not None:
                reason += "; its training argument follows the wrapper's mode"
            module, adopted = qm.Functional(node.target, args, kwargs, mode_arg=mode_arg), {}
        base = type(module).__name__.lower() if not reason else short_name(node).strip("_") or "functional"
        name = namer.name(module_scope(node), base)
        changes.append(record_change(
            node, PASS_NAME, REWRITTEN, op_text, op_text, module_name=name,
            module_type=type_name(module), reason=reason,
        ))
        replace_with_module(gm, node, name, module, inputs, PASS_NAME)
        aliases.update({f"{name}.{attr}": target for attr, target in adopted.items()})
    if aliases:
        hide_aliases(gm, aliases)
    erase_unused_attrs(gm)
    rewritten = any(c.action == REWRITTEN for c in changes)
    return PassResult(PASS_NAME, gm, rewritten, tuple(changes))
