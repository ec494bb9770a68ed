"""``qprep check``: a readiness lint for models not yet prepared. Every tensor op, functional
call, re-used module and recurrent/attention module a module-level quantizer would miss,
with its source line and the fix; the findings are the records a preparation makes."""

from __future__ import annotations

import dataclasses
import json

from tabulate import tabulate

from ..core.provenance import split_location
from ..passes.convert_functionals import convert_functionals
from ..passes.expand_rnns import expand_rnns
from ..passes.pipeline import pass_name
from ..passes.split_reused_modules import split_reused_modules
from ..passes.wrap_tensor_ops import wrap_tensor_ops
from ..report import Report
from .inputs import setup
from .run import prepared_unchecked

__all__ = ["cmd_check", "Finding", "findings_of"]

#: pass -> (kind of finding, the finding and its fix).
_FINDINGS = {
    wrap_tensor_ops: ("tensor op", "tensor op {op} is not a module, so a module-level quantizer misses it; "
                                   "fix: call a {module_type} module instead"),
    convert_functionals: ("functional", "functional call {op} is not a module, so a module-level quantizer misses it; "
                                        "fix: use a {module_type} module instead"),
    split_reused_modules: ("re-used module", "{op}: the module is called at several sites, so their statistics "
                                             "collide; fix: give this call its own {module_type} instance"),
    expand_rnns: ("recurrent/attention module", "{op} computes everything inside one fused kernel, so a quantizer "
                                                "sees only its inputs and outputs; fix: replace it with {module_type} "
                                                "(from_float keeps the weights)"),
}
_BY_NAME = {pass_name(p): finding for p, finding in _FINDINGS.items()}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing ``qprep check`` found: where, what, and the fix."""

    kind: str
    location: str
    code: str
    op: str
    message: str
    suggested_module: str
    suggested_name: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def findings_of(report) -> list[Finding]:
    """The rewritten records of a preparation, as readiness findings."""
    found = []
    for c in report.rewrites:
        kind, template = _BY_NAME.get(c.pass_name, (c.pass_name, "{op} needs a rewrite; fix: use {module_type}"))
        message = template.format(op=c.op, module_type=c.module_type)
        if c.reason:
            message += f" ({c.reason})"
        found.append(Finding(kind, c.location, c.code, c.op, message, c.module_type, c.module_name))
    return found


def _gh_escape(text: str, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def cmd_check(args) -> int:
    model, inputs, options = setup(args)
    gm = prepared_unchecked(model, inputs, options)  # traces a copy and runs the pipeline on it
    report = Report.of(gm, type(model).__name__)
    findings = findings_of(report)
    notes = [c for c in report.notes if c.pass_name == "trace"]
    if args.format == "json":
        print(json.dumps({"schema": "qprep.check/1", "model": type(model).__name__, "ready": not findings,
                          "findings": [f.as_dict() for f in findings],
                          "notes": [c.as_dict() for c in notes]}, indent=2))
    elif args.format == "github":
        for f in findings:
            path, line = split_location(f.location)
            where = f"file={_gh_escape(path, True)},line={line}," if line is not None else ""
            print(f"::warning {where}title={_gh_escape('qprep: ' + f.kind, True)}::{_gh_escape(f.message)}")
        for c in notes:
            path, line = split_location(c.location)
            where = f"file={_gh_escape(path, True)},line={line}," if line is not None else ""
            print(f"::notice {where}title=qprep: not checked::{_gh_escape(c.op + ': ' + c.reason)}")
    else:
        title = f"qprep check: {type(model).__name__}: "
        if findings:
            print(title + f"NOT READY: {len(findings)} op(s) a module-level quantizer would miss")
            rows = [(f.location or "?", f.code, f.kind, f.message) for f in findings]
            print(tabulate(rows, headers=["location", "code", "kind", "finding and fix"], maxcolwidths=[None, 40, None, 70]))
        else:
            print(title + "READY: every compute op is a module called at one site")
        for c in notes:
            print(f"not checked: {c.op} at {c.location or '?'}: {c.reason}")
        print("qprep.prepare(model, example_inputs) makes all of these changes for you, bit for bit.")
    return 1 if findings else 0
