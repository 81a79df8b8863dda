"""``text2image tasks list|show|delete|cleanup`` against a local store, and the errors ``serve --standalone`` gives
before it starts."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from standalone_helpers import load_service, wait_until

from backend.cli import cli
from backend.standalone.manager import TaskManager
from backend.standalone.store import TaskStore
from backend.standalone.task import Task, TaskStatus


def run(*args: str, ok: bool = True, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A store with three tasks: alice's SUCCESSFUL one with two images, alice's FAILED one, bob's SCHEDULED one."""
    store = TaskStore(tmp_path / "data")
    done = store.insert(Task.new("a red fox", "app1", 2, "alice", "x", {"steps": 2}), TaskStatus.RUNNING, 1, 0)
    store.save_images(done.id or 0, [b"png0", b"png1"])
    store.finish(done.id or 0, TaskStatus.SUCCESSFUL, seeds=[7, 8])
    failed = store.insert(Task.new("a cat", "app2", 1, "alice"), TaskStatus.RUNNING, 1, 0)
    store.finish(failed.id or 0, TaskStatus.FAILED, error_message="for the user", debug_message="for the admin")
    store.insert(Task.new("ü" * 80, "app1", 1, "bob"), TaskStatus.SCHEDULED, 1, 0)
    store.close()
    return tmp_path / "data"


def test_list_shows_tasks_and_filters(data: Path) -> None:
    lines = run("tasks", "list", "--data-dir", str(data)).splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["1", "SUCCESSFUL"], ["2", "FAILED"], ["3", "SCHEDULED"]]
    assert "alice/app1" in lines[0] and "'a red fox'" in lines[0] and "ü" * 47 + "..." in lines[2]
    assert lines[-1] == "3 task(s)"
    only = json.loads(run("tasks", "list", "--data-dir", str(data), "--user", "alice", "--app", "app1", "--json"))
    assert [t["id"] for t in only] == [1] and only[0]["status"] == 3 and only[0]["identifier"] == "x"
    failed = json.loads(run("tasks", "list", "--data-dir", str(data), "--status", "failed", "--json"))
    assert [t["errorMessage"] for t in failed] == ["for the user"]


def test_show_tells_everything_including_images(data: Path) -> None:
    shown = json.loads(run("tasks", "show", "1", "--data-dir", str(data), "--json"))
    assert shown["status"] == "SUCCESSFUL" and shown["seeds"] == [7, 8] and shown["options"] == {"steps": 2}
    assert shown["images"] == [str(data / "images" / "1" / f"{i}.png") for i in range(2)]
    text = run("tasks", "show", "2", "--data-dir", str(data))
    assert "error_message: for the user" in text and "debug_message: for the admin" in text
    assert "there is no task 9" in run("tasks", "show", "9", "--data-dir", str(data), ok=False)


def test_delete_removes_tasks_and_images(data: Path) -> None:
    assert run("tasks", "delete", "1", "3", "--data-dir", str(data)) == "deleted task 1\ndeleted task 3\n"
    assert not (data / "images" / "1").exists()
    out = run("tasks", "delete", "2", "1", "--data-dir", str(data), ok=False)
    assert "deleted task 2" in out and "no task 1; nothing deleted for those" in out
    assert run("tasks", "list", "--data-dir", str(data)).strip() == "0 task(s)"


def test_cleanup_deletes_old_finished_tasks(data: Path) -> None:
    assert "deleted 0 finished task(s) older than 30 days" in run("tasks", "cleanup", "--data-dir", str(data))
    with sqlite3.connect(data / "tasks.sqlite3") as db:
        db.execute("UPDATE tasks SET updated_at = updated_at - 2 * 86400")
    assert "deleted 2" in run("tasks", "cleanup", "--older-than-days", "1.5", "--data-dir", str(data))
    assert not (data / "images" / "1").exists()
    assert "is negative" in run("tasks", "cleanup", "--older-than-days", "-1", "--data-dir", str(data), ok=False)


def test_the_default_data_dir_comes_from_the_settings(data: Path, tmp_path: Path) -> None:
    assert "3 task(s)" in run("tasks", "list", env={"T2I_DATA_DIR": str(data)})
    out = run("tasks", "list", env={"T2I_DATA_DIR": str(tmp_path / "none")}, ok=False)
    assert f"there is no task store in {tmp_path / 'none'}" in out
    assert not (tmp_path / "none").exists()  # looking does not create a store


def test_deleting_from_the_cli_stops_a_task_the_service_is_making(tmp_path: Path, onnx_bundle: Path) -> None:
    with TaskManager(tmp_path, services=[load_service(onnx_bundle)]) as manager:
        task = manager.schedule_task(Task.new("a slow fox", "app", 4, "alice", options={"steps": 100}))
        wait_until(lambda: manager.get_task(task.id or 0).status == TaskStatus.RUNNING, 30, what="RUNNING")
        started = time.monotonic()
        run("tasks", "delete", str(task.id), "--data-dir", str(tmp_path))
        quick = manager.run_task(Task.new("fox", "app", 1, "alice", options={"steps": 1}))  # waits for the worker
        assert quick.status == TaskStatus.SUCCESSFUL and time.monotonic() - started < 10
        assert not manager.store.image_dir(task.id or 0).exists()


@pytest.mark.parametrize("users, words", [("alice:short", "use at least 16"), ("nocolon", "is not 'user:secret'")])
def test_serve_refuses_bad_users(tmp_path: Path, users: str, words: str) -> None:
    out = run("serve", "--standalone", "--data-dir", str(tmp_path), env={"T2I_USERS": users}, ok=False)
    assert words in out and "Traceback" not in out


def test_serve_says_when_the_port_is_taken_and_frees_the_store(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = run("serve", "--standalone", "--data-dir", str(tmp_path), "--port", port,
                  env={"T2I_USERS": "alice:long-enough-secret"}, ok=False)
    assert f"cannot listen on 127.0.0.1:{port}" in out
    TaskManager(tmp_path).close()  # the data directory is free again


def test_the_command_line_stays_light() -> None:
    code = ("import sys, backend.cli; heavy = [m for m in ('numpy', 'sqlite3', 'onnxruntime', 'PIL', "
            "'backend.standalone.store') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
