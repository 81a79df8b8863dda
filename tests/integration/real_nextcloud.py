"""Helpers for the ExApp against a real Nextcloud 32.0.1 + AppAPI 32.0.0: the server tree is ``../shared/nextcloud``
next to the repository (``T2I_NEXTCLOUD_TREE`` names another folder). One server per test session, in its own
folder under the session's tmp dir, on a free port; the ExApp is the real ``text2image serve`` process with the tiny
model, registered with ``occ app_api:app:register … manual_install --json-info`` as the server's README shows.
Users' requests go through OCS exactly as Nextcloud's own pages send them. Skipped, with the reason, where the tree
or PHP is missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fake_appapi import APP_ID, APP_VERSION, SECRET, ExAppProcess
from fake_nextcloud import ScheduleError

REPO = Path(__file__).resolve().parents[2]
ADMIN_PASS = "Integration-Admin-Pass-1"
PROVIDER = f"{APP_ID}:tiny-onnx"
DONE = ("STATUS_SUCCESSFUL", "STATUS_FAILED", "STATUS_CANCELLED")


def server_tree() -> Path:
    return Path(os.environ.get("T2I_NEXTCLOUD_TREE") or REPO.parent / "shared" / "nextcloud")


def why_skipped() -> str:
    tree = server_tree()
    if not (tree / "setup.sh").is_file():
        return f"no Nextcloud test server tree at {tree} (set T2I_NEXTCLOUD_TREE)"
    if shutil.which("php") is None:
        return "no PHP on this machine (the real Nextcloud needs php-cli 8.1-8.4; .ci/run installs it as root)"
    return ""


def start_server(root: Path, port: int) -> RealNextcloud:
    """Install the server tree into ``root`` (offline, SQLite) and start it on 127.0.0.1:``port`` without cron;
    raises RuntimeError with the scripts' output when either step fails."""
    tree = server_tree()
    env = {**os.environ, "NC_ADMIN_PASS": ADMIN_PASS, "NO_CRON": "1", "NC_LOGLEVEL": "2"}
    for step in (["bash", str(tree / "setup.sh"), str(root), str(port)], ["bash", str(tree / "start.sh"), str(root)]):
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"{' '.join(step)} failed (rc={done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
    return RealNextcloud(root, port)


def stop_server(root: Path) -> None:
    subprocess.run(["bash", str(server_tree() / "stop.sh"), str(root)], capture_output=True, timeout=60)


def send(req: urllib.request.Request) -> tuple[int, Any]:
    """One HTTP request: (status, the JSON answer, or its text when it is no JSON)."""
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")

