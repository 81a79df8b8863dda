"""The worker's progress reports never hold the generation thread: a step's report is sent and the steps go on; its
answer (which is how Nextcloud says that a task was cancelled) is read at a later step, or awaited after the
generation, before anything is uploaded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from backend.nextcloud.worker import CANCELLED, ProgressBridge


class Answers:
    """Nextcloud's side of the progress calls: records each report and answers it when told to (``release``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, status: str) -> None:
        self.loop, self.status = loop, status
        self.reports: list[float] = []
        self.received, self.answered = threading.Event(), threading.Event()
        self._release = asyncio.Event()

    async def progress(self, task_id: int, fraction: float) -> str | None:
        self.reports.append(fraction)
        self.received.set()
        await self._release.wait()
        self.answered.set()
        return self.status

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._release.set)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def _bridge(loop: asyncio.AbstractEventLoop, status: str) -> tuple[ProgressBridge, Answers]:
    nc = Answers(loop, status)
    return ProgressBridge(nc, 7, loop, lambda: None), nc  # type: ignore[arg-type]


def test_a_step_goes_on_while_its_report_is_unanswered(loop: asyncio.AbstractEventLoop) -> None:
    bridge, nc = _bridge(loop, "STATUS_RUNNING")
    # Nextcloud has not answered the first report: the steps go on (none waits for the answer) and no second report
    # piles up behind the first.
    assert bridge(0.25) is True and nc.received.wait(30)
    assert bridge(0.5) is True and bridge(0.75) is True
    assert not nc.answered.is_set()
    assert nc.reports == [pytest.approx(0.9 * 0.25)]
    nc.release()
    assert nc.answered.wait(30)
    # After the last step no report is sent: the check after the decoding follows at once.
    assert asyncio.run_coroutine_threadsafe(bridge.answered(), loop).result(30) is False
    assert bridge(1.0) is True and len(nc.reports) == 1


def test_a_cancel_is_read_at_the_next_step_not_waited_for(loop: asyncio.AbstractEventLoop) -> None:
    bridge, nc = _bridge(loop, CANCELLED)
    nc.release()  # every report is answered CANCELLED as soon as it arrives
    # A bridge that waited for the answer would stop at this step; this one goes on and reads it at the next.
    assert bridge(0.1) is True
    assert nc.answered.wait(30)
    # The fake answers just before its coroutine returns: the step after that return reads the answer.
    assert bridge._pending is not None and bridge._pending.result(30) == CANCELLED
    assert bridge(0.2) is False and bridge.cancelled
    assert len(nc.reports) == 1


def test_the_answer_in_flight_is_awaited_before_the_upload(loop: asyncio.AbstractEventLoop) -> None:
    bridge, nc = _bridge(loop, CANCELLED)
    assert bridge(0.5) is True  # the only report of the run, still unanswered when the generation ends
    waiting = asyncio.run_coroutine_threadsafe(bridge.answered(), loop)
    nc.release()
    assert waiting.result(30) is True
