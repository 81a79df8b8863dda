"""The task store: one SQLite database in WAL mode plus the images as PNG files beside it.

Layout of a data directory::

    <data_dir>/tasks.sqlite3 (+ -wal, -shm)   the tasks
    <data_dir>/images/<task id>/<index>.png    the images of SUCCESSFUL tasks

No model stack (the input is written and read by the task-input codec), so ``text2image tasks`` reads the store
without loading a model. Safe to use from many
threads (one connection behind a lock) and from several processes (WAL lets the CLI read and delete while the
service runs).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend.standalone.data_dir import DB_NAME, StoreError, StoreFull, has_room, store_error
from backend.standalone.rows import DAMAGED, decode_text, missing_columns, shown_value, task_of_row
from backend.standalone.task import Task, TaskStatus
from backend.tasks.task_input import dump
from runtime.errors import ConfigError
from runtime.validation import shown

__all__ = ["ANY_USER", "DAMAGED", "DB_NAME", "StoreError", "StoreFull", "TaskStore"]
IMAGES_DIR = "images"
#: Task ids are SQLite rowids: a larger number is no task (and SQLite could not even bind it).
MAX_TASK_ID = 2**63 - 1
#: A stored runtime estimate above this (115 days) is damage, and does not count in the backlog.
MAX_EXPECTED_SECONDS = 1e7

# AUTOINCREMENT: ids of deleted tasks are never handed out again, so an app polling an old id cannot reach a task
# made later for the same user.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT,
    app_id TEXT NOT NULL,
    identifier TEXT NOT NULL DEFAULT '',
    input TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    number_of_images INTEGER NOT NULL,
    status INTEGER NOT NULL,
    expected_seconds REAL NOT NULL DEFAULT 0,
    completion_expected_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_message TEXT,
    debug_message TEXT,
    seeds TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_app ON tasks (user_id, app_id, identifier);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, id);
"""

#: Marks "any user" in queries, as None is a real owner (tasks of Python callers without a user).
ANY_USER: Any = object()