class RealNextcloud:
    """One running Nextcloud: occ, OCS as a user, and read-only looks into its SQLite database."""

    version = 32

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.exapp_url = ""  # set by ExAppProcess.start

    # -- occ ----------------------------------------------------------------------------------------------------
    def occ(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(["php", "occ", *args], cwd=self.root / "nextcloud", capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode:
            raise AssertionError(f"occ {' '.join(args)}: rc={done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def register(self, proc: ExAppProcess, wait: bool = True) -> subprocess.CompletedProcess:
        info = {"id": APP_ID, "name": "text2image_sd2", "daemon_config_name": "manual_install",
                "version": APP_VERSION, "secret": SECRET, "port": proc.port}
        return self.occ("app_api:app:register", APP_ID, "manual_install", *(["--wait-finish"] if wait else []),
                        "--json-info", json.dumps(info))

    def add_user(self, user: str, password: str) -> None:
        done = subprocess.run(["php", "occ", "user:add", "--password-from-env", user], cwd=self.root / "nextcloud",
                              env={**os.environ, "OC_PASS": password}, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise AssertionError(f"occ user:add {user}: rc={done.returncode}\n{done.stdout}\n{done.stderr}")

    def unregister(self, rm_data: bool = False) -> None:
        self.occ("app_api:app:unregister", APP_ID, "--force", *(["--rm-data"] if rm_data else []), check=False)

    def registered(self) -> bool:
        return APP_ID in self.occ("app_api:app:list").stdout

    # -- OCS as a user ------------------------------------------------------------------------------------------
    def ocs(self, method: str, path: str, body: Any = None, user: str = "admin", password: str = ADMIN_PASS,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One request as Nextcloud's pages send it (basic auth here instead of the session); (status, JSON)."""
        sent = {"OCS-APIRequest": "true", "Accept": "application/json",
                "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        data = None
        if body is not None:
            data, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
        sent.update(headers or {})
        return send(urllib.request.Request(self.url + path, data=data, method=method, headers=sent))

    def schedule(self, task_input: Any, custom_id: str = "", user: str = "admin", password: str = ADMIN_PASS) -> int:
        status, answer = self.ocs("POST", "/ocs/v2.php/taskprocessing/schedule", {
            "type": "core:text2image", "appId": "assistant", "customId": custom_id, "input": task_input}, user=user,
            password=password)
        if status != 200:
            data = answer["ocs"]["data"] if isinstance(answer, dict) else {}
            raise ScheduleError(status, (data or {}).get("message", str(answer)) if isinstance(data, dict) else "")
        return int(answer["ocs"]["data"]["task"]["id"])

    def task(self, tid: int, user: str = "admin", password: str = ADMIN_PASS) -> dict:
        status, answer = self.ocs("GET", f"/ocs/v2.php/taskprocessing/task/{tid}", user=user, password=password)
        assert status == 200, (status, answer)
        return answer["ocs"]["data"]["task"]

    def wait(self, tids: list[int], timeout: float = 60.0, statuses: tuple[str, ...] = DONE, user: str = "admin",
             password: str = ADMIN_PASS, interval: float = 0.2) -> list[dict]:
        """The tasks once all are in one of ``statuses``, looked at every ``interval`` seconds as ``user``."""
        end = time.monotonic() + timeout
        while True:
            found = [self.task(t, user, password) for t in tids]
            if all(t["status"] in statuses for t in found):
                return found
            if time.monotonic() > end:
                raise AssertionError(f"tasks not done in {timeout} s: {[(t['id'], t['status']) for t in found]}")
            time.sleep(interval)

    def file(self, tid: int, fid: int) -> bytes:
        req = urllib.request.Request(f"{self.url}/ocs/v2.php/taskprocessing/tasks/{tid}/file/{fid}", headers={
            "OCS-APIRequest": "true",
            "Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASS}".encode()).decode()})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    def cancel(self, tid: int) -> dict:
        status, answer = self.ocs("POST", f"/ocs/v2.php/taskprocessing/tasks/{tid}/cancel")
        assert status == 200, (status, answer)
        return answer["ocs"]["data"]["task"]

    # -- the declarative settings page ----------------------------------------------------------------------------
    def forms(self) -> dict[str, dict]:
        """GET forms as the admin settings page loads them: each form with its fields' current ``value``."""
        status, answer = self.ocs("GET", "/ocs/v2.php/settings/api/declarative/forms")
        assert status == 200, (status, answer)
        return {f["id"]: f for f in answer["ocs"]["data"] if f.get("app") == APP_ID}

    def page_save(self, field_id: str, value: Any) -> tuple[int, Any]:
        """What the settings page sends when the admin changes one field of this app's form: ``formId`` is the
        form's id with the ``<appid>_`` prefix removed (``form.id.replace(app + '_', '')``)."""
        [form] = [f for f in self.forms().values() if any(x["id"] == field_id for x in f["fields"])]
        return self.ocs("POST", "/ocs/v2.php/settings/api/declarative/value", {
            "app": APP_ID, "formId": form["id"].replace(APP_ID + "_", "", 1), "fieldId": field_id, "value": value})

    # -- the database (read only) -------------------------------------------------------------------------------
    def query(self, sql: str, *args: Any) -> list[tuple]:
        with sqlite3.connect(f"file:{self.root / 'data' / 'nextcloud.db'}?mode=ro", uri=True, timeout=30) as db:
            return db.execute(sql, args).fetchall()

    def providers(self) -> list[str]:
        """The task-processing providers this app has registered (AppAPI's table)."""
        return [r[0] for r in self.query("SELECT name FROM oc_ex_task_processing WHERE app_id = ?", APP_ID)]

    def app_config(self) -> dict[str, str]:
        """This app's rows of oc_appconfig_ex, where AppAPI stores the admin form's values."""
        return dict(self.query("SELECT configkey, configvalue FROM oc_appconfig_ex WHERE appid = ?", APP_ID))

    def error_message(self, tid: int) -> str:
        return self.query("SELECT error_message FROM oc_taskprocessing_tasks WHERE id = ?", tid)[0][0] or ""


#: The settings every ExApp process of this suite runs with: quick polls, one thread.
FAST = {"T2I_POLL_INTERVAL": "0.3", "T2I_SETTINGS_POLL": "0.5", "T2I_THREADS": "1"}


def exapp_process(nc: RealNextcloud, storage: Path, model: Path | str, **env: str) -> ExAppProcess:
    return ExAppProcess(nc, storage, {**FAST, "T2I_MODEL": str(model), **env})  # type: ignore[arg-type]


def wait_for(what: Any, timeout: float = 60.0, proc: ExAppProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("timed out" + (f"; the ExApp's log:\n{proc.output()[-4000:]}" if proc else ""))
        time.sleep(0.2)


def heartbeat(proc: ExAppProcess, timeout: float = 60.0) -> None:
    def ok() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/heartbeat", timeout=3) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_for(ok, timeout, proc)


class SharedApp:
    """One registered ExApp shared by the cases that leave it as they found it; a case that needs the app id for
    itself calls :meth:`release` first, and the next user starts and registers a new one."""

    def __init__(self, nc: RealNextcloud, root: Path, model: Path) -> None:
        self.nc, self.root, self.model = nc, root, model
        self.proc: ExAppProcess | None = None
        self.runs = 0

    def get(self) -> ExAppProcess:
        if self.proc is None or self.proc.proc is None or self.proc.proc.poll() is not None:
            self.release()
            self.runs += 1
            proc = exapp_process(self.nc, self.root / f"storage-{self.runs}", self.model).start()
            heartbeat(proc)
            self.nc.register(proc)
            wait_for(lambda: PROVIDER in self.nc.providers(), 30, proc)
            self.proc = proc
        return self.proc

    def release(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        self.nc.unregister()
