"""The standalone service as an ASGI application (served by uvicorn, see :mod:`backend.standalone.server`).

It answers only to its own host names (DNS rebinding), reads a request's body within limits (size, time), hands the
request to :class:`~backend.standalone.http_api.Api` on a bounded pool of threads (the task store is SQLite, and a
short task may be generated before the answer), bounds and slows down failed logins from one address, serves the web
page at ``/``, and puts the security headers on every answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse

from backend.http_server import SECURITY_HEADERS, address_key, host_allowed
from backend.standalone.http_api import MAX_BODY_BYTES, Api, HttpError, Request, Response, error

log = logging.getLogger("text2image.standalone")

#: A body over the limit is still read (and dropped) up to this size, so the client gets to see the 413.
DRAIN_BYTES = 16 * 1024 * 1024
#: The longest path with query, and the most header bytes, a request may have (h11 bounds them only while a head is
#: incomplete).
MAX_TARGET_BYTES = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
#: Requests answered at once; more wait for a free thread (each holds a thread while the store or a model works).
API_THREADS = 16
#: Failed logins one address may make within FAILURE_WINDOW seconds; beyond them a request with credentials is
#: answered 429 without checking them, however many connections it comes on.
FAILURE_WINDOW = 60.0
FAILURE_BUDGET = 30
#: Each recent failure adds this much delay to the next 401 answer, up to MAX_FAILURE_DELAY seconds.
FAILURE_DELAY = 0.1
MAX_FAILURE_DELAY = 2.0
PAGE_DIR = Path(__file__).with_name("page")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/page/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/page/style.css": ("style.css", "text/css; charset=utf-8")}
#: The page loads nothing from elsewhere, runs only its own script, and may not be framed.
PAGE_HEADERS = {**SECURITY_HEADERS,
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; connect-src 'self' blob:; "
                                           "frame-ancestors 'none'",
                "Cache-Control": "no-cache"}


class LoginThrottle:
    """Recent failed logins per client address: each makes the next 401 to that address come later, and
    :data:`FAILURE_BUDGET` of them stop the address's logins until the oldest leaves the window.

    Used from the event loop only, so checking and recording need no lock: parallel requests see each other's
    failures."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float]:
        recent = self._failures.setdefault(address, deque())
        while recent and recent[0] <= now - FAILURE_WINDOW:
            recent.popleft()
        return recent

    def wait(self, address: str) -> float:
        """Seconds until ``address`` may try to log in again; 0 when it may now."""
        now = time.monotonic()
        recent = self._recent(address, now)
        return recent[0] + FAILURE_WINDOW - now if len(recent) >= FAILURE_BUDGET else 0.0

    def delay(self, address: str) -> float:
        """Record a failure from ``address``; return how long to hold its answer."""
        now = time.monotonic()
        recent = self._recent(address, now)
        recent.append(now)
        if len(self._failures) > 10_000:  # forget addresses that stopped failing
            for key in [k for k, v in self._failures.items() if not v or v[-1] <= now - FAILURE_WINDOW]:
                del self._failures[key]
        return min(MAX_FAILURE_DELAY, FAILURE_DELAY * (len(recent) - 1))


class AsgiApp:
    """The API under ``BASE`` and the web page, as one ASGI callable. ``hosts``: the names a request's Host may
    carry besides IP addresses (None: any; see :func:`backend.http_server.host_names`)."""

    def __init__(self, api: Api, body_timeout: float, hosts: frozenset[str] | None = None) -> None:
        self.api, self.body_timeout, self.hosts = api, body_timeout, hosts
        self.limiter = anyio.CapacityLimiter(API_THREADS)
        self.throttle = LoginThrottle()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # uvicorn runs without lifespan events; there are no websockets
            return
        request = StarletteRequest(scope, receive)
        address = address_key(str((scope.get("client") or ("?", 0))[0]))
        auth = request.headers.get("Authorization")
        delay = 0.0
        host = request.headers.get("Host", "")
        if not host_allowed(host, self.hosts):
            reply = error(400, f"Host {host[:100]!r} is not a name of this service; the administrator can allow it "
                               "in T2I_ALLOWED_HOSTS", {"Connection": "close"})
        elif auth and (wait := self.throttle.wait(address)):
            reply = error(429, f"too many failed logins from your address: at most {FAILURE_BUDGET} per "
                               f"{FAILURE_WINDOW:g} s; try again in {math.ceil(wait)} s",
                          {"Retry-After": str(math.ceil(wait))})
        else:
            if auth and self.api.credentials.authenticate(auth) is None:
                delay = self.throttle.delay(address)  # recorded before any await: parallel guesses count at once
            page = PAGE_FILES.get(scope["path"])
            try:
                if page and scope["method"] in ("GET", "HEAD"):
                    reply = Response(200, (PAGE_DIR / page[0]).read_bytes(), page[1], dict(PAGE_HEADERS))
                else:
                    reply = await self._api(request, scope)
            except ClientDisconnect:  # gone mid-body: there is no one to answer
                log.debug("%s %s: the client disconnected before sending its body", scope["method"],
                          scope["path"][:200].encode("unicode_escape").decode())
                return
        if delay:
            await asyncio.sleep(delay)
        headers = {**SECURITY_HEADERS, **reply.headers}
        await StarletteResponse(reply.body, reply.status, headers, reply.content_type)(scope, receive, send)

    async def _api(self, request: StarletteRequest, scope: dict[str, Any]) -> Response:
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        try:
            if len(target) > MAX_TARGET_BYTES:
                raise HttpError(414, f"the request target is {len(target)} bytes; at most {MAX_TARGET_BYTES} are "
                                     "allowed")
            if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
                raise HttpError(431, f"the request headers are longer than {MAX_HEADER_BYTES} bytes")
            body = await self._body(request)
        except HttpError as exc:
            return error(exc.status, exc.message, {**exc.headers, "Connection": "close"})
        wrapped = Request(scope["method"], target.decode("latin-1"), request.headers, lambda: body)
        try:
            return await anyio.to_thread.run_sync(_answer, self.api, wrapped, limiter=self.limiter)
        except Exception:
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"][:200])
            return error(500, "internal error; the administrator can find the details in the service log")

    async def _body(self, request: StarletteRequest) -> bytes:
        """The whole body, read within :data:`MAX_BODY_BYTES` and ``body_timeout`` seconds."""
        headers = request.headers
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise HttpError(411, "send the body with a Content-Length header; chunked bodies are not accepted")
        length = int(headers.get("content-length") or 0)  # h11 has checked it is one number
        if length > MAX_BODY_BYTES:
            if length <= DRAIN_BYTES:
                await self._read(request, DRAIN_BYTES, keep=False)
            raise HttpError(413, f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are allowed")
        return await self._read(request, MAX_BODY_BYTES, keep=True)

    async def _read(self, request: StarletteRequest, most: int, keep: bool) -> bytes:
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > most:
                    break
                if keep:
                    chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {self.body_timeout:g} s") from None
        return b"".join(chunks)


def _answer(api: Api, request: Request) -> Response:
    try:
        return api.handle(request)
    except HttpError as exc:
        return error(exc.status, exc.message, exc.headers)
