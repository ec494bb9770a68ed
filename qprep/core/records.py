"""The records the stages hand each other and the reports render: :class:`Change` (one per
node a pass rewrote or left alone), :class:`PassResult` (what one pass did),
:class:`TraceNote` (a submodule the tracer kept opaque) and :class:`Preparation` (everything
about one :func:`qprep.prepare` run). Reports are rendered from these, never re-parsed."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx

__all__ = ["Change", "PassResult", "TraceNote", "Preparation", "REWRITTEN", "SKIPPED", "NOTE"]

#: ``Change.action`` values.
REWRITTEN = "rewritten"  # the node now calls ``Change.module_name``
SKIPPED = "skipped"  # the node was left alone; ``Change.reason`` says why
NOTE = "note"  # information about the model that needed no rewrite (opaque leaf, by-design reuse)


@dataclasses.dataclass(frozen=True)
class Change:
    """One thing a pass did, or chose not to do, to one node.

    Attributes:
        pass_name: the pass that made the record.
        action: :data:`REWRITTEN`, :data:`SKIPPED` or :data:`NOTE`.
        node: name of the node in the graph the pass received.
        op: the op: its callable or method (``"operator.iadd"``, ``"torch.cat"``,
            ``"torch.nn.functional.relu"``, ``"Tensor.sigmoid"``) or, for a module call site,
            ``"self.relu (2nd call)"``; ``code`` holds what the user wrote.
        target: the original target, as text (``"operator.iadd"``, ``"torch.nn.functional.relu"``,
            ``"relu"`` for a module); stable, for tools.
        location: ``path/to/file.py:LINE`` of the user's source line, or ``""`` when unknown.
        code: the user's source line, stripped (``"out += identity"``), or ``""``.
        module_name: qualified name of the module that now runs the op (rewrites), or of the
            module the record is about (notes).
        module_type: that module's class, as ``"qprep.modules.Add"`` or ``"torch.nn.ReLU"``.
        reason: why the node was skipped, or what the note says.
        scope: qualified name of the user module whose ``forward`` holds the op.
    """

    pass_name: str
    action: str
    node: str
    op: str
    target: str = ""
    location: str = ""
    code: str = ""
    module_name: str = ""
    module_type: str = ""
    reason: str = ""
    scope: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What one pass returned: its name, the graph module (mutated in place and returned),
    whether anything changed, and the records."""

    pass_name: str
    graph_module: torch.fx.GraphModule
    changed: bool
    changes: tuple[Change, ...] = ()

    @property
    def rewritten(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.action == REWRITTEN)

    @property
    def skipped(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.action == SKIPPED)


@dataclasses.dataclass(frozen=True)
class TraceNote:
    """A submodule the tracer kept opaque, and why."""

    module: str
    module_type: str
    reason: str
    location: str = ""


@dataclasses.dataclass(frozen=True)
class Preparation:
    """Everything a report needs about one :func:`qprep.prepare` run; stored on the prepared
    module as ``gm.meta["qprep"]["preparation"]`` (:data:`qprep.core.meta.PREPARATION`).

    Attributes:
        config: the :class:`~qprep.core.config.PrepareConfig` used.
        passes: the names of the passes that ran, in order.
        changes: the analysis notes, then every pass's records, in pipeline order.
        trace_notes: submodules the tracer kept opaque.
        before: the snapshot of the traced graph before the passes (``qprep.report.snapshot``).
        specialised: forward arguments fixed at trace time -> their values.
        changed: pass name -> whether it changed the graph.
        verification: the :class:`qprep.verify.VerifyResult`, or ``None`` when not verified.
        guards: the :class:`qprep.core.guards.Guard` records: what tracing specialised.
    """

    config: Any
    passes: tuple[str, ...]
    changes: tuple[Change, ...]
    trace_notes: tuple[TraceNote, ...]
    before: dict
    specialised: dict = dataclasses.field(default_factory=dict)
    changed: dict = dataclasses.field(default_factory=dict)
    verification: Any = None
    guards: tuple = ()

    def verified(self, result: Any) -> Preparation:
        """A copy of this record with ``verification`` set to ``result``."""
        return dataclasses.replace(self, verification=result)
