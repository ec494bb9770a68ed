"""The HTML rendering of a :class:`~qprep.report.model.Report`: one self-contained file.

:meth:`qprep.report.Report.html` is the public entry; it calls :func:`render`. The page's
skeleton, CSS and JS are the template ``report.html`` beside this file (``string.Template`` fields:
``$title``, ``$verdict``, ``$verdict_class``, ``$stats``, ``$sections``); this module builds
the fields from the same rows as the text and markdown reports.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import string
from typing import TYPE_CHECKING, Any

from ..core.provenance import source_uri

if TYPE_CHECKING:
    from .model import Report

__all__ = ["render"]


@functools.lru_cache(maxsize=1)
def _template() -> string.Template:
    text = importlib.resources.files("qprep.report").joinpath("report.html").read_text(encoding="utf-8")
    return string.Template(text.removesuffix("\n"))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _loc_link(location: str) -> str:
    if not location:
        return '<span class="muted">?</span>'
    uri = source_uri(location)
    return f'<a class="mono" href="{_e(uri)}" title="{_e(location)}">{_e(location)}</a>' if uri else _e(location)


def _node_id(side: str, name: str | None) -> str:
    return f"{side}-{name}" if name else ""


def _scope_parts(scope: str) -> list[str]:
    parts = scope.split(".") if scope else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _call_text(n: dict) -> str:
    """``= self.add(bn2, x)``: what the node computes, from which nodes."""
    args = ", ".join(n["args"])
    if n["op"] == "placeholder":
        return "input"
    if n["op"] == "output":
        return f"return {args}"
    if n["op"] == "get_attr":
        return f"= self.{n['target']}"
    if n["op"] == "call_module":
        return f"= self.{n['target']}({args})"
    return f"= {n['target']}({args})"


def _html_graph(report: Report, snap: dict, side: str, status: dict, links: dict) -> str:
    """Nodes as boxes, nested in dashed boxes by the module scope that made them; the
    submodules of new modules listed (open when they are few in all)."""
    out, open_scopes = [], []
    report_small = sum(len(v) for v in report.submodules.values()) <= 40
    for n in snap["nodes"]:
        want = _scope_parts(n["scope"])
        while open_scopes and open_scopes != want[: len(open_scopes)]:
            open_scopes.pop()
            out.append("</div>")
        for part in want[len(open_scopes):]:
            open_scopes.append(part)
            out.append(f'<div class="scope"><div class="label">{_e(part)}</div>')
        state = status.get(n["name"]) or ""
        change, partner = links.get(n["name"], (None, ""))
        kind = n["op"] if n["op"] != "call_module" else f'{n["module_type"]}'
        why = ""
        if change is not None and state == "rewritten":
            why = f'{_e(change.pass_name)} → <code>{_e(change.module_name)}</code> ({_e(change.module_type)})'
        elif change is not None and state == "new":
            why = f'new: {_e(change.module_type)}, by {_e(change.pass_name)}, from <code>{_e(change.op)}</code>'
            inner = report.submodules.get(change.module_name, [])
            if inner:
                items = "".join(
                    f'<li style="padding-left:{14 * name.count(".")}px"><code>{_e(name.rpartition(".")[2])}</code> '
                    f'<span class="muted">{_e(kind.rpartition(".")[2])}</span></li>' for name, kind in inner)
                why += f'<details{" open" if report_small else ""}><summary>{len(inner)} submodules</summary><ul class="tree">{items}</ul></details>'
        elif change is not None:
            why = f'left alone by {_e(change.pass_name)}: {_e(change.reason)}'
        attrs = f' data-pair="{_e(partner)}"' if partner else ""
        title = f' title="{_e(change.code)}"' if change is not None and change.code else ""
        out.append(
            f'<div class="node {state}" id="{_e(_node_id(side, n["name"]))}" data-status="{state}"{attrs}{title}>'
            f'<div class="head"><span class="name">{_e(n["name"])}</span><code>{_e(_call_text(n))}</code>'
            f'<span class="kind">{_e(kind)}</span></div>'
            + (f'<div class="where">{_loc_link(n["location"])}</div>' if n["location"] else "")
            + (f'<div class="why">{why}</div>' if why else "") + "</div>"
        )
    out.extend("</div>" for _ in open_scopes)
    return "\n".join(out)


def _html_table(headers: list, rows: list, *, loc_col: int | None = None, code_cols: tuple = (),
                row_attrs: list | None = None) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            if j == loc_col:
                cells.append(f"<td>{_loc_link(value if value != '?' else '')}</td>")
            elif j in code_cols and value != "":
                cells.append(f"<td><code>{_e(value)}</code></td>")
            else:
                cells.append(f"<td>{_e(value)}</td>")
        attrs = row_attrs[i] if row_attrs else ""
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_diff(text: str) -> str:
    lines = []
    for line in text.splitlines():
        cls = "add" if line.startswith("+") and not line.startswith("+++") else \
              "del" if line.startswith("-") and not line.startswith("---") else \
              "hunk" if line.startswith("@@") else ""
        lines.append(f'<span class="{cls or "ctx"}">{_e(line) or " "}</span>')
    return '<pre class="diff">' + "".join(lines) + "</pre>"


def render(report: Report) -> str:
    """The report as one HTML page (inline CSS and JS)."""
    tables = report.rows("html")  # the same rows as the text report
    status_before, status_after = report.status()
    links_before, links_after = {}, {}
    for c in report.rewrites:
        after = report.after_node(c)
        links_before[c.node] = (c, _node_id("after", after))
        if after:
            links_after[after] = (c, _node_id("before", c.node))
    for c in report.left_alone:
        links_before.setdefault(c.node, (c, _node_id("after", c.node) if c.node in status_after else ""))
        if c.node in status_after:
            links_after.setdefault(c.node, (c, _node_id("before", c.node)))
    rewrite_attrs = [f' class="pick" data-before="{_e(_node_id("before", c.node))}"'
                     f' data-after="{_e(_node_id("after", report.after_node(c)))}"' for c in report.rewrites]
    skipped_attrs = [f' class="pick" data-before="{_e(_node_id("before", c.node))}" data-after=""'
                     for c in report.left_alone]
    summary = report.summary()
    p = summary["parameters"]
    params = (f'<span class="ok">unchanged</span>' if p["unchanged"]
              else '<span class="flag">DIFFERENT: preparation must not change the weights</span>')
    v = report.preparation.verification
    verify_html = f"<p>{_e(report.verdict_line())}</p>"
    if v is not None:
        verify_html += _html_table(list(v.HEADERS), v.rows())
    verdict_cls = report.verdict.replace(" ", "-")
    specialised = "".join(f"<p>Specialised at trace time: <code>{_e(k)}={_e(val)}</code></p>"
                          for k, val in summary["specialised"].items())
    sections = [
        f'<section id="rewrites"><h2>Rewritten ({len(tables["rewrites"][1])})</h2>'
        f'<p class="muted">Click a row to show its nodes in the graphs below.</p>'
        + _html_table(*tables["rewrites"], loc_col=2, code_cols=(0, 1, 4), row_attrs=rewrite_attrs) + "</section>",
        f'<section id="graphs"><h2>Graph</h2><p class="legend">'
        f'<span class="node rewritten">rewritten</span><span class="node new">new module call</span>'
        f'<span class="node left_alone">left alone</span> Hover a highlighted node to see its counterpart.</p>'
        f'<div class="graphs"><div><h3>Before: traced, {report.before["modules"]} modules</h3>'
        + _html_graph(report, report.before, "before", status_before, links_before)
        + f'</div><div><h3>After: prepared, {report.after["modules"]} modules</h3>'
        + _html_graph(report, report.after, "after", status_after, links_after)
        + "</div></div></section>",
        f'<section id="left-alone"><h2>Left alone ({len(tables["left_alone"][1])})</h2>'
        + _html_table(*tables["left_alone"], loc_col=2, code_cols=(0, 1), row_attrs=skipped_attrs) + "</section>",
        f'<section id="notes"><h2>Notes ({len(tables["notes"][1])})</h2>'
        + _html_table(*tables["notes"], loc_col=1, code_cols=(0,)) + "</section>",
        f'<section id="guards"><h2>Guards ({len(tables["guards"][1])})</h2>'
        '<p class="muted">Specialised to the example inputs; checked when the prepared model runs, which '
        'raises qprep.GuardError on a call they do not cover.</p>'
        + _html_table(*tables["guards"], loc_col=1, code_cols=(0,)) + "</section>",
        '<section id="summary"><h2>Summary</h2>' + _html_table(*tables["passes"])
        + f'<p>Modules: {summary["modules"]["before"]} → {summary["modules"]["after"]}. '
          f'Parameters: {p["before"]} → {p["after"]} ({params}).</p>{specialised}</section>',
        f'<section id="verification"><h2>Verification</h2>{verify_html}</section>',
        f'<section id="code-diff"><h2>Generated <code>forward</code>: before → after</h2>'
        + _html_diff(report.code_diff()) + "</section>",
        *(f'<section id="mode-{_e(mode)}"><h2>{_e(mode.capitalize())}-mode <code>forward</code></h2>'
          f'<pre class="diff">{_e(code)}</pre></section>' for mode, code in report.after.get("modes", {}).items()),
    ]
    stats = (f'<b>{len(report.rewrites)}</b> rewritten · <b>{len(report.left_alone)}</b> left alone · '
             f'<b>{len(report.notes)}</b> notes · modules <b>{summary["modules"]["before"]} → {summary["modules"]["after"]}</b>'
             f' · parameters <b>{p["before"]} → {p["after"]}</b>')
    return _template().substitute(
        title=_e(report.title()),
        verdict=_e(report.verdict),
        verdict_class=verdict_cls,
        stats=stats,
        sections="".join(sections),
    )
