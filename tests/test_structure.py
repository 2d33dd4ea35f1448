"""The package's architecture, checked from its source: imports point one way (from studies down to core), no
module imports another inside a function (a cycle dodged that way is still a cycle), and no import cycle."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lxmert"
# Sub-packages from the foundations up: a module may import its own sub-package and those before it.
LAYERS = ["core", "data", "modeling", "prune", "train", "embedded", "studies"]


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The package modules an import statement names (resolved from relative form)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lxmert"]
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if base.split(".")[0] != "lxmert":
        return []
    known = _modules()
    out = []
    for alias in node.names:  # `from . import a` names modules; `from .a import f` names a function of .a
        out.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module-level imports of package modules per module, and every import made inside a function."""
    graph: dict[str, set[str]] = {}
    nested: list[str] = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        graph[module] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in _target(module, node, is_package) if t != module]
            if node in tree.body:
                graph[module].update(t for t in targets if t in _modules() or t + ".__init__" in _modules())
            elif targets:
                nested.append(f"{module} line {node.lineno}: {targets}")
    return graph, nested


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else len(LAYERS)


def test_every_module_lives_in_a_layer():
    loose = [m for m in _modules() if _layer(m) == len(LAYERS) and m not in ("lxmert.__init__", "lxmert.__main__")]
    assert not loose, f"modules outside the sub-packages {LAYERS}: {loose}"


def test_imports_point_down_the_layers():
    graph, _ = _imports()
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_package_module_is_imported_inside_a_function():
    _, nested = _imports()
    assert not nested, "in-function imports of package modules (a cycle dodged is still a cycle):\n" + "\n".join(nested)


def test_no_import_cycle():
    graph, _ = _imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above find what they look for: a fake package with a cycle, an upward import and an
    import inside a function."""
    fake = tmp_path / "lxmert"
    for sub in ("core", "studies"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "core" / "a.py").write_text("from . import b\nfrom ..studies import c\n")
    (fake / "core" / "b.py").write_text("from .a import x\n")
    (fake / "studies" / "c.py").write_text("def f():\n    from ..core import a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph, nested = _imports()
    assert graph["lxmert.core.a"] == {"lxmert.core.b", "lxmert.studies.c"} and graph["lxmert.core.b"] == {"lxmert.core.a"}
    assert nested == ["lxmert.studies.c line 2: ['lxmert.core.a']"]
    upward = [t for m, ts in graph.items() for t in ts if _layer(t) > _layer(m)]
    assert upward == ["lxmert.studies.c"]
