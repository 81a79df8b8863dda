"""Nextcloud's Text-To-Image manager (OCP\\TextToImage\\IManager) for Python callers, over the local task store.

The images are made by the shared core (:class:`backend.tasks.service.ImageService`), the same code the Nextcloud
connector runs; this module adds the queue, the persistence and the events around it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.standalone.data_dir import StoreError, StoreFull, lock_data_dir, store_error
from backend.standalone.store import TaskStore
from backend.standalone.task import (
    ImageNotFoundError,
    NoProviderError,
    Task,
    TaskFailedError,
    TaskFailedEvent,
    TaskNotFoundError,
    TaskStatus,
    TaskSuccessfulEvent,
)
from backend.tasks.outcome import (
    INTERNAL_ERROR,
    MAX_ATTEMPTS,
    Cancelled,
    Failed,
    Images,
    Refused,
    Stopped,
    admin_detail,
    run_task,
)
from runtime.errors import ConfigError, InvalidRequest, Unavailable
from runtime.validation import shown

if TYPE_CHECKING:
    from backend.tasks.service import ImageService

log = logging.getLogger(__name__)

#: Shown to the user when the images were made but could not be stored.
NO_ROOM = "the server ran out of disk space while storing the images; please try again later"
#: Workers look into the store this often even without a wake-up (cheap, and it bounds any missed wake-up).
POLL_SECONDS = 5.0
CLEANUP_EVERY_SECONDS = 3600.0
SuccessHandler = Callable[[TaskSuccessfulEvent], object]
FailureHandler = Callable[[TaskFailedEvent], object]


class TaskManager:
    """The manager operations of Nextcloud's Text-To-Image API over a task store in ``data_dir``.

    >>> manager = TaskManager(Path("tasks"), services=[service])   # service: a loaded ImageService
    >>> manager.on_success(lambda event: print(event.task.id, event.images))
    >>> task = manager.schedule_task(Task.new("a red fox", "my_app", 2, "alice"))
    >>> manager.get_user_task(task.id, "alice").status
    <TaskStatus.SCHEDULED: 1>
    >>> manager.close()

    One background worker per service runs the scheduled tasks, oldest first. Opening the manager recovers from a
    crash: tasks left RUNNING are run again (or end FAILED after :data:`MAX_ATTEMPTS` starts). Only one manager
    (one process) may use a data directory at a time; ``text2image tasks`` may read and delete alongside it.
    """

    def __init__(self, data_dir: Path, max_age_days: float = 30.0, services: Iterable[ImageService] = ()) -> None:
        if not isinstance(max_age_days, (int, float)) or not math.isfinite(max_age_days) or max_age_days < 0:
            raise ConfigError(f"max_age_days {shown(max_age_days)} is not allowed; give days, a finite number 0 or "
                              "more")
        self.data_dir = Path(data_dir)
        self.max_age_days = max_age_days
        self._lock_file = lock_data_dir(self.data_dir)
        self.store = TaskStore(self.data_dir)
        requeued, failed = self.store.recover(MAX_ATTEMPTS)
        if requeued or failed:
            log.warning("tasks left RUNNING by the last process: scheduled again %s, failed %s", requeued, failed)
        for task in (t for t in self.store.find() if t.damaged):
            log.warning("task %d cannot be read from the store, so it reads as FAILED: %s", task.id, task.damaged)
        self.store.remove_orphan_images()
        self._services: list[ImageService] = []
        self._idle: list[ImageService] = []
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._sync_waiting = 0  # synchronous runs waiting for a service go before the queue
        self._pending = True  # there may be SCHEDULED tasks; _generation tells a wake-up from a stale "no"
        self._generation = 0
        self._deleted: set[int] = set()
        #: Fraction done of each task being generated here (for the task JSON's ``progress``).
        self._progress: dict[int, float] = {}
        self._on_success: list[SuccessHandler] = []
        self._on_failure: list[FailureHandler] = []
        self._start(self._janitor, "t2i-cleanup")
        for service in services:
            self.add_service(service)

    # -- set-up ----------------------------------------------------------------------------------------------------
    def add_service(self, service: ImageService) -> None:
        """Add a loaded :class:`ImageService` and a background worker that runs scheduled tasks on it."""
        if not service.ready:
            raise Unavailable("the image service has no model loaded; call its load() first")
        with self._cond:
            self._services.append(service)
            self._idle.append(service)
            self._cond.notify_all()
        self._start(self._worker, f"t2i-worker-{len(self._services)}")

    def on_success(self, handler: SuccessHandler) -> SuccessHandler:
        """Call ``handler(TaskSuccessfulEvent)`` once for every task that gets its images. Usable as a decorator."""
        self._on_success.append(handler)
        return handler

    def on_failure(self, handler: FailureHandler) -> FailureHandler:
        """Call ``handler(TaskFailedEvent)`` once for every task that ends FAILED. Usable as a decorator."""
        self._on_failure.append(handler)
        return handler

    def close(self) -> None:
        """Stop the workers; a task being made stops within one denoising step and goes back to the queue."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        with self._cond:  # synchronous runs in callers' threads stop within a step too; let them store that
            self._cond.wait_for(lambda: len(self._idle) == len(self._services), timeout=60)
        self.store.close()
        self._lock_file.close()

    def __enter__(self) -> TaskManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Nextcloud's operations ------------------------------------------------------------------------------------
    def progress(self, task: Task) -> float:
        """How far ``task`` is: 1 once it has ended, the fraction of its denoising steps done while this manager
        generates it, else 0."""
        if task.status in (TaskStatus.SUCCESSFUL, TaskStatus.FAILED):
            return 1.0
        return round(self._progress.get(task.id or -1, 0.0), 4) if task.status == TaskStatus.RUNNING else 0.0

    def has_providers(self) -> bool:
        """True when a model is loaded, so tasks can run."""
        return bool(self._services)

    def schedule_task(self, task: Task) -> Task:
        """Store a checked task (:meth:`Task.new`) as SCHEDULED and return it at once; a background worker makes
        the images. Raises :class:`NoProviderError` (no model loaded)."""
        expected, backlog = self._estimate(task)
        self.store.insert(task, TaskStatus.SCHEDULED, expected, int(time.time() + backlog + expected))
        with self._cond:
            self._generation += 1
            self._pending = True
            self._cond.notify_all()
        return task

    def run_task(self, task: Task) -> Task:
        """Make a checked task's images now, in the calling thread; return it SUCCESSFUL.

        Raises :class:`TaskFailedError` when generation failed (the task is stored as FAILED and the failure event
        fired), besides the errors of :meth:`schedule_task`. Waits for a free service first; it goes before the
        queue. If the manager is closed meanwhile the task is returned SCHEDULED and runs after a restart.
        """
        expected, _ = self._estimate(task)
        service = self._take(sync=True)
        if service is None:
            raise NoProviderError("the task service is stopping; try again when it is back")
        try:
            self.store.insert(task, TaskStatus.RUNNING, expected, int(time.time() + expected), attempts=1)
            self._execute(task, service)
        finally:
            self._give(service)
        assert task.id is not None
        stored = self.store.get(task.id)
        if stored is None:
            raise TaskFailedError("the task was deleted while its images were being made", task)
        _copy(stored, task)
        if task.status == TaskStatus.FAILED:
            raise TaskFailedError(task.error_message or INTERNAL_ERROR, task)
        return task

    def run_or_schedule_task(self, task: Task, budget_seconds: float) -> Task:
        """Run a checked task now when its expected runtime (measured step times of the loaded model, plus the work
        already queued) fits ``budget_seconds``; otherwise schedule it. Returns the task either way."""
        expected, backlog = self._estimate(task)
        if expected + backlog <= budget_seconds:
            return self.run_task(task)
        return self.schedule_task(task)

    def get_task(self, task_id: int) -> Task:
        """The task with this id, of any user; raises :class:`TaskNotFoundError`."""
        return self._found(self.store.get(task_id), task_id)

    def get_user_task(self, task_id: int, user_id: str | None) -> Task:
        """The task with this id if ``user_id`` owns it; raises :class:`TaskNotFoundError` otherwise."""
        return self._found(self.store.get(task_id, user_id), task_id)

    def get_user_tasks_by_app(self, user_id: str | None, app_id: str, identifier: str | None = None) -> list[Task]:
        """The user's tasks of one app, oldest first; only those with ``identifier`` when it is given."""
        return self.store.find(user_id, app_id, identifier)

    def delete_task(self, task: Task | int) -> None:
        """Delete a task and its images; a task being made stops within one denoising step."""
        task_id = task if isinstance(task, int) else task.id
        stored = None if task_id is None else self.store.get(task_id)
        if task_id is None or stored is None:
            raise TaskNotFoundError(f"task {task_id} not found")
        if stored.status == TaskStatus.RUNNING:
            self._deleted.add(task_id)
        self.store.delete(task_id)

    def image_path(self, task: Task, index: int) -> Path:
        """The PNG file of image ``index`` of a SUCCESSFUL task; raises :class:`TaskNotFoundError`."""
        path = self.store.image_path(task.id or 0, index)
        if task.status != TaskStatus.SUCCESSFUL or not 0 <= index < task.number_of_images or not path.is_file():
            raise ImageNotFoundError(f"image {index} of task {task.id} not found")
        return path

    def cleanup(self, max_age_days: float | None = None) -> list[int]:
        """Delete finished tasks (and images) older than ``max_age_days`` (default: the manager's). Returns ids."""
        days = self.max_age_days if max_age_days is None else max_age_days
        return self.store.cleanup(days * 86400)

    # -- the workers -----------------------------------------------------------------------------------------------
    def _estimate(self, task: Task) -> tuple[float, float]:
        """(expected seconds of this task, seconds until a worker is free for it)."""
        if not self._services:
            raise NoProviderError("no text-to-image model is loaded yet; try again when the service is ready")
        if task.request is None:
            raise InvalidRequest(f"task {task.id} cannot run: {task.damaged}")
        return self._services[0].expected_seconds(task.request), self.store.backlog_seconds() / len(self._services)

    def _found(self, task: Task | None, task_id: int) -> Task:
        if task is None:
            raise TaskNotFoundError(f"task {task_id} not found")
        return task

    def _start(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _take(self, sync: bool, timeout: float | None = None) -> ImageService | None:
        """An idle service, or None on timeout or when stopping. Workers take one only when there may be work."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._sync_waiting += sync
            try:
                while not self._stopping.is_set():
                    if self._idle and (sync or (self._pending and not self._sync_waiting)):
                        return self._idle.pop()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(left)
                return None
            finally:
                self._sync_waiting -= sync

    def _give(self, service: ImageService) -> None:
        with self._cond:
            self._idle.append(service)
            self._cond.notify_all()

    def _worker(self) -> None:
        while not self._stopping.is_set():
            service = self._take(sync=False, timeout=POLL_SECONDS)
            if service is None:
                with self._cond:
                    self._pending = True
                continue
            try:
                with self._cond:
                    generation = self._generation
                task = self.store.claim_next()
                if task is None:
                    with self._cond:
                        self._pending = self._generation != generation
                else:
                    self._execute(task, service, share=True)
            except Exception:
                log.exception("the task worker hit an unexpected error; it carries on")
                self._stopping.wait(1.0)
            finally:
                self._give(service)

    def _janitor(self) -> None:
        while True:
            try:
                removed = self.cleanup()
                if removed:
                    log.info("deleted %d finished tasks older than %g days", len(removed), self.max_age_days)
            except Exception:
                log.exception("cleaning up old tasks failed")
            if self._stopping.wait(CLEANUP_EVERY_SECONDS):
                return

    def _execute(self, task: Task, service: ImageService, share: bool = False) -> None:
        """Make a RUNNING task's images and end it SUCCESSFUL or FAILED, firing the event once; never leaves it
        RUNNING except when cancelled (deleted: gone; stopping: back in the queue).

        ``share``: between the batches of a task with more images than one batch, run the oldest waiting task of
        another user that fits in one batch, so one user's 12 images do not hold everyone else up."""
        task_id = task.id
        assert task_id is not None
        checked = [time.monotonic()]

        def serve_another() -> None:
            other = self.store.claim_next(other_than=task.user_id, most_images=service.settings.runtime.max_batch)
            if other is not None:
                log.info("task %d of %s runs between the batches of task %d", other.id, other.user_id, task_id)
                self._execute(other, service)

        def on_progress(fraction: float) -> bool:
            self._progress[task_id] = fraction
            if self._stopping.is_set() or task_id in self._deleted:
                return False
            if time.monotonic() - checked[0] > 1.0:  # deleted by another process (text2image tasks delete)?
                checked[0] = time.monotonic()
                return self.store.get(task_id) is not None
            return True

        assert task.request is not None  # a damaged row never reaches a worker (claim_next fails it)
        outcome = run_task(service, task.request, on_progress, serve_another if share else None,
                           cancelled=lambda: task_id in self._deleted, label=f"task {task_id}")
        try:
            match outcome:
                case Images(results=results):
                    paths = self.store.save_images(task_id, [r.png for r in results])
                    if not self.store.finish(task_id, TaskStatus.SUCCESSFUL, seeds=[r.seed for r in results]):
                        self.store.remove_images(task_id)  # deleted while it ran
                        return
                case Cancelled() | Stopped():  # deleted: gone; stopping: back in the queue
                    if not self.store.requeue(task_id):
                        self.store.remove_images(task_id)
                    return
                case Refused(user=message):
                    self._fail(task_id, message, message)
                    return
                case Failed(admin=detail, user=message):
                    self._fail(task_id, message, detail)
                    return
        except (StoreError, OSError) as exc:  # the images were made, but storing them failed
            problem = store_error(exc, self.data_dir) if isinstance(exc, OSError) else exc
            log.error("task %d: its images could not be stored: %s", task_id, problem)
            self._fail(task_id, NO_ROOM if isinstance(problem, StoreFull) else INTERNAL_ERROR,
                       f"{type(exc).__name__}: {problem}")
            return
        except Exception as exc:  # a bug while storing: the task still ends, FAILED with the reason
            log.exception("task %d: storing its outcome failed", task_id)
            self._fail(task_id, INTERNAL_ERROR, admin_detail(f"task {task_id}", exc))
            return
        finally:
            self._deleted.discard(task_id)
            self._progress.pop(task_id, None)
        done = self.store.get(task_id)
        if done is not None:
            _emit(self._on_success, TaskSuccessfulEvent(done, paths))

    def _fail(self, task_id: int, user_message: str, debug_message: str) -> None:
        self.store.remove_images(task_id)
        try:
            ended = self.store.finish(task_id, TaskStatus.FAILED, error_message=user_message,
                                      debug_message=debug_message)
        except StoreError as exc:  # stays RUNNING; the next start runs it again or fails it with a reason
            log.error("task %d could not be marked failed: %s", task_id, exc)
            return
        if ended:
            done = self.store.get(task_id)
            if done is not None:
                _emit(self._on_failure, TaskFailedEvent(done, debug_message))


def _emit(handlers: list[Callable[[Any], Any]], event: Any) -> None:
    for handler in list(handlers):
        try:
            handler(event)
        except Exception:
            log.exception("an event handler failed for task %s", event.task.id)


def _copy(source: Task, target: Task) -> None:
    for name in Task.__dataclass_fields__:
        setattr(target, name, getattr(source, name))
