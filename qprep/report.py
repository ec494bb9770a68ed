"""The diff report: what :func:`qprep.prepare` did to a model, rendered from ONE object.

>>> report = qprep.report.diff(model, example_inputs=(x,))      # or diff(model, prepared)
>>> print(report.text())                                          # terminal (tabulate)
>>> report.write("report.html")                                   # .html / .md / .json / .txt

A :class:`Report` is built from the :class:`~qprep.records.Change` records the passes
returned (``Preparation.changes``), the tracer's notes, the snapshot of the traced graph
before the passes (``Preparation.before``) and a snapshot of the prepared graph
(:func:`qprep.prepare.snapshot`). Nothing is re-parsed from code. The renderings:
:meth:`Report.text`, :meth:`Report.markdown`, :meth:`Report.html` (one self-contained file,
rendered by :mod:`qprep.report_html`), :meth:`Report.json` / :meth:`Report.as_dict` and
:meth:`Report.code_diff`.

JSON schema ``qprep.report/1`` (the JSON Schema document is ``qprep/report_schema.json``,
:func:`json_schema` loads it, :func:`validate` checks a document). Fields of the
top-level object:

``schema``
    always ``"qprep.report/1"``; a change that removes or retypes a field bumps the number.
``qprep_version``, ``model``
    the qprep version, and the class name of the prepared model.
``passes``
    the pipeline's pass names, in the order they ran.
``config``
    the :class:`~qprep.config.PrepareConfig` fields (types written as qualified names,
    other values as ``repr`` text where they are not JSON values).
``rewrites``, ``left_alone``, ``notes``
    lists of records, each with every :class:`~qprep.records.Change` field (``pass_name``,
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
import math
import os
import pathlib
from typing import Any

import torch.fx
import torch.nn as nn
from tabulate import tabulate

from .errors import InputError
from .prepare import Preparation, prepare, snapshot
from .records import NOTE, REWRITTEN, SKIPPED, Change

__all__ = ["Report", "diff", "SCHEMA", "json_schema", "validate"]

SCHEMA = "qprep.report/1"
_FORMATS = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown",
            ".json": "json", ".txt": "text", ".text": "text"}
_CODE_WIDTH = 56


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) that :meth:`Report.as_dict` follows."""
    path = pathlib.Path(__file__).with_name("report_schema.json")
    return json.loads(path.read_text(encoding="utf-8"))


def validate(document: dict) -> None:
    """Check ``document`` (e.g. ``json.load`` of a written report) against
    :func:`json_schema`; raises ``ValueError`` naming the first field that does not match.

    Uses ``jsonschema`` when it is installed (it is not a dependency of qprep), else a
    small checker of the keywords the schema uses."""
    schema = json_schema()
    try:
        import jsonschema
    except ImportError:
        _check(document, schema, schema, "$")
        return
    try:
        jsonschema.validate(document, schema)
    except jsonschema.ValidationError as exc:
        where = "$" + "".join(f"[{p!r}]" for p in exc.absolute_path)
        raise ValueError(f"{where}: {exc.message}") from None


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number"):
        numeric = isinstance(value, int if kind == "integer" else (int, float))
        return numeric and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[kind])


