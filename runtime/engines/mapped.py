"""Give back the pages of a weights file that an engine has memory-mapped once it no longer reads them.

OpenVINO maps a graph's ``.bin`` and, while compiling, reads every weight from it into its own repacked copy; the
file's pages stay resident in the process (and count in its RSS) for as long as the graph is kept, which it is, to
compile other sizes. Measured on the full-size SD2.1 with fp16 weights: 2.3 GB of 7.4 GB. The mapping is read-only,
so its pages always equal the file: dropping them (``madvise(MADV_DONTNEED)``) changes nothing but the memory, and
a later compile reads them back from the file. :func:`releasing` also drops them while a compile runs, so that the
file's pages and the compiled copy are never resident together.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
MAPS = Path("/proc/self/maps")
_libc: ctypes.CDLL | None = None


def _madvise() -> Callable[[int, int, int], int] | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        _libc = ctypes.CDLL(name, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise  # type: ignore[no-any-return]


def read_only_ranges(path: Path) -> list[tuple[int, int]]:
    """This process's read-only mappings of ``path``, as (start, end) addresses."""
    target = str(path.resolve())
    found = []
    try:
        lines = MAPS.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target and "w" not in parts[1]:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append((start, end))
    return found


def release(path: Path) -> int:
    """Drop this process's resident pages of the read-only mappings of ``path``; returns the bytes advised (0 where
    the platform has no /proc or madvise). Never raises: memory is all that is at stake."""
    madvise = _madvise()
    if madvise is None:
        return 0
    advised = 0
    for start, end in read_only_ranges(path):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
        else:
            log.debug("madvise on %s failed: errno %d", path, ctypes.get_errno())
    return advised


@contextlib.contextmanager
def releasing(path: Path, every: float = 0.25) -> Iterator[None]:
    """While the block runs, give back ``path``'s mapped pages every ``every`` seconds, and once more at its end.

    A compile reads each weight once, into its own copy, so pages given back meanwhile are not read again; one that
    is comes back from the page cache."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            release(path)

    worker = threading.Thread(target=loop, name="t2i-release-weights", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        release(path)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path``'s mappings resident in this process now (from ``/proc/self/smaps``; 0 where absent)."""
    target = str(path.resolve())
    total, inside = 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and all(c in "0123456789abcdef-" for c in head[0]):
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
