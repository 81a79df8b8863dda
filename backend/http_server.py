"""The HTTP server under both services (the standalone task service and the Nextcloud ExApp): uvicorn, with HTTP
parsed by h11, and bounds on connections and time that one client cannot get around.

- A connection must send a whole request head within ``request_timeout`` seconds of opening, or of its last answer;
  idle and slow-dripping clients are closed.
- At most ``max_connections`` are open. From 90 % of that on, a new connection first closes the longest-idle
  keep-alive connections (no request under way), so idle sockets cannot lock other clients out; only when every
  connection is busy is the new one answered 503.
- At most ``per_address`` connections from one client address (0: no such cap; trusted proxies are exempt): the
  address's own idle connections make room for a new one, and if all of them are busy the new one gets 503.
- Every answer made here (400 for a request that is not valid HTTP, 503) is an OCS JSON error with the security
  headers of :data:`SECURITY_HEADERS`; a 503 says when to try again (``Retry-After``).
- Forwarded headers (``X-Forwarded-For``) are believed only from the configured trusted proxies.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar

from runtime.errors import ConfigError

#: Seconds an idle keep-alive connection stays open after its last answer.
KEEP_ALIVE_SECONDS = 5
#: The longest request line (with the query) and header block accepted; longer ones answer 414 / 431.
MAX_HEAD_BYTES = 16 * 1024
#: Share of ``max_connections`` from which a new connection closes idle ones first.
NEAR_FULL = 0.9
#: Seconds a client refused for lack of connections is asked to wait (``Retry-After``).
RETRY_AFTER = 5
#: Sent with every answer: browsers must not guess content types, frame the service, or keep task data.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "frame-ancestors 'none'",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class Limits:
    """What one server allows; see the module's description."""

    request_timeout: float
    max_connections: int
    #: Connections one client address may hold; 0 turns the cap off (e.g. the ExApp, whose client is Nextcloud).
    per_address: int = 0
    #: Proxies whose ``X-Forwarded-For`` is believed and whose connections are not capped per address.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=())

    def __post_init__(self) -> None:
        # Both services build their limits here: a zero cap would answer every request 503, a zero or NaN timeout
        # would close each connection before its head arrives.
        if not (isinstance(self.request_timeout, (int, float)) and math.isfinite(self.request_timeout)
                and self.request_timeout > 0):
            raise ConfigError(f"T2I_REQUEST_TIMEOUT {self.request_timeout} is not allowed; use a number of seconds "
                              "above 0")
        if self.max_connections < 1:
            raise ConfigError(f"T2I_MAX_CONNECTIONS {self.max_connections} is not allowed; use 1 or more")
        if self.per_address < 0:
            raise ConfigError(f"T2I_MAX_CONNECTIONS_PER_ADDRESS {self.per_address} is not allowed; use 0 (no cap) "
                              "or more")

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)


def address_key(host: str) -> str:
    """What counts as one client address: an IPv4 address, or an IPv6 /64 (one host's usual share, which it could
    otherwise spread its connections and guesses over)."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def parse_proxies(text: str, setting: str = "T2I_TRUSTED_PROXIES") -> tuple[Any, ...]:
    """``"10.0.0.1, 192.168.0.0/24"`` as networks; an entry that is no address or network raises :class:`T2IError`."""
    nets = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(f"{setting} entry {entry[:100]!r} is not an IP address or network; use addresses like "
                           "10.0.0.5 or networks like 10.0.0.0/8, separated by commas") from None
    return tuple(nets)


def host_names(text: str, bind_host: str, setting: str = "T2I_ALLOWED_HOSTS") -> frozenset[str] | None:
    """The host names a request's ``Host`` may carry besides IP addresses: those listed, ``localhost``, this
    machine's name and the bind address; None when the list has ``*`` (any)."""
    entries = [e.strip().lower().rstrip(".") for e in text.split(",") if e.strip()]
    if "*" in entries:
        return None
    for entry in entries:
        if not _HOST_RE.match(entry):
            raise ConfigError(f"{setting} entry {entry[:100]!r} is not a host name; list names like t2i.example.org "
                           "(no scheme, port or path), separated by commas, or * for any")
    machine = socket.gethostname().lower()
    return frozenset({"localhost", machine, machine.split(".")[0], bind_host.lower(), *entries})


def host_allowed(header: str, names: frozenset[str] | None) -> bool:
    """Whether a ``Host`` header names this service: an IP address (a DNS-rebinding page cannot send one) or one
    of ``names``. An empty header (HTTP/1.0) passes."""
    host = header.strip().lower()
    if names is None or not host:
        return True
    if host.startswith("["):  # [v6]:port
        host = host[1:host.find("]")] if "]" in host else "?"
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in names


