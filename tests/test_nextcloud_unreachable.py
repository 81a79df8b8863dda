"""Nextcloud unreachable while the ExApp registers its providers: an expected condition, told in one log line with
the reason (not pages of tracebacks), and answered to AppAPI with that reason."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from fake_appapi import APP_ID, APP_VERSION, SECRET, free_port
from standalone_helpers import load_service

from backend.config import Settings


def test_registration_against_a_closed_port_logs_one_line(onnx_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from backend.nextcloud.exapp import ExApp
    from backend.nextcloud.loader import Model
    from backend.nextcloud.provider import provider_id

    closed = free_port()  # nothing listens there
    for name, value in {"NEXTCLOUD_URL": f"http://127.0.0.1:{closed}", "APP_ID": APP_ID, "APP_SECRET": SECRET,
                        "APP_VERSION": APP_VERSION, "AA_VERSION": "32.0.0", "APP_HOST": "127.0.0.1",
                        "APP_PORT": str(free_port()), "APP_PERSISTENT_STORAGE": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    service = load_service(onnx_bundle)

    async def enable() -> str:
        app = ExApp(Settings().updated(model=str(onnx_bundle), threads=1))
        pid = provider_id("tiny")
        app.models = {pid: Model("tiny", pid, [service])}  # loaded: enable goes straight to registering
        try:
            return await app.enable()
        finally:
            await app.nc.close()
            app.journal.close()

    with caplog.at_level(logging.DEBUG):
        error = asyncio.run(enable())
    assert "could not register its provider" in error and "Connection" in error, error
    assert "\n" not in error and "Traceback" not in error
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    text = caplog.text
    assert "Traceback" not in text, text[-3000:]
    about = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(about) == 1 and "register" in about[0] and "Connection" in about[0], about
