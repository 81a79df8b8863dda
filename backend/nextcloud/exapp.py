"""The ExApp's life: load the models (at /init, or at start when AppAPI already has the app enabled), register the
providers on enable, run the workers and the delivery, recover the journal's tasks, and stop cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from backend.config import Settings
from backend.nextcloud.admin_loop import AdminSettings
from backend.nextcloud.admin_settings import OLD_FORM_IDS, build_form
from backend.nextcloud.client import Backoff, Gone, Nextcloud, Unreachable, sleep_or
from backend.nextcloud.delivery import Delivery
from backend.nextcloud.journal import Journal
from backend.nextcloud.models import Model, ModelLife, storage_dir
from backend.nextcloud.provider import build_provider
from backend.nextcloud.worker import Trigger, Worker
from backend.tasks.outcome import MAX_ATTEMPTS
from runtime.errors import T2IError

log = logging.getLogger(__name__)

#: A task that was being generated when the service died MAX_ATTEMPTS times is failed instead of run again: it may
#: be what kills the service (e.g. more memory than the machine has).
CRASHED = ("The image service stopped unexpectedly while working on this task, twice; it may need more memory "
           "than the server has. Try fewer or smaller images.")
#: On SIGTERM a task in hand is finished if it can be within this many seconds, else stopped and reported failed;
#: Docker waits 10 s before it kills a container.
STOP_GRACE = 8.0
#: AppAPI waits 60 s for the answer to /enabled; a model still loading after this long is registered later.
ENABLE_WAIT = 45.0
#: On disable, a task in hand that can finish within this many seconds is finished and delivered, else stopped.
DISABLE_GRACE = 20.0


def exapp_settings(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Settings from the environment; models go into the persistent storage unless T2I_MODEL_STORE says otherwise."""
    settings = settings or Settings.from_env(**overrides)
    if "model_store" not in settings.explicit:
        settings = settings.updated(model_store=storage_dir() / "models")
    return settings


