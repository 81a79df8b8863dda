"""The task model of Nextcloud's Text-To-Image API (OCP\\TextToImage\\Task), and the errors of its manager.

A task carries its input as the runtime's one request type, parsed once where the task is made (:meth:`Task.new`)
and once where the task store reads it back.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.tasks import task_input
from runtime.errors import InvalidRequest, T2IError, Unavailable
from runtime.request import GenerationRequest
from runtime.validation import check_text, shown

MAX_IDENTIFIER_CHARS = 255
# App and user ids appear in URLs; a strict alphabet keeps them from ever meaning a path.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_NAMES = "use 1 to 64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit"


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

    Make one with :meth:`Task.new` (which checks it) and hand it to a
    :class:`~backend.standalone.manager.TaskManager`; the manager fills in ``id``, ``status`` and
    ``completion_expected_at`` on the same object.
    """

    #: What to generate, checked. None only for a task whose stored row is damaged (see ``damaged``).
    request: GenerationRequest | None
    #: The app the task belongs to; tasks are listed per user and app.
    app_id: str
    #: The owner; only this user sees the task over HTTP. None is allowed for Python callers (no user).
    user_id: str | None
    #: Any string up to 255 characters the app uses to find its tasks again.
    identifier: str = ""
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
    #: What could still be read of a damaged task's prompt.
    damaged_input: str = ""

    @classmethod
    def new(cls, input: Any, app_id: Any, number_of_images: Any, user_id: Any, identifier: Any = "",
            options: Mapping[str, Any] | None = None) -> Task:
        """A checked task: the envelope (app, user, identifier) here, the input by the task-input codec (numbers
        may come as text, "3" → 3). ``options``: size, steps, guidance, negative_prompt, seed, scheduler. Raises
        :class:`InvalidRequest` with a message for the user."""
        if not isinstance(app_id, str) or not NAME_RE.match(app_id):
            raise InvalidRequest(f"appId {shown(app_id)} is not allowed; {_NAMES}")
        if user_id is not None and (not isinstance(user_id, str) or not NAME_RE.match(user_id)):
            raise InvalidRequest(f"user id {shown(user_id)} is not allowed; {_NAMES}")
        if not isinstance(identifier, str) or len(identifier) > MAX_IDENTIFIER_CHARS:
            raise InvalidRequest(f"identifier {shown(identifier)} is not allowed; use text of at most "
                                 f"{MAX_IDENTIFIER_CHARS} characters")
        check_text("identifier", identifier)
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise InvalidRequest(f"options must be an object, got {type(options).__name__}")
        core = {"input": input, "numberOfImages": number_of_images}
        clash = sorted(repr(k) for k in set(options) & set(core))
        if clash:  # the task's own fields, not options: they must not be given twice
            allowed = ", ".join(task_input.OPTIONAL_INPUTS)
            raise InvalidRequest(f"unknown option {', '.join(clash)}; allowed: {allowed}")
        return cls(task_input.parse({**core, **options}), app_id, user_id, identifier)

    @property
    def input(self) -> str:
        """The prompt: what the image should show."""
        return self.damaged_input if self.request is None else self.request.prompt

    @property
    def number_of_images(self) -> int:
        """How many images to make (1 to MAX_IMAGES); 0 for a damaged task."""
        return 0 if self.request is None else self.request.n

    @property
    def options(self) -> dict[str, Any]:
        """The optional inputs that were given (size, steps, guidance, negative_prompt, seed, scheduler)."""
        if self.request is None:
            return {}
        given = task_input.dump(self.request)
        del given["input"], given["numberOfImages"]
        return given

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
            "options": self.options,
            "errorMessage": self.error_message,
        }


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


class ImageNotFoundError(TaskNotFoundError):
    """No such image of this task (the task is not SUCCESSFUL, or the index is out of range)."""


class NoProviderError(Unavailable):
    """No model is loaded, so tasks cannot be run or scheduled (Nextcloud's PreConditionNotMetException)."""


class TaskFailedError(T2IError):
    """``run_task`` ran the task and it failed; the task is FAILED and ``task`` holds the user-facing message."""

    def __init__(self, message: str, task: Task) -> None:
        super().__init__(message)
        self.task = task
