"""A worker: take a task from Nextcloud's queue, check its input, generate its images in a thread while reporting
progress after every denoising step, and hand the outcome to the delivery.

Nextcloud tells a provider that a task was cancelled only in the answer to a progress report. The generation thread
never waits for that answer (a round trip to Nextcloud per step would slow every image down): it reads the answer
after the next step and stops there when it says CANCELLED, and one more report after the decoding, awaited before
anything is uploaded, catches a cancel that came later. Several workers (threads of one process, or other processes
and containers) may poll the same queue: Nextcloud hands each task to exactly one poller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from backend.nextcloud.client import Backoff, Gone, Nextcloud, Unreachable, sleep_or
from backend.nextcloud.delivery import Delivery
from backend.nextcloud.journal import Journal
from backend.nextcloud.models import Model
from backend.tasks.outcome import (
    INTERNAL_ERROR,
    Cancelled,
    Failed,
    Images,
    Outcome,
    Refused,
    Stopped,
    admin_detail,
    parsed,
    run_task,
)
from backend.tasks.service import ImageService
from runtime.request import GenerationRequest

log = logging.getLogger(__name__)

CANCELLED = "STATUS_CANCELLED"
#: Share of the progress bar for the denoising steps; decoding and uploading take the rest (Nextcloud sets 1.0
#: itself when the result arrives).
DENOISE_SHARE = 0.9
#: With triggers (Nextcloud 33+) a poll now and then still catches a trigger that was lost.
POLL_WITH_TRIGGERS = 60.0

STOPPED = ("The image service was stopped (restarted, updated or disabled) before this task finished; "
           "please try again.")


class Trigger:
    """Wakes idle workers when Nextcloud (33+) says a task is waiting; polling every ``interval`` until then."""

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self.seen = False
        self._event = asyncio.Event()

    def fire(self, from_nextcloud: bool = True) -> None:
        self.seen = self.seen or from_nextcloud
        self._event.set()
        self._event = asyncio.Event()

    def event(self) -> asyncio.Event:
        """The event the next :meth:`fire` sets; take it *before* asking for a task so no trigger slips through."""
        return self._event

    @property
    def interval(self) -> float:
        return max(self.poll_interval, POLL_WITH_TRIGGERS) if self.seen else self.poll_interval


class ProgressBridge:
    """Called from the generation thread after each step: reports progress through the event loop without waiting
    for the answer, learns of a cancellation from an answer that has come, and stops a run that cannot finish before
    a shutdown deadline."""

    def __init__(self, nc: Nextcloud, task_id: int, loop: asyncio.AbstractEventLoop,
                 deadline: Callable[[], float | None]) -> None:
        self.nc, self.task_id, self.loop, self.deadline = nc, task_id, loop, deadline
        self.cancelled = False
        self.stopped = False
        self.started = time.monotonic()
        self.reports = 0
        #: For the task's timeline: when the generation began and ended, when the first step ended, when the last
        #: report call returned, and the time the generation thread spent inside these calls.
        self.began = self.ended = self.last_step = 0.0
        self.first_step: float | None = None
        self.waited = 0.0
        self._pending: concurrent.futures.Future | None = None

    def __call__(self, fraction: float) -> bool:
        entered = time.monotonic()
        self.first_step = self.first_step or entered
        try:
            return self._report(fraction)
        finally:
            self.last_step = time.monotonic()
            self.waited += self.last_step - entered

    def _report(self, fraction: float) -> bool:
        # One report in flight at most: while one hangs (Nextcloud slow or unreachable), the steps go on without
        # piling up more. After the last step none is sent: the check after the decoding (in the worker) follows.
        if self._pending is None or self._pending.done():
            self._read()
            if not self.cancelled and fraction < 1:
                coro = self.nc.progress(self.task_id, DENOISE_SHARE * fraction)
                self.reports += 1
                self._pending = asyncio.run_coroutine_threadsafe(coro, self.loop)
        deadline = self.deadline()
        if deadline is not None and fraction < 1:
            now = time.monotonic()
            left = (now - self.started) / max(fraction, 1e-3) * (1 - fraction)
            self.stopped = now + 1.2 * left + 0.5 > deadline
        return not (self.cancelled or self.stopped)

    def _read(self) -> None:
        """Take the answer of the report in flight, which has come."""
        if self._pending is None:
            return
        try:
            status = self._pending.result(0)
        except Exception:  # the report failed; the next step sends another
            status = None
        self._pending = None
        self.cancelled = self.cancelled or status == CANCELLED

    async def answered(self) -> bool:
        """On the event loop, after the generation: wait for the report still in flight (so that Nextcloud gets
        the reports in order) and say whether an answer said CANCELLED."""
        if self._pending is not None:
            with contextlib.suppress(Exception):  # a failed report: the check that follows asks again
                await asyncio.wrap_future(self._pending)
            self._read()
        return self.cancelled


class Worker:
    """One generation slot: a service of its own, a thread to run it in, a loop that takes tasks."""

    def __init__(self, name: str, model: Model, service: ImageService, journal: Journal, delivery: Delivery,
                 trigger: Trigger, enabled: asyncio.Event, stopping: asyncio.Event,
                 deadline: Callable[[], float | None]) -> None:
        self.name, self.model, self.service = name, model, service
        self.journal, self.delivery, self.trigger = journal, delivery, trigger
        self.enabled, self.stopping, self.deadline = enabled, stopping, deadline
        self.nc = Nextcloud()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self.current: int | None = None
        #: Set to end :meth:`run` after the task in hand (a reload for new admin settings); never drops a task.
        self.retired = False
        #: Deliveries under way: a result is uploaded while the next task already denoises.
        self.deliveries: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        """Take and process tasks until the service stops or the worker is retired."""
        self.loop = asyncio.get_running_loop()
        backoff = Backoff()
        try:
            while not self.stopping.is_set() and not self.retired:
                wake = self.trigger.event()
                if not self.enabled.is_set():
                    await sleep_or(wake, 5.0)
                    continue
                if self.retired:
                    break
                task = self._recovered()
                if task is None:
                    try:
                        found = await self.nc.next_task([self.model.provider_id])
                        backoff.reset()
                    except (Unreachable, Gone) as exc:
                        delay = backoff.next()
                        log.warning("%s: cannot reach Nextcloud for tasks (%s); next try in %.1f s",
                                    self.name, exc, delay)
                        await sleep_or(wake, delay)
                        continue
                    if found is None:
                        await sleep_or(wake, self.trigger.interval)
                        continue
                    task = found["task"]
                try:
                    await self.process(task)
                except Exception as exc:  # a bug or a broken journal must not end this worker
                    log.exception("%s: task %s could not be handled", self.name, task.get("id"))
                    await self._report_directly(task, exc)
        finally:
            if self.deliveries:  # what is not delivered now stays in the journal for the delivery loop
                await asyncio.wait(self.deliveries, timeout=5.0)
            self.executor.shutdown(wait=False)
            await self.nc.close()

    async def _report_directly(self, task: dict[str, Any], exc: Exception) -> None:
        """Last resort when the journal cannot take the outcome: tell Nextcloud at once, or leave it to the
        journal's recovery if that fails too."""
        try:
            await self.nc.report(int(task["id"]), error=admin_detail(f"task {task['id']}", exc),
                                 user_error=INTERNAL_ERROR)
        except Exception as again:
            log.error("%s: could not report task %s either: %s", self.name, task.get("id"), again)

    def _recovered(self) -> dict[str, Any] | None:
        try:
            return self.model.recovered.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def process(self, task: dict[str, Any]) -> None:
        """Generate one task and hand its outcome (images or an error) to the delivery."""
        tid, request, bridge = self._begin(task)
        t0 = time.monotonic()
        if isinstance(request, Refused):
            outcome: Outcome = request
        else:
            # Between the batches of a task with more images than one batch, the next task in Nextcloud's queue
            # runs (see _between): one user's 12 images do not hold everyone else up for their whole run.
            between = self._between if request.n > self.service.settings.runtime.max_batch else None
            try:
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self.executor, partial(self._generate, tid, request, bridge, between))
            finally:
                self.current = None
        if not await self._settle(tid, bridge, outcome, t0):
            self._deliver(tid)

    def _begin(self, task: dict[str, Any]) -> tuple[int, GenerationRequest | Refused, ProgressBridge]:
        """Record the task as taken and parse its input (a refused input comes back as :class:`Refused`)."""
        tid = int(task["id"])
        entry = self.journal.take(task, self.model.provider_id)
        self.current = tid
        log.info("%s: task %d taken (attempt %d)", self.name, tid, entry.attempts)
        bridge = ProgressBridge(self.nc, tid, asyncio.get_running_loop(), self.deadline)
        request = parsed(task.get("input") or {})
        if isinstance(request, Refused):
            self.current = None
        return tid, request, bridge

    def _generate(self, tid: int, request: GenerationRequest, bridge: ProgressBridge,
                  between: Callable[[], None] | None = None) -> Outcome:
        """In the generation thread: the images, or how the generation ended."""
        bridge.began = time.monotonic()
        try:
            return run_task(self.service, request, bridge, between, cancelled=lambda: bridge.cancelled,
                            label=f"{self.name}: task {tid}")
        finally:
            bridge.ended = time.monotonic()

    def _deliver(self, tid: int) -> None:
        """Upload and report while this worker goes on: the generation runs in a thread, so the event loop is free
        to send the result in the meantime."""
        delivering = asyncio.get_running_loop().create_task(self.delivery.deliver(tid), name=f"deliver-{tid}")
        self.deliveries.add(delivering)
        delivering.add_done_callback(self.deliveries.discard)

    def _between(self) -> None:
        """In the generation thread, between two batches of a long task: take the next task from Nextcloud's queue
        and run it here and now (its own batches without a further interleave), then go back to the long one."""
        if self.stopping.is_set() or self.retired or not self.enabled.is_set():
            return
        loop, held = self.loop, self.current
        assert loop is not None  # set by run(), which is what calls the generation
        try:
            found = asyncio.run_coroutine_threadsafe(self.nc.next_task([self.model.provider_id]), loop).result(30)
        except Exception as exc:  # Nextcloud unreachable: carry on with the task in hand
            log.info("%s: no task taken between batches: %s", self.name, exc)
            return
        if found is None:
            return

        try:
            self._run_between(found["task"])
        except Exception as exc:  # a bug or a broken journal must fail neither this task nor the one in hand
            log.exception("%s: task %s could not be handled between batches", self.name, found["task"].get("id"))
            asyncio.run_coroutine_threadsafe(self._report_directly(found["task"], exc), loop).result(60)
        finally:
            self.current = held

    def _run_between(self, task: dict[str, Any]) -> None:
        """:meth:`process` for a task taken between batches: the generation runs in this (the generation) thread,
        the rest on the event loop."""
        loop = self.loop
        assert loop is not None

        async def begin() -> tuple[int, GenerationRequest | Refused, ProgressBridge]:
            return self._begin(task)

        tid, request, bridge = asyncio.run_coroutine_threadsafe(begin(), loop).result()
        log.info("%s: task %d runs between the batches of another task", self.name, tid)
        t0 = time.monotonic()
        outcome = request if isinstance(request, Refused) else self._generate(tid, request, bridge)

        async def settle() -> None:
            if not await self._settle(tid, bridge, outcome, t0):
                self._deliver(tid)

        asyncio.run_coroutine_threadsafe(settle(), loop).result()

    async def _settle(self, tid: int, bridge: ProgressBridge, outcome: Outcome, t0: float) -> bool:
        """Record a task's outcome in the journal. True when nothing is left to deliver."""
        if not isinstance(outcome, Images):
            # A progress report still in flight would land after the failure and leave the task RUNNING: Nextcloud
            # saves the whole task, status included, with each report. (Images wait for it below.)
            await bridge.answered()
        match outcome:
            case Cancelled():
                log.info("%s: task %d cancelled by its user after %.1f s; nothing uploaded", self.name, tid,
                         time.monotonic() - t0)
                self.journal.remove(tid)
                return True
            case Stopped():
                self.journal.fail(tid, f"task {tid} stopped: the service was shutting down", STOPPED)
            case Refused(user=message):
                self.journal.fail(tid, f"task {tid} was refused: {message}", message)
            case Failed(admin=detail, user=message):
                self.journal.fail(tid, detail, message)
            case Images(results=results):
                t_back = time.monotonic()
                # The last chance to see a cancel that came during decoding: a cancelled task must upload nothing.
                if await bridge.answered() or await self.nc.progress(tid, (1 + DENOISE_SHARE) / 2) == CANCELLED:
                    log.info("%s: task %d cancelled by its user; nothing uploaded", self.name, tid)
                    self.journal.remove(tid)
                    return True
                t1 = time.monotonic()
                self.journal.finish(tid, [r.png for r in results])
                b = bridge
                first = b.first_step or b.ended
                log.debug("task %d timeline: to the thread %.3f s, to the first step's end %.3f s, steps %.3f s with "
                          "%.3f s in %d progress report(s), decode and PNG %.3f s, back %.3f s, cancel check %.3f s, "
                          "journal %.3f s", tid, b.began - t0, first - b.began, b.last_step - first, b.waited,
                          b.reports, b.ended - max(b.last_step, first), t_back - b.ended, t1 - t_back,
                          time.monotonic() - t1)
                log.info("%s: task %d generated %d image(s) in %.1f s", self.name, tid, len(results),
                         time.monotonic() - t0)
        return False
