"""The two sides of the contract tests: the fake Nextcloud and the real one, each driven with the same requests, as
this ExApp sends them (AppAPI headers, raw HTTP, no session cookie) and as a user's pages send them.

On the real server the app id is registered against a stand-in ExApp (a thread answering /heartbeat, /init with
404, which AppAPI takes as "init done", and /enabled), so the answers come from Nextcloud and AppAPI alone."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fake_appapi import APP_ID, APP_VERSION, SECRET, free_port
from fake_nextcloud import FakeNextcloud, ScheduleError
from real_nextcloud import RealNextcloud, send

BOUNDARY = "contract-boundary-7d1f"


def shape(value: Any) -> Any:
    """The JSON shape of ``value``: key names and value types, lists by their first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


class Side:
    """One server seen by the ExApp (``app``) and by the admin (``user``)."""

    name = ""
    url = ""

    def app(self, method: str, path: str, body: Any = None, headers: dict | None = None, secret: str = SECRET,
            file: bytes | None = None) -> tuple[int, Any]:
        sent = {"AA-VERSION": "32.0.0", "EX-APP-ID": APP_ID, "EX-APP-VERSION": APP_VERSION,
                "OCS-APIRequest": "true", "Accept": "application/json",
                "AUTHORIZATION-APP-API": base64.b64encode(f":{secret}".encode()).decode()}
        data = None
        if file is not None:
            head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image.png\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n")
            data = head.encode() + file + f"\r\n--{BOUNDARY}--\r\n".encode()
            sent["Content-Type"] = f"multipart/form-data; boundary={BOUNDARY}"
        elif body is not None:
            data, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
        sent.update(headers or {})
        for k in [k for k, v in sent.items() if v is None]:
            del sent[k]
        return send(urllib.request.Request(self.url + path, data=data, method=method, headers=sent))

    def user(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raise NotImplementedError

    def schedule(self, task_input: Any) -> tuple[int, Any]:
        """(200, task id) or (status, the refusal's message)."""
        raise NotImplementedError

    def task(self, tid: int) -> dict:
        raise NotImplementedError

    def cancel(self, tid: int) -> None:
        raise NotImplementedError

    def error(self, tid: int) -> str:
        raise NotImplementedError

    def config(self) -> dict[str, str]:
        raise NotImplementedError

    def set_preference(self, provider: str) -> None:
        raise NotImplementedError

    def set_app(self, state: str) -> None:
        """``occ app_api:app:disable`` / ``enable`` / ``unregister``: "disabled", "enabled" or "unknown"."""
        raise NotImplementedError


class FakeSide(Side):
    name = "fake"

    def __init__(self, fake: FakeNextcloud) -> None:
        self.fake, self.url = fake, fake.url

    def user(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        sent = {"OCS-APIRequest": "true", "Accept": "application/json",
                "Authorization": "Basic " + base64.b64encode(b"admin:any").decode()}
        data = None
        if body is not None:
            data, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
        return send(urllib.request.Request(self.url + path, data=data, method=method, headers=sent))

    def schedule(self, task_input: Any) -> tuple[int, Any]:
        try:
            return 200, self.fake.schedule(task_input)
        except ScheduleError as exc:
            return exc.status, exc.message

    def task(self, tid: int) -> dict:
        return {k: v for k, v in self.fake.task(tid).items() if not k.startswith("_")}

    def cancel(self, tid: int) -> None:
        self.fake.cancel(tid)

    def error(self, tid: int) -> str:
        return self.fake.tasks[tid]["_error"] or ""

    def config(self) -> dict[str, str]:
        return dict(self.fake.app_config)

    def set_preference(self, provider: str) -> None:
        self.fake.preferences["core:text2image"] = provider

    def set_app(self, state: str) -> None:
        self.fake.enabled, self.fake.registered = state == "enabled", state != "unknown"


class RealSide(Side):
    name = "real"

    def __init__(self, nc: RealNextcloud) -> None:
        self.nc, self.url = nc, nc.url
        self.created: list[int] = []

    def user(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.nc.ocs(method, path, body)

    def schedule(self, task_input: Any) -> tuple[int, Any]:
        try:
            tid = self.nc.schedule(task_input)
        except ScheduleError as exc:
            return exc.status, exc.message
        self.created.append(tid)
        return 200, tid

    def task(self, tid: int) -> dict:
        return self.nc.task(tid)

    def cancel(self, tid: int) -> None:
        self.nc.cancel(tid)

    def error(self, tid: int) -> str:
        return self.nc.error_message(tid)

    def config(self) -> dict[str, str]:
        return self.nc.app_config()

    def set_preference(self, provider: str) -> None:
        self.nc.occ("config:app:set", "core", "ai.taskprocessing_provider_preferences", "--lazy",
                    "--value", json.dumps({"core:text2image": provider}))

    def set_app(self, state: str) -> None:
        command = {"disabled": "disable", "enabled": "enable", "unknown": "unregister"}[state]
        self.nc.occ(f"app_api:app:{command}", APP_ID, *(["--force"] if state == "unknown" else []))

    def clean(self) -> None:
        """Delete the tasks the contract made (none may reach a later ExApp) and the preference."""
        for tid in self.created:
            self.nc.ocs("DELETE", f"/ocs/v2.php/taskprocessing/task/{tid}")
        self.nc.occ("config:app:delete", "core", "ai.taskprocessing_provider_preferences", check=False)


class StandInExApp:
    """What AppAPI needs to register the app id: /heartbeat ok, /init 404 (init done), /enabled without error."""

    def __init__(self) -> None:
        self.port = free_port()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = {"/heartbeat": (200, {"status": "ok"}), "/init": (404, {})}.get(
                    self.path.split("?")[0], (200, {"error": ""}))
                out = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
