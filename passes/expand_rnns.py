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

from qprep._provenance import record_change, stamp
from qprep.config import PrepareConfig
from qprep.graph_utils import type_name
from qprep.records import REWRITTEN, PassResult

__all__ = ["expand_rnns", "RNN_TABLE", "ATTENTION_TABLE"]

PASS_NAME = "expand_rnns"


def _tables() -> tuple[dict, dict]:
    from qprep.modules import attention, rnn

    rnns = {
        nn.LSTM: rnn.ModularLSTM, nn.GRU: rnn.ModularGRU, nn.RNN: rnn.ModularRNN,
        nn.LSTMCell: rnn.ModularLSTMCell, nn.GRUCell: rnn.ModularGRUCell, nn.RNNCell: rnn.ModularRNNCell,
    }
    return rnns, {nn.MultiheadAttention: attention.ModularMultiheadAttention}


#: torch module type -> modular class (exact type match: subclasses may change forward).
RNN_TABLE, ATTENTION_TABLE = _tables()


def _replace_submodule(gm: torch.fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)


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
            _replace_submodule(gm, node.target, swapped[node.target][1])
        original_type, modular = swapped[node.target]
        stamp(node, PASS_NAME, REWRITTEN, original_type)
        changes.append(record_change(
            node, PASS_NAME, REWRITTEN, f"self.{node.target} ({original_type})", original_type,
            module_name=node.target, module_type=type_name(modular),
        ))
    return PassResult(gm, bool(changes), tuple(changes))
