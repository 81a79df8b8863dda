"""A faithful fake of Nextcloud 32/33 + AppAPI for the ExApp's tests: a loopback HTTP server with the endpoints
an ExApp uses and the server rules measured on a real Nextcloud 32.0.1 (see DESIGN §5 and
research/nextcloud_server_behaviour.md). It schedules tasks as Nextcloud does, plays AppAPI towards the ExApp
(heartbeat, init, enabled, trigger) and records everything it is sent.

Rules copied: ExApp auth (provider endpoints 412 "ExApp required", AppAPI endpoints 401/OCS 997); ``next`` hands
the oldest SCHEDULED task of the *preferred* provider to exactly one poller, 204 otherwise; scheduling checks
types only (Number, Text, Enum), drops undeclared keys and merges defaults under the input; progress outside 0..1
is a 500 and a progress call answers with the task (showing CANCELLED); a cancelled task takes uploads (201) but
ignores results; results need existing file ids and cut errorMessage to 1000 characters; Nextcloud 32 has no
userFacingErrorMessage (alone it is a 500); only 33+ calls /trigger and has next_batch. AppAPI's side towards the
ExApp and the ExApp process are in ``fake_appapi.py``; the settings page's side in ``fake_settings_form.py``.

tests/integration/test_contract.py sends the same requests to this fake and to a real Nextcloud 32.0.1 and
compares the answers. Not imitated: the session cookie's effect is modelled only where measured (a disabled app's
provider calls, see ``_route``); users have no passwords (any basic auth as "admin" is the admin); users' task
endpoints are Python methods (``schedule``, ``cancel``, ``task``), not HTTP; timestamps, file ids and the log.
"""

from __future__ import annotations

import base64
import email.parser
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fake_appapi import APP_ID, APP_VERSION, SECRET, AppAPI, ExAppProcess, free_port, provider_api
from fake_settings_form import SettingsForms, config_api

__all__ = ["APP_ID", "APP_VERSION", "SECRET", "ExAppProcess", "FakeNextcloud", "ScheduleError", "free_port"]

TEXT2IMAGE = {"input": 1, "numberOfImages": 0}  # core:text2image input shape: slot name -> ShapeType
_NUMERIC = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")  # PHP is_numeric on strings
_BAD_OUTPUT = ("The task was processed successfully but the provider's output doesn't pass validation against the "
               "task type's outputShape spec and/or the provider's own optionalOutputShape spec")
_E500 = (500, {"message": "Internal Server Error\n", "statuscode": 996})  # an uncaught PHP TypeError
#: Nextcloud's session cookie, set on an ExApp's authenticated requests.
SESSION_COOKIE = "nc_session_id"


