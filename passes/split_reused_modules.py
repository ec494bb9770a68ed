"""Pass: a module called at several call sites -> one instance per call site.

Before::

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(out + x)             # self.relu, 2nd call: statistics would collide
        return out

After::

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu_1(out + x)           # a clone: nn.ReLU()
        return out

The first call site keeps the original name; later ones get ``<name>_1``, ``<name>_2`` (or,
for a module registered under several names, those names in order). A clone shares the
original's Parameter and buffer objects (``copy.deepcopy`` with those objects memoised), so
weight tying, gradients, buffer updates and memory are unchanged, and the clones' keys are
hidden from ``state_dict()``. In a graph of both training modes (a ``forward`` that branches
on ``self.training``), two call sites that run in different modes are not a re-use: they
share the module. Modules that re-use their own submodules by design (a modular LSTM's
per-time-step cell) are one call site in the graph: nothing to split.
"""

from __future__ import annotations

import copy

import torch.fx
import torch.nn as nn

from qprep.core import meta
from qprep.core._compat import rename_like_fx
from qprep.core.aliases import hide_aliases
from qprep.core.config import PrepareConfig
from qprep.core.dual import modes_of
from qprep.core.graph import ModuleNamer, retarget_scope, type_name
from qprep.core.provenance import record_change, stamp
from qprep.core.records import REWRITTEN, PassResult

__all__ = ["split_reused_modules", "clone_sharing_tensors"]

PASS_NAME = "split_reused_modules"

_ORDINALS = {2: "2nd", 3: "3rd"}


def clone_sharing_tensors(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose Parameters and buffers are the original objects."""
    memo = {id(t): t for _, t in _state_items(module)}
    return copy.deepcopy(module, memo)


def _ordinal(k: int) -> str:
    return _ORDINALS.get(k, f"{k}th")


def _split(target: str) -> tuple[str, str]:
    scope, _, leaf = target.rpartition(".")
    return scope, leaf


def split_reused_modules(gm: torch.fx.GraphModule, config: PrepareConfig) -> PassResult:
    """Give every ``call_module`` site after the first its own clone of the module."""
    sites: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites.setdefault(node.target, []).append(node)
    registered = dict(meta.graph_fact(gm, meta.MODULE_ALIASES) or {})
    namer = ModuleNamer(gm)
    changes, aliases = [], {}
    for target, nodes in sites.items():
        module = gm.get_submodule(target)
        spare = [n for n in registered.get(target, []) if not namer.exists(n)]
        # (name, module, modes it is called in): a module is called once per mode at most
        instances = [(target, module, set(modes_of(nodes[0])))]
        for k, node in enumerate(nodes[1:], start=2):
            free = next((i for i in instances if not i[2] & set(modes_of(node))), None)
            if free is not None:  # a call site of the other training mode: no clash
                free[2].update(modes_of(node))
                if free[0] != target:
                    node.target = free[0]
                    retarget_scope(node, free[0], free[1], replace_last=True)
                    rename_like_fx(node)
                continue
            own_name = bool(spare)  # a name the user registered the module under: its keys stay
            name = spare.pop(0) if spare else namer.name(*_split(target))
            namer.take(name)
            clone = clone_sharing_tensors(module)
            gm.add_submodule(name, clone)
            instances.append((name, clone, set(modes_of(node))))
            node.target = name
            stamp(node, PASS_NAME, REWRITTEN, target)
            retarget_scope(node, name, clone, replace_last=True)
            rename_like_fx(node)
            for key, _ in () if own_name else _state_items(clone):
                aliases[f"{name}.{key}"] = f"{target}.{key}"
            changes.append(record_change(
                node, PASS_NAME, REWRITTEN, f"self.{target} ({_ordinal(k)} call)", target,
                module_name=name, module_type=type_name(clone),
            ))
    if aliases:
        hide_aliases(gm, aliases)
    rewritten = any(c.action == REWRITTEN for c in changes)
    return PassResult(PASS_NAME, gm, rewritten, tuple(changes))


def _state_items(module: nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
