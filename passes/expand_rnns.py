"""Pass: recurrent modules and multi-head attention -> modular equivalents.

Before::

    def forward(self, tokens):
        out, (h, c) = self.lstm(self.embed(tokens))      # nn.LSTM: gates inside one C++ call

After::

    def forward(self, tokens):
        out, (h, c) = self.lstm(self.embed(tokens))      # qprep.modules.ModularLSTM

The node keeps its target; the module behind it is replaced by a modular version
(``from_float``) whose every gate op is a named submodule, holding the original Parameter
objects under the original ``state_dict`` keys. The time loop lives inside the modular
module, so the graph keeps one ``call_module`` node and sequences of any length work.
"""

from __future__ import annotations

import torch.fx
import torch.nn as nn

from qprep import modules as qm
from qprep.core.config import PrepareConfig
from qprep.core.graph import type_name
from qprep.core.provenance import record_change, stamp
from qprep.core.records import NOTE, REWRITTEN, PassResult

__all__ = ["expand_rnns", "RNN_TABLE", "ATTENTION_TABLE"]

PASS_NAME = "expand_rnns"
NOTE_REUSE = ("per-time-step cell modules are re-used across time steps by design; "
              "the stack is one call site in the graph")

#: torch module type -> modular class (exact type match: subclasses may change forward).
RNN_TABLE: dict = {
    nn.LSTM: qm.ModularLSTM, nn.GRU: qm.ModularGRU, nn.RNN: qm.ModularRNN,
    nn.LSTMCell: qm.ModularLSTMCell, nn.GRUCell: qm.ModularGRUCell, nn.RNNCell: qm.ModularRNNCell,
}
ATTENTION_TABLE: dict = {nn.MultiheadAttention: qm.ModularMultiheadAttention}
#: The modular stacks whose per-step cells run at every time step (reported, not split).
_STEPPED = (qm.ModularLSTM, qm.ModularGRU, qm.ModularRNN)


def expand_rnns(gm: torch.fx.GraphModule, config: PrepareConfig) -> PassResult:
    """Swap every ``nn.LSTM``/``GRU``/``RNN`` (and cells), and ``nn.MultiheadAttention`` when
    ``config.expand_attention``, for its modular equivalent, in place at the same name."""
    table = {**(RNN_TABLE if config.expand_rnns else {}), **(ATTENTION_TABLE if config.expand_attention else {})}
    changes = []
    swapped: dict[str, tuple[str, nn.Module]] = {}  # target -> (original type, modular module)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target not in swapped:
            module = gm.get_submodule(node.target)
            modular_cls = table.get(type(module))
            if modular_cls is None:
                continue
            modular = modular_cls.from_float(module)
            modular.train(module.training)
            swapped[node.target] = (type_name(module), modular)
            gm.add_submodule(node.target, modular)
            if isinstance(modular, _STEPPED):
                changes.append(record_change(node, PASS_NAME, NOTE, f"self.{node.target}", node.target,
                                             module_name=node.target, module_type=type_name(modular),
                                             reason=NOTE_REUSE))
        original_type, modular = swapped[node.target]
        stamp(node, PASS_NAME, REWRITTEN, original_type)
        changes.append(record_change(
            node, PASS_NAME, REWRITTEN, f"self.{node.target} ({original_type})", original_type,
            module_name=node.target, module_type=type_name(modular),
        ))
    rewritten = any(c.action == REWRITTEN for c in changes)
    return PassResult(PASS_NAME, gm, rewritten, tuple(changes))
