"""Issue #16, item 16: input the command line got from files, folders and arguments ended in a traceback. Each case
is now a one-line error that names the value and what is allowed, or is shown as damaged."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from backend.cli import cli
from backend.standalone.manager import TaskManager
from backend.standalone.store import DB_NAME, TaskStore
from backend.standalone.task import Task, TaskStatus
from runtime.errors import T2IError

ROOT = Path(__file__).resolve().parents[1]
TOO_BIG = "1" * 23


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A store with a SUCCESSFUL task (id 1, one image) and a SCHEDULED one (id 2)."""
    store = TaskStore(tmp_path / "data")
    done = store.insert(Task.new("a red fox", "app", 1, "alice"), TaskStatus.RUNNING, 1, 0)
    store.save_images(done.id or 0, [b"png0"])
    store.finish(done.id or 0, TaskStatus.SUCCESSFUL, seeds=[7])
    store.insert(Task.new("a cat", "app", 1, "alice"), TaskStatus.SCHEDULED, 1, 0)
    store.close()
    return tmp_path / "data"


def test_a_tasks_table_of_another_program_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / DB_NAME) as db:
        db.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
        db.execute("INSERT INTO tasks VALUES (1, 'buy milk', 0)")
    for args in (["tasks", "list"], ["tasks", "show", "1"]):
        code, out = run(*args, "--data-dir", str(tmp_path / "data"))
        assert code == 1 and out == (f"Error: {tmp_path / 'data' / DB_NAME} is not a task store (its tasks table has "
                                     "no column user_id, app_id, identifier and 12 more); pass the --data-dir of the "
                                     "service\n"), out


def test_rows_with_a_text_time_or_nested_json_are_listed_and_shown(data: Path) -> None:
    with sqlite3.connect(data / DB_NAME) as db:
        db.execute("UPDATE tasks SET created_at = 'yesterday' WHERE id = 1")
        db.execute("UPDATE tasks SET options = ? WHERE id = 2", ("[" * 5000 + "]" * 5000,))
    code, out = run("tasks", "list", "--data-dir", str(data))
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["1", "FAILED", "-"] and lines[1].split()[:2] == ["2", "FAILED"], out
    code, out = run("tasks", "list", "--json", "--data-dir", str(data))
    assert code == 0 and [t["status"] for t in json.loads(out)] == [4, 4]
    code, out = run("tasks", "show", "1", "--data-dir", str(data))
    assert code == 0 and "created_at: (damaged) 'yesterday'" in out and "status: SUCCESSFUL" in out, out
    code, out = run("tasks", "show", "2", "--json", "--data-dir", str(data))
    assert code == 0 and json.loads(out)["options"].startswith("(damaged) '[[[["), out


@pytest.mark.parametrize("command", ["show", "delete"])
def test_a_task_id_beyond_64_bits_is_refused(data: Path, command: str) -> None:
    code, out = run("tasks", command, TOO_BIG, "--data-dir", str(data))
    name = "TASK_ID" if command == "show" else "TASK_IDS..."
    assert code == 2 and out.splitlines()[-1] == (f"Error: Invalid value for '{name}': {TOO_BIG} is not in the range "
                                                  "1<=x<=9223372036854775807."), out
    assert TaskStore(data).get(int(TOO_BIG)) is None


def test_show_lists_only_the_images_of_a_task(data: Path) -> None:
    (data / "images" / "1" / "x.png").write_bytes(b"not one of the task's images")
    code, out = run("tasks", "show", "1", "--json", "--data-dir", str(data))
    assert code == 0 and json.loads(out)["images"] == [str(data / "images" / "1" / "0.png")], out


@pytest.mark.parametrize("days, why", [("nan", "is not a finite number"), ("inf", "is not a finite number"),
                                       ("-inf", "is not a finite number"), ("-1", "is negative")])
def test_cleanup_refuses_an_age_that_is_not_a_finite_number(data: Path, days: str, why: str) -> None:
    code, out = run("tasks", "cleanup", "--older-than-days", days, "--data-dir", str(data))
    assert code == 2 and out.splitlines()[-1] == (f"Error: Invalid value for --older-than-days: {days} {why}; give "
                                                  "an age in days, 0 or more"), out
    with pytest.raises(T2IError, match="max_age_days nan is not allowed"):
        TaskManager(data, max_age_days=float("nan"))


def test_generate_refuses_an_output_folder_it_cannot_write_before_generating(onnx_bundle: Path) -> None:
    # /proc passes a permission check as root, and the PNG files could not be written after the generation.
    code, out = run("generate", "a fox", "--model", str(onnx_bundle), "--steps", "1", "--out", "/proc")
    assert code == 1 and "denoising" not in out, out
    assert out.startswith("Error: --out '/proc' is not writable: no file can be created in '/proc' ("), out
    assert out.endswith("); choose another folder\n"), out


def test_serve_without_users_on_a_data_folder_it_cannot_write(tmp_path: Path) -> None:
    # Without T2I_USERS the service writes a credentials file; a data folder under a file failed there with a
    # traceback (a mode 0o555 folder would not stop root).
    (tmp_path / "file").write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k != "T2I_USERS"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", "from backend.cli import main; main()", "serve", "--standalone",
                           "--data-dir", str(tmp_path / "file" / "sub")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and done.stderr == (
        f"Error: the credentials file '{tmp_path / 'file' / 'sub' / 'credentials'}' cannot be written or read "
        f"([Errno 20] Not a directory: '{tmp_path / 'file' / 'sub'}'); give the service a writable data folder "
        "(--data-dir / T2I_DATA_DIR) or users in T2I_USERS\n"), done.stderr
