"""A small local journal of the tasks this service holds, so that none is left RUNNING in Nextcloud forever.

Nextcloud marks a task RUNNING when it hands it out and never hands it out again, nor requeues it: a task the
ExApp drops (crash, kill, lost result) stays RUNNING for good. So every task is written here the moment it is
taken, its finished outcome (PNG files or an error) is kept until Nextcloud has confirmed it, and a restarted
service finds what was in hand and reports it.

Several processes may share one journal (``--workers`` threads share a process; containers may share a volume).
Each process owns its rows under a random owner id and holds an exclusive lock on ``owners/<id>.lock`` while it
lives; rows whose owner's lock is free belong to a dead process and are adopted by the next one that looks.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id INTEGER PRIMARY KEY,
    provider TEXT NOT NULL,
    owner TEXT NOT NULL,
    task TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL CHECK (state IN ('running', 'deliver')),
    outcome TEXT,
    updated REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Entry:
    """One task in hand. ``state`` is ``running`` (being generated) or ``deliver`` (outcome waiting for Nextcloud).

    ``outcome`` for ``deliver``: ``{"pngs": [paths], "file_ids": [ids uploaded so far]}`` or
    ``{"error": admin message, "user_error": message for the user}``.
    """

    task_id: int
    provider: str
    task: dict[str, Any]
    attempts: int
    state: str
    outcome: dict[str, Any] | None


class Journal:
    """The journal in ``folder`` (created if needed), owned by this process until :meth:`close`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "owners").mkdir(parents=True, exist_ok=True)
        (folder / "files").mkdir(exist_ok=True)
        self.owner = uuid.uuid4().hex
        self._lock_file = open(folder / "owners" / f"{self.owner}.lock", "w")  # held while the process lives
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        # One connection used from the event loop only; WAL lets other processes read while one writes.
        self._db = sqlite3.connect(folder / "journal.sqlite", timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a taken task must survive a power cut too
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        """Release ownership; rows left behind are adopted by the next process (normally this one restarted)."""
        self._db.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
        (self.folder / "owners" / f"{self.owner}.lock").unlink(missing_ok=True)

    # -- recording ---------------------------------------------------------------------------------------------
    def take(self, task: dict[str, Any], provider: str) -> Entry:
        """Record a task just handed out by Nextcloud (or count one more attempt of a recovered one)."""
        self._db.execute(
            "INSERT INTO tasks (task_id, provider, owner, task, state, updated) VALUES (?, ?, ?, ?, 'running', ?) "
            "ON CONFLICT(task_id) DO UPDATE SET attempts = attempts + 1, owner = excluded.owner, "
            "state = 'running', outcome = NULL, updated = excluded.updated",
            (int(task["id"]), provider, self.owner, json.dumps(task), time.time()))
        entry = self.get(int(task["id"]))
        assert entry is not None
        return entry

    def finish(self, task_id: int, pngs: list[bytes]) -> None:
        """Keep the generated images on disk until they are uploaded and the result is confirmed."""
        folder = self.folder / "files" / str(task_id)
        folder.mkdir(exist_ok=True)
        paths = []
        for i, png in enumerate(pngs):
            path = folder / f"{i}.png"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(png)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            tmp.replace(path)
            paths.append(str(path))
        self._deliver(task_id, {"pngs": paths, "file_ids": []})

    def fail(self, task_id: int, error: str, user_error: str) -> None:
        """Keep a failure until Nextcloud has it: ``error`` for the admin, ``user_error`` for the user."""
        self._deliver(task_id, {"error": error, "user_error": user_error})

    def uploaded(self, task_id: int, file_ids: list[int]) -> None:
        """Remember the file ids uploaded so far, so a retry does not upload them again."""
        entry = self.get(task_id)
        if entry is not None and entry.outcome is not None:
            self._deliver(task_id, {**entry.outcome, "file_ids": file_ids})

    def _deliver(self, task_id: int, outcome: dict[str, Any]) -> None:
        self._db.execute("UPDATE tasks SET state = 'deliver', outcome = ?, updated = ? WHERE task_id = ?",
                         (json.dumps(outcome), time.time(), task_id))

    def remove(self, task_id: int) -> None:
        """The task is settled (reported, cancelled or gone): forget it and its files."""
        self._db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
        shutil.rmtree(self.folder / "files" / str(task_id), ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------------------------
    def get(self, task_id: int) -> Entry | None:
        row = self._db.execute("SELECT task_id, provider, task, attempts, state, outcome FROM tasks "
                               "WHERE task_id = ?", (task_id,)).fetchone()
        return _entry(row) if row else None

    def mine(self, state: str | None = None) -> list[Entry]:
        """This process's entries, oldest first, optionally only those in ``state``."""
        rows = self._db.execute(
            "SELECT task_id, provider, task, attempts, state, outcome FROM tasks WHERE owner = ? "
            "AND (? IS NULL OR state = ?) ORDER BY updated", (self.owner, state, state)).fetchall()
        return [_entry(r) for r in rows]

    def adopt_orphans(self) -> int:
        """Take over the rows of owners that are gone (their lock is free); return how many were adopted."""
        owners = {r[0] for r in self._db.execute("SELECT DISTINCT owner FROM tasks WHERE owner != ?", (self.owner,))}
        adopted = 0
        for owner in owners:
            lock_path = self.folder / "owners" / f"{owner}.lock"
            with open(lock_path, "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # that process is alive
                adopted += self._db.execute("UPDATE tasks SET owner = ? WHERE owner = ?",
                                            (self.owner, owner)).rowcount
                lock_path.unlink(missing_ok=True)
        return adopted


def _entry(row: tuple) -> Entry:
    task_id, provider, task, attempts, state, outcome = row
    return Entry(task_id, provider, json.loads(task), attempts, state, json.loads(outcome) if outcome else None)
