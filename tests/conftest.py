"""Shared fixtures: the tiny random SD2 model as a diffusers folder and pushed through the real exporters.

Built once per test session (a few seconds each) and shared read-only; tests that change a bundle copy it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny epsilon-prediction model as a diffusers folder (the reference's weights)."""
    from exporters.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("src") / "tiny", variant="epsilon")


@pytest.fixture(scope="session")
def tiny_v_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny v-prediction model (upcast attention, like sd2.1 768) as a diffusers folder."""
    from exporters.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("src") / "tiny-v", variant="v")


def _export(source: Path, fmt: str, root: Path) -> Path:
    from exporters.export import export_model

    return export_model(str(source), fmt, root / f"{source.name}-{fmt}", say=lambda _: None)


@pytest.fixture(scope="session")
def onnx_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_source, "onnx", tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def openvino_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_source, "openvino", tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def onnx_v_bundle(tiny_v_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_v_source, "onnx", tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def openvino_v_bundle(tiny_v_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_v_source, "openvino", tmp_path_factory.mktemp("bundles"))


@pytest.fixture
def bundle_copy(onnx_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the ONNX bundle that a test may damage."""
    return Path(shutil.copytree(onnx_bundle, tmp_path / "bundle"))
