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
