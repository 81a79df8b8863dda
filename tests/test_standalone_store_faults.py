"""Issue #11, rows 6–8: a damaged task row or database, a full disk and a read-only data directory. One damaged row
fails that task, never a listing or the service; deleting frees space on a full disk; every ``tasks`` command and
the service say what is wrong instead of a traceback. The disk cases use small tmpfs mounts (root only)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from standalone_helpers import ALICE, BOB, USERS, Client, basic

from backend.cli import cli
from backend.config import Settings
from backend.standalone.manager import TaskManager
from backend.standalone.server import StandaloneServer
from backend.standalone.store import DAMAGED, DB_NAME, StoreError, TaskStore
from backend.standalone.task import Task, TaskStatus

COMMANDS = [["list"], ["list", "--json"], ["list", "--status", "failed"], ["show", "1"], ["show", "2"],
            ["show", "2", "--json"], ["delete", "3"], ["cleanup", "--older-than-days", "0"]]


def tasks(data: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["tasks", *args, "--data-dir", str(data)], catch_exceptions=False)
    return result.exit_code, result.output


def _store_with_tasks(data: Path) -> None:
    store = TaskStore(data)
    done = store.insert(Task.new("a red fox", "app", 1, "alice"), TaskStatus.RUNNING, 1, 0)
    store.save_images(done.id or 0, [b"png"])
    store.finish(done.id or 0, TaskStatus.SUCCESSFUL, seeds=[1])
    store.insert(Task.new("a cat", "app", 1, "alice"), TaskStatus.SCHEDULED, 1, 0)
    store.insert(Task.new("a dog", "app", 1, "bob"), TaskStatus.SCHEDULED, 1, 0)
    store.close()


def test_a_damaged_row_fails_that_task_and_nothing_else(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store_with_tasks(data)
    with sqlite3.connect(data / DB_NAME) as db:
        db.execute("UPDATE tasks SET options = 'not json' WHERE id = 2")
    # Every command works, and shows the damaged task as failed.
    for args in COMMANDS[:6]:
        code, out = tasks(data, *args)
        assert code == 0 and "Traceback" not in out, (args, out)
    assert "(damaged) 'not json'" in tasks(data, "show", "2")[1]
    # The service starts; the damaged task is failed with the reason, the others run or stay readable.
    manager = TaskManager(data)
    try:
        assert manager.store.claim_next().id == 3  # type: ignore[union-attr]
        damaged = manager.get_task(2)
        assert damaged.status == TaskStatus.FAILED and damaged.error_message == DAMAGED
        assert manager.store.details(2)["debug_message"].startswith(
            "stored task cannot be read: column options is not JSON (JSONDecodeError")
        assert [t.id for t in manager.get_user_tasks_by_app("alice", "app")] == [1, 2]
    finally:
        manager.close()


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("column, value, reason", [
    ("input", "CAST(x'ff41' AS TEXT)", r"column input is not UTF-8: b'\xffA'"),
    ("user_id", "CAST(x'c328' AS TEXT)", r"column user_id is not UTF-8: b'\xc3('"),
    ("options", f"'{DEEP}'", "column options is JSON nested too deeply"),
    ("seeds", f"'{DEEP}'", "column seeds is JSON nested too deeply"),
    ("seeds", "'[1, [2]]'", "column seeds holds '[1, [2]]'; a list of whole numbers is allowed"),
    ("options", "'{\"steps\": {\"a\": 1}}'", "column options holds '{\"steps\": {\"a\": 1}}'; an object of plain"),
    ("created_at", "'yesterday'", "column created_at holds 'yesterday'; Unix seconds from 0 to"),
    ("number_of_images", "1e300", "column number_of_images holds 1e+300; a whole number from 1 to 12"),
    ("error_message", "x'00ff'", "column error_message holds b'\\x00\\xff'; text or NULL is allowed"),
])
def test_one_unreadable_column_fails_only_its_task(tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str,
                                                    value: str, reason: str) -> None:
    # Issue #16, item 8: bytes that are not UTF-8 in a SUCCESSFUL task refused start-up and answered the user's list
    # with 503; JSON nested 5000 deep crashed start-up with RecursionError.
    data = tmp_path / "data"
    _store_with_tasks(data)
    with sqlite3.connect(data / DB_NAME) as db:
        db.execute(f"UPDATE tasks SET {column} = {value} WHERE id = 1")
    server = StandaloneServer(Settings().updated(data_dir=data, users=USERS, port=0, threads=1))
    server.start()
    try:
        assert f"task 1 cannot be read from the store, so it reads as FAILED: {reason}" in caplog.text
        listed = Client(server.url, basic(*ALICE)).get("tasks/app/app")
        assert listed.status == 200, listed
        tasks_by_id = {t["id"]: t for t in listed.data["tasks"]}
        assert tasks_by_id[2]["status"] == TaskStatus.SCHEDULED
        if column != "user_id":  # a user id that is not UTF-8 is nobody's
            assert tasks_by_id[1]["status"] == TaskStatus.FAILED and tasks_by_id[1]["errorMessage"] == DAMAGED
        assert server.manager.get_task(1).damaged.startswith(reason)  # type: ignore[union-attr]
        with sqlite3.connect(data / DB_NAME) as db:  # the same damage while the service runs
            db.execute(f"UPDATE tasks SET {column} = {value} WHERE id = 3")
        listed = Client(server.url, basic(*BOB)).get("tasks/app/app")
        assert listed.status == 200 and [t["id"] for t in listed.data["tasks"]] == ([] if column == "user_id" else [3])
    finally:
        server.close()
    for args in [["list"], ["list", "--json"], ["show", "1"], ["show", "1", "--json"], ["delete", "1"]]:
        code, out = tasks(data, *args)
        assert code == 0 and "Traceback" not in out, (args, out)
    assert tasks(data, "list")[1].splitlines()[0].split()[:2] == ["2", "SCHEDULED"]


def test_start_up_reads_counts_and_estimates_as_input(tmp_path: Path) -> None:
    # A RUNNING task whose attempts are not a number is failed at start-up (it stopped start-up with a TypeError);
    # estimates that are not plausible numbers do not count in the backlog (an overflowing SUM refused scheduling).
    data = tmp_path / "data"
    store = TaskStore(data)
    for attempts in ("'many'", "1"):
        task = store.insert(Task.new("a fox", "app", 1, "alice"), TaskStatus.SCHEDULED, 5, 0)
        store._db.execute(f"UPDATE tasks SET status = 2, attempts = {attempts} WHERE id = ?", (task.id,))
    for estimate in ("'soon'", "1e308", "9223372036854775807", "-7"):
        task = store.insert(Task.new("a fox", "app", 1, "alice"), TaskStatus.SCHEDULED, 5, 0)
        store._db.execute(f"UPDATE tasks SET expected_seconds = {estimate} WHERE id = ?", (task.id,))
    store.close()
    manager = TaskManager(data)
    try:
        assert [t.status for t in manager.store.find()][:2] == [TaskStatus.FAILED, TaskStatus.SCHEDULED]
        assert manager.store.backlog_seconds() == 5.0  # the one scheduled again; the others have no estimate
    finally:
        manager.close()


@pytest.mark.parametrize("damage", ["garbage", "empty", "no table"])
def test_a_damaged_database_is_named_by_every_command_and_the_service(tmp_path: Path, damage: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / DB_NAME
    if damage == "garbage":
        db.write_bytes(b"this is not an SQLite database at all. " * 200)
    elif damage == "empty":
        db.write_bytes(b"")
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE other (x)")
    size = db.stat().st_size
    for args in COMMANDS:
        code, out = tasks(data, *args)
        assert code != 0 and "Traceback" not in out, (args, out)
        assert ("is damaged" in out) if damage == "garbage" else ("is not a task store" in out), (args, out)
    assert db.stat().st_size == size, "reading a damaged store never writes to it"
    if damage == "garbage":
        with pytest.raises(StoreError, match="is damaged"):
            StandaloneServer(Settings().updated(data_dir=data, users=USERS, port=0))


# -- the disk cases: small tmpfs mounts ----------------------------------------------------------------------------
def _mount(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full or read-only disk) needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    _mount(mount, "4m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "ab", buffering=0) as out:
        for size in (65536, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                pass


def test_on_a_full_disk_deleting_frees_space_and_scheduling_says_why(small_disk: Path, service: Any) -> None:
    data = small_disk / "data"
    store = TaskStore(data)
    for _ in range(3):
        big = store.insert(Task.new("a fox", "app", 1, "alice"), TaskStatus.RUNNING, 1, 0)
        store.save_images(big.id or 0, [os.urandom(800 * 1024)])
        store.finish(big.id or 0, TaskStatus.SUCCESSFUL, seeds=[1])
    assert big.id == 3
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next write needs new room
    store.close()
    server = StandaloneServer(Settings().updated(data_dir=data, users=USERS, port=0, threads=1), services=[service])
    server.start()
    try:
        _fill(small_disk)
        alice = Client(server.url, basic(*ALICE))
        assert alice.get("is_available").data == {"isAvailable": False}
        reply = alice.schedule("a red fox", steps=1)
        assert reply.status == 507 and "no room left" in reply.message, reply
        # Deleting the task with the big image works, and makes room.
        assert alice.delete(f"task/{big.id}").status == 200
        assert not (data / "images" / str(big.id)).exists()
        assert alice.get(f"task/{big.id}").status == 404
    finally:
        server.close()
    # The command line's delete and cleanup work on a full disk too (the service has stopped: its WAL files are
    # gone, and there is no room to make them again until images are removed).
    _fill(small_disk)
    code, out = tasks(data, "delete", "2")
    assert code == 0 and "deleted task 2" in out, out
    _fill(small_disk)
    code, out = tasks(data, "cleanup", "--older-than-days", "0")
    assert code == 0 and "deleted 1 finished task(s)" in out, out
    assert not (data / "images").exists() or not any((data / "images").iterdir())


def test_a_read_only_data_directory_is_named_and_still_readable(small_disk: Path) -> None:
    data = small_disk / "data"
    _store_with_tasks(data)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(StoreError, match="cannot be written"):
        StandaloneServer(Settings().updated(data_dir=data, users=USERS, port=0))
    code, out = tasks(data, "list")
    assert code == 0 and "a red fox" in out and "a dog" in out, out
    code, out = tasks(data, "delete", "1")
    assert code != 0 and "cannot be written" in out and "Traceback" not in out, out
    result = CliRunner().invoke(cli, ["serve", "--standalone", "--data-dir", str(data)], catch_exceptions=False,
                                env={"T2I_USERS": USERS})
    assert result.exit_code != 0 and "cannot be written" in result.output, result.output


@pytest.fixture(scope="module")
def service(onnx_bundle: Path) -> Any:
    from standalone_helpers import load_service

    return load_service(onnx_bundle)
