"""Layering: ``study/`` never imports ``baselines`` or ``analysis`` (they depend on it, not the reverse).

Every module under study/ is parsed (ast) and every import is checked, module-level and inside functions,
``import x``, ``from x import y`` and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name.
The one documented exception is the command line's composition root, study/cli.py, which lists the
sub-commands, ``analysis``'s among them. Variants reach study's registry through entry points
(study/models/build.py), not imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("baselines", "analysis")
# Module (path relative to the repo) -> the forbidden packages it may import, and why.
EXCEPTIONS = {
    "study/cli.py": {"analysis"},  # the composition root of the `study` command: it lists analysis's sub-commands
}


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in a parsed module, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:  # relative imports stay inside study/
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def violations(root: Path, package: str = "study", exceptions: dict | None = None) -> list[str]:
    exceptions = EXCEPTIONS if exceptions is None else exceptions
    found = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        allowed = exceptions.get(rel, set())
        for line, module in imported_names(ast.parse(path.read_text(), filename=rel)):
            top = module.split(".")[0]
            if top in FORBIDDEN and top not in allowed:
                found.append(f"{rel}:{line} imports {module}")
    return found


def test_study_imports_neither_baselines_nor_analysis():
    assert violations(REPO) == []


def test_the_walk_finds_every_kind_of_import(tmp_path):
    pkg = tmp_path / "study" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "study" / "cli.py").write_text("import analysis.cli\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from baselines.variants import BUILDERS\n")
    (pkg / "b.py").write_text("import importlib\nm = importlib.import_module('analysis.tables')\n")
    (pkg / "c.py").write_text("class C:\n    def g(self):\n        import baselines\n")
    (pkg / "d.py").write_text("from . import a\nfrom study.models import build\n")  # allowed
    found = violations(tmp_path)
    assert found == ["study/sub/a.py:4 imports baselines.variants", "study/sub/b.py:2 imports analysis.tables",
                     "study/sub/c.py:3 imports baselines"]
    assert violations(tmp_path, exceptions={}) == ["study/cli.py:1 imports analysis.cli"] + found


def test_the_only_exception_is_still_needed():
    """An exception that no longer applies must be dropped, so the list stays the truth."""
    for rel, allowed in EXCEPTIONS.items():
        used = {m.split(".")[0] for _, m in imported_names(ast.parse((REPO / rel).read_text()))}
        assert allowed <= used, f"{rel} no longer imports {sorted(allowed - used)}: drop the exception"


# ------------------------------------------------------------------------------------------ import circles



def import_graph(root: Path, package: str = "study") -> dict[str, set[str]]:
    """File -> the files of ``package`` it imports, at any depth (inside functions too: a hidden import is an
    import); ``from a.b import c`` counts a/b/c.py when that is a module, else a/b.py (or its __init__)."""
    def file_of(module: str) -> str | None:
        base = root / Path(*module.split("."))
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand.relative_to(root).as_posix()
        return None

    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        targets = set()
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names if file_of(f"{node.module}.{a.name}")] \
                    or [node.module]
            for name in names:
                if name.split(".")[0] == package and (target := file_of(name)) and target != rel \
                        and not target.endswith("__init__.py"):
                    targets.add(target)
        graph[rel] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset]:
    """The strongly connected components of more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    """No file of study/ reaches itself through imports, function-level imports included (issue 25 broke the
    last three circles: config/launch/runs/build, backbone/dinov3/checkpoint, train loop/state)."""
    found = [sorted(c) for c in circles(import_graph(REPO))]
    assert found == [], "import circles (function-level imports included): " + str(found)


def test_the_circle_finder_sees_imports_hidden_in_functions(tmp_path):
    pkg = tmp_path / "study"
    (pkg / "launch").mkdir(parents=True)
    (pkg / "config.py").write_text("from study.launch.config import L\n")
    (pkg / "launch" / "config.py").write_text("def f():\n    from study.runs import check\n")
    (pkg / "runs.py").write_text("import study.config\n")
    (pkg / "apart.py").write_text("from study import runs\n")
    assert circles(import_graph(tmp_path)) == [frozenset({"study/config.py", "study/launch/config.py",
                                                          "study/runs.py"})]
