"""The task model of Nextcloud's Text-To-Image API (OCP\\TextToImage\\Task), and the errors of its manager.

Standard library only: the ``text2image tasks`` commands read tasks without loading the model stack.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import T2IError


class TaskStatus(enum.IntEnum):
    """Nextcloud's task statuses, with the same numbers (they appear in the JSON)."""

    UNKNOWN = 0
    SCHEDULED = 1
    RUNNING = 2
    SUCCESSFUL = 3
    FAILED = 4


@dataclass
class Task:
    """A text-to-image task: Nextcloud's ``Task(input, appId, numberOfImages, userId, identifier='')``.

    Create one with the first five fields and hand it to a :class:`~backend.standalone.manager.TaskManager`; the
    manager fills in ``id``, ``status`` and ``completion_expected_at`` on the same object.
    """

    #: The prompt: what the image should show.
    input: str
    #: The app the task belongs to; tasks are listed per user and app.
    app_id: str
    #: How many images to make (1-12).
    number_of_images: int
    #: The owner; only this user sees the task over HTTP. None is allowed for Python callers (no user).
    user_id: str | None
    #: Any string up to 255 characters the app uses to find its tasks again.
    identifier: str = ""
    #: Our optional inputs: size, steps, guidance, negative_prompt, seed, scheduler (see ``backend.tasks.request``).
    options: dict[str, Any] = field(default_factory=dict)
    #: Set by the manager.
    id: int | None = None
    status: TaskStatus = TaskStatus.UNKNOWN
    #: Unix seconds when the images are expected to be ready (queue ahead included).
    completion_expected_at: int | None = None
    #: For a FAILED task: the message meant for the user (what was wrong and what to do).
    error_message: str | None = None
    #: Seeds of the images, in order, once SUCCESSFUL (image i can be made again alone with its seed).
    seeds: list[int] = field(default_factory=list)
    #: Unix seconds of creation and of the last status change.
    created_at: float | None = None
    updated_at: float | None = None
    #: Why the stored row could not be read, for a task damaged in the store (it then reads as FAILED).
    damaged: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Nextcloud's task JSON (``CoreTextToImageTask``) plus two extensions: ``options`` and ``errorMessage``."""
        return {
            "id": self.id,
            "status": int(self.status),
            "userId": self.user_id,
            "appId": self.app_id,
            "input": self.input,
            "identifier": self.identifier,
            "numberOfImages": self.number_of_images,
            "completionExpectedAt": self.completion_expected_at,
            "options": dict(self.options),
            "errorMessage": self.error_message,
        }

    def task_input(self) -> dict[str, Any]:
        """The task as the input dict that ``backend.tasks.request.parse_task_input`` checks."""
        return {"input": self.input, "numberOfImages": self.number_of_images, **self.options}


@dataclass(frozen=True)
class TaskSuccessfulEvent:
    """Fired once when a task has its images (Nextcloud's TaskSuccessfulEvent)."""

    task: Task
    #: Paths of the PNG files, in image order; they live until the task is deleted.
    images: list[Path]


@dataclass(frozen=True)
class TaskFailedEvent:
    """Fired once when a task ends FAILED (Nextcloud's TaskFailedEvent)."""

    task: Task
    #: English, for debugging and logs; ``task.error_message`` holds the text meant for the user.
    error_message: str


class TaskNotFoundError(T2IError):
    """No task with this id (for this user)."""


class NoProviderError(T2IError):
    """No model is loaded, so tasks cannot be run or scheduled (Nextcloud's PreConditionNotMetException)."""


class TaskFailedError(T2IError):
    """``run_task`` ran the task and it failed; the task is FAILED and ``task`` holds the user-facing message."""

    def __init__(self, message: str, task: Task) -> None:
        super().__init__(message)
        self.task = task
