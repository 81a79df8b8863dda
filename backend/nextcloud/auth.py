"""AppAPI's authentication of the requests it sends the ExApp, checked by us rather than by nc_py_api.

nc_py_api 0.30's own check prints the secret it expected next to the one it got on every failed login (into the
container log) and compares them with ``!=``. Ours compares in constant time and logs only which check failed, never
the user part of a failed login (with user and secret swapped, it is the secret); the headers AppAPI sends are
``EX-APP-ID``, ``EX-APP-VERSION`` and ``AUTHORIZATION-APP-API: base64("<user>:<APP_SECRET>")``. ``/heartbeat`` is
open, as AppAPI calls it without them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import Any

log = logging.getLogger(__name__)

OPEN_PATHS = ("/heartbeat",)


def check(headers: dict[str, str], app_id: str, secret: str) -> str:
    """The user AppAPI acts for; raises ValueError saying which check failed (never with a secret in it)."""
    missing = [k for k in ("EX-APP-ID", "EX-APP-VERSION", "AUTHORIZATION-APP-API") if not headers.get(k)]
    if missing:
        raise ValueError(f"missing headers {', '.join(missing)}")
    if not hmac.compare_digest(headers["EX-APP-ID"].encode(), app_id.encode()):
        raise ValueError("wrong EX-APP-ID")
    try:
        decoded = base64.b64decode(headers["AUTHORIZATION-APP-API"], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("AUTHORIZATION-APP-API is not base64 of 'user:secret'") from None
    user, sep, given = decoded.partition(":")
    if not sep:  # the whole value may be a secret sent without its user: name nothing of it
        raise ValueError("AUTHORIZATION-APP-API holds no 'user:secret' pair")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        # The user part is never shown: with user and secret swapped it is the secret itself, and a secret can
        # look like any user id.
        raise ValueError("wrong app secret (the user part of the header is not shown)")
    return user


class AppAPIAuth:
    """Pure ASGI middleware: 401 for any request but ``/heartbeat`` that fails :func:`check`; the user goes into
    ``scope["username"]`` as nc_py_api's own middleware puts it."""

    def __init__(self, app: Any, app_id: str, secret: str) -> None:
        self.app, self._app_id, self._secret = app, app_id, secret

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").upper(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            scope["username"] = check(headers, self._app_id, self._secret)
        except ValueError as exc:
            log.warning("refused %s %s: %s", scope.get("method", ""), scope.get("path", "")[:200].encode(
                "unicode_escape").decode(), exc)
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)