def ocs_error(status: int, message: str) -> bytes:
    """The OCS v2 error envelope the services answer with, as JSON bytes."""
    meta = {"status": "failure", "statuscode": status, "message": message}
    return json.dumps({"ocs": {"meta": meta, "data": {"message": message}}}, ensure_ascii=False).encode()


def _head(status: int, body: bytes, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body)),
               "Connection": "close", **SECURITY_HEADERS, **extra}
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def server_options(limits: Limits) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run`` that apply ``limits``."""
    trusted = [str(net) for net in limits.trusted_proxies]
    return {"http": protocol_class(limits), "timeout_keep_alive": KEEP_ALIVE_SECONDS,
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES, "proxy_headers": bool(trusted),
            "forwarded_allow_ips": trusted or [], "server_header": False, "date_header": True,
            "access_log": False}


def protocol_class(limits: Limits) -> type:
    """uvicorn's h11 protocol with the bounds of the module's description."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11(H11Protocol):
        #: Open connections by client address (those that are capped per address).
        by_address: ClassVar[dict[str, set[BoundedH11]]] = {}

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._deadline = self.loop.call_later(limits.request_timeout, self._expire)
            host = self.client[0] if self.client else ""  # no address on a unix socket
            self._address = address_key(host) if host and limits.per_address and not limits.trusts(host) else ""
            refusal = ""
            if self._address:
                peers = self.by_address.setdefault(self._address, set())
                peers.add(self)
                if not self._make_room(peers, limits.per_address):
                    refusal = (f"too many connections from your address: at most {limits.per_address} at once; "
                               "finish or close some")
            if not refusal and not self._make_room(self.connections, int(limits.max_connections * NEAR_FULL)):
                if self._open(self.connections) > limits.max_connections:
                    refusal = f"the service is at its limit of {limits.max_connections} connections"
            if refusal:
                self._refuse(f"{refusal}; try again in {RETRY_AFTER} s")

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        @staticmethod
        def _open(group: set[Any]) -> int:
            return sum(1 for p in group if not p.transport.is_closing())

        def _make_room(self, group: set[Any], most: int) -> bool:
            """Close the longest-idle other connections of ``group`` until at most ``most`` are open; whether that
            was possible."""
            excess = self._open(group) - most
            if excess <= 0:
                return True
            idle = sorted((p for p in group if p is not self and p._idle() and not p.transport.is_closing()),
                          key=lambda p: p._idle_since)
            for peer in idle[:excess]:
                peer.transport.close()
            return len(idle) >= excess

        def _refuse(self, message: str) -> None:
            body = ocs_error(503, message)
            head = _head(503, body, {"Retry-After": str(RETRY_AFTER)})
            lines = [b"HTTP/1.1 503 Service Unavailable", *(k + b": " + v for k, v in head)]
            self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            self.transport.close()

        def _expire(self) -> None:
            if self._idle():
                self.transport.close()  # no request under way: an idle or a slow-dripping client

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = self.loop.time()
            self._deadline.cancel()
            self._deadline = self.loop.call_later(limits.request_timeout, self._expire)

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            if self._address:
                peers = self.by_address.get(self._address, set())
                peers.discard(self)
                if not peers:
                    self.by_address.pop(self._address, None)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            problem = sys.exc_info()[1]  # called from uvicorn's handler of h11's RemoteProtocolError
            status = getattr(problem, "error_status_hint", 400)
            head = self.conn.trailing_data[0][:MAX_HEAD_BYTES + 2]
            if status == 431 and b"\r\n" not in head:
                status, text = 414, f"the request line is longer than {MAX_HEAD_BYTES} bytes"
            elif status == 431:
                text = f"the request headers are longer than {MAX_HEAD_BYTES} bytes"
            else:
                text = f"the request is not valid HTTP/1.1: {problem or msg}"
            body = ocs_error(status, text)
            try:
                for event in (h11.Response(status_code=status, headers=_head(status, body, {}),
                                           reason=HTTPStatus(status).phrase.encode()),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # the connection broke mid-answer: nothing more to say
                pass
            self.transport.close()

    return BoundedH11


def server_class() -> type:
    """uvicorn's server without its signal handling, for a caller that handles SIGTERM and Ctrl-C itself (so that
    a clean stop exits 0; uvicorn raises the signal again once stopped)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server
