"""Nextcloud's OCS Text-To-Image endpoints over the task manager: same paths, parameters, JSON and status codes.

Base ``/ocs/v2.php/text2image``; answers are OCS v2 envelopes ``{"ocs": {"meta": {status, statuscode, message},
"data": …}}`` with real HTTP status codes; images come as ``image/png``. Every error answer carries a message that
names the bad value and what is allowed, in ``meta.message`` and ``data.message``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from backend.standalone.auth import Credentials, RateLimiter
from backend.standalone.data_dir import StoreError, StoreFull
from backend.standalone.manager import TaskManager
from backend.standalone.task import ImageNotFoundError, NoProviderError, Task, TaskFailedError, TaskNotFoundError
from runtime.errors import InvalidRequest, T2IError

log = logging.getLogger(__name__)

BASE = "/ocs/v2.php/text2image"
#: Two prompts of 4000 characters, each character escaped as a surrogate pair, fit with room to spare.
MAX_BODY_BYTES = 256 * 1024
#: Nextcloud's default for numberOfImages in /schedule.
DEFAULT_IMAGES = 8
#: OCS clients often add ?format=json; the answer is JSON either way.
IGNORED_KEYS = ("format",)
OPENAPI_FILE = Path(__file__).with_name("openapi.json")
_NUMBER_RE = re.compile(r"^-?[0-9]{1,18}$")
_APP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# Quoted or bracketed values of 80+ characters inside a message (the checks quote the bad value).
_LONG_VALUE_RE = re.compile(r"'[^']{80,}'|\"[^\"]{80,}\"|\[[^\[\]]{80,}\]|\{[^{}]{80,}\}|\d{80,}")


_LOGGED = "(the administrator can see why in the service log)"
#: How an error of the task service reaches an HTTP client: its status and message (None: the error's own). The
#: first class of the error's MRO listed here applies; any other error is a 500 (see ``asgi``).
STATUSES: dict[type[T2IError], tuple[int, str | None]] = {
    InvalidRequest: (400, None),
    ImageNotFoundError: (404, "Image not found"),
    TaskNotFoundError: (404, "Task not found"),
    NoProviderError: (412, None),
    StoreFull: (507, f"the service has no room left to store tasks; try again later {_LOGGED}"),
    StoreError: (503, f"the service cannot use its task store right now; try again later {_LOGGED}"),
}


class HttpError(Exception):
    """An answer other than 200, with the message for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def ocs(status: int, data: Any, message: str = "OK", headers: Mapping[str, str] | None = None) -> Response:
    """An OCS v2 envelope; ``statuscode`` repeats the HTTP status as Nextcloud's v2 endpoints do."""
    meta = {"status": "ok" if status < 400 else "failure", "statuscode": status, "message": message}
    body = json.dumps({"ocs": {"meta": meta, "data": data}}, ensure_ascii=False).encode()
    return Response(status, body, headers=dict(headers or {}))


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return ocs(status, {"message": message}, message, headers)


@dataclass
class Request:
    """What a route needs of an HTTP request; ``read_body`` raises :class:`HttpError` for a body it refuses."""

    method: str
    target: str
    headers: Mapping[str, str] | Message
    read_body: Callable[[], bytes]