class ScheduleError(Exception):
    """Scheduling refused, as the OCS API answers it: HTTP ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class FakeNextcloud(AppAPI):
    """Nextcloud ``version`` (32 or 33) with AppAPI and this app registered (enabled, not yet initialised).

    The AppAPI side towards the ExApp (heartbeat, /init, /enabled, /trigger) comes from :class:`AppAPI`."""

    def __init__(self, version: int = 32, users: tuple[str, ...] = ("admin", "alice")) -> None:
        self.version, self.users = version, users
        self.lock = threading.RLock()
        self.tasks: dict[int, dict] = {}
        self.files: dict[int, bytes] = {}
        self.providers: dict[str, dict] = {}  # registration order = preference when none is set
        self.preferences: dict[str, str] = {}
        self.enabled, self.exapp_url = True, ""
        #: False until AppAPI knows the app (a manual install started before `occ app_api:app:register`): every
        #: request of the app is refused, and each one makes Nextcloud log "ExApp with appId … not found".
        self.registered = True
        self.unknown_app_requests = 0
        self.init_status: list[dict] = []
        self.requests: list[dict] = []  # everything the ExApp sent: method, path, body, time
        self.handouts: dict[int, int] = {}
        self.enable_answers: list[dict] = []
        #: Declarative settings forms the app registered (by form id), and the app's config (appconfig_ex), where
        #: AppAPI keeps an admin form's values: one string per field id.
        self.forms = SettingsForms()
        self.settings_forms = self.forms.forms
        self.app_config: dict[str, str] = {}
        self.logged: list[dict] = []  # what the app wrote to nextcloud.log
        self._ids = iter(range(1, 10**9))
        self._file_ids = iter(range(1001, 10**9))
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None
        self._down_until = 0.0
        #: Seconds a request whose path contains the key waits before it is answered (a busy server's latency).
        self.slow: dict[str, float] = {}

    # -- server --------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeNextcloud:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def go_down(self, seconds: float) -> None:
        """Be unreachable for ``seconds`` (connections refused, requests in flight cut), then come back."""
        self._down_until = time.monotonic() + seconds
        self.stop()
        threading.Timer(seconds, self.start).start()

    # -- user side -----------------------------------------------------------------------------------------
    def preferred(self, task_type: str = "core:text2image") -> dict | None:
        with self.lock:
            pid = self.preferences.get(task_type)
            if pid in self.providers:
                return self.providers[pid]
            return next((p for p in self.providers.values() if p["task_type"] == task_type), None)

    def schedule(self, task_input: Any, task_type: str = "core:text2image", user: str = "admin",
                 app_id: str = "assistant", check: bool = True) -> int:
        """Schedule as ``POST /taskprocessing/schedule`` does; raise :class:`ScheduleError` as it answers.

        ``check=False`` stores the input as given: a task no real server would accept, to show what the
        provider does with it anyway."""
        with self.lock:
            provider = self.preferred(task_type)
            if provider is None:
                raise ScheduleError(412, "The given provider is not available")
            if check:
                task_input = self._prepare(task_input, provider)
            tid, now = next(self._ids), int(time.time())
            self.tasks[tid] = {"id": tid, "type": task_type, "lastUpdated": now, "status": "STATUS_SCHEDULED",
                               "userId": user, "appId": app_id, "input": task_input, "output": None,
                               "customId": "", "completionExpectedAt": now + provider["expected_runtime"],
                               "progress": 0, "scheduledAt": now, "startedAt": None, "endedAt": None,
                               "allowCleanup": True, "_error": None, "_user_error": None}
        if self.version >= 33 and self.exapp_url:  # AppAPI 33+ tells the provider a task is waiting
            threading.Thread(target=self.call_exapp, args=("POST", f"/trigger?providerId={provider['id']}"),
                             daemon=True).start()
        return tid

    def _prepare(self, raw: Any, provider: dict) -> dict:
        if not isinstance(raw, dict):
            raise ScheduleError(500, "Internal Server Error")
        slots = dict(TEXT2IMAGE)
        slots.update({s["name"]: s["shape_type"] for s in provider["optional_input_shape"]})
        enums = {k: [e["value"] for e in v] for k, v in (provider["optional_input_shape_enum_values"] or {}).items()}
        merged = {**(provider["input_shape_defaults"] or {}), **(provider["optional_input_shape_defaults"] or {}),
                  **{k: v for k, v in raw.items() if k in slots}}  # undeclared keys are dropped
        for key in TEXT2IMAGE:
            if merged.get(key) is None:
                raise ScheduleError(400, f'Missing key: "{key}"')
        for key, value in merged.items():
            kind = slots[key]
            if value is None:
                continue
            if kind == 0 and not ((isinstance(value, (int, float)) and not isinstance(value, bool))
                                  or (isinstance(value, str) and _NUMERIC.match(value))):
                why = "Non-numeric item provided for Number slot"
            elif kind in (1, 6) and not isinstance(value, str):
                why = f"Non-text item provided for {'Text' if kind == 1 else 'Enum'} slot"
            elif kind == 6 and value not in enums.get(key, []):
                listed = ", ".join(f'"{e}"' for e in enums.get(key, []))
                why = f'Wrong value given for Enum slot. Got "{value}", but expected one of the provided enum ' \
                      f"values: {listed}"
            else:
                continue
            raise ScheduleError(400, f'Failed to validate input key "{key}": {why}')
        return merged

    def cancel(self, tid: int) -> None:
        with self.lock:
            task = self.tasks[tid]
            if task["status"] in ("STATUS_SCHEDULED", "STATUS_RUNNING"):
                task.update(status="STATUS_CANCELLED", endedAt=int(time.time()), lastUpdated=int(time.time()))

    def task(self, tid: int) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.tasks[tid]))

    def wait(self, tids: list[int], timeout: float = 60.0, statuses: tuple[str, ...] = (
            "STATUS_SUCCESSFUL", "STATUS_FAILED", "STATUS_CANCELLED")) -> list[dict]:
        """Wait until every task has one of ``statuses``; return them (AssertionError on timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [self.task(t) for t in tids]
            if all(t["status"] in statuses for t in found):
                return found
            time.sleep(0.05)
        raise AssertionError(f"tasks not done in {timeout} s: {[(t['id'], t['status']) for t in found]}")

    def sent(self, path_part: str, tid: int | None = None) -> list[dict]:
        """The ExApp's requests whose path contains ``path_part`` (and are about task ``tid``)."""
        with self.lock:
            return [r for r in self.requests if path_part in r["path"]
                    and (tid is None or f"/tasks_provider/{tid}/" in r["path"])]

    # -- HTTP ----------------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if time.monotonic() < self._down_until:
            h.close_connection = True  # cut: no answer at all
            return
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        ctype = h.headers.get("Content-Type", "")
        body: Any = None
        if ctype.startswith("application/json") and raw:
            body = json.loads(raw)
        elif ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser().parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            body = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                    for p in msg.get_payload()}
        query = {k: v if k.endswith("[]") else v[0] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append({"method": h.command, "path": parts.path, "query": query, "t": time.monotonic(),
                                  "body": body if not isinstance(body, dict) or "file" not in body else "<file>"})
        delay = max((t for part, t in self.slow.items() if part in parts.path), default=0.0)
        if delay:
            time.sleep(delay)
        status, payload, v1 = self._route(h.command, parts.path, query, body, h.headers)
        if status == 204:
            h.send_response(204)
            h.end_headers()
            return
        if isinstance(payload, tuple):  # (code, data) to wrap in an OCS envelope
            code, data = payload
            ok = (code == 100) if v1 else (code < 300)
            meta = {"status": "ok" if ok else "failure", "statuscode": code, "message": "OK" if ok else
                    (data.get("message", "") if isinstance(data, dict) else "")}
            if v1:
                meta.update(totalitems="", itemsperpage="")
            payload = {"ocs": {"meta": meta, "data": data}}
        out = json.dumps(payload).encode()
        h.send_response(status)
        if self._exapp_user(h.headers) is not None:  # Nextcloud's session cookie, which nc_py_api keeps
            h.send_header("Set-Cookie", f"{SESSION_COOKIE}=fake; path=/; HttpOnly")
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def _exapp_user(self, headers: Any) -> str | None:
        """The user an ExApp request acts for, or None when AppAPI would refuse it."""
        try:
            uid, secret = base64.b64decode(headers.get("AUTHORIZATION-APP-API", "")).decode().split(":", 1)
        except Exception:
            return None
        ok = (headers.get("EX-APP-ID") == APP_ID and headers.get("EX-APP-VERSION") and secret == SECRET
              and (uid == "" or uid in self.users))
        return uid if ok else None

    def _route(self, method: str, path: str, query: dict, body: Any, headers: Any) -> tuple[int, Any, bool]:
        app_api, core = "/ocs/v1.php/apps/app_api/", "/ocs/v2.php/taskprocessing/tasks_provider/"
        authed = self._exapp_user(headers) is not None
        if not self.registered and path != "/ocs/v1.php/cloud/capabilities":
            with self.lock:
                self.unknown_app_requests += 1
            authed = False
        if path == "/ocs/v1.php/cloud/capabilities":
            caps = {"app_api": {"loglevel": 2, "version": f"{self.version}.0.0"}}
            return 200, (100, {"version": {"major": self.version, "minor": 0, "micro": 1, "string":
                                           f"{self.version}.0.1", "edition": "", "extendedSupport": False},
                               "capabilities": caps}), True
        if path.startswith(app_api):
            if not authed or not (self.enabled or path.endswith(("/ex-app/state", "/ex-app/status"))):
                return 401, (997, []), True
            return self._app_api(method, path[len(app_api):], query, body)
        if path.startswith(core):
            if headers.get("OCS-APIRequest") != "true":
                return 412, {"message": "CSRF check failed"}, False
            # A disabled app is refused, unless it sends the session cookie of its earlier requests (measured on
            # 32.0.1: then progress 200, file 201, and a result for an unregistered provider 500).
            if not authed or not (self.enabled or SESSION_COOKIE in headers.get("Cookie", "")):
                return 412, {"message": "ExApp required"}, False
            return self._provider_api(method, path[len(core):], query, body)
        if path.startswith("/ocs/v2.php/settings/api/declarative/"):  # the admin's settings page
            with self.lock:
                return self.forms.page(method, path, headers, APP_ID, body, self.app_config)
        return 404, (998, {"message": "Not found"}), False

    def _app_api(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any, bool]:
        if path == "ex-app/state":
            return 200, (100, int(self.enabled)), True
        if path == "ex-app/status":
            progress, error = int(body.get("progress", 0)), body.get("error") or ""
            if not 0 <= progress <= 100:
                return 200, (996, []), True
            done = any(s["progress"] == 100 and not s["error"] for s in self.init_status)
            self.init_status.append({"progress": progress, "error": error, "t": time.monotonic()})
            if progress == 100 and not error and not done:
                self.enable()  # inside this request, as AppAPI does
            return 200, (100, []), True
        if path == "api/v1/log":
            with self.lock:
                self.logged.append({"level": (body or {}).get("level"), "message": (body or {}).get("message")})
            return 200, (100, []), True
        if path == "api/v1/ui/settings":
            return self.forms.handle(method, query, body)
        if path == "api/v1/ex-app/config":
            with self.lock:
                return config_api(method, body, APP_ID, self.app_config)
        if path == "api/v1/ex-app/config/get-values":
            keys = (body or {}).get("configKeys") or []
            with self.lock:
                found = [{"configkey": k, "configvalue": self.app_config[k]} for k in keys if k in self.app_config]
            return 200, (100, found), True
        if path == "api/v1/ai_provider/task_processing":
            with self.lock:
                return provider_api(method, query, body, self.providers)
        return 200, (998, []), True

    def admin_set(self, field_id: str, value: Any) -> tuple[int, Any, bool]:
        """An admin changes one field on Nextcloud's settings page (see ``SettingsForms.page_save``)."""
        body = {"app": APP_ID, "formId": self.forms.page_form_id(APP_ID, field_id), "fieldId": field_id,
                "value": value}
        with self.lock:
            return self.forms.page_save(APP_ID, body, self.app_config)

    def _provider_api(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any, bool]:
        if path in ("next", "next_batch"):
            if path == "next_batch" and self.version < 33:
                return 404, (998, {"message": "Not found"}), False
            pids = (body or {}).get("providerIds", query.get("providerIds[]"))
            types = (body or {}).get("taskTypeIds", query.get("taskTypeIds[]"))
            if not isinstance(pids, list) or not isinstance(types, list):
                return _E500[0], (996, []), False
            with self.lock:
                for task in sorted(self.tasks.values(), key=lambda t: t["id"]):
                    pref = self.preferred(task["type"])
                    if (task["status"] == "STATUS_SCHEDULED" and task["type"] in types and pref
                            and pref["id"] in pids):
                        task.update(status="STATUS_RUNNING", progress=0, _provider=pref["id"])  # atomic: one poller
                        self.handouts[task["id"]] = self.handouts.get(task["id"], 0) + 1
                        found = {"task": _public(task), "provider": {"name": pref["id"]}}
                        if path == "next":
                            return 200, (200, found), False
                        return 200, (200, {"tasks": [{"task": found["task"], "provider": pref["id"]}],
                                           "has_more": False}), False
            return (204, None, False) if path == "next" else (200, (200, {"tasks": [], "has_more": False}), False)
        m = re.fullmatch(r"(\d+)/(progress|file|result)", path)
        with self.lock:
            task = self.tasks.get(int(m.group(1))) if m else None
            if task is None:
                return 404, (404, {"message": "Not found"}), False
            now, action = int(time.time()), m.group(2)  # type: ignore[union-attr]
            if action == "file":
                if not isinstance(body, dict) or "file" not in body:
                    return 400, (400, {"message": "Bad request"}), False
                fid = next(self._file_ids)
                self.files[fid] = body["file"]
                return 201, (201, {"fileId": fid}), False
            if action == "progress":
                value = (body or {}).get("progress")
                if value is None:
                    return _E500[0], (996, []), False
                value = float(value) if isinstance(value, (int, float)) or _NUMERIC.match(str(value)) else 0.0
                if not 0 <= value <= 1:
                    return 500, (500, {"message": "Internal error"}), False
                if task["status"] != "STATUS_CANCELLED":
                    if task["status"] != "STATUS_RUNNING":  # startedAt stays null, as on Nextcloud 32.0.1
                        task.update(status="STATUS_RUNNING")
                    task.update(progress=value, lastUpdated=now)
                return 200, (200, {"task": _public(task)}), False
            return self._result(task, body or {}, now)

    def _result(self, task: dict, body: dict, now: int) -> tuple[int, Any, bool]:
        error, user_error, output = body.get("errorMessage"), body.get("userFacingErrorMessage"), body.get("output")
        if task["status"] == "STATUS_CANCELLED":
            return 200, (200, {"task": _public(task)}), False  # ignored
        if output is not None and "_provider" in task and task["_provider"] not in self.providers:
            # Unregistered meanwhile (the app was disabled): validateOutputWithFileIds meets a null output spec.
            return 500, {"message": "Internal Server Error"}, False
        if self.version < 33 and user_error is not None and error is None:
            return _E500[0], (996, []), False  # 32 has no such parameter: TaskFailedEvent gets null, stays RUNNING
        if error is not None:
            task.update(status="STATUS_FAILED", endedAt=now, lastUpdated=now, _error=str(error)[:1000],
                        _user_error=str(user_error)[:1000] if self.version >= 33 and user_error else None)
            return 200, (200, {"task": _public(task)}), False
        if output is None or isinstance(output, str):
            return _E500[0], (996, []), False
        images = output.get("images") if isinstance(output, dict) else None
        if isinstance(images, list) and any(isinstance(i, str) and i.isdigit() and int(i) in self.files
                                            for i in images):
            return _E500[0], (996, []), False
        if not isinstance(images, list) or not all(type(i) is int and i in self.files for i in images):
            task.update(status="STATUS_FAILED", progress=1.0, endedAt=now, lastUpdated=now, _error=_BAD_OUTPUT)
        else:
            task.update(status="STATUS_SUCCESSFUL", output={"images": images}, progress=1.0, endedAt=now,
                        lastUpdated=now)
        return 200, (200, {"task": _public(task)}), False


def _public(task: dict) -> dict:
    """The task as Nextcloud's JSON shows it: no error message in any form."""
    return {k: v for k, v in task.items() if not k.startswith("_")}

