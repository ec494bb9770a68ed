"""The ``qprep`` command line: real processes, exit codes and files.

The commands that must be checked as separate processes start together in one fixture
(each pays torch's import once, in parallel); the other cases call ``qprep.cli.main``
in-process, which returns the same exit status.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import qprep
import qprep.serialize
from qprep.cli import EXIT_CODES, main
from qprep.cli.inputs import load_model
from qprep.examples import DistillerBlock
from qprep.report import validate

MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class ModelA(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.fc = nn.Linear(width, width)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.act(self.fc(x))
            y = y + x  # residual
            y = F.relu(y)  # functional
            return self.act(y)  # re-used


    class ModelB(nn.Module):
        """Same input and output shapes as ModelA, other computation."""

        def __init__(self, width=4):
            super().__init__()
            self.fc = nn.Linear(width, width)

        def forward(self, x):
            return torch.tanh(self.fc(x))


    class Ready(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            return self.body(x)


    def make_a(width=4):
        return ModelA(width)


    instance = Ready()


    def not_a_module():
        return 3


    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None, scale=1.0):
            y = self.fc(x) * scale
            if mask is not None:
                y = y * mask
            return y


    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * 2


    class WithLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Opaque()

        def forward(self, x):
            return self.inner(x) + x
''')

DISTILLER = ["qprep.examples:DistillerBlock", "--kwargs", '{"in_ch": 4, "out_ch": 4}', "--input-shape", "1,4,8,8"]


def line_of(text: str) -> int:
    lines = [i for i, line in enumerate(MODELS.splitlines(), 1) if text in line]
    assert len(lines) == 1
    return lines[0]


def at(text: str) -> str:
    """``models_cli.py:LINE`` of ``text``, as a regex: in-process, qprep may show the path
    relative to an earlier working directory, or absolute (its relpath cache)."""
    return rf"(\S*/)?models_cli\.py:{line_of(text)}\b"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "models_cli.py").write_text(MODELS)
    torch.manual_seed(0)
    other = load_model(f"{root / 'models_cli.py'}:ModelB").eval()
    qprep.serialize.save(qprep.prepare(other, (torch.randn(3, 4),)), root / "b.qprep")
    return root


class Background:
    """``python -m qprep ...`` processes started together when the module's first test
    runs; the in-process tests run while they work, the process tests (at the end) wait."""

    COMMANDS = {
        "prepare": ["prepare", *DISTILLER, "-o", "prepared.qprep", "--report", "report.json"],
        "verify_other": ["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--prepared", "b.qprep",
                         "--trials", "2", "--json"],
        "bad_spec": ["check", "no_such_module_qprep:Model"],
    }

    def __init__(self, workdir: pathlib.Path):
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.procs = {name: subprocess.Popen([sys.executable, "-m", "qprep", *argv], cwd=workdir, env=env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                      for name, argv in self.COMMANDS.items()}
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        if name not in self.done:
            proc = self.procs[name]
            out, err = proc.communicate(timeout=300)
            self.done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self.done[name]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def runs(workdir):
    background = Background(workdir)
    yield background
    background.close()


def explain(run: subprocess.CompletedProcess) -> str:
    return f"exit {run.returncode}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("argv, message", [
    (["check", "models_cli.py:ModelA", "--kwargs", "{bad"], "not valid JSON"),
    (["check", "models_cli.py:ModelA", "--kwargs", '{"depth": 2}'], "unexpected keyword"),
    (["check", "models_cli.py:Missing"], "no attribute 'Missing'"),
    (["check", "missing_file.py:ModelA"], "no such file"),
    (["check", "models_cli.py"], "package.module:attr"),
    (["check", "models_cli.py:not_a_module"], "not an nn.Module"),
    (["check", "models_cli.py:instance", "--kwargs", "{}"], None),
    (["check", "models_cli.py:instance", "--kwargs", '{"a": 1}'], "instance"),
    (["verify", "models_cli.py:ModelA"], "needs example inputs"),
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,5"], "do not run through ModelA"),
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--dtype", "float32", "--dtype", "int64"], "--dtype"),
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,x"], "comma-separated integers"),
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--dtype", "float33"], "unknown dtype"),
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--prepared", "missing.pt"], "cannot load"),
    (["diff", "models_cli.py:ModelA", "--input-shape", "3,4", "-o", "report.pdf"], "report format"),
    # more inputs than forward takes
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--input-shape", "3,4"],
     "2 example inputs given, but ModelA.forward takes 1 positional input (x)"),
    (["prepare", "models_cli.py:ModelA", "--input-shape", "3,4", "--input-shape", "3,4", "-o", "x.qprep"],
     "takes 1 positional input"),
    # empty inputs prove nothing
    (["prepare", "models_cli.py:ModelA", "--input-shape", "0,4", "-o", "x.qprep"],
     "input 1 (shape 0x4) is empty: ops on an empty tensor compute nothing"),
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,0"], "is empty"),
    # --concrete
    (["verify", "models_cli.py:Masked", "--input-shape", "3,4", "--concrete", "scale"], "NAME=VALUE"),
    (["verify", "models_cli.py:Masked", "--input-shape", "3,4", "--concrete", "scale=two"], "is not JSON"),
    (["verify", "models_cli.py:Masked", "--input-shape", "3,4", "--concrete", "scale=1", "--concrete", "scale=2"],
     "given twice"),
    (["verify", "models_cli.py:Masked", "--input-shape", "3,4", "--concrete", "shift=1.0"],
     "concrete_args names 'shift', which Masked.forward does not take"),
    (["verify", "models_cli.py:Masked", "--input-shape", "3,4", "--input-shape", "3,4", "--concrete", "mask=null"],
     "'mask' is given twice: as example input 2 and in concrete_args"),
    # prepared-model files
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--trust", "models_cli.py:Opaque"], "--prepared"),
    (["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--prepared", "b.qprep", "--pickle",
      "--trust", "models_cli.py:Opaque"], "exclude each other"),
])
def test_usage_errors_exit_2(workdir, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(workdir)
    code = main(argv)
    err = capsys.readouterr().err
    if message is None:  # `{}` kwargs on an instance are fine: Ready is ready
        assert code == 0
        return
    assert code == 2, err
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["prepare", "-o", "/nonexistent_dir_qprep/x.qprep"], "folder '/nonexistent_dir_qprep' does not exist"),
    (["prepare", "-o", ".", "--report", "r.json"], "is a folder"),
    (["prepare", "-o", "x.qprep", "--report", "r.pdf"], "cannot tell the report format from 'r.pdf'"),
    (["prepare", "-o", "x.qprep", "--report", "/nonexistent_dir_qprep/r.json"], "does not exist"),
    (["diff", "-o", "/nonexistent_dir_qprep/r.html"], "does not exist"),
])
def test_output_paths_are_checked_before_any_work(workdir, monkeypatch, capsys, argv, message):
    """A bad output path fails at once: the model is not even loaded."""
    monkeypatch.chdir(workdir)
    loaded = []
    cli_main = sys.modules["qprep.cli.main"]  # the module (qprep.cli.main is also the function's name)
    monkeypatch.setattr(cli_main, "setup", lambda args: loaded.append(args) or pytest.fail("model loaded"))
    command, *rest = argv
    code = main([command, "models_cli.py:ModelA", "--input-shape", "3,4", *rest])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.strip().count("\n") == 0 and not loaded
    assert not list(workdir.glob("*.tmp")) and not list(workdir.glob(".x.qprep*"))


def test_concrete_flag_fixes_arguments_for_preparing_and_verifying(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    concrete = ["--concrete", "scale=2.0", "--concrete", "mask=null"]
    code = main(["prepare", "models_cli.py:Masked", "--input-shape", "3,4", *concrete, "-o", "masked.qprep"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "specialised at trace time: mask=None" in out and "specialised at trace time: scale=2.0" in out
    assert "verification: EQUIVALENT" in out and "computes the same: yes" in out
    gm = qprep.serialize.load(workdir / "masked.qprep")
    torch.manual_seed(0)
    model = load_model(f"{workdir / 'models_cli.py'}:Masked").eval()
    x = torch.randn(5, 4)
    assert torch.equal(gm(x, None, 2.0), model(x, None, 2.0))
    assert not torch.equal(model(x, None, 2.0), model(x))  # the value given is the value used
    verify = ["verify", "models_cli.py:Masked", "--input-shape", "3,4", "--prepared", "masked.qprep", "--trials", "2"]
    assert main([*verify, "--concrete", "scale=2.0"]) == 0
    assert "verdict: EQUIVALENT (2 runs)" in capsys.readouterr().out
    assert main(verify) == 1  # called with the default scale=1.0, the specialised model refuses
    assert "GuardError" in (err := capsys.readouterr().err) and "`scale` gave 1.0, the model was prepared for 2.0" in err


def test_pickle_is_an_opt_in_with_a_warning(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["prepare", "models_cli.py:ModelA", "--input-shape", "3,4", "-o", "a.pt", "--pickle"]) == 0
    captured = capsys.readouterr()
    assert "warning: --pickle" in captured.err and "weights_only=False" in captured.err
    assert "torch.load(path, weights_only=False), only if you trust the file" in captured.out
    assert isinstance(torch.load(workdir / "a.pt", weights_only=False), torch.fx.GraphModule)
    verify = ["verify", "models_cli.py:ModelA", "--input-shape", "3,4", "--prepared", "a.pt"]
    assert main(verify) == 2  # the default loader reads data only, and says what to do
    err = capsys.readouterr().err
    assert "not a qprep model file" in err and "--pickle" in err and err.strip().count("\n") == 0
    assert main([*verify, "--pickle"]) == 0
    captured = capsys.readouterr()
    assert "verdict: EQUIVALENT" in captured.out and "warning: --pickle" in captured.err
    assert not list(workdir.glob(".a.pt*"))  # written through a temporary file, replaced atomically


def test_default_file_is_data_and_trust_names_what_it_needs(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    code = main(["prepare", "models_cli.py:WithLeaf", "--input-shape", "3,4", "--leaf", "models_cli.py:Opaque",
                 "-o", "leaf.qprep"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "trusted=[Opaque]" in out and "--trust models_cli:Opaque" in out and "computes the same: yes" in out
    with zipfile.ZipFile(workdir / "leaf.qprep") as zf:
        assert set(zf.namelist()) == {"forward.py", "model.json", "weights.pt"}
        assert "self.inner(x)" in zf.read("forward.py").decode()
    verify = ["verify", "models_cli.py:WithLeaf", "--input-shape", "3,4", "--prepared", "leaf.qprep"]
    assert main(verify) == 2
    err = capsys.readouterr().err
    assert "'models_cli.Opaque' is not allowlisted" in err and "--trust models_cli:Opaque" in err
    assert main([*verify, "--trust", "models_cli.py:Opaque", "--trials", "2"]) == 0
    assert "verdict: EQUIVALENT (2 runs)" in capsys.readouterr().out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["verify"])
    assert info.value.code == 2
    assert main([]) == 2
    assert "exit codes" in capsys.readouterr().err
    for code in (0, 1, 2):
        assert code in EXIT_CODES


def test_untraceable_model_exits_2_or_prepares_with_leaf(workdir, monkeypatch, capsys):
    (workdir / "branchy_cli.py").write_text(textwrap.dedent('''
        import torch.nn as nn

        class Inner(nn.Module):
            def forward(self, x):
                return x * 2 if x.sum() > 0 else x

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
                self.inner = Inner()

            def forward(self, x):
                return self.inner(self.fc(x))
    '''))
    monkeypatch.chdir(workdir)
    assert main(["check", "branchy_cli.py:Net"]) == 2
    err = capsys.readouterr().err
    assert "cannot trace module 'inner'" in err and err.strip().count("\n") == 0
    assert main(["check", "branchy_cli.py:Net", "--on-untraceable", "leaf"]) == 0
    out = capsys.readouterr().out
    assert "READY" in out and "not checked: self.inner (Inner)" in out
    assert main(["check", "branchy_cli.py:Net", "--leaf", "inner", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["ready"] is True
    assert main(["check", "branchy_cli.py:Net", "--leaf", "branchy_cli.py:Inner"]) == 0


def test_check_text_and_json(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["check", "models_cli.py:make_a", "--kwargs", '{"width": 4}']) == 1
    out = capsys.readouterr().out
    assert "NOT READY: 3 op(s)" in out and re.search(at("# residual"), out)
    assert main(["check", "models_cli.py:ModelA", "--format", "json", "--input-shape", "2,4"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ready"] is False
    assert [f["kind"] for f in result["findings"]] == ["tensor op", "functional", "re-used module"]
    assert [f["suggested_module"] for f in result["findings"]] == [
        "qprep.modules.Add", "torch.nn.ReLU", "torch.nn.ReLU"]
    assert re.fullmatch(at("# re-used"), result["findings"][2]["location"])
    assert main(["check", "models_cli.py:Ready"]) == 0
    assert "READY" in capsys.readouterr().out


def test_diff_formats(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    base = ["diff", "models_cli.py:ModelA", "--input-shape", "3,4"]
    assert main([*base, "--format", "json"]) == 0
    validate(json.loads(capsys.readouterr().out))
    assert main([*base, "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("## qprep report: ModelA")
    assert main([*base, "-o", "diff.html"]) == 0
    assert 'class="node new"' in (workdir / "diff.html").read_text()
    assert main([*base, "--format", "text", "-o", "diff.out"]) == 0
    assert "Rewritten (3)" in (workdir / "diff.out").read_text()
    assert main(["diff", "models_cli.py:ModelA"]) == 0  # no inputs: not verified
    assert "verification: not run" in capsys.readouterr().out


def test_inputs_file_and_int_inputs(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    torch.save((torch.randn(5, 4),), workdir / "inputs.pt")
    assert main(["verify", "models_cli.py:ModelA", "--inputs", "inputs.pt", "--trials", "2"]) == 0
    assert "verdict: EQUIVALENT (2 runs)" in capsys.readouterr().out
    (workdir / "tokens_cli.py").write_text(textwrap.dedent('''
        import torch.nn as nn

        class Tokens(nn.Module):
            def __init__(self, vocab=10):
                super().__init__()
                self.embed = nn.Embedding(vocab, 3)

            def forward(self, ids, mask):
                return self.embed(ids) * mask.unsqueeze(-1)
    '''))
    argv = ["verify", "tokens_cli.py:Tokens", "--input-shape", "2,5", "--input-shape", "2,5",
            "--dtype", "int64", "--dtype", "float32", "--int-range", "0,10", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["equal"] is True
    assert main([*argv[:-3], "--int-range", "10,0"]) == 2


def test_check_github_annotations(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["check", "models_cli.py:ModelA", "--format", "github"]) == 1
    lines = capsys.readouterr().out.splitlines()

    def annotation(text: str, kind: str) -> str:
        return rf"::warning file=(\S*/)?models_cli\.py,line={line_of(text)},title=qprep%3A {kind}::"

    assert len(lines) == 3
    assert re.match(annotation("# residual", "tensor op"), lines[0])
    assert lines[0].endswith("::tensor op operator.add is not a module, so a module-level quantizer misses it; "
                             "fix: call a qprep.modules.Add module instead")
    assert re.match(annotation("# functional", "functional"), lines[1]) and "torch.nn.ReLU" in lines[1]
    assert re.match(annotation("# re-used", "re-used module"), lines[2]) and "self.act (2nd call)" in lines[2]


def test_demo(capsys, tmp_path):
    assert main(["demo", "-o", str(tmp_path), "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "qprep report: DistillerBlock" in out and "qprep report: TinyLSTMLM" in out
    assert "self.relu (2nd call)" in out and "qprep.modules.ModularLSTM" in out
    assert out.count("verification: EQUIVALENT") == 2 and out.count("verdict: EQUIVALENT (2 runs)") == 2
    assert {p.name for p in tmp_path.iterdir()} == {"distiller.html", "lstm.html"}
    assert main(["demo", "--example", "nope"]) == 2


# -- separate processes (started in the background by the `runs` fixture) ---------------------
def test_prepare_saves_a_model_that_loads_and_computes_the_same(runs, workdir):
    run = runs["prepare"]
    assert run.returncode == 0, explain(run)
    assert "Rewritten (4)" in run.stdout and "verification: EQUIVALENT" in run.stdout
    assert "the reloaded model computes the same: yes" in run.stdout
    assert "load it with qprep.serialize.load(path)" in run.stdout
    loaded = qprep.serialize.load(workdir / "prepared.qprep")
    assert isinstance(loaded, torch.fx.GraphModule) and "self.add(" in loaded.code
    torch.manual_seed(0)  # the CLI builds the model after torch.manual_seed(--seed=0)
    model = DistillerBlock(in_ch=4, out_ch=4).eval()
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(loaded(x), model(x))
    document = json.loads((workdir / "report.json").read_text())
    validate(document)
    assert document["model"] == "DistillerBlock" and document["verification"]["equal"] is True
    assert {r["module_type"] for r in document["rewrites"]} == {
        "qprep.modules.Add", "torch.nn.ReLU", "qprep.modules.Cat", "torch.nn.Sigmoid"}


def test_verify_the_file_prepare_wrote_exits_0(runs, workdir, monkeypatch, capsys):
    """A model built from the same spec in another process has the same weights (seeded)."""
    assert runs["prepare"].returncode == 0
    monkeypatch.chdir(workdir)
    code = main(["verify", *DISTILLER, "--prepared", "prepared.qprep", "--trials", "2", "--train", "--grad"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict: EQUIVALENT (4 runs)" in out
    assert out.count(" train ") == 2 and out.count(" eval ") == 2


def test_verify_a_prepared_file_from_another_model_exits_1(runs):
    run = runs["verify_other"]
    assert run.returncode == 1, explain(run)
    result = json.loads(run.stdout)
    assert result["schema"] == "qprep.verify/1" and result["equal"] is False
    assert [(r["trial"], r["mode"], r["seed"]) for r in result["runs"]] == [(1, "eval", 0), (2, "eval", 1)]
    assert all(r["result"]["equal"] is False for r in result["runs"])
    assert "trial 1/2 (eval)" in run.stderr and "trial 2/2 (eval)" in run.stderr


def test_bad_model_spec_exits_2_with_one_line(runs):
    run = runs["bad_spec"]
    assert run.returncode == 2, explain(run)
    assert run.stdout == ""
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "no_such_module_qprep" in run.stderr