class TaskStore:
    """Tasks and their images in ``data_dir``. ``create=False`` refuses a directory without a store."""

    def __init__(self, data_dir: Path, create: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / IMAGES_DIR
        db = self.data_dir / DB_NAME
        if not create and not db.is_file():
            raise ConfigError(f"there is no task store in {self.data_dir}; start `text2image serve --standalone` "
                           "first or pass the --data-dir it uses")
        self._lock = threading.RLock()
        #: False when the store could only be opened for reading (``create=False`` on a read-only directory).
        self.writable = True
        try:
            self._db = self._open(db, create)
        except (sqlite3.Error, OSError) as exc:
            raise store_error(exc, self.data_dir) from None

    def _open(self, db: Path, create: bool) -> sqlite3.Connection:
        if create:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # Users' prompts and images: for this service's account only (the folder closes everything in it,
            # the database gets its own mode too).
            if self.data_dir.stat().st_mode & 0o077:
                os.chmod(self.data_dir, 0o700)
        try:
            conn = sqlite3.connect(db, timeout=30, check_same_thread=False, isolation_level=None)
            if not create:
                _check_is_store(conn, db)
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if create:
                raise
            # Reading a store on a read-only mount (or without write permission) still works.
            conn = sqlite3.connect(f"{db.resolve().as_uri()}?immutable=1", uri=True, timeout=30,
                                   check_same_thread=False, isolation_level=None)
            self.writable = False
        _rows_as_input(conn)
        if create:
            if db.stat().st_mode & 0o077:
                os.chmod(db, 0o600)
            # FULL: a task acknowledged to a client survives a power cut, not only a crash of this process.
            conn.execute("PRAGMA synchronous=FULL")
            if _has_tasks_table(conn):
                _check_is_store(conn, db)
            conn.executescript(_SCHEMA)
        else:
            _check_is_store(conn, db)
        return conn

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock at once, so read-then-update (claiming a task) is atomic across processes.
        with self._lock:
            if not self.writable:
                self._reopen_writable()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise store_error(exc, self.data_dir) from None

    def _reopen_writable(self) -> None:
        """Open for writing a store that could only be read at first (read-only, or no room for its WAL files)."""
        db = self.data_dir / DB_NAME
        try:
            conn = sqlite3.connect(db, timeout=30, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise store_error(exc, self.data_dir) from None
        _rows_as_input(conn)
        self._db.close()
        self._db, self.writable = conn, True

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise store_error(exc, self.data_dir) from None

    def has_room(self) -> bool:
        """Whether the data directory has the room a new task needs (:data:`MIN_FREE_BYTES`)."""
        return has_room(self.data_dir)

    # -- writing ---------------------------------------------------------------------------------------------------
    def insert(self, task: Task, status: TaskStatus, expected_seconds: float, completion_expected_at: int,
               attempts: int = 0) -> Task:
        """Store a new task; fills in ``task.id``, status and times on the object and returns it."""
        assert task.request is not None, "a task is stored once, made with Task.new"
        stored = dump(task.request)  # what rows.task_of_row parses back
        prompt, n = stored.pop("input"), stored.pop("numberOfImages")
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO tasks (user_id, app_id, identifier, input, options, number_of_images, status, "
                "expected_seconds, completion_expected_at, attempts, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task.user_id, task.app_id, task.identifier, prompt, json.dumps(stored), n, int(status),
                 expected_seconds, completion_expected_at, attempts, now, now))
        task.id, task.status = cur.lastrowid, status
        task.completion_expected_at, task.created_at, task.updated_at = completion_expected_at, now, now
        return task

    def claim_next(self, other_than: Any = ANY_USER, most_images: int | None = None) -> Task | None:
        """Move the oldest SCHEDULED task to RUNNING and return it; None when there is none. ``other_than`` skips
        that user's tasks and ``most_images`` larger tasks (a task run between another one's batches).

        A row that cannot be read back (damaged by hand) ends FAILED instead of blocking the queue.
        """
        where, args = "status = ?", [int(TaskStatus.SCHEDULED)]
        if other_than is not ANY_USER:
            where, args = where + " AND user_id IS NOT ?", [*args, other_than]
        if most_images is not None:
            where, args = where + " AND number_of_images <= ?", [*args, most_images]
        while True:
            with self._tx() as db:
                row = db.execute(f"SELECT id FROM tasks WHERE {where} ORDER BY id LIMIT 1", args).fetchone()
                if row is None:
                    return None
                db.execute("UPDATE tasks SET status = ?, attempts = attempts + 1, updated_at = ? WHERE id = ?",
                           (int(TaskStatus.RUNNING), time.time(), row["id"]))
            task = self.get(row["id"])
            if task is not None and task.damaged is None:
                return task
            if task is not None:
                self.finish(row["id"], TaskStatus.FAILED, error_message=DAMAGED,
                            debug_message=f"stored task cannot be read: {task.damaged}")

    def finish(self, task_id: int, status: TaskStatus, seeds: list[int] | None = None,
               error_message: str | None = None, debug_message: str | None = None) -> bool:
        """End a RUNNING task as SUCCESSFUL or FAILED. False when it is gone (deleted while it ran)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tasks SET status = ?, seeds = ?, error_message = ?, debug_message = ?, updated_at = ? "
                "WHERE id = ? AND status = ?",
                (int(status), json.dumps(seeds or []), error_message, debug_message, time.time(), task_id,
                 int(TaskStatus.RUNNING)))
        return cur.rowcount == 1

    def requeue(self, task_id: int) -> bool:
        """Put a RUNNING task back in the queue, e.g. when the service stops; the attempt does not count."""
        with self._tx() as db:
            cur = db.execute("UPDATE tasks SET status = ?, attempts = MAX(attempts - 1, 0), updated_at = ? "
                             "WHERE id = ? AND status = ?",
                             (int(TaskStatus.SCHEDULED), time.time(), task_id, int(TaskStatus.RUNNING)))
        return cur.rowcount == 1

    def recover(self, max_attempts: int) -> tuple[list[int], list[int]]:
        """After a crash: tasks left RUNNING are scheduled again, or FAILED once they were started ``max_attempts``
        times (a task that kills the process must not do so forever). Returns (requeued ids, failed ids)."""
        message = (f"the service stopped {max_attempts} times while making these images, so it was not tried "
                   "again; try fewer or smaller images, or ask the administrator to check the log")
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM tasks WHERE status = ?", (int(TaskStatus.RUNNING),)).fetchall()
            # A count that is not a whole number (a damaged row) counts as used up.
            spent = {r["id"]: not isinstance(r["attempts"], int) or r["attempts"] >= max_attempts for r in rows}
            failed = [i for i, done in spent.items() if done]
            requeued = [i for i, done in spent.items() if not done]
            now = time.time()
            db.executemany("UPDATE tasks SET status = ?, error_message = ?, debug_message = ?, updated_at = ? "
                           "WHERE id = ?",
                           [(int(TaskStatus.FAILED), message, "process ended while the task was RUNNING", now, i)
                            for i in failed])
            db.executemany("UPDATE tasks SET status = ?, updated_at = ? WHERE id = ?",
                           [(int(TaskStatus.SCHEDULED), now, i) for i in requeued])
        return requeued, failed

    def delete(self, task_id: int) -> bool:
        """Delete a task and its images. False when there was no such task.

        On a full disk the images go first: that frees the room the database needs to record the delete."""
        if not _is_task_id(task_id):
            return False
        try:
            with self._tx() as db:
                cur = db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
        except StoreFull:
            self.remove_images(task_id)
            with self._tx() as db:
                cur = db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
        self.remove_images(task_id)
        return cur.rowcount == 1

    def cleanup(self, older_than_seconds: float) -> list[int]:
        """Delete finished (SUCCESSFUL or FAILED) tasks last changed more than ``older_than_seconds`` ago."""
        if not isinstance(older_than_seconds, (int, float)) or not math.isfinite(older_than_seconds) \
                or older_than_seconds < 0:
            raise ConfigError(f"an age of {shown(older_than_seconds)} seconds is not allowed; give a finite number, "
                              "0 or more")
        cutoff = time.time() - older_than_seconds
        rows = self._query("SELECT id FROM tasks WHERE status IN (?, ?) AND updated_at < ?",
                           (int(TaskStatus.SUCCESSFUL), int(TaskStatus.FAILED), cutoff))
        ids = [r["id"] for r in rows]
        try:
            with self._tx() as db:
                db.executemany("DELETE FROM tasks WHERE id = ?", [(i,) for i in ids])
        except StoreFull:  # free the images' room first, then record the deletes
            for i in ids:
                self.remove_images(i)
            with self._tx() as db:
                db.executemany("DELETE FROM tasks WHERE id = ?", [(i,) for i in ids])
        for i in ids:
            self.remove_images(i)
        return ids

    # -- reading ---------------------------------------------------------------------------------------------------
    def get(self, task_id: int, user_id: Any = ANY_USER) -> Task | None:
        """The task with this id (and owner, unless ``user_id`` is ANY_USER); None when there is none."""
        if not _is_task_id(task_id):
            return None
        if user_id is ANY_USER:
            rows = self._query("SELECT * FROM tasks WHERE id = ?", (task_id,))
        else:
            rows = self._query("SELECT * FROM tasks WHERE id = ? AND user_id IS ?", (task_id, user_id))
        return task_of_row(rows[0]) if rows else None

    def find(self, user_id: Any = ANY_USER, app_id: str | None = None, identifier: str | None = None,
             status: TaskStatus | None = None) -> list[Task]:
        """Tasks matching every filter given, oldest first."""
        where: list[str] = []
        args: list[Any] = []
        if user_id is not ANY_USER:
            where.append("user_id IS ?")
            args.append(user_id)
        for column, value in (("app_id", app_id), ("identifier", identifier), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM tasks" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [task_of_row(r) for r in self._query(sql, tuple(args))]

    def backlog_seconds(self) -> float:
        """Expected seconds of the work queued or running (estimates that are not plausible numbers left out)."""
        rows = self._query("SELECT TOTAL(expected_seconds) AS s FROM tasks WHERE status IN (?, ?) AND "
                           "typeof(expected_seconds) IN ('integer', 'real') AND expected_seconds BETWEEN 0 AND ?",
                           (int(TaskStatus.SCHEDULED), int(TaskStatus.RUNNING), MAX_EXPECTED_SECONDS))
        return float(rows[0]["s"])

    def details(self, task_id: int) -> dict[str, Any] | None:
        """Everything stored about a task, including the debug message and attempts (for ``tasks show``); a
        value that is not UTF-8 text or is bytes shows as damaged."""
        if not _is_task_id(task_id):
            return None
        rows = self._query("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return {k: shown_value(v) for k, v in dict(rows[0]).items()} if rows else None

    def check(self) -> list[str]:
        """Problems found: SQLite's integrity check, and images that disagree with task statuses. Empty = fine."""
        problems = [r[0] for r in self._query("PRAGMA integrity_check") if r[0] != "ok"]
        successful = {t.id: t.number_of_images for t in self.find(status=TaskStatus.SUCCESSFUL)}
        for task_id, wanted in successful.items():
            have = len(list(self.images_dir.joinpath(str(task_id)).glob("*.png")))
            if have != wanted:
                problems.append(f"task {task_id} is SUCCESSFUL with {have} of {wanted} images")
        if self.images_dir.is_dir():
            for folder in self.images_dir.iterdir():
                if not folder.name.isdigit() or int(folder.name) not in successful:
                    problems.append(f"images folder {folder.name} belongs to no SUCCESSFUL task")
        return problems

    # -- images ----------------------------------------------------------------------------------------------------
    def image_dir(self, task_id: int) -> Path:
        return self.images_dir / str(int(task_id))

    def image_path(self, task_id: int, index: int) -> Path:
        return self.image_dir(task_id) / f"{int(index)}.png"

    def image_files(self, task_id: int) -> list[Path]:
        """The images stored for a task, in image order; other files in its folder are not images."""
        found = [p for p in self.image_dir(task_id).glob("*.png") if p.stem.isdigit() and p.stem.isascii()]
        return sorted(found, key=lambda p: int(p.stem))

    def save_images(self, task_id: int, pngs: list[bytes]) -> list[Path]:
        """Write a task's PNG files; each appears whole or not at all (write, then rename)."""
        folder = self.image_dir(task_id)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, png in enumerate(pngs):
            path = self.image_path(task_id, index)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(png)
            tmp.replace(path)
            paths.append(path)
        return paths

    def remove_images(self, task_id: int) -> None:
        shutil.rmtree(self.image_dir(task_id), ignore_errors=True)

    def remove_orphan_images(self) -> int:
        """Remove image folders of tasks that are gone or not SUCCESSFUL (left by a crash). Returns how many."""
        if not self.images_dir.is_dir():
            return 0
        keep = {str(t.id) for t in self.find(status=TaskStatus.SUCCESSFUL)}
        orphans = [f for f in self.images_dir.iterdir() if f.name not in keep]
        for path in orphans:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(orphans)


def _rows_as_input(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.text_factory = decode_text  # one value that is not UTF-8 must not fail a whole query


def _is_task_id(task_id: object) -> bool:
    return isinstance(task_id, int) and 0 <= task_id <= MAX_TASK_ID


def _has_tasks_table(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tasks'").fetchone() is not None


def _check_is_store(conn: sqlite3.Connection, db: Path) -> None:
    """Refuse a database without the tasks table of this service (an empty file, another program's database),
    writing nothing."""
    missing = missing_columns(conn) if _has_tasks_table(conn) else None
    if missing is None:
        what = "it has no tasks table"
    elif missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        what = f"its tasks table has no column {', '.join(missing[:3])}{more}"
    else:
        return
    conn.close()
    raise StoreError(f"{db} is not a task store ({what}); pass the --data-dir of the service")