class ExApp(ModelLife):
    """Everything one ExApp process holds. Create and use it inside the running event loop."""

    def __init__(self, settings: Settings) -> None:
        #: The deploy-time settings (environment); ``settings`` is them with the admin form's values applied.
        self.base_settings = settings
        self.settings = settings
        self.nc = Nextcloud()
        self.journal = Journal(storage_dir() / "journal")
        self.delivery = Delivery(self.nc, self.journal)
        self.trigger = Trigger(settings.exapp.poll_interval)
        self.enabled = asyncio.Event()
        self.stopping = asyncio.Event()
        self.stop_deadline: float | None = None
        self.models: dict[str, Model] = {}
        self.workers: list[Worker] = []
        self._tasks: list[asyncio.Task] = []
        self._loading: asyncio.Future | None = None
        self._verified = False  # whether the models in hand were hashed by a forced check in this process
        self._init_progress: asyncio.Queue | None = None
        self._recovered = False
        self._worker_tasks: list[asyncio.Task] = []
        self._old_forms_gone = False
        self.admin: AdminSettings = AdminSettings(self)

    # -- start and stop ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin delivering what an earlier run left, and resume work if AppAPI has the app enabled."""
        self.journal.adopt_orphans()
        self.spawn(self.delivery.run(self.stopping), "delivery")
        self.spawn(self._resume(), "resume")

    async def _resume(self) -> None:
        """Wait until Nextcloud has the app enabled, at whatever time that happens, then load and take tasks.

        AppAPI calls /init and /enabled on the one process it registered; another process of the same app (started
        before the registration, or beside the registered one) learns it only by asking. Until the app is enabled
        the state is asked with a growing wait (1 s doubling up to 12 poll intervals, 60 s by default): each ask of
        an app Nextcloud does not know yet makes it log "ExApp … not found", so they are kept few."""
        unreachable, waiting = Backoff(cap=30.0), Backoff(first=1.0, cap=max(1.0, 12 * self.trigger.poll_interval))
        told: object = ...  # the state last logged: each change is logged once, the asks themselves at debug level
        while not self.stopping.is_set() and not self.enabled.is_set():
            try:
                enabled = await self.nc.enabled_state()
            except Unreachable as exc:
                delay = unreachable.next()
                log.warning("cannot ask Nextcloud whether the app is enabled (%s); next try in %.1f s", exc, delay)
                await sleep_or(self.stopping, delay)
                continue
            unreachable.reset()
            if enabled:
                break
            if enabled is not told:
                told = enabled
                log.info("%s; asking again now and then (AppAPI's /init or /enabled also starts the work)",
                         "Nextcloud does not know this app yet" if enabled is None else
                         "the app is disabled in Nextcloud")
            delay = waiting.next()
            log.debug("app not enabled in Nextcloud yet; next look in %.1f s", delay)
            await sleep_or(self.stopping, delay)
        else:
            return
        # A restarted container is not initialised again, so it loads its models itself, verifying a bundle no
        # earlier run has verified (AppAPI 32 marks a new app enabled before it posts /init, so this may be a
        # first start that /init will also claim: both take the same ordered load).
        if enabled and not self.enabled.is_set():
            log.info("the app is enabled in Nextcloud; loading the models to resume work")
            error = await self.enable()
            if error:
                log.error("could not resume: %s", error)
            else:
                log.info("resumed: providers registered, workers running")

    async def shutdown(self, grace: float = STOP_GRACE) -> None:
        """Stop taking tasks; finish or report the tasks in hand within ``grace`` seconds; deliver what can be."""
        deadline = time.monotonic() + grace
        self.stop_deadline = deadline
        self.stopping.set()
        self.trigger.fire(from_nextcloud=False)
        self.delivery.wake.set()
        busy = [w.current for w in self.workers if w.current is not None]
        if busy:
            log.info("stopping: finishing or reporting task(s) %s", busy)
        running = [t for t in self._tasks if not t.done()]
        if running:
            await asyncio.wait(running, timeout=max(0.1, deadline - time.monotonic()))
        try:
            await asyncio.wait_for(self.delivery.flush(), timeout=max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        tasks = [*self._tasks, *(d for w in self.workers for d in w.deliveries)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # none may touch the journal after this
        left = self.journal.mine()
        self.journal.close()
        await self.nc.close()
        if left:
            log.warning("stopped with %d task(s) unsettled (%s); the next start reports them",
                        len(left), ", ".join(str(e.task_id) for e in left))
        else:
            log.info("stopped cleanly: no task left in hand")

    def spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        return task

    # -- init (ModelLife.load loads the models) --------------------------------------------------------------
    async def init(self) -> None:
        """/init: download and verify the models, load them, and report progress to AppAPI (0..100, or an error)."""
        self._init_progress = queue = asyncio.Queue[int]()
        sender = asyncio.get_running_loop().create_task(self._send_init_progress(queue))
        queue.put_nowait(0)
        try:
            await self.load(verify=True)
        except T2IError as exc:
            await self._end_init(sender, queue, f"the model could not be made ready: {exc}")
        except Exception as exc:
            log.exception("init failed")
            await self._end_init(sender, queue, f"internal error while loading the model: {type(exc).__name__}: {exc}")
        else:
            # AppAPI calls /enabled from inside this report, so the providers are registered after it returns.
            await self._end_init(sender, queue, None)

    async def _send_init_progress(self, queue: asyncio.Queue) -> None:
        """Send init progress in order, skipping values that are already stale; end with 100 or the error."""
        last = -1
        while True:
            item = await queue.get()
            while not queue.empty() and not isinstance(item, tuple):
                item = queue.get_nowait()
            if isinstance(item, tuple):
                error = item[1]
                await self.nc.set_init_status(max(last, 0) if error else 100, error or "")
                return
            if item > last:
                await self.nc.set_init_status(item)
                last = item

    async def _end_init(self, sender: asyncio.Task, queue: asyncio.Queue, error: str | None) -> None:
        self._init_progress = None
        if error:
            log.error("init failed: %s", error)
        await queue.put(("end", error))
        await sender

    # -- enable and disable ------------------------------------------------------------------------------------
    async def enable(self) -> str:
        """Register one provider per model and start the workers; return an error for the admin, or ""."""
        try:
            models = await asyncio.wait_for(self.load(), timeout=ENABLE_WAIT)
        except asyncio.TimeoutError:
            # Still loading (a restart of a big model): answer AppAPI now, finish enabling when ready.
            self.spawn(self._enable_when_loaded(), "enable-later")
            return ""
        except T2IError as exc:
            return f"text2image_sd2 cannot start: {exc}"
        await self.admin.apply_light()
        try:
            await self.register(models)
        except (Unreachable, Gone) as exc:  # expected while Nextcloud is down: the reason is enough
            log.error("could not register the providers with Nextcloud at %s: %s", self.settings.exapp.nextcloud_url,
                      exc)
            return f"text2image_sd2 could not register its provider with Nextcloud: {exc}"
        except Exception as exc:
            log.exception("provider registration failed")
            return f"text2image_sd2 could not register its provider with Nextcloud: {exc}"
        self._recover()
        if not self.workers:
            self._start_workers()
        self.enabled.set()
        self.trigger.fire(from_nextcloud=False)
        self.admin.watch()
        return ""

    async def register(self, models: dict[str, Model]) -> None:
        """Register (or update) each model's provider, then the admin form that shows them."""
        for model in models.values():
            await self.nc.register(build_provider(model.name, model.services[0]))
        try:
            await self.nc.register_settings_form(build_form(
                self.base_settings, {m.name: m.services[0] for m in models.values()}))
            for old in OLD_FORM_IDS if not self._old_forms_gone else ():  # forms the page could not save into
                await self.nc.unregister_settings_form(old)
            self._old_forms_gone = True
        except (Unreachable, Gone) as exc:
            log.warning("the admin settings form could not be registered (%s); the T2I_* variables apply", exc)

    async def _enable_when_loaded(self) -> None:
        error = await self.enable()
        if error:
            log.error(error)

    async def disable(self) -> str:
        """Stop taking tasks, settle the tasks in hand while the providers still take results, then unregister.

        Nextcloud refuses results (HTTP 500) once a task's provider is unregistered, and AppAPI waits up to a
        minute for this answer: a task that can finish within :data:`DISABLE_GRACE` seconds is finished and
        delivered, a longer one is stopped at its next step and reported failed with the reason."""
        self.enabled.clear()
        busy = [w.current for w in self.workers if w.current is not None]
        if busy and self.stop_deadline is None:
            log.info("disabled while task(s) %s run: finishing what can be within %.0f s, stopping the rest",
                     busy, DISABLE_GRACE)
            self.stop_deadline = time.monotonic() + DISABLE_GRACE
            try:
                # Settled means delivered too: the worker reports a task's result after it lets go of the task.
                while any(w.current is not None for w in self.workers) or {
                        e.task_id for e in self.journal.mine()} & set(busy):
                    if time.monotonic() > self.stop_deadline + 5:
                        log.warning("task(s) %s did not settle before the providers are unregistered", busy)
                        break
                    await asyncio.sleep(0.05)
            finally:
                self.stop_deadline = None
        errors = []
        for pid in self.models:
            try:
                await self.nc.unregister(pid)
            except Exception as exc:
                errors.append(f"{pid}: {exc}")
        return f"could not unregister {'; '.join(errors)}" if errors else ""

    def _start_workers(self) -> None:
        for model in self.models.values():
            for i, service in enumerate(model.services):
                worker = Worker(f"{model.provider_id}#{i}", model, service, self.journal, self.delivery,
                                self.trigger, self.enabled, self.stopping, lambda: self.stop_deadline)
                self.workers.append(worker)
                self._worker_tasks.append(self.spawn(worker.run(), worker.name))

    async def retire_workers(self) -> None:
        """Stop taking tasks and end every worker once its task in hand is done and delivered."""
        self.enabled.clear()
        for worker in self.workers:
            worker.retired = True
        self.trigger.fire(from_nextcloud=False)
        await asyncio.gather(*self._worker_tasks, return_exceptions=True)
        self.workers, self._worker_tasks = [], []

    def resume_workers(self) -> None:
        """Start workers for the models loaded now and take tasks again."""
        self._start_workers()
        self.enabled.set()
        self.trigger.fire(from_nextcloud=False)

    def _recover(self) -> None:
        """Once per process, before any worker runs: queue the tasks that a dead process (normally this service
        before a crash or kill) was generating, or fail them when they have already been tried too often."""
        if self._recovered:
            return
        self._recovered = True
        self.journal.adopt_orphans()
        for entry in self.journal.mine("running"):
            model = self.models.get(entry.provider)
            if entry.attempts >= MAX_ATTEMPTS:
                self.journal.fail(entry.task_id, f"task {entry.task_id}: the service died {entry.attempts} times "
                                                 "while generating it", CRASHED)
            elif model is None:
                self.journal.fail(entry.task_id, f"task {entry.task_id} is for {entry.provider}, which is no "
                                  "longer configured (T2I_MODEL)", "This image model is no longer available.")
            else:
                log.info("task %d was in hand when the service stopped; running it again", entry.task_id)
                model.recovered.put_nowait(entry.task)
        self.delivery.wake.set()
