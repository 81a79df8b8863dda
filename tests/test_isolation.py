"""The runtime stands alone: no torch, diffusers, transformers or optimum; and layers import downward only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'optimum'}:
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
"""


def test_runtime_generates_without_torch(onnx_bundle: Path, openvino_bundle: Path) -> None:
    code = _BLOCKER + f"""
from runtime import Pipeline
for path, engine in [({str(onnx_bundle)!r}, 'onnxruntime'), ({str(openvino_bundle)!r}, 'openvino')]:
    images = Pipeline.load(path, device='cpu', engine=engine, threads=1).generate('a fox', steps=2, seed=1)
    assert images[0].size == (256, 256), images[0].size
blocked = [m for m in sys.modules if m.split('.')[0] in {{'torch', 'diffusers', 'transformers', 'optimum'}}]
assert not blocked, blocked
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def _imports(folder: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_layers_import_downward_only() -> None:
    runtime = _imports("runtime")
    assert not runtime & {"torch", "diffusers", "transformers", "optimum", "exporters", "backend"}, runtime
    exporters = _imports("exporters")
    assert "backend" not in exporters, exporters


def test_no_source_file_is_too_long() -> None:
    long = [str(p.relative_to(ROOT)) for folder in ("runtime", "exporters", "backend", "tests")
            for p in (ROOT / folder).rglob("*.py") if len(p.read_text(encoding="utf-8").splitlines()) > 420]
    assert not long, long
