"""Memory of this process as Linux counts it for this process alone.

``getrusage(RUSAGE_SELF).ru_maxrss`` is no use in a benchmark child: Linux carries it from the parent into a forked
child and keeps it across ``exec``, so every child reports at least its parent's size at the fork. ``VmHWM`` (the
peak resident set) and ``VmRSS`` in ``/proc/self/status`` belong to the process's own address space, which
``exec`` starts afresh.
"""

from __future__ import annotations

import resource
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_mb() -> dict[str, float]:
    """``VmHWM`` and ``VmRSS`` in MiB, read at one moment (empty where there is no /proc)."""
    found: dict[str, float] = {}
    try:
        for line in STATUS.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return {}
    return found


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    now = _status_mb()
    if "VmHWM" not in now:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(now["VmHWM"], now.get("VmRSS", 0.0))


def rss_mb() -> float:
    """This process's resident memory now, in MiB (``VmRSS``; 0 where there is no /proc)."""
    return _status_mb().get("VmRSS", 0.0)
