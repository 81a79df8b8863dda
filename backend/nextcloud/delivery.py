"""Getting finished tasks to Nextcloud: upload the PNGs, report the result (or the failure), and keep trying with
backoff while Nextcloud is unreachable. Outcomes live in the journal until Nextcloud has confirmed them, so a
worker can hand one over and take the next task, and a restarted service delivers what an earlier one could not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from backend.nextcloud.client import Backoff, Gone, Nextcloud, Unreachable
from backend.nextcloud.journal import Entry, Journal

log = logging.getLogger(__name__)


class Delivery:
    """The outbox of one process: every ``deliver`` entry of its journal, retried until settled."""

    def __init__(self, nc: Nextcloud, journal: Journal) -> None:
        self.nc = nc
        self.journal = journal
        self.wake = asyncio.Event()
        self._busy: set[int] = set()
        self._backoff: dict[int, Backoff] = {}
        self._due: dict[int, float] = {}

    async def deliver(self, task_id: int) -> bool:
        """One attempt to settle ``task_id``; True when Nextcloud has it (or no longer knows the task)."""
        entry = self.journal.get(task_id)
        if entry is None or entry.state != "deliver" or task_id in self._busy:
            return entry is None
        self._busy.add(task_id)
        try:
            await self._send(entry)
        except Gone as exc:
            log.warning("task %d is gone from Nextcloud (%s); dropping its result", task_id, exc)
        except Unreachable as exc:
            backoff = self._backoff.setdefault(task_id, Backoff())
            delay = backoff.next()
            self._due[task_id] = time.monotonic() + delay
            log.warning("result of task %d not delivered (%s); retrying in %.1f s", task_id, exc, delay)
            self.wake.set()  # the delivery loop may be asleep for long: let it see the new retry time
            return False
        finally:
            self._busy.discard(task_id)
        self.journal.remove(task_id)
        self._backoff.pop(task_id, None)
        self._due.pop(task_id, None)
        return True

    async def _send(self, entry: Entry) -> None:
        outcome = entry.outcome or {}
        tid = entry.task_id
        if "pngs" in outcome:
            t0 = time.monotonic()
            file_ids = list(outcome.get("file_ids") or [])
            for path in outcome["pngs"][len(file_ids):]:
                file_ids.append(await self.nc.upload(tid, Path(path).read_bytes()))
                self.journal.uploaded(tid, file_ids)
            t1 = time.monotonic()
            await self.nc.report(tid, output={"images": file_ids})
            # The task's timeline at debug level: where the time around a generation goes.
            log.debug("task %d timeline: upload %.3f s, result %.3f s", tid, t1 - t0, time.monotonic() - t1)
            log.info("task %d: %d image(s) delivered", tid, len(file_ids))
        else:
            await self.nc.report(tid, error=outcome.get("error") or "failed", user_error=outcome.get("user_error"))
            log.info("task %d: failure reported: %s", tid, outcome.get("user_error"))

    async def flush(self) -> None:
        """One attempt for every pending entry whose retry time has come."""
        now = time.monotonic()
        for entry in self.journal.mine("deliver"):
            if self._due.get(entry.task_id, 0) <= now:
                await self.deliver(entry.task_id)

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver pending outcomes until ``stopping`` is set (then :meth:`flush` once more is the caller's call)."""
        while not stopping.is_set():
            try:
                await self.flush()
            except Exception:  # a bug here must not end delivery for good
                log.exception("delivery pass failed")
            waits = [d - time.monotonic() for d in self._due.values()]
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=max(0.2, min(waits, default=30.0)))
            except asyncio.TimeoutError:
                pass
