"""The ``node.meta`` and ``GraphModule.meta`` keys that stages share, declared once.

qprep keeps its own facts about a node under one namespaced key, ``node.meta["qprep"]``
(:data:`NAMESPACE`), next to torch.fx's standard keys (:data:`STACK_TRACE`,
:data:`MODULE_STACK`, :data:`VAL`, :data:`TENSOR_META`). Facts about the whole graph live
in ``gm.meta["qprep"]``. Every stage reads and writes them through the helpers here, never
through ad-hoc attributes or string literals of its own.
"""

from __future__ import annotations

from typing import Any

import torch.fx

__all__ = [
    "NAMESPACE", "STACK_TRACE", "MODULE_STACK", "VAL", "TENSOR_META",
    "PASS", "ACTION", "FROM", "VALUE", "FOLLOWS_TRAINING", "MODE_ARG", "MODES",
    "PREPARATION", "MODULE_ALIASES", "GUARDS", "REPLAYED",
    "facts", "fact", "set_facts", "graph_facts", "graph_fact", "set_graph_facts",
]

#: ``node.meta[NAMESPACE]`` / ``gm.meta[NAMESPACE]``: qprep's facts.
NAMESPACE = "qprep"

# torch.fx's own keys.
STACK_TRACE = "stack_trace"  # the user's stack when the node was traced
MODULE_STACK = "nn_module_stack"  # {path: (qualified name, module type)} of the forwards it ran in
VAL = "val"  # the example value (a FakeTensor for tensors), as FakeTensorProp writes it
TENSOR_META = "tensor_meta"  # shape, dtype, ... as ShapeProp writes it

# Keys of node.meta["qprep"].
PASS = "pass"  # provenance: the pass that made the node ...
ACTION = "action"  # ... what it did ("rewritten") ...
FROM = "from"  # ... and the node it was made from
VALUE = "value"  # {"type", "shape", "has_tensor"}: what the node produced on the example inputs
FOLLOWS_TRAINING = "follows_training"  # a bool argument of this call is its scope's self.training ...
MODE_ARG = "mode_arg"  # ... at this position (int) or keyword (str)
MODES = "modes"  # ("train",) / ("eval",): the node runs in that mode only (a graph of both modes)

# Keys of gm.meta["qprep"].
PREPARATION = "preparation"  # the qprep.core.records.Preparation of the prepared module
MODULE_ALIASES = "module_aliases"  # {first name: [other names]} of modules registered twice
GUARDS = "guards"  # tuple of qprep.core.guards.Guard: what tracing specialised, checked at run time
REPLAYED = "replayed"  # tuple of qprep.capture.blocks.Replay: module calls replayed from an identical one's


def facts(node: torch.fx.Node) -> dict:
    """``node.meta["qprep"]`` (empty when qprep recorded nothing)."""
    return node.meta.get(NAMESPACE) or {}


def fact(node: torch.fx.Node, key: str, default: Any = None) -> Any:
    return facts(node).get(key, default)


def set_facts(node: torch.fx.Node, **values: Any) -> None:
    node.meta[NAMESPACE] = {**facts(node), **values}


def graph_facts(gm: torch.fx.GraphModule) -> dict:
    """``gm.meta["qprep"]`` (empty when qprep recorded nothing)."""
    meta = getattr(gm, "meta", None)
    return (meta.get(NAMESPACE) or {}) if isinstance(meta, dict) else {}


def graph_fact(gm: torch.fx.GraphModule, key: str, default: Any = None) -> Any:
    return graph_facts(gm).get(key, default)


def set_graph_facts(gm: torch.fx.GraphModule, **values: Any) -> None:
    gm.meta[NAMESPACE] = {**graph_facts(gm), **values}