def _check(value: Any, schema: dict, root: dict, where: str) -> None:
    """The subset of JSON Schema that report_schema.json uses."""
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        _check(value, node, root, where)
    for sub in schema.get("allOf", []):
        _check(value, sub, root, where)
    if "oneOf" in schema:
        passed = 0
        for sub in schema["oneOf"]:
            try:
                _check(value, sub, root, where)
                passed += 1
            except ValueError:
                pass
        if passed != 1:
            raise ValueError(f"{where}: matches {passed} of the oneOf alternatives, not exactly one")
    kinds = schema.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        raise ValueError(f"{where}: {value!r:.60} is not of type {kinds}")
    if "const" in schema and value != schema["const"]:
        raise ValueError(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        raise ValueError(f"{where}: {value} is less than {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"{where}: {key!r} is a required property")
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                _check(item, sub, root, f"{where}[{key!r}]")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{where}[{i}]")


def _preparation_of(module: Any) -> Preparation | None:
    meta = getattr(module, "meta", None)
    if not isinstance(meta, dict):
        return None
    found = (meta.get("qprep") or {}).get("preparation")
    return found if isinstance(found, Preparation) else None


def diff(original: nn.Module, prepared: nn.Module | None = None, example_inputs: Any = None,
         **prepare_options: Any) -> Report:
    """The report of how ``prepared`` was made from ``original``.

    When ``prepared`` carries ``meta["qprep"]["preparation"]`` (it came from
    :func:`qprep.prepare` in this process), that record is used. Otherwise (``None``, a
    GraphModule qprep did not make, or one loaded with ``torch.load``, which drops ``meta``)
    ``original`` is prepared with ``example_inputs`` and ``prepare_options``.
    """
    preparation = _preparation_of(prepared)
    if preparation is None:
        prepared = prepare(original, example_inputs, **prepare_options)
        preparation = _preparation_of(prepared)
    elif example_inputs is not None or prepare_options:
        raise InputError("diff(): example_inputs and prepare options are used only when prepared is not given")
    return Report.of(prepared, type(original).__name__)


def _submodules(gm: nn.Module, preparation: Preparation) -> dict:
    from .graph_utils import type_name

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


def _trace_note_record(note) -> Change:
    return Change(pass_name="trace", action=NOTE, node="", op=f"self.{note.module} ({note.module_type})",
                  target=note.module_type, location=note.location, module_name=note.module,
                  module_type=note.module_type, reason=f"kept as an opaque leaf: {note.reason}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def _short(text: str, width: int = _CODE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def split_location(location: str) -> tuple[str, int | None]:
    """``("path/file.py", 42)`` from ``"path/file.py:42"``; ``(location, None)`` otherwise."""
    path, _, line = location.rpartition(":")
    return (path, int(line)) if path and line.isdigit() else (location, None)


def source_uri(location: str) -> str:
    """``file:///abs/path/file.py#L42`` for a ``file.py:42`` location, or ``""``."""
    path, line = split_location(location)
    if not path or line is None:
        return ""
    return pathlib.Path(os.path.abspath(path)).as_uri() + f"#L{line}"


@dataclasses.dataclass(frozen=True)
class Report:
    """How a model was prepared: the records, and the graph before and after.

    Args:
        preparation: the :class:`~qprep.prepare.Preparation` stored on the prepared module.
        after: :func:`qprep.prepare.snapshot` of the prepared module.
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
        preparation = _preparation_of(prepared)
        if preparation is None:
            raise InputError("this module carries no qprep preparation record: use qprep.report.diff(original, ...)")
        return cls(preparation, snapshot(prepared), model or type(prepared).__name__, _submodules(prepared, preparation))

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
        traced = tuple(_trace_note_record(n) for n in self.preparation.trace_notes)
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

    def _status(self) -> tuple[dict, dict]:
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
    def parameters_unchanged(self) -> bool:
        return self.before["parameters"] == self.after["parameters"]

    @property
    def verdict(self) -> str:
        """``EQUIVALENT``, ``NOT EQUIVALENT`` or ``NOT VERIFIED``."""
        v = self.preparation.verification
        if v is None:
            return "NOT VERIFIED"
        return "EQUIVALENT" if v.equal else "NOT EQUIVALENT"

    def _verdict_line(self, label: bool = True) -> str:
        v = self.preparation.verification
        if v is None:
            return "verification: not run (no example inputs)" if label else "NOT VERIFIED (no example inputs)"
        text = f"{self.verdict} ({v.mode} mode, {v.reference}; max abs diff {_fmt(v.max_abs_diff)})"
        if label:
            text = "verification: " + text
        if v.kernel_diff is not None:
            text += f"; default fused kernels differ by {_fmt(v.kernel_diff)} (bound {_fmt(v.kernel_bound)})"
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
        from . import __version__

        status_before, status_after = self._status()

        def graph(snap: dict, status: dict) -> dict:
            nodes = [{**n, "status": status.get(n["name"])} for n in snap["nodes"]]
            return {"code": snap["code"], "modules": snap["modules"], "parameters": snap["parameters"], "nodes": nodes}

        def records(changes) -> list:
            return [{**c.as_dict(), "after_node": self.after_node(c),
                     "submodules": [{"name": n, "type": t} for n, t in self.submodules.get(c.module_name, [])]
                     if c.action == REWRITTEN else []} for c in changes]

        config = {f.name: getattr(self.preparation.config, f.name) for f in dataclasses.fields(self.preparation.config)}
        v = self.preparation.verification
        return _jsonable({
            "schema": SCHEMA,
            "qprep_version": __version__,
            "model": self.model,
            "passes": list(self.preparation.passes),
            "config": config,
            "rewrites": records(self.rewrites),
            "left_alone": records(self.left_alone),
            "notes": records(self.notes),
            "summary": self.summary(),
            "verification": v.as_dict() if v is not None else None,
            "graph": {"before": graph(self.before, status_before), "after": graph(self.after, status_after)},
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

    # -- text -----------------------------------------------------------------------
    def _rows(self, fmt: str) -> dict[str, tuple[list, list]]:
        """Headers and rows of the tables, shared by text, markdown and html."""
        def code(c: Change) -> str:
            return _short(c.code) if fmt == "text" else c.code

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
            "passes": (["pass", "rewritten", "left alone", "notes", "changed graph"], passes),
            "counts": (["", "before", "after", ""], counts),
        }

    def _title(self) -> str:
        return f"qprep report: {self.model}" if self.model else "qprep report"

    def text(self) -> str:
        """The report for a terminal."""
        tables = self._rows("text")
        out = [self._title(), ""]
        for key, title in (("rewrites", "Rewritten"), ("left_alone", "Left alone"), ("notes", "Notes")):
            headers, rows = tables[key]
            out.append(f"{title} ({len(rows)})")
            out.append(tabulate(rows, headers=headers) if rows else "  (none)")
            out.append("")
        out.append("Summary")
        out.append(tabulate(tables["passes"][1], headers=tables["passes"][0]))
        out.append("")
        out.append(tabulate(tables["counts"][1], headers=tables["counts"][0]))
        out.extend(f"specialised at trace time: {k}={v}" for k, v in self.summary()["specialised"].items())
        out.append(self._verdict_line())
        return "\n".join(out)

    __str__ = text

    def markdown(self) -> str:
        """The report for a pull-request comment (GitHub-flavoured Markdown)."""
        tables = self._rows("markdown")
        badge = {"EQUIVALENT": "✅", "NOT EQUIVALENT": "❌"}.get(self.verdict, "⚪")
        out = [f"## {self._title()}", "", f"{badge} {self._verdict_line(label=False).replace(self.verdict, f'**{self.verdict}**', 1)}", ""]
        for key, title in (("rewrites", "Rewritten"), ("left_alone", "Left alone"), ("notes", "Notes")):
            headers, rows = tables[key]
            out.append(f"### {title} ({len(rows)})")
            out.append("")
            out.append(_md_table(headers, rows, code_cols={0, 1, 4} if key != "notes" else {0}) if rows else "_none_")
            out.append("")
        out += ["### Summary", "", _md_table(*tables["passes"]), "", _md_table(*tables["counts"]), ""]
        out.extend(f"Specialised at trace time: `{k}={v}`" for k, v in self.summary()["specialised"].items())
        out += ["<details><summary>Generated <code>forward</code>, before → after</summary>", "",
                "```diff", self.code_diff(), "```", "", "</details>", ""]
        return "\n".join(out)

    def html(self) -> str:
        """One self-contained HTML file (inline CSS and JS, no network access)."""
        from .report_html import render

        return render(self)

    def write(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the report; the format follows the suffix: .html, .md, .json or .txt."""
        path = pathlib.Path(path)
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"cannot tell the report format from {path.name!r}: use .html, .md, .json or .txt")
        text = {"html": self.html, "markdown": self.markdown, "json": self.json, "text": self.text}[fmt]()
        path.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        return path


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _md_cell(value: Any, code: bool) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if code and text else text


def _md_table(headers: list, rows: list, code_cols: set = frozenset()) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(v, i in code_cols) for i, v in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)
