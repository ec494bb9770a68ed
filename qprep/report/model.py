"""The diff report: what :func:`qprep.prepare` did to a model, rendered from ONE object.

>>> report = qprep.diff(model, example_inputs=(x,))      # or qprep.diff(model, prepared)
>>> print(report.text())                                          # terminal (tabulate)
>>> report.write("report.html")                                   # .html / .md / .json / .txt

A :class:`Report` is built from the :class:`~qprep.records.Change` records the passes
returned (``Preparation.changes``), the tracer's notes, the snapshot of the traced graph
before the passes (``Preparation.before``) and a snapshot of the prepared graph
(:func:`snapshot`). Nothing is re-parsed from code. This module is the model: records,
status, summary, rows and the JSON form; the renderings are :mod:`qprep.report.text`
(text, markdown) and :mod:`qprep.report.html` (one self-contained file), reached through
:meth:`Report.text`, :meth:`Report.markdown`, :meth:`Report.html`.

JSON schema ``qprep.report/1`` (the JSON Schema document is ``qprep/report/report_schema.json``,
:func:`qprep.report.json_schema` loads it, :func:`qprep.report.validate` checks a document). Fields of the
top-level object:

``schema``
    always ``"qprep.report/1"``; a change that removes or retypes a field bumps the number.
``qprep_version``, ``model``
    the qprep version, and the class name of the prepared model.
``passes``
    the pipeline's pass names, in the order they ran.
``config``
    the :class:`~qprep.core.config.PrepareConfig` fields (types written as qualified names,
    other values as ``repr`` text where they are not JSON values).
``rewrites``, ``left_alone``, ``notes``
    lists of records, each with every :class:`~qprep.core.records.Change` field (``pass_name``,
    ``action``, ``node``, ``op``, ``target``, ``location``, ``code``, ``module_name``,
    ``module_type``, ``reason``, ``scope``) plus ``after_node``: the name of the node of the
    prepared graph that calls the new module (rewrites; ``null`` otherwise), and
    ``submodules``: ``[{"name", "type"}]`` inside the new module (a modular LSTM's layers,
    cells and gates; ``[]`` otherwise). ``rewrites``
    holds ``action == "rewritten"`` records in the order of the original graph;
    ``left_alone`` the ``"skipped"`` records (data movement, shape arithmetic, unsupported
    ops); ``notes`` the ``"note"`` records and the tracer's opaque leaves (``pass_name ==
    "trace"``).
``summary``
    ``per_pass``: ``{pass: {"rewritten", "left_alone", "notes", "changed"}}``;
    ``modules`` and ``parameters``: ``{"before", "after"}`` counts, ``parameters`` also
    ``"unchanged"`` (must be ``true``: preparing never adds or copies weights);
    ``specialised``: ``{argument: repr of the value fixed at trace time}``.
``verification``
    :meth:`qprep.VerifyResult.as_dict` or ``null`` when not verified; ``max_abs_diff``
    values that are infinite (shape or structure mismatch) are written as ``null``.
``graph``
    ``{"before": snapshot, "after": snapshot}``; a snapshot is ``{"code", "modules",
    "parameters", "nodes"}`` and each node ``{"name", "op", "target", "module_type",
    "args", "location", "scope", "meta", "status"}``; ``status`` is ``"rewritten"``,
    ``"left_alone"``, ``"new"`` (after side: calls a module a pass made or re-targeted) or
    ``null``.
``code_diff``
    :meth:`Report.code_diff`, a unified diff of the generated ``forward``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import pathlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch.fx
import torch.nn as nn

from ..core import meta
from ..core.dual import MODES, DualGraphModule
from ..core.errors import InputError
from ..core.graph import target_text, type_name
from ..core.provenance import module_scope, source_location, source_uri, split_location  # noqa: F401  (re-exported)
from ..core.records import NOTE, REWRITTEN, SKIPPED, Change, Preparation
from ..core.text import fmt_float
from . import html as _html
from . import text as _text
from .schema import SCHEMA, jsonable

__all__ = ["Report", "snapshot", "preparation_of", "split_location", "source_uri", "FORMATS", "report_format"]

#: report file suffix -> format.
FORMATS = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown",
           ".json": "json", ".txt": "text", ".text": "text"}
_CODE_WIDTH = 56


def report_format(path: str | os.PathLike) -> str:
    """The format a report file's suffix asks for (``"html"``, ``"markdown"``, ``"json"``,
    ``"text"``); :class:`InputError` for another suffix."""
    fmt = FORMATS.get(pathlib.Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the report format from {pathlib.Path(path).name!r}: "
                         "use .html, .md, .json or .txt")
    return fmt


def snapshot(gm: torch.fx.GraphModule) -> dict:
    """A plain-data picture of a graph for reports: its code and its nodes."""
    nodes = []
    for node in gm.graph.nodes:
        module_type = ""
        if node.op == "call_module":
            module_type = type(gm.get_submodule(node.target)).__name__
        nodes.append({
            "name": node.name, "op": node.op, "target": target_text(node), "module_type": module_type,
            "args": [a.name for a in node.all_input_nodes], "location": source_location(node),
            "scope": module_scope(node), "meta": dict(meta.facts(node)),
        })
    modules = sum(1 for _ in gm.modules())
    params = sum(p.numel() for p in gm.parameters())
    snap = {"code": gm.code, "nodes": nodes, "modules": modules, "parameters": params}
    if isinstance(gm, DualGraphModule):  # a forward that branches on self.training: both graphs
        snap["modes"] = {mode: gm.graph_of(mode).python_code("self").src for mode in MODES}
    return snap


def preparation_of(module: Any) -> Preparation | None:
    """The :class:`~qprep.core.records.Preparation` a module returned by :func:`qprep.prepare`
    carries, or ``None``."""
    found = meta.graph_fact(module, meta.PREPARATION)
    return found if isinstance(found, Preparation) else None


def submodules_of(gm: nn.Module, preparation: Preparation) -> dict:
    found = {}
    for change in preparation.changes:
        if change.action != REWRITTEN or not change.module_name:
            continue
        try:
            module = gm.get_submodule(change.module_name)
        except AttributeError:
            continue
        inner = [[name, type_name(m)] for name, m in module.named_modules() if name]
        if inner:
            found[change.module_name] = inner
    return found


def trace_note_record(note) -> Change:
    about = f"self.{note.module}" if note.module else "forward"
    reason = note.reason if not note.module else f"kept as an opaque leaf: {note.reason}"
    return Change(pass_name="trace", action=NOTE, node="", op=f"{about} ({note.module_type})",
                  target=note.module_type, location=note.location, module_name=note.module,
                  module_type=note.module_type, reason=reason)


@dataclasses.dataclass(frozen=True)
class Report:
    """How a model was prepared: the records, and the graph before and after.

    Args:
        preparation: the :class:`~qprep.core.records.Preparation` stored on the prepared module.
        after: :func:`snapshot` of the prepared module.
        model: the model's class name, for titles.
        submodules: for each new module that has submodules (a modular LSTM), their
            ``[relative name, type]`` pairs; :meth:`of` fills it in.
    """

    preparation: Preparation
    after: dict
    model: str = ""
    submodules: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, prepared: torch.fx.GraphModule, model: str = "") -> Report:
        """The report of a module returned by :func:`qprep.prepare` in this process."""
        preparation = preparation_of(prepared)
        if preparation is None:
            raise InputError("this module carries no qprep preparation record: use qprep.diff(original, ...)")
        return cls(preparation, snapshot(prepared), model or type(prepared).__name__,
                   submodules_of(prepared, preparation))

    # -- the records ----------------------------------------------------------------
    @property
    def before(self) -> dict:
        return self.preparation.before

    def _sorted(self, action: str) -> tuple[Change, ...]:
        index = {n["name"]: i for i, n in enumerate(self.before["nodes"])}
        found = [c for c in self.preparation.changes if c.action == action]
        return tuple(sorted(found, key=lambda c: index.get(c.node, len(index))))

    @functools.cached_property
    def rewrites(self) -> tuple[Change, ...]:
        """``rewritten`` records, in the order of the original graph."""
        return self._sorted(REWRITTEN)

    @functools.cached_property
    def left_alone(self) -> tuple[Change, ...]:
        """``skipped`` records, in the order of the original graph."""
        return self._sorted(SKIPPED)

    @functools.cached_property
    def notes(self) -> tuple[Change, ...]:
        """``note`` records and the tracer's opaque leaves (as records of pass ``trace``)."""
        traced = tuple(trace_note_record(n) for n in self.preparation.trace_notes)
        return traced + tuple(c for c in self.preparation.changes if c.action == NOTE)

    @functools.cached_property
    def _callers(self) -> dict[str, str]:
        """Module name -> the first node of the prepared graph that calls it."""
        callers: dict[str, str] = {}
        for n in self.after["nodes"]:
            if n["op"] == "call_module":
                callers.setdefault(n["target"], n["name"])
        return callers

    def after_node(self, change: Change) -> str | None:
        """The node of the prepared graph that calls the module ``change`` made."""
        if change.action != REWRITTEN or not change.module_name:
            return None
        return self._callers.get(change.module_name)

    def status(self) -> tuple[dict, dict]:
        """Node name -> ``rewritten``/``left_alone``/``new``, for the graph before and after."""
        before = {c.node: "left_alone" for c in self.left_alone}
        before.update({c.node: "rewritten" for c in self.rewrites})
        after = {}
        for c in self.rewrites:
            name = self.after_node(c)
            if name:
                after[name] = "new"
        for n in self.after["nodes"]:
            if n["name"] not in after and n["name"] in before and before[n["name"]] == "left_alone":
                after[n["name"]] = "left_alone"
        return before, after

    @property
    def guards(self) -> tuple:
        """What tracing specialised to the example inputs (checked when the model runs)."""
        return tuple(self.preparation.guards)

    @property
    def parameters_unchanged(self) -> bool:
        return self.before["parameters"] == self.after["parameters"]

    @property
    def verdict(self) -> str:
        """``EQUIVALENT``, ``NOT EQUIVALENT`` or ``NOT VERIFIED``."""
        v = self.preparation.verification
        if v is None:
            return "NOT VERIFIED"
        return "EQUIVALENT" if v.equal else "NOT EQUIVALENT"

    def verdict_line(self, label: bool = True) -> str:
        v = self.preparation.verification
        if v is None:
            return "verification: not run (no example inputs)" if label else "NOT VERIFIED (no example inputs)"
        text = f"{self.verdict} ({v.mode} mode, {v.reference}; max abs diff {fmt_float(v.max_abs_diff)})"
        if label:
            text = "verification: " + text
        if v.kernel_diff is not None:
            text += f"; default fused kernels differ by {fmt_float(v.kernel_diff)} (bound {fmt_float(v.kernel_bound)})"
        if v.first_bad_pass:
            text += f"; first pass that broke equality: {v.first_bad_pass}"
        return text

    def summary(self) -> dict:
        per_pass = {}
        for name in ("trace", *self.preparation.passes):
            records = [c for c in self.rewrites + self.left_alone + self.notes if c.pass_name == name]
            if name == "trace" and not records:
                continue
            per_pass[name] = {
                "rewritten": sum(c.action == REWRITTEN for c in records),
                "left_alone": sum(c.action == SKIPPED for c in records),
                "notes": sum(c.action == NOTE for c in records),
                "changed": bool(self.preparation.changed.get(name, False)),
            }
        return {
            "per_pass": per_pass,
            "modules": {"before": self.before["modules"], "after": self.after["modules"]},
            "parameters": {"before": self.before["parameters"], "after": self.after["parameters"],
                           "unchanged": self.parameters_unchanged},
            "specialised": {k: repr(v) for k, v in self.preparation.specialised.items()},
        }

    # -- data -----------------------------------------------------------------------
    def as_dict(self) -> dict:
        """The report as plain data, schema ``qprep.report/1`` (see the module docstring)."""
        status_before, status_after = self.status()

        def graph(snap: dict, status: dict) -> dict:
            nodes = [{**n, "status": status.get(n["name"])} for n in snap["nodes"]]
            out = {"code": snap["code"], "modules": snap["modules"], "parameters": snap["parameters"], "nodes": nodes}
            if "modes" in snap:
                out["modes"] = snap["modes"]
            return out

        def records(changes) -> list:
            return [{**c.as_dict(), "after_node": self.after_node(c),
                     "submodules": [{"name": n, "type": t} for n, t in self.submodules.get(c.module_name, [])]
                     if c.action == REWRITTEN else []} for c in changes]

        config = {f.name: getattr(self.preparation.config, f.name) for f in dataclasses.fields(self.preparation.config)}
        v = self.preparation.verification
        return jsonable({
            "schema": SCHEMA,
            "qprep_version": _version(),
            "model": self.model,
            "passes": list(self.preparation.passes),
            "config": config,
            "rewrites": records(self.rewrites),
            "left_alone": records(self.left_alone),
            "notes": records(self.notes),
            "summary": self.summary(),
            "verification": v.as_dict() if v is not None else None,
            "graph": {"before": graph(self.before, status_before), "after": graph(self.after, status_after)},
            "guards": [g.as_dict() for g in self.guards],
            "code_diff": self.code_diff(),
        })

    def json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent, allow_nan=False)

    def code_diff(self, context: int = 3) -> str:
        """A unified diff of the generated ``forward`` before and after the passes."""
        before = self.before["code"].strip("\n").splitlines()
        after = self.after["code"].strip("\n").splitlines()
        lines = difflib.unified_diff(before, after, "before/forward", "after/forward", n=context, lineterm="")
        return "\n".join(lines)

    def rows(self, fmt: str) -> dict[str, tuple[list, list]]:
        """Headers and rows of the tables, shared by text, markdown and html."""
        def code(c: Change) -> str:
            return short(c.code) if fmt == "text" else c.code

        rewrites = [(code(c), c.op, c.location or "?", c.pass_name, c.module_name, c.module_type, c.reason)
                    for c in self.rewrites]
        skipped = [(code(c), c.op, c.location or "?", c.pass_name, c.reason) for c in self.left_alone]
        notes = [(c.op, c.location or "?", c.pass_name, c.reason) for c in self.notes]
        summary = self.summary()
        passes = [(name, s["rewritten"], s["left_alone"], s["notes"], "yes" if s["changed"] else "no")
                  for name, s in summary["per_pass"].items()]
        p = summary["parameters"]
        counts = [("modules", summary["modules"]["before"], summary["modules"]["after"], ""),
                  ("parameters", p["before"], p["after"],
                   "unchanged" if p["unchanged"] else "DIFFERENT: preparation must not change the weights")]
        with_reason = any(r[-1] for r in rewrites)
        rewrite_headers = ["code", "op", "location", "pass", "new module", "type"] + (["note"] if with_reason else [])
        return {
            "rewrites": (rewrite_headers, [r if with_reason else r[:-1] for r in rewrites]),
            "left_alone": (["code", "op", "location", "pass", "why"], skipped),
            "notes": (["about", "location", "from", "note"], notes),
            "guards": (["guard", "location", "checked"], [
                (g.text(), g.location or "?", "at the top of forward" if g.inputs_only else "where computed")
                for g in self.guards]),
            "passes": (["pass", "rewritten", "left alone", "notes", "changed graph"], passes),
            "counts": (["", "before", "after", ""], counts),
        }

    def title(self) -> str:
        return f"qprep report: {self.model}" if self.model else "qprep report"

    def text(self) -> str:
        """The report for a terminal."""
        return _text.render_text(self)

    __str__ = text

    def markdown(self) -> str:
        """The report for a pull-request comment (GitHub-flavoured Markdown)."""
        return _text.render_markdown(self)

    def html(self) -> str:
        """One self-contained HTML file (inline CSS and JS, no network access)."""
        return _html.render(self)

    def write(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the report; the format follows the suffix: .html, .md, .json or .txt."""
        path = pathlib.Path(path)
        fmt = report_format(path)
        text = {"html": self.html, "markdown": self.markdown, "json": self.json, "text": self.text}[fmt]()
        path.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        return path


def _version() -> str:
    try:
        return version("qprep")
    except PackageNotFoundError:
        return "unknown"


def short(text: str, width: int = _CODE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