# (path pattern below BASE, {method: handler name}); "{name}" matches one segment.
# Not Starlette's Router: the API is a plain synchronous class that runs on the ASGI app's bounded thread pool (and
# that the task manager's tests drive without an event loop), and every answer, 404 and 405 with its Allow header
# included, is an OCS envelope. A Router would make each route an async endpoint, move the thread hand-off into
# every one of them and need its own 404/405 handlers to keep the envelope: more code for six routes, not less.
ROUTES: list[tuple[tuple[str, ...], dict[str, str]]] = [
    (("is_available",), {"GET": "is_available"}),
    (("schedule",), {"POST": "schedule"}),
    (("task", "{id}"), {"GET": "get_task", "DELETE": "delete_task"}),
    (("task", "{id}", "image", "{index}"), {"GET": "get_image"}),
    (("tasks", "app", "{appId}"), {"GET": "list_tasks"}),
    (("openapi.json",), {"GET": "openapi"}),
]
#: Answer without credentials (Nextcloud's is_available is a public page); wrong credentials are still refused.
PUBLIC = {"is_available", "openapi"}
#: Methods that change nothing; any other must pass :func:`_refuse_cross_site`.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Api:
    """Routes requests to the manager. ``sync_budget`` is the runtime in seconds under which /schedule makes the
    images before answering (Nextcloud's runOrScheduleTask); 0 always schedules."""

    def __init__(self, manager: TaskManager, credentials: Credentials, limiter: RateLimiter,
                 sync_budget: float = 0.0) -> None:
        self.manager, self.credentials, self.limiter, self.sync_budget = manager, credentials, limiter, sync_budget
        #: Why no model is available yet; shown with 412 answers.
        self.unavailable_reason = "the model is still loading"

    def handle(self, request: Request) -> Response:
        url = urlsplit(request.target)
        if not url.path.startswith(BASE + "/"):
            raise HttpError(404, f"no such endpoint {url.path!r}; the API lives under {BASE}/")
        try:
            parts = [unquote(p, errors="strict") for p in url.path[len(BASE) + 1:].split("/")]
        except UnicodeDecodeError:
            raise HttpError(400, "the path is not valid UTF-8 after percent-decoding") from None
        name, args = _route(request.method, parts)
        if request.method not in SAFE_METHODS:
            _refuse_cross_site(request.headers)
        user = self.credentials.authenticate(request.headers.get("Authorization"))
        if user is None and (request.headers.get("Authorization") or name not in PUBLIC):
            raise HttpError(401, "authentication required: send 'Authorization: Bearer <token>' or basic auth "
                                 "with a user and secret configured in T2I_USERS",
                            _challenge(request.headers))
        query = _single_values(parse_qs(url.query, keep_blank_values=True), "query parameter")
        try:
            return getattr(self, name)(user, args, query, request)
        except T2IError as exc:
            listed = next((cls for cls in type(exc).__mro__ if cls in STATUSES), None)
            if listed is None:
                raise
            status, message = STATUSES[listed]
            if isinstance(exc, StoreError):  # the admin's to fix; the user learns that it is not their request
                log.error("task store: %s", exc)
            raise HttpError(status, message or _shorten(str(exc)), {"Retry-After": "60"} if status == 503 else {}
                            ) from None

    # -- endpoints -------------------------------------------------------------------------------------------------
    def is_available(self, user: str | None, args: dict[str, str], query: dict[str, str], r: Request) -> Response:
        _known(query, ())
        return ocs(200, {"isAvailable": self.manager.has_providers() and self.manager.store.has_room()})

    def schedule(self, user: str, args: dict[str, str], query: dict[str, Any], r: Request) -> Response:
        params: dict[str, Any] = {k: v for k, v in {**query, **_body_params(r)}.items() if k not in IGNORED_KEYS}
        for key in ("input", "appId"):
            if params.get(key) is None:
                raise HttpError(400, f"'{key}' is missing; /schedule needs input (the prompt) and appId")
        # The envelope is the task's; every other key is task input, for the codec to check (unknown keys too).
        app_id, identifier = params.pop("appId"), params.pop("identifier", "")
        prompt, n = params.pop("input"), params.pop("numberOfImages", DEFAULT_IMAGES)
        task = Task.new(prompt, app_id, n, user, identifier, params)
        if not self.manager.has_providers():
            raise HttpError(412, f"No text to image provider is available: {self.unavailable_reason}")
        # Counted only for valid requests: a typo does not use up the user's quota.
        wait = self.limiter.acquire(user)
        if wait:
            raise HttpError(429, f"too many schedules: at most {self.limiter.limit} per {self.limiter.window:g} s "
                                 f"per user; try again in {wait:.0f} s", {"Retry-After": str(max(1, round(wait)))})
        try:
            self.manager.run_or_schedule_task(task, self.sync_budget)
        except TaskFailedError:
            pass  # the task is FAILED with its message, which the answer shows, as in Nextcloud
        return ocs(200, {"task": self._json(task)})

    def get_task(self, user: str, args: dict[str, str], query: dict[str, str], r: Request) -> Response:
        _known(query, ())
        return ocs(200, {"task": self._json(self._task(user, args["id"]))})

    def delete_task(self, user: str, args: dict[str, str], query: dict[str, str], r: Request) -> Response:
        _known(query, ())
        task = self._task(user, args["id"])
        self.manager.delete_task(task)
        return ocs(200, {"task": self._json(task)})

    def get_image(self, user: str, args: dict[str, str], query: dict[str, str], r: Request) -> Response:
        _known(query, ())
        task = self._task(user, args["id"])
        path = self.manager.image_path(task, _number("image index", args["index"]))
        return Response(200, path.read_bytes(), "image/png")

    def list_tasks(self, user: str, args: dict[str, str], query: dict[str, str], r: Request) -> Response:
        _known(query, ("identifier",))
        app_id = args["appId"]
        if not _APP_RE.match(app_id):
            raise HttpError(400, f"appId {app_id[:64]!r} is not allowed; use 1 to 64 letters, digits, '_', '.', "
                                 "'@' or '-', starting with a letter or digit")
        tasks = self.manager.get_user_tasks_by_app(user, app_id, query.get("identifier"))
        return ocs(200, {"tasks": [self._json(t) for t in tasks]})

    def openapi(self, user: str | None, args: dict[str, str], query: dict[str, str], r: Request) -> Response:
        return Response(200, OPENAPI_FILE.read_bytes())

    def _json(self, task: Task) -> dict[str, Any]:
        """The task JSON, with ``progress`` (0..1) as an extension of Nextcloud's."""
        return {**task.to_json(), "progress": self.manager.progress(task)}

    def _task(self, user: str, raw_id: str) -> Task:
        return self.manager.get_user_task(_number("task id", raw_id), user)


