"""How a task ended, classified in one place for both task services (the Nextcloud worker and the standalone
manager): :func:`run_task` holds the only ``try/except`` that turns a generation's errors into an :data:`Outcome`,
and each service matches on the outcome to record it in its own way.

- :class:`Images`: the images were made.
- :class:`Refused`: the request was not acceptable (:class:`InvalidRequest`, also one only the model refuses, such
  as a size its static graphs do not allow); the message is the user's to act on and is shown as it is.
- :class:`Failed`: anything else went wrong; the user learns that it was an internal error, the admin the detail.
- :class:`Cancelled`: the requester cancelled or deleted the task; nothing is delivered.
- :class:`Stopped`: the service is stopping; the task stops within one denoising step.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend.tasks import task_input
from runtime.errors import GenerationCancelled, InvalidRequest, T2IError
from runtime.request import GenerationRequest

if TYPE_CHECKING:
    from backend.tasks.service import ImageResult, ImageService, ProgressCallback

log = logging.getLogger(__name__)

#: A task found running after a crash runs again, up to this many starts in all; then it ends failed.
MAX_ATTEMPTS = 2
#: Shown to the user when something unexpected broke; the details go to the admin (log, failure event).
INTERNAL_ERROR = ("the images could not be made because of an internal error; the administrator can find the "
                  "details in the log")


@dataclass(frozen=True)
class Images:
    results: list[ImageResult]


@dataclass(frozen=True)
class Refused:
    #: What was not acceptable and what is allowed, for the user who sent it.
    user: str


@dataclass(frozen=True)
class Failed:
    #: What went wrong, for the admin.
    admin: str
    user: str = INTERNAL_ERROR


@dataclass(frozen=True)
class Cancelled:
    pass


@dataclass(frozen=True)
class Stopped:
    pass


Outcome = Images | Refused | Failed | Cancelled | Stopped


def parsed(raw: Mapping[str, Any]) -> GenerationRequest | Refused:
    """A task's input as a request, or :class:`Refused` with the reason (for a service that receives the input
    only when it takes the task)."""
    try:
        return task_input.parse(raw)
    except InvalidRequest as exc:
        return Refused(str(exc))


def run_task(service: ImageService, request: GenerationRequest, on_progress: ProgressCallback | None = None,
             between_batches: Callable[[], None] | None = None, cancelled: Callable[[], bool] = lambda: False,
             label: str = "task") -> Outcome:
    """Generate ``request`` on ``service`` and classify how it ended; never raises an Exception.

    ``on_progress`` returning False stops the run: ``cancelled()`` then tells a cancel by the requester
    (:class:`Cancelled`) from a stop of the service (:class:`Stopped`). ``label`` names the task in the log.
    """
    try:
        return Images(service.run(request, on_progress, between_batches))
    except InvalidRequest as exc:
        return Refused(str(exc))
    except GenerationCancelled:
        return Cancelled() if cancelled() else Stopped()
    except T2IError as exc:  # an engine, bundle or configuration problem: the admin's, and named
        log.error("%s failed: %s: %s", label, type(exc).__name__, exc)
        return Failed(admin_detail(label, exc))
    except Exception as exc:  # a bug: logged with its traceback
        log.exception("%s failed", label)
        return Failed(admin_detail(label, exc))


def admin_detail(label: str, exc: BaseException) -> str:
    """What went wrong, for the admin: the exception and the innermost frames."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{label} failed: {type(exc).__name__}: {exc} [at {where}]"
