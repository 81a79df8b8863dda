"""The ExApp in this process when something around it fails: Nextcloud unreachable while the providers are
registered (an expected condition: one log line with the reason, not pages of tracebacks), and a poll of the admin
settings that throws (the loop logs one line and goes on, so later changes still apply)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from fake_appapi import APP_ID, APP_VERSION, SECRET, free_port
from fake_nextcloud import FakeNextcloud
from standalone_helpers import load_service

from backend.config import Settings


def _appapi_env(monkeypatch: pytest.MonkeyPatch, nextcloud_url: str, storage: Path) -> None:
    """The environment AppAPI gives the ExApp, pointing at ``nextcloud_url``."""
    for name, value in {"NEXTCLOUD_URL": nextcloud_url, "APP_ID": APP_ID, "APP_SECRET": SECRET,
                        "APP_VERSION": APP_VERSION, "AA_VERSION": "32.0.0", "APP_HOST": "127.0.0.1",
                        "APP_PORT": str(free_port()), "APP_PERSISTENT_STORAGE": str(storage)}.items():
        monkeypatch.setenv(name, value)


def test_registration_against_a_closed_port_logs_one_line(onnx_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from backend.nextcloud.exapp import ExApp
    from backend.nextcloud.models import Model
    from backend.nextcloud.provider import provider_id

    _appapi_env(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path)  # nothing listens there
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
    assert "Traceback" not in caplog.text, caplog.text[-3000:]
    about = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(about) == 1 and "could not register the providers" in about[0] and "Connection" in about[0], about


def test_a_poll_that_throws_does_not_end_the_settings_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from backend.nextcloud import admin_loop
    from backend.nextcloud.client import Unreachable
    from backend.nextcloud.exapp import ExApp

    fake = FakeNextcloud(version=32).start()
    _appapi_env(monkeypatch, fake.url, tmp_path)
    faults = {"choose": 1, "register": 1}
    real_choose = admin_loop.choose

    def choose(base: Settings, values: Any) -> Any:  # a bug that strikes once, whatever it may be
        if faults["choose"]:
            faults["choose"] -= 1
            raise RuntimeError("one poll's fault")
        return real_choose(base, values)

    monkeypatch.setattr(admin_loop, "choose", choose)

    async def run() -> Any:
        app = ExApp(Settings().updated(model="tiny", settings_poll=0.05))
        real_register = app.register

        async def register(models: Any) -> None:  # Nextcloud gone for one registration
            if faults["register"]:
                faults["register"] -= 1
                raise Unreachable("ConnectionRefusedError: [Errno 111] Connect call failed")
            await real_register(models)

        app.register = register  # type: ignore[method-assign]
        app.enabled.set()
        app.admin.watch()
        fake.app_config["watermark"] = "1"  # stored earlier: the page saves only once the form is there
        deadline = time.monotonic() + 30
        while not fake.settings_forms and time.monotonic() < deadline:  # registered once the faults are past
            await asyncio.sleep(0.05)
        applied = app.admin.applied
        fake.admin_set("watermark", "0")  # and a later change still applies
        while app.admin.applied is applied and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        app.stopping.set()
        await asyncio.gather(*app._tasks)
        await app.nc.close()
        app.journal.close()
        return applied, app.admin.applied

    try:
        with caplog.at_level(logging.INFO):
            first, later = asyncio.run(run())
    finally:
        fake.stop()
    assert faults == {"choose": 0, "register": 0}
    assert first is not None and first.settings.images.watermark is True, caplog.text[-3000:]
    assert later is not None and later.settings.images.watermark is False, caplog.text[-3000:]
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text[-3000:]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and "one poll's fault" in errors[0] and "Connect call failed" in errors[1], errors
    assert any("one poll's fault" in (e["message"] or "") for e in fake.logged), fake.logged


def test_a_default_the_model_cannot_take_is_left_out_alone(bundle_copy: Path) -> None:
    # A size allowed in general but not by a bundle exported for one size: the other defaults still apply.
    import json

    from backend.nextcloud.admin_loop import _set_defaults
    from runtime.request import Defaults

    manifest = bundle_copy / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "static_shape": {"width": 256,
                                                                                          "height": 256}}))
    pipe = load_service(bundle_copy).pipeline
    refused = _set_defaults(pipe, Defaults(width=384, height=384, steps=3, guidance=2.5))
    assert len(refused) == 1 and "384x384 is not allowed for this bundle" in refused[0], refused
    d = pipe.defaults
    assert (d.width, d.height, d.steps, d.guidance) == (256, 256, 3, 2.5)
    assert _set_defaults(pipe, Defaults(steps=4)) == [] and pipe.defaults.steps == 4
