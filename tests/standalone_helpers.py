"""Helpers for the standalone service's tests: an HTTP client on the standard library, the real service as a
subprocess, and waiting for a condition."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BASE = "/ocs/v2.php/text2image"
ALICE = ("alice", "alice-secret-0001")
BOB = ("bob", "bob-secret-000022")
USERS = f"{ALICE[0]}:{ALICE[1]},{BOB[0]}:{BOB[1]}"


def basic(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


class Reply:
    """A response: status, headers and body; ``data``/``message`` read the OCS envelope."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def data(self) -> Any:
        return self.json["ocs"]["data"]

    @property
    def message(self) -> str:
        return str(self.json["ocs"]["meta"]["message"])

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:300]!r}>"


class Client:
    """A keep-alive HTTP client for one server; ``auth`` is an Authorization header value or None. Like Nextcloud's
    clients it sends ``OCS-APIRequest: true`` (the service refuses changes by basic auth without it), unless
    ``ocs_header`` is False."""

    def __init__(self, url: str, auth: str | None = None, timeout: float = 30, ocs_header: bool = True) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.auth, self.timeout = parts.hostname or "", parts.port or 80, auth, timeout
        self.ocs_header = ocs_header
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                auth: Any = ...) -> Reply:
        """``path`` is below BASE unless it starts with '/'. A dict/list body is sent as JSON, bytes as they are."""
        heads = {"OCS-APIRequest": "true"} if self.ocs_header else {}
        heads.update(headers or {})
        token = self.auth if auth is ... else auth
        if token:
            heads["Authorization"] = token
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            heads.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        target = path if path.startswith("/") else f"{BASE}/{path}"
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, target, body=body, headers=heads)
                resp = self._conn.getresponse()
                reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()
                # Only a GET or DELETE is tried again: a POST may have been received, and must not count twice.
                if attempt or method == "POST":
                    raise
                continue
            if reply.headers.get("connection", "").lower() == "close":
                self.close()
            return reply
        raise AssertionError("unreachable")

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Reply:
        return self.request("DELETE", path, **kw)

    def schedule(self, prompt: str = "a red fox", app: str = "app", n: int = 1, **extra: Any) -> Reply:
        return self.post("schedule", {"input": prompt, "appId": app, "numberOfImages": n, **extra})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def load_service(bundle: Path) -> Any:
    """A real ImageService on the tiny bundle, one op thread (the tests run on small machines)."""
    from backend.config import Settings
    from backend.tasks.service import ImageService

    service = ImageService(Settings().updated(threads=1))
    service.load(bundle=bundle)
    return service


def wait_until(check: Callable[[], Any], timeout: float = 60, every: float = 0.05, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something true; return that, or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``text2image serve --standalone`` as a child process (the console script's entry point) on a free port."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}{BASE}"
        self.log = log
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("T2I_")}
        full_env = {**inherited, "T2I_THREADS": "1", **env}
        command = [sys.executable, "-c", "from backend.cli import main; main()", "serve", "--standalone",
                   "--port", str(self.port)]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, client: Client, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return bool(client.get("is_available").data["isAvailable"])
            except OSError:
                return False

        wait_until(ready, timeout, 0.1, "the service to load its model")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (kill -9): no clean-up of any kind."""
        self.proc.kill()
        self.proc.wait(30)
