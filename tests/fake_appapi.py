"""AppAPI's side of the fake Nextcloud: what it sends to the ExApp (heartbeat, /init, /enabled, /trigger) with
the headers a real AppAPI sends, and the ExApp itself as AppAPI's deploy daemon runs it: the real
``text2image serve`` process with AppAPI's environment."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

APP_ID, SECRET, APP_VERSION = "text2image_sd2", "s3cret-for-tests", "0.1.0"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PROVIDER_KEYS = ("id", "name", "task_type", "expected_runtime", "optional_input_shape", "optional_output_shape",
                  "input_shape_enum_values", "input_shape_defaults", "optional_input_shape_enum_values",
                  "optional_input_shape_defaults", "output_shape_enum_values", "optional_output_shape_enum_values")


def provider_api(method: str, query: dict, body: Any, providers: dict[str, dict]) -> tuple[int, Any, bool]:
    """AppAPI's ``api/v1/ai_provider/task_processing``: POST registers (every key needed), GET answers with its
    table's row (the provider as a JSON string in it), DELETE removes; an unknown name is OCS 404."""
    if method == "POST":
        provider = (body or {}).get("provider") or {}
        if any(k not in provider for k in _PROVIDER_KEYS) or not isinstance(provider["expected_runtime"], int):
            return 200, (400, []), True
        providers[provider["id"]] = provider
        return 200, (100, []), True
    p = providers.get(query.get("name", ""))
    if p is None:
        return 200, (404, []), True
    if method == "DELETE":
        del providers[p["id"]]
        return 200, (100, []), True
    return 200, (100, {"id": list(providers).index(p["id"]) + 1, "app_id": APP_ID, "name": p["id"],
                       "display_name": p["name"], "task_type": p["task_type"], "custom_task_type": "null",
                       "provider": json.dumps(p)}), True


class AppAPI:
    """Mixed into the fake Nextcloud, whose state it uses: the ExApp's address, the enabled flag, the init
    statuses the ExApp reported; it records the answers to /enabled."""

    url: str
    version: int
    enabled: bool
    exapp_url: str
    init_status: list[dict]
    enable_answers: list[dict]

    def call_exapp(self, method: str, path: str, auth: bool = True, headers: dict | None = None,
                   timeout: float = 60) -> tuple[int, Any]:
        sent = {"Accept": "application/json", "Content-Type": "application/json",
                "User-Agent": "Nextcloud Server Crawler"}
        if auth:
            sent.update({"AA-VERSION": f"{self.version}.0.0", "EX-APP-ID": APP_ID, "EX-APP-VERSION": APP_VERSION,
                         "AUTHORIZATION-APP-API": base64.b64encode(f":{SECRET}".encode()).decode(),
                         "AA-REQUEST-ID": "CLI", "Accept-Language": "en"})
        sent.update(headers or {})
        data = b"" if method in ("POST", "PUT") else None
        req = urllib.request.Request(self.exapp_url + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
                return resp.status, json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def heartbeat(self, timeout: float = 60) -> None:
        """Retry GET /heartbeat (no auth headers) once a second like AppAPI, until ``{"status": "ok"}``."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self.call_exapp("GET", "/heartbeat", auth=False, timeout=3) == (200, {"status": "ok"}):
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError("the ExApp never answered /heartbeat")
            time.sleep(0.2)

    def init(self) -> tuple[int, Any]:
        return self.call_exapp("POST", "/init")

    def install(self, proc: ExAppProcess, timeout: float = 120) -> dict:
        """``occ app_api:app:register --wait-finish`` after the deploy: start, heartbeat, /init, wait for the
        init to end (100 and the /enabled call made inside that report, or an error); return the last status."""
        proc.start()
        self.heartbeat()
        assert self.init() == (200, {})
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            last = self.init_status[-1] if self.init_status else {}
            if last.get("error") or (last.get("progress") == 100 and self.enable_answers):
                return last
            time.sleep(0.05)
        raise AssertionError(f"init did not finish: {self.init_status}\n{proc.output()[-3000:]}")

    def enable(self) -> str:
        """What AppAPI does to enable: flag set, heartbeat, PUT /enabled?enabled=1; an error disables again."""
        self.enabled = True
        self.heartbeat()
        status, answer = self.call_exapp("PUT", "/enabled?enabled=1")
        self.enable_answers.append({"enabled": 1, "status": status, "answer": answer})
        error = answer.get("error", "") if isinstance(answer, dict) else f"HTTP {status}"
        self.enabled = not error
        return error

    def disable(self, stop_container: Any = None) -> str:
        """PUT /enabled?enabled=0, then AppAPI stops the container (``stop_container``), then flags it disabled."""
        status, answer = self.call_exapp("PUT", "/enabled?enabled=0")
        self.enable_answers.append({"enabled": 0, "status": status, "answer": answer})
        if stop_container is not None:
            stop_container()
        self.enabled = False
        return answer.get("error", "") if isinstance(answer, dict) else f"HTTP {status}"


class ExAppProcess:
    """``text2image serve`` as AppAPI deploys it: the AppAPI environment plus ``T2I_*`` settings."""

    def __init__(self, fake: AppAPI, storage: Path, env: dict[str, str], args: tuple[str, ...] = (),
                 verbose: int = 0) -> None:
        self.fake, self.storage, self.args = fake, storage, args
        self.verbose = ("-" + "v" * verbose,) if verbose else ()
        self.port = free_port()
        self.env = {**os.environ, "NEXTCLOUD_URL": fake.url, "APP_ID": APP_ID, "APP_SECRET": SECRET,
                    "APP_VERSION": APP_VERSION, "APP_HOST": "127.0.0.1", "APP_PORT": str(self.port),
                    "AA_VERSION": f"{fake.version}.0.0", "APP_PERSISTENT_STORAGE": str(storage),
                    "COMPUTE_DEVICE": "CPU", "PYTHONPATH": str(REPO), **env}
        self.proc: subprocess.Popen | None = None
        self.log = storage / f"service-{self.port}.log"

    def start(self) -> ExAppProcess:
        self.storage.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from backend.cli import main; main()", *self.verbose, "serve",
                 *self.args],
                cwd=self.storage, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.fake.exapp_url = f"http://127.0.0.1:{self.port}"
        return self

    def signal(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig``; return the exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
