"""Text and Markdown renderings of a :class:`~qprep.report.model.Report`, built from the
same rows as the HTML page (:meth:`Report.rows`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tabulate import tabulate

if TYPE_CHECKING:
    from .model import Report

__all__ = ["render_text", "render_markdown"]

_SECTIONS = (("rewrites", "Rewritten"), ("left_alone", "Left alone"), ("notes", "Notes"))


def render_text(report: Report) -> str:
    """The report for a terminal."""
    tables = report.rows("text")
    out = [report.title(), ""]
    for key, title in _SECTIONS:
        headers, rows = tables[key]
        out.append(f"{title} ({len(rows)})")
        out.append(tabulate(rows, headers=headers) if rows else "  (none)")
        out.append("")
    headers, rows = tables["guards"]
    if rows:
        out.append(f"Guards ({len(rows)}): specialised to the example inputs, checked when the model runs")
        out.append(tabulate(rows, headers=headers))
        out.append("")
    out.append("Summary")
    out.append(tabulate(tables["passes"][1], headers=tables["passes"][0]))
    out.append("")
    out.append(tabulate(tables["counts"][1], headers=tables["counts"][0]))
    out.extend(f"specialised at trace time: {k}={v}" for k, v in report.summary()["specialised"].items())
    out.append(report.verdict_line())
    return "\n".join(out)


def render_markdown(report: Report) -> str:
    """The report for a pull-request comment (GitHub-flavoured Markdown)."""
    tables = report.rows("markdown")
    badge = {"EQUIVALENT": "✅", "NOT EQUIVALENT": "❌"}.get(report.verdict, "⚪")
    verdict = report.verdict_line(label=False).replace(report.verdict, f"**{report.verdict}**", 1)
    out = [f"## {report.title()}", "", f"{badge} {verdict}", ""]
    for key, title in _SECTIONS:
        headers, rows = tables[key]
        out.append(f"### {title} ({len(rows)})")
        out.append("")
        out.append(md_table(headers, rows, code_cols={0, 1, 4} if key != "notes" else {0}) if rows else "_none_")
        out.append("")
    if tables["guards"][1]:
        out += [f"### Guards ({len(tables['guards'][1])})", "",
                "Specialised to the example inputs, checked when the model runs.", "",
                md_table(*tables["guards"], code_cols={0}), ""]
    out += ["### Summary", "", md_table(*tables["passes"]), "", md_table(*tables["counts"]), ""]
    out.extend(f"Specialised at trace time: `{k}={v}`" for k, v in report.summary()["specialised"].items())
    out += ["<details><summary>Generated <code>forward</code>, before → after</summary>", "",
            "```diff", report.code_diff(), "```", "", "</details>", ""]
    for mode, code in report.after.get("modes", {}).items():  # a forward that branches on self.training
        out += [f"<details><summary>{mode.capitalize()}-mode <code>forward</code></summary>", "",
                "```python", code.strip("\n"), "```", "", "</details>", ""]
    return "\n".join(out)


def _md_cell(value: Any, code: bool) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if code and text else text


def md_table(headers: list, rows: list, code_cols: set = frozenset()) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(v, i in code_cols) for i, v in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)
