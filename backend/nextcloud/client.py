"""The calls this ExApp makes to Nextcloud, through nc_py_api's async API, with each failure sorted into what to do.

nc_py_api's task-processing helpers swallow HTTP errors (``{}`` for a 500, a 404 and a 412 alike) and let network
errors through. A worker must tell "Nextcloud is unreachable, try again" from "this task is gone, drop it", so the
result and state calls go through ``AsyncNextcloudApp.ocs`` here and every failure becomes :class:`Unreachable`
(retry later) or :class:`Gone` (stop trying).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable
from typing import Any

from nc_py_api import AsyncNextcloudApp, NextcloudException, NextcloudExceptionNotFound
from nc_py_api.ex_app.providers.task_processing import TaskProcessingProvider

log = logging.getLogger(__name__)

TASK_TYPE = "core:text2image"
#: Nextcloud cuts errorMessage to this many characters (and logs the full text); we cut it ourselves, keeping
#: the start, so what is stored is what we chose.
MAX_ERROR_CHARS = 1000
_PROVIDER_API = "/ocs/v2.php/taskprocessing/tasks_provider"


class Unreachable(Exception):
    """Nextcloud did not answer, or answered with a server error: try again later."""


class Gone(Exception):
    """Nextcloud no longer knows this task (deleted or cleaned up): stop trying."""


class Backoff:
    """Exponential waits with jitter between retries: 0.5, 1, 2, 4 … up to ``cap`` seconds."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**min(self.failures, 32))  # 2**1024 would overflow a float
        self.failures += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.failures = 0


