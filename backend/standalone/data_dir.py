"""The data directory of the standalone service: one process's lock on it, and what its file system's errors mean
for the admin (a full disk, a read-only mount, a damaged database)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, Unavailable

DB_NAME = "tasks.sqlite3"
#: Below this much free space in the data directory, the service says it is not available (new tasks need room).
MIN_FREE_BYTES = 4 * 1024 * 1024


class StoreError(Unavailable):
    """The task store cannot be read or written; the message says why and what the admin can do."""


class StoreFull(StoreError):
    """No room left for the task store or the images."""


def store_error(exc: BaseException, data_dir: Path) -> StoreError:
    """The :class:`StoreError` that an SQLite or OS error means for the admin."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    # SQLite reports a WAL or -shm file it could not create as "disk I/O error" or "unable to open database
    # file": the file system tells which it was.
    vague = isinstance(exc, sqlite3.OperationalError) and ("disk I/O error" in text or "unable to open" in text)
    if vague and _read_only(data_dir):
        code = errno.EROFS
    elif vague and not has_room(data_dir):
        code = errno.ENOSPC
    if code == errno.ENOSPC or "disk is full" in text or "database or disk is full" in text:
        return StoreFull(f"the disk holding the task store {data_dir} is full; delete old tasks (`text2image tasks "
                         "cleanup`) or free space")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text:
        return StoreError(f"the task store {data_dir} cannot be written ({exc}); the service needs a writable data "
                          "directory (check its permissions and whether it is mounted read-only)")
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return StoreError(f"the task store {data_dir / DB_NAME} is damaged ({exc}); move it away to start with an "
                          "empty store, or restore it from a backup")
    return StoreError(f"the task store {data_dir} cannot be used: {exc}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY) or not os.access(path, os.W_OK)
    except OSError:
        return False


def has_room(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free >= MIN_FREE_BYTES
    except OSError:
        return False


class DirLock:
    """An exclusive lock on a data directory, held until :meth:`close`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()  # closing the file releases the lock


def lock_data_dir(data_dir: Path) -> DirLock:
    """Hold an exclusive lock on ``data_dir`` so that two services never run the same queue twice."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / "service.lock", "a+")  # held open for the manager's lifetime
    except OSError as exc:
        raise store_error(exc, data_dir) from None
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, one service per data directory is then up to the admin
        return DirLock(handle)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"another task service is using {data_dir}; stop it first or use another data "
                       "directory (--data-dir / T2I_DATA_DIR)") from None
    return DirLock(handle)