def _route(method: str, parts: list[str]) -> tuple[str, dict[str, str]]:
    for pattern, methods in ROUTES:
        if len(pattern) != len(parts):
            continue
        pairs = list(zip(pattern, parts, strict=True))
        if any(p != s for p, s in pairs if not p.startswith("{")):
            continue
        if method not in methods:
            raise HttpError(405, f"{method} is not allowed here; use {', '.join(methods)}",
                            {"Allow": ", ".join(methods)})
        args = {p.strip("{}"): s for p, s in pairs if p.startswith("{")}
        return methods[method], args
    raise HttpError(404, f"no such endpoint {BASE}/{'/'.join(parts)[:200]}; see {BASE}/openapi.json")


def _challenge(headers: Mapping[str, str] | Message) -> dict[str, str]:
    """The basic-auth challenge of a 401, except to a script (``X-Requested-With: XMLHttpRequest``, as the web page
    sends), where it would make the browser open its own login dialog over the page's."""
    if headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
        return {}
    return {"WWW-Authenticate": 'Basic realm="text2image", charset="UTF-8"'}


def _refuse_cross_site(headers: Mapping[str, str] | Message) -> None:
    """403 for a state-changing request that another site's page may have sent with this browser's credentials.

    A browser that once signed in with basic auth sends those credentials with any request to this service, also
    with a plain form POST from another site. Allowed are: Nextcloud's ``OCS-APIRequest: true`` header (another
    site's page cannot send it without a CORS preflight, which this service never grants); a browser's word that
    the request comes from this service's own pages (``Sec-Fetch-Site: same-origin``, or an ``Origin`` that is this
    host); and, with no browser's headers at all, credentials no browser sends by itself (a bearer token)."""
    if headers.get("OCS-APIRequest", "").strip().lower() == "true":
        return
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    origin = headers.get("Origin")
    host = headers.get("Host", "").strip().lower()
    if site:
        if site in ("same-origin", "none"):
            return
        why = f"the browser says it comes from another site (Sec-Fetch-Site: {site[:40]!r})"
    elif origin is not None:
        try:
            origin_host = urlsplit(origin.strip()).netloc.lower()
        except ValueError:  # "http://[::1" and the like
            origin_host = ""
        if origin != "null" and origin_host and origin_host == host:
            return
        why = f"it comes from the page of another site (Origin {origin[:100]!r}, this is {host[:100]!r})"
    elif headers.get("Authorization", "").strip().lower().startswith("basic"):
        why = "a browser may have sent it with its saved basic-auth credentials"
    else:
        return
    raise HttpError(403, f"cross-site request refused: {why}; a script must send the header 'OCS-APIRequest: "
                         "true' (as Nextcloud's OCS API asks) to change tasks")


def _shorten(message: str) -> str:
    """Cut long echoed values (a 100 kB 'numberOfImages') so the message stays readable; keep what is allowed."""
    def cut(m: re.Match[str]) -> str:
        text = m.group()
        if text.isdigit():
            return f"{text[:20]}…({len(text)} digits)"
        return f"{text[:60]}…{text[-1]} ({len(text) - 2} characters)"

    short = _LONG_VALUE_RE.sub(cut, message)
    return short if len(short) <= 1000 else short[:999] + "…"


def _number(name: str, text: str) -> int:
    # Only digits: ids never become file names, and "../x" or "1;DROP" are refused before any lookup.
    if not _NUMBER_RE.match(text):
        raise HttpError(400, f"{name} {text[:64]!r} is not a whole number")
    return int(text)


def _known(params: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(allowed) - set(IGNORED_KEYS))
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:5])
        raise HttpError(400, f"unknown parameter {shown}; allowed: {', '.join(allowed) or 'none'}")


def _single_values(parsed: dict[str, list[str]], what: str) -> dict[str, str]:
    repeated = [k for k, values in parsed.items() if len(values) > 1]
    if repeated:
        raise HttpError(400, f"{what} {repeated[0][:64]!r} is given more than once")
    return {k: values[0] for k, values in parsed.items()}


def _body_params(r: Request) -> dict[str, Any]:
    """The body as parameters: a JSON object or a form (application/x-www-form-urlencoded)."""
    body = r.read_body()
    if not body.strip():
        return {}
    kind = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if kind in ("application/json", ""):
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"the body is not valid JSON ({str(exc)[:120]}); send an object like "
                                 '{"input": "a red fox", "appId": "my_app", "numberOfImages": 1}') from None
        if not isinstance(data, dict):
            raise HttpError(400, f"the body must be a JSON object with input and appId, got {type(data).__name__}")
        return data
    if kind == "application/x-www-form-urlencoded":
        try:
            return dict(_single_values(parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False),
                                       "form field"))
        except UnicodeDecodeError:
            raise HttpError(400, "the form body is not valid UTF-8") from None
    raise HttpError(415, f"Content-Type {kind[:64]!r} is not supported; send application/json or "
                         "application/x-www-form-urlencoded")