def cut(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


class Nextcloud:
    """One connection to Nextcloud as this ExApp (credentials from the AppAPI environment)."""

    def __init__(self) -> None:
        self.nc = AsyncNextcloudApp()
        self._major: int | None = None

    async def _ocs(self, method: str, path: str, **kwargs: Any) -> Any:
        return await _sorted(self.nc.ocs(method, path, **kwargs))

    async def server_major(self) -> int:
        """Nextcloud's major version (33+ shows userFacingErrorMessage to users)."""
        if self._major is None:
            caps = await self._ocs("GET", "/ocs/v1.php/cloud/capabilities")
            self._major = int(caps["version"]["major"])
        return self._major

    async def enabled_state(self) -> bool | None:
        """Whether AppAPI has this app enabled; None when AppAPI does not know it (401: not registered yet, as
        with a manual install started first). Raises :class:`Unreachable` when Nextcloud cannot answer."""
        try:
            return bool(await self.nc.ocs("GET", "/ocs/v1.php/apps/app_api/ex-app/state"))
        except NextcloudException as exc:
            if exc.status_code == 401:
                return None
            raise Unreachable(str(exc)) from None
        except OSError as exc:
            raise Unreachable(reason(exc)) from None

    async def set_init_status(self, progress: int, error: str = "") -> None:
        try:
            await self.nc.set_init_status(progress, error)
        except (NextcloudException, OSError) as exc:
            log.warning("could not report init progress %d%%: %s", progress, exc)

    async def register(self, provider: TaskProcessingProvider) -> None:
        await _sorted(self.nc.providers.task_processing.register(provider))

    async def unregister(self, provider_id: str) -> None:
        await _sorted(self.nc.providers.task_processing.unregister(provider_id))

    async def register_settings_form(self, form: dict[str, Any]) -> None:
        """Declare (or replace) an admin settings form; Nextcloud shows it in its admin settings."""
        await self._ocs("POST", "/ocs/v1.php/apps/app_api/api/v1/ui/settings", json={"formScheme": form})

    async def admin_values(self, keys: list[str]) -> dict[str, str]:
        """The stored values of these admin-form fields (the app's config); a field never saved is absent."""
        found = await self._ocs("POST", "/ocs/v1.php/apps/app_api/api/v1/ex-app/config/get-values",
                                json={"configKeys": keys})
        return {str(r["configkey"]): str(r.get("configvalue") or "") for r in found or [] if "configkey" in r}

    async def unregister_settings_form(self, form_id: str) -> None:
        """Remove a declared settings form; one that is not there is fine."""
        try:
            await self._ocs("DELETE", "/ocs/v1.php/apps/app_api/api/v1/ui/settings", params={"formId": form_id})
        except Gone:
            pass

    async def set_admin_value(self, key: str, value: str) -> None:
        """Store one value in the app's config (where the admin form's values are)."""
        await self._ocs("POST", "/ocs/v1.php/apps/app_api/api/v1/ex-app/config",
                        json={"configKey": key, "configValue": value})

    async def delete_admin_values(self, keys: list[str]) -> None:
        """Remove these keys from the app's config: a form field without a value shows its default again."""
        try:
            await self._ocs("DELETE", "/ocs/v1.php/apps/app_api/api/v1/ex-app/config", json={"configKeys": keys})
        except Gone:
            pass

    async def admin_log(self, message: str, level: int = 2) -> None:
        """Write to nextcloud.log (level 2 = warning, 3 = error), where an admin looks first; never raises."""
        try:
            await self._ocs("POST", "/ocs/v1.php/apps/app_api/api/v1/log",
                            json={"level": level, "message": cut(message)})
        except (Unreachable, Gone) as exc:
            log.debug("could not write to the Nextcloud log: %s", exc)

    async def next_task(self, provider_ids: list[str]) -> dict[str, Any] | None:
        """The next task for one of ``provider_ids`` (``{"task", "provider"}``), or None when there is none."""
        found = await self._ocs("GET", f"{_PROVIDER_API}/next",
                                json={"providerIds": provider_ids, "taskTypeIds": [TASK_TYPE]})
        return found or None  # 204 comes back as []

    async def progress(self, task_id: int, fraction: float) -> str | None:
        """Report progress (0..1); return the task's status as Nextcloud answers it, None when unknown.

        The answer is the only way to learn that a user cancelled the task (``STATUS_CANCELLED``).
        """
        try:
            data = await self._ocs("POST", f"{_PROVIDER_API}/{task_id}/progress",
                                   json={"taskId": task_id, "progress": min(1.0, max(0.0, fraction))})
        except Unreachable as exc:
            log.debug("progress of task %d not reported: %s", task_id, exc)
            return None
        return str((data or {}).get("task", {}).get("status") or "") or None

    async def upload(self, task_id: int, png: bytes) -> int:
        """Upload one result file; return its file id."""
        data = await self._ocs("POST", f"{_PROVIDER_API}/{task_id}/file", files={"file": png})
        return int(data["fileId"])

    async def report(self, task_id: int, output: dict[str, Any] | None = None, error: str | None = None,
                     user_error: str | None = None) -> None:
        """Report the result; raise unless Nextcloud confirmed it.

        ``errorMessage`` is always sent with a failure; ``userFacingErrorMessage`` only to Nextcloud 33+ (32 has
        no such field, and sent alone it makes 32 answer 500 and keep the task RUNNING).
        """
        body: dict[str, Any] = {"taskId": task_id, "output": output,
                                "errorMessage": None if error is None else cut(error)}
        if error is not None and user_error and await self.server_major() >= 33:
            body["userFacingErrorMessage"] = cut(user_error)
        data = await self._ocs("POST", f"{_PROVIDER_API}/{task_id}/result", json=body)
        if not isinstance(data, dict) or "task" not in data:
            raise Unreachable(f"unexpected answer to the result of task {task_id}: {str(data)[:200]}")

    async def close(self) -> None:
        adapter = getattr(self.nc._session, "adapter", None)  # no public close in nc_py_api 0.30
        if adapter is not None:
            await adapter.close()


async def _sorted(call: Awaitable[Any]) -> Any:
    """``call``'s result, with its failure turned into :class:`Gone` or :class:`Unreachable`."""
    try:
        return await call
    except NextcloudExceptionNotFound as exc:
        raise Gone(str(exc)) from None
    except NextcloudException as exc:
        # 5xx, 408 (timeout), 412/401 (AppAPI refuses a disabled app): all pass; nothing we sent was wrong.
        raise Unreachable(str(exc)) from None
    except OSError as exc:  # niquests' connection errors are OSErrors
        raise Unreachable(reason(exc)) from None


def reason(exc: BaseException) -> str:
    """Why a request did not get through, in one short line: the first cause in the chain of wrapped errors
    (``ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 8080)``), not the wrappers' repeats."""
    inner, seen = exc, {id(exc)}
    while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
        inner = nxt
        seen.add(id(nxt))
    if not str(inner).strip():  # a bare TimeoutError says nothing more than its wrapper
        inner = exc
    text = " ".join(f"{type(inner).__name__}: {inner}".split())
    return cut(text, 300)


async def sleep_or(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` unless ``event`` is set first."""
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
