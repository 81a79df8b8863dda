"""Fixtures of the integration suite: one real Nextcloud per test session (see real_nextcloud.py), the tiny model,
and one registered ExApp shared by the cases that leave it as they found it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_appapi import ExAppProcess, free_port
from real_nextcloud import RealNextcloud, SharedApp, start_server, stop_server, why_skipped


@pytest.fixture(scope="session")
def nextcloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNextcloud]:
    reason = why_skipped()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("nextcloud")
    try:
        server = start_server(root, free_port())
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    stop_server(root)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ONNX bundle with a TAESD decoder too, under a fixed folder name (the provider id is taken from it)."""
    from exporters.export import export_model

    return export_model(str(tiny_source), "onnx", tmp_path_factory.mktemp("models") / "tiny-onnx", say=lambda _: None,
                        taesd="tiny")


@pytest.fixture(scope="session")
def tiny_two(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same bundle under another name: another model, another provider."""
    link = tmp_path_factory.mktemp("more") / "tiny-two"
    link.symlink_to(tiny_onnx)
    return link


@pytest.fixture(scope="session")
def tiny_three(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    link = tmp_path_factory.mktemp("more") / "tiny-three"
    link.symlink_to(tiny_onnx)
    return link


@pytest.fixture(scope="session")
def shared(nextcloud: RealNextcloud, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedApp]:
    app = SharedApp(nextcloud, tmp_path_factory.mktemp("shared-app"), tiny_onnx)
    yield app
    app.release()


@pytest.fixture
def app(shared: SharedApp) -> ExAppProcess:
    """The shared ExApp, registered, enabled and initialised."""
    return shared.get()
