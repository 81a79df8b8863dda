"""What the package ships: the images install the built wheel (``pip install '.[cpu,nextcloud]'``), which must hold
the product and none of the development tools (the benchmark, the template builder, the full-size model), which need
torch, diffusers or optimum-intel and cannot run there. The development install (``pip install -e``) still imports
them, and ``text2image bench`` from a wheel says where the command lives instead of failing on an import."""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "exporters", "runtime")
DEV_ONLY = ("backend.bench", "exporters.dev")


def _build(tmp: Path, hook: str) -> Path:
    """The wheel (``build_wheel``) or editable wheel (``build_editable``) of a copy of the project, built by setuptools
    as pip would, outside the working tree (the build writes build/ and *.egg-info next to the sources)."""
    tree, out = tmp / "project", tmp / "dist"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in PACKAGES:
        shutil.copytree(REPO / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    out.mkdir()
    code = f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.splitlines()[-1].strip()


def _site_packages_without_pth() -> str:
    """The test environment's libraries as a plain path entry: its .pth files (the project's own editable install
    among them) are not run, so the imports below see only the wheel under test."""
    return sysconfig.get_paths()["purelib"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("wheel"), "build_wheel")


def test_the_wheel_holds_the_product_and_no_development_tools(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    dev = [n for n in names if n.startswith(("backend/bench/", "exporters/dev/"))
           or any(word in n for word in ("bench", "template_build", "fullsize"))]
    assert not dev, dev
    wanted = {"runtime/pipeline.py", "runtime/py.typed", "exporters/convert.py", "exporters/graph_template.py",
              "backend/cli.py", "backend/standalone/openapi.json"}
    for folder in ("backend/standalone/page", "exporters/templates"):
        wanted |= {p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
    assert any(n.startswith("exporters/templates/") for n in wanted)
    assert wanted <= names, sorted(wanted - names)


def test_shipped_code_imports_no_development_tool(wheel: Path) -> None:
    """Only the bench command names them, and it checks first (below)."""
    found = []
    with zipfile.ZipFile(wheel) as whl:
        for name in (n for n in whl.namelist() if n.endswith(".py") and n != "backend/cli.py"):
            for node in ast.walk(ast.parse(whl.read(name))):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [(name, m) for m in modules if m.startswith(DEV_ONLY)]
    assert not found, found


def test_bench_from_the_wheel_says_it_is_a_development_command(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(tmp_path / "site")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), _site_packages_without_pth()])}
    # Where the bench is installed, this device is refused at once: the test never starts a benchmark.
    command = [sys.executable, "-S", "-c", "from backend.cli import main; main()", "bench", "--device", "nowhere"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "development command" in done.stderr and "pip install -e '.[cpu,export,bench]'" in done.stderr, done.stderr


def test_the_editable_install_still_imports_the_development_tools(tmp_path: Path) -> None:
    """``pip install -e`` (the README's test install) maps the top-level folders, so the tests, scripts/ and
    ``text2image bench`` keep the tools that the wheel leaves out."""
    editable = _build(tmp_path, "build_editable")
    site = tmp_path / "site"
    with zipfile.ZipFile(editable) as whl:
        whl.extractall(site)
    project = tmp_path / "project"
    code = ("import site, sys; site.addsitedir(sys.argv[1]); "
            "import backend.bench.report, backend.bench.metrics, exporters.dev.fullsize, exporters.dev.template_build; "
            "print(backend.bench.report.__file__, exporters.dev.template_build.__file__)")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(site), _site_packages_without_pth()])}
    done = subprocess.run([sys.executable, "-S", "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(project / "backend/bench/report.py"),
                                   str(project / "exporters/dev/template_build.py")], done.stdout


def test_the_images_copy_files_that_exist() -> None:
    """Each COPY source of both Dockerfiles (the entrypoints in scripts/image/ among them) is in the repository."""
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (REPO / dockerfile).read_text().replace("\\\n", " ")
        sources = [w for line in text.splitlines() if line.startswith("COPY ")
                   for w in shlex.split(line)[1:-1] if not w.startswith("--")]
        assert "scripts/image/start.sh" in sources and "scripts/image/healthcheck.sh" in sources, (dockerfile, sources)
        assert all((REPO / s).exists() for s in sources), (dockerfile, sources)
