"""Reading the task store's rows back. The database is a file that an admin, another program or a disk fault may
have changed, so every column is checked where it enters, like any outside input: its type, that its text is UTF-8,
and the size, depth and shape of its JSON. A row that does not hold what this service writes reads as a FAILED task
whose ``damaged`` names the column, so one bad row fails that task, never a listing or the service.

The input columns are parsed back by the task-input codec, the one parser of every task's input.
"""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

from backend.standalone.task import Task, TaskStatus
from backend.tasks.task_input import parse
from runtime.errors import InvalidRequest
from runtime.request import GenerationRequest
from runtime.validation import MAX_IMAGES, shown

DAMAGED = "this task's stored data is damaged, so it cannot run; please schedule it again"
#: The options hold at most a negative prompt (4000 characters, up to 12 each when JSON-escaped) and a few numbers.
MAX_JSON_CHARS = 128 * 1024
#: The columns this service writes; a ``tasks`` table without them belongs to another program.
#: Times are Unix seconds up to this (the year 6325): any later one is damage, and would not print as a date.
MAX_UNIX_SECONDS = 2**37
COLUMNS = ("id", "user_id", "app_id", "identifier", "input", "options", "number_of_images", "status",
           "expected_seconds", "completion_expected_at", "attempts", "error_message", "debug_message", "seeds",
           "created_at", "updated_at")


class Undecodable(str):
    """Text of the database that is not UTF-8: the text with U+FFFD for each bad byte, and the bytes in ``raw``."""

    raw: bytes


def decode_text(data: bytes) -> str:
    """The connection's text factory: SQLite's own decoding fails the whole query on one bad value."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = Undecodable(data.decode("utf-8", "replace"))
        text.raw = data
        return text


def shown_value(value: Any) -> Any:
    """A stored value as ``tasks show`` prints it: text that is not UTF-8 and bytes are marked as damaged."""
    if isinstance(value, Undecodable):
        return f"(damaged, not UTF-8) {shown(value.raw, 100)}"
    if isinstance(value, bytes):
        return f"(damaged, not text) {shown(value, 100)}"
    return value


class _Damaged(Exception):
    pass


def _text(row: sqlite3.Row, column: str, null: bool = False) -> Any:
    value = row[column]
    if value is None and null:
        return None
    if isinstance(value, Undecodable):
        raise _Damaged(f"column {column} is not UTF-8: {shown(value.raw)}")
    if not isinstance(value, str):
        raise _Damaged(f"column {column} holds {shown(value)}; text{' or NULL' if null else ''} is allowed")
    return value


def _whole(row: sqlite3.Row, column: str, low: int, high: int, null: bool = False) -> Any:
    value = row[column]
    if value is None and null:
        return None
    if not isinstance(value, int) or not low <= value <= high:
        raise _Damaged(f"column {column} holds {shown(value)}; a whole number from {low} to {high} is allowed")
    return value


def _time(row: sqlite3.Row, column: str) -> float:
    value = row[column]
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= MAX_UNIX_SECONDS:
        raise _Damaged(f"column {column} holds {shown(value)}; Unix seconds from 0 to {MAX_UNIX_SECONDS} are allowed")
    return float(value)


def _json(row: sqlite3.Row, column: str, kind: type) -> Any:
    text = _text(row, column)
    if len(text) > MAX_JSON_CHARS:
        raise _Damaged(f"column {column} is {len(text)} characters long; at most {MAX_JSON_CHARS} are allowed")
    try:
        value = json.loads(text)
    except RecursionError:
        raise _Damaged(f"column {column} is JSON nested too deeply") from None
    except ValueError as exc:
        raise _Damaged(f"column {column} is not JSON ({type(exc).__name__}: {exc}): {shown(text)}") from None
    scalars = (str, int, float, bool, type(None)) if kind is dict else (int,)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if not isinstance(value, kind) or items is None or not all(type(v) in scalars for v in items):
        what = "an object of plain values" if kind is dict else "a list of whole numbers"
        raise _Damaged(f"column {column} holds {shown(text)}; {what} is allowed")
    return value


def task_of_row(row: sqlite3.Row) -> Task:
    """The task of a row; a FAILED task with ``damaged`` set when a column does not hold what this service wrote."""
    try:
        return Task(request=_request(row), app_id=_text(row, "app_id"), user_id=_text(row, "user_id", null=True),
                    identifier=_text(row, "identifier"), id=row["id"],
                    status=TaskStatus(_whole(row, "status", min(TaskStatus), max(TaskStatus))),
                    completion_expected_at=_whole(row, "completion_expected_at", 0, 2**62, null=True),
                    error_message=_text(row, "error_message", null=True), seeds=_json(row, "seeds", list),
                    created_at=_time(row, "created_at"), updated_at=_time(row, "updated_at"))
    except _Damaged as exc:
        return Task(request=None, damaged_input=_readable(row, "input", ""), app_id=_readable(row, "app_id", ""),
                    user_id=_readable(row, "user_id", None), identifier=_readable(row, "identifier", ""),
                    id=row["id"], status=TaskStatus.FAILED, error_message=DAMAGED,
                    created_at=_readable(row, "created_at", None, _time),
                    updated_at=_readable(row, "updated_at", None, _time), damaged=str(exc))


def _request(row: sqlite3.Row) -> GenerationRequest:
    """The stored input, parsed as any task input is (the store writes it with ``task_input.dump``)."""
    options = _json(row, "options", dict)
    raw = {"input": _text(row, "input"), "numberOfImages": _whole(row, "number_of_images", 1, MAX_IMAGES)}
    if set(options) & set(raw):
        raise _Damaged(f"column options holds {shown(sorted(set(options) & set(raw)))}, which are columns")
    try:
        return parse({**raw, **options})
    except InvalidRequest as exc:
        raise _Damaged(f"the stored input is not a request this service takes: {exc}") from None


def _readable(row: sqlite3.Row, column: str, default: Any, read: Any = _text) -> Any:
    """What a damaged row can still show of a column: its value when it is sound, else ``default``."""
    try:
        return read(row, column)
    except _Damaged:
        value = row[column]
        return str(value) if isinstance(value, Undecodable) else default


def missing_columns(conn: sqlite3.Connection) -> list[str]:
    """The columns of :data:`COLUMNS` that the ``tasks`` table lacks; ``id`` must be its INTEGER PRIMARY KEY."""
    info = {r[1]: r for r in conn.execute("PRAGMA table_info(tasks)").fetchall()}
    missing = [c for c in COLUMNS if c not in info]
    if "id" in info and (str(info["id"][2]).upper() != "INTEGER" or info["id"][5] != 1):
        missing.append("id as INTEGER PRIMARY KEY")
    return missing
