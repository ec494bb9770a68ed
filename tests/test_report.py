"""qprep.report: one Report object, rendered as text, markdown, JSON, HTML and a code diff."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess

import pytest
import torch
import torch.fx
import torch.nn as nn

import qprep
import qprep.examples
from qprep.examples import DistillerBlock, TinyLSTMLM
from qprep.passes import PIPELINE, pass_name
from qprep import diff
from qprep.report import Report, json_schema, source_uri, split_location, validate

EXAMPLES_PY = pathlib.Path(qprep.examples.__file__)


def source_lines(code: str, path: pathlib.Path = EXAMPLES_PY) -> list[int]:
    """1-based numbers of the lines of ``path`` that are ``code`` (stripped)."""
    return [i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == code]


@pytest.fixture(scope="module")
def distiller():
    torch.manual_seed(0)
    model = DistillerBlock().eval()
    inputs = model.example_inputs()
    gm = qprep.prepare(model, inputs)
    return model, inputs, gm, diff(model, gm)


@pytest.fixture(scope="module")
def lstm():
    torch.manual_seed(0)
    model = TinyLSTMLM().eval()
    return qprep.diff(model, example_inputs=model.example_inputs())


def by_op(report: Report) -> dict:
    return {c.op: c for c in report.rewrites}


def test_distiller_rows(distiller):
    _, _, gm, report = distiller
    rows = by_op(report)
    assert [c.op for c in report.rewrites] == [  # in the order of the user's forward
        "operator.iadd", "self.relu (2nd call)", "torch.cat", "Tensor.sigmoid"]
    assert (rows["operator.iadd"].pass_name, rows["operator.iadd"].module_name, rows["operator.iadd"].module_type) \
        == ("wrap_tensor_ops", "add", "qprep.modules.Add")
    relu = rows["self.relu (2nd call)"]
    assert (relu.pass_name, relu.module_name, relu.module_type) == ("split_reused_modules", "relu_1", "torch.nn.ReLU")
    assert (rows["torch.cat"].module_name, rows["torch.cat"].module_type) == ("cat", "qprep.modules.Cat")
    sigmoid = rows["Tensor.sigmoid"]
    assert (sigmoid.pass_name, sigmoid.module_type) == ("convert_functionals", "torch.nn.Sigmoid")
    for c in report.rewrites:  # each row points at the node of the prepared graph calling the new module
        assert gm.get_submodule(c.module_name) is not None
        assert report.after_node(c) in {n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == c.module_name}
    assert report.left_alone == () and report.notes == ()


def test_distiller_source_lines(distiller):
    """``out += identity`` is reported at its line of qprep/examples.py, with the code."""
    report = distiller[3]
    rows = by_op(report)
    expected = {
        "operator.iadd": "out += identity",
        "self.relu (2nd call)": "out = self.relu(out)",
        "torch.cat": "out = torch.cat([identity, out], dim=1)",
        "Tensor.sigmoid": "out = F.sigmoid(out)",
    }
    for op, code in expected.items():
        path, line = split_location(rows[op].location)
        assert pathlib.Path(path).resolve() == EXAMPLES_PY.resolve(), rows[op]
        lines = source_lines(code)  # `out = self.relu(out)` is there twice: the 2nd call is the 2nd line
        assert line == (lines[1] if op == "self.relu (2nd call)" else lines[0]), rows[op]
        assert len(lines) == (2 if op == "self.relu (2nd call)" else 1)
        assert rows[op].code == code


def test_text(distiller):
    report = distiller[3]
    text = report.text()
    assert text.startswith("qprep report: DistillerBlock")
    for expected in ("Rewritten (4)", "Left alone (0)", "Notes (0)", "qprep.modules.Add", "relu_1",
                     "self.relu (2nd call)", "qprep.modules.Cat", "torch.nn.Sigmoid", "split_reused_modules",
                     "unchanged", "verification: EQUIVALENT (eval mode, default kernels"):
        assert expected in text, expected
    summary = report.summary()
    assert summary["per_pass"]["wrap_tensor_ops"] == {"rewritten": 2, "left_alone": 0, "notes": 0, "changed": True}
    assert summary["per_pass"]["expand_rnns"]["changed"] is False
    assert summary["parameters"]["before"] == summary["parameters"]["after"] == \
        sum(p.numel() for p in distiller[0].parameters())
    assert summary["modules"]["after"] == summary["modules"]["before"] + 4
    assert str(report) == text


def test_parameter_change_is_flagged(distiller):
    report = distiller[3]
    broken = dataclasses.replace(report, after={**report.after, "parameters": report.after["parameters"] + 1})
    assert not broken.parameters_unchanged
    assert "DIFFERENT" in broken.text() and "DIFFERENT" in broken.markdown() and "DIFFERENT" in broken.html()
    assert broken.as_dict()["summary"]["parameters"]["unchanged"] is False


def test_json_follows_schema(distiller, lstm):
    for report in (distiller[3], lstm):
        document = json.loads(report.json())
        validate(document)
        assert document["schema"] == "qprep.report/1" == json_schema()["properties"]["schema"]["const"]
        assert [r["op"] for r in document["rewrites"]] == [c.op for c in report.rewrites]
    document = distiller[3].as_dict()
    assert document["verification"]["equal"] is True
    assert document["passes"] == [pass_name(p) for p in PIPELINE]
    add = next(r for r in document["rewrites"] if r["op"] == "operator.iadd")
    assert add["after_node"] and add["module_type"] == "qprep.modules.Add" and add["submodules"] == []
    after = {n["name"]: n for n in document["graph"]["after"]["nodes"]}
    assert after[add["after_node"]]["status"] == "new"
    before = {n["name"]: n for n in document["graph"]["before"]["nodes"]}
    assert before[add["node"]]["status"] == "rewritten"


def test_schema_checks_without_jsonschema(distiller, monkeypatch):
    """The fallback checker (jsonschema is not a dependency) accepts reports and names bad fields."""
    import builtins

    real_import = builtins.__import__

    def no_jsonschema(name, *args, **kwargs):
        if name == "jsonschema":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jsonschema)
    document = distiller[3].as_dict()
    validate(document)
    document["rewrites"][0]["action"] = "moved"
    with pytest.raises(ValueError, match=r"\['rewrites'\]\[0\]\['action'\]"):
        validate(document)
    del document["summary"]["parameters"]["unchanged"]
    document["rewrites"][0]["action"] = "rewritten"
    with pytest.raises(ValueError, match="unchanged"):
        validate(document)


def test_schema_rejects_bad_documents_with_jsonschema(distiller):
    pytest.importorskip("jsonschema")
    document = distiller[3].as_dict()
    document["schema"] = "qprep.report/0"
    with pytest.raises(ValueError, match="schema"):
        validate(document)


def test_markdown(distiller):
    md = distiller[3].markdown()
    assert md.startswith("## qprep report: DistillerBlock")
    assert "✅ **EQUIVALENT** (eval mode" in md
    assert "| code | op | location | pass | new module | type |" in md
    assert "`operator.iadd`" in md and "qprep.modules.Add" in md
    assert "`relu_1`" in md and "```diff" in md


def test_code_diff(distiller):
    text = distiller[3].code_diff()
    lines = text.splitlines()
    assert lines[0] == "--- before/forward" and lines[1] == "+++ after/forward"
    assert any(line.startswith("-") and "+= x" in line for line in lines)
    assert any(line.startswith("+") and "self.add(" in line for line in lines)
    assert any(line.startswith("+") and "self.relu_1(" in line for line in lines)
    assert not any(line.startswith(("-", "+")) and "self.conv1(" in line for line in lines)


def test_write_picks_format_by_suffix(distiller, tmp_path):
    report = distiller[3]
    for suffix, start in ((".html", "<!DOCTYPE html>"), (".md", "## qprep report"), (".txt", "qprep report"),
                          (".json", "{")):
        path = report.write(tmp_path / f"r{suffix}")
        assert path.read_text(encoding="utf-8").startswith(start)
    validate(json.loads((tmp_path / "r.json").read_text()))
    with pytest.raises(qprep.InputError, match="suffix|format"):
        report.write(tmp_path / "r.pdf")


def test_html_is_self_contained_and_highlights(distiller):
    page = distiller[3].html()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<style>" in page and "<script>" in page
    for external in ("http://", "https://", "<link", "src="):
        assert external not in page, external
    assert 'class="node rewritten" id="before-iadd"' in page
    after_add = distiller[3].after_node(by_op(distiller[3])["operator.iadd"])
    assert f'class="node new" id="after-{after_add}"' in page
    assert 'id="before-relu_1"' in page and 'data-pair="after-relu_1"' in page
    assert '<span class="badge EQUIVALENT" id="verdict">' in page
    assert 'class="diff"' in page and "self.add(" in page
    for c in distiller[3].rewrites:
        if c.location:
            assert source_uri(c.location) in page


def test_source_links():
    here = pathlib.Path(__file__)
    uri = source_uri(f"{here}:12")
    assert uri == here.resolve().as_uri() + "#L12"
    assert split_location("a/b.py:7") == ("a/b.py", 7)
    assert source_uri("") == "" and split_location("nowhere") == ("nowhere", None)


def test_lstm_report(lstm):
    rows = by_op(lstm)
    expanded = rows["self.lstm (torch.nn.LSTM)"]
    assert (expanded.pass_name, expanded.module_type) == ("expand_rnns", "qprep.modules.ModularLSTM")
    assert rows["self.drop (2nd call)"].module_name == "drop_1"
    inner = dict(lstm.submodules["lstm"])
    assert inner["layers.1.cell"] == "qprep.modules.ModularLSTMCell"
    assert {c.reason for c in lstm.left_alone} == {"data movement: stays a graph node by policy"}
    assert lstm.parameters_unchanged
    assert lstm.verdict == "EQUIVALENT"
    assert "native kernels" in lstm.text()
    assert "ModularLSTMCell" in lstm.html()


def test_notes_and_unverified():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Branchy()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.relu(self.inner(self.fc(x)))

    report = diff(Net(), on_untraceable="leaf")
    assert report.verdict == "NOT VERIFIED"
    assert "not run" in report.text()
    (note,) = report.notes
    assert (note.pass_name, note.module_name) == ("trace", "inner")
    assert "opaque leaf" in note.reason and "control flow" in note.reason
    assert "Notes (1)" in report.text()
    validate(report.as_dict())
    assert report.as_dict()["verification"] is None


def test_diff_reuses_or_makes_the_preparation(distiller):
    model, inputs, gm, report = distiller
    assert diff(model, gm).preparation is report.preparation
    assert Report.of(gm).preparation is report.preparation
    plain = torch.fx.symbolic_trace(model)  # a GraphModule qprep did not make: prepared again
    again = diff(model, plain, inputs)
    assert again.preparation is not report.preparation
    assert [c.op for c in again.rewrites] == [c.op for c in report.rewrites]
    with pytest.raises(qprep.InputError):
        Report.of(plain)


def test_prepare_writes_the_report(tmp_path):
    torch.manual_seed(0)
    model = DistillerBlock(4, 4).eval()
    qprep.prepare(model, model.example_inputs(batch=1, size=6), report=str(tmp_path / "r.md"))
    assert "Rewritten (4)" in (tmp_path / "r.md").read_text()


def _chromium(*args: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([shutil.which("chromium"), *flags, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_html_in_headless_chromium(lstm, tmp_path):
    page = lstm.write(tmp_path / "report.html")
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri(), tmp_path=tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one
    dom = _chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path).stdout
    assert 'class="node rewritten" id="before-lstm"' in dom
    assert 'class="node new" id="after-lstm"' in dom
    assert 'class="node left_alone"' in dom
    assert "EQUIVALENT" in dom and "ModularLSTMCell" in dom
