"""Structure the code keeps: the runtime's load options are listed in one definition, and the Nextcloud connector's
modules import each other without a cycle (type-only imports included)."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from runtime.options import LoadOptions

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {f.name for f in fields(LoadOptions)}


def _names(node: ast.AST) -> set[str]:
    """The option names a definition or a call lists: parameters, class fields, keywords, dict keys."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        return {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    if isinstance(node, ast.ClassDef):
        return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    if isinstance(node, ast.Call):
        return {k.arg for k in node.keywords if k.arg}
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return set()


def option_lists(root: Path = ROOT) -> list[str]:
    """Every place in the product code and scripts that spells out four or more of the load options."""
    found = []
    for folder in ("runtime", "backend", "exporters", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                listed = _names(node) & OPTIONS
                if len(listed) >= 4:
                    found.append(f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)} {sorted(listed)}")
    return found


def test_the_load_options_are_listed_once() -> None:
    # A new option is a field of LoadOptions and its use; the settings (T2I_*), Pipeline.load, the engines and the
    # front ends take the whole value, so none of them spells the list out again.
    assert option_lists() == [f"runtime/options.py:{_line('class LoadOptions')} {sorted(OPTIONS)}"]


def _line(text: str) -> int:
    lines = (ROOT / "runtime" / "options.py").read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(text))


def import_graph(package: str = "backend.nextcloud", root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``, counting every import: at the top, inside functions and under
    ``TYPE_CHECKING`` (a type-only cycle still ties the two modules together)."""
    folder = root.joinpath(*package.split("."))
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # from package import module
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or [] when none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return []
        for other in sorted(graph[module]):
            found = visit(other, [*path, module])
            if found:
                return found
        done.add(module)
        return []

    for module in sorted(graph):
        found = visit(module, [])
        if found:
            return found
    return []


def test_the_nextcloud_connector_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"backend.nextcloud.exapp", "backend.nextcloud.admin_loop", "backend.nextcloud.models"} <= set(graph)
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"], "the check finds a cycle"
    assert cycle(graph) == []
