"""The architecture rule, enforced: ``cli -> api -> {report, verify} -> passes -> capture ->
modules -> core``. Each layer imports only the layers below it, with no cycle; no import
inside a function except of an optional dependency; a pass never imports another pass."""

from __future__ import annotations

import ast
import pathlib

import pytest

import qprep
from qprep.passes import PIPELINE, pass_name

ROOT = pathlib.Path(qprep.__file__).resolve().parent
PASSES_DIR = pathlib.Path(qprep.passes.__file__).resolve().parent

#: layer -> rank; a module may import its own layer and layers of lower rank, never a
#: layer of the same rank (report and verify are siblings).
RANKS = {"core": 0, "examples": 0, "modules": 1, "capture": 2, "passes": 3, "verify": 4, "report": 4, "api": 5,
         "quant": 5, "cli": 6}
#: imported inside functions on purpose: optional dependencies.
OPTIONAL = {"jsonschema"}
PASS_MODULES = {f"qprep.passes.{pass_name(p)}" for p in PIPELINE}


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(("qprep", *parts)).removesuffix(".__init__")] = path
    for path in PASSES_DIR.glob("*.py"):
        files[f"qprep.passes.{path.stem}".removesuffix(".__init__")] = path
    return files


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module in ("qprep", "qprep.api", "qprep.testing", "qprep.serialize", "qprep.hf"):
        return "api"
    if module == "qprep.__main__":
        return "cli"
    return parts[1] if parts[1] in RANKS else "core"


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        is_package = MODULES.get(module, pathlib.Path()).name == "__init__.py"
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # `from pkg import sub` imports the submodule when there is one
    names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return names or [base]


def imports(module: str, source: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for each import of ``source``,
    skipping those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(source)
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((name, child.lineno, inside) for name in _resolve(module, child))
            visit(child, inside)

    visit(tree, False)
    return found


def violations(module: str, source: str) -> list[str]:
    """Every way ``source`` (the text of ``module``) breaks the rule."""
    out = []
    layer = layer_of(module)
    for target, line, in_function in imports(module, source):
        where = f"{module}:{line} imports {target}"
        top = target.split(".")[0]
        if in_function and top not in OPTIONAL:
            out.append(f"{where} inside a function (only optional dependencies may be imported there)")
        if top != "qprep":
            continue
        target_layer = layer_of(target)
        if target_layer != layer and RANKS[target_layer] >= RANKS[layer]:
            out.append(f"{where}: layer {layer} may not import layer {target_layer}")
        if module in PASS_MODULES and target in PASS_MODULES and target != module:
            out.append(f"{where}: a pass never imports another pass")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among qprep's modules (each as the list of modules around it)."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


MODULES = module_files()


def test_every_module_keeps_the_layer_rule():
    found = [v for module, path in MODULES.items() for v in violations(module, path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


def _with_packages(target: str) -> set[str]:
    """Importing ``a.b.c`` runs the ``a.b`` package first (the root package is always running)."""
    parts = target.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(MODULES)


def test_no_import_cycles():
    graph = {}
    for module, path in MODULES.items():
        targets = set()
        for target, _, _ in imports(module, path.read_text(encoding="utf-8")):
            targets |= _with_packages(target)
        # a module inside a package does not import that package by being in it
        graph[module] = {t for t in targets if t != module and not module.startswith(t + ".")}
    assert cycles(graph) == []


@pytest.mark.parametrize("module, source, message", [
    ("qprep.core.graph", "from qprep.passes import PIPELINE\n", "layer core may not import layer passes"),
    ("qprep.modules.base", "from ..capture import trace\n", "layer modules may not import layer capture"),
    ("qprep.report.model", "from ..verify import compare\n", "layer report may not import layer verify"),
    ("qprep.verify.compare", "from ..api import prepare\n", "layer verify may not import layer api"),
    ("qprep.passes.wrap_tensor_ops", "from qprep.passes.convert_functionals import spec_for\n",
     "a pass never imports another pass"),
    ("qprep.capture.tracer", "def f():\n    import qprep.modules\n", "inside a function"),
])
def test_the_checker_catches_each_kind_of_violation(module, source, message):
    assert any(message in v for v in violations(module, source))


def test_the_checker_accepts_downward_imports_and_optional_lazy_ones():
    source = "from ..core import meta\nfrom . import html\ndef f():\n    import jsonschema\n"
    assert violations("qprep.report.model", source) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
