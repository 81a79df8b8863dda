"""Issue #14, the HTTP layer of the standalone service: one address cannot lock others out with idle connections,
failed logins are bounded per address (forwarded headers believed only from a configured proxy), a client that
leaves mid-body writes no traceback, and every answer carries the security headers and names a known host. Each
test is the adversarial review's reproduction, on raw sockets against the running service on loopback."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from standalone_helpers import ALICE, USERS, Client, basic, load_service, wait_until

from backend.config import Settings
from backend.http_server import RETRY_AFTER, address_key
from backend.standalone import asgi
from backend.standalone.http_api import BASE
from backend.standalone.server import StandaloneServer
from runtime.errors import T2IError

WRONG = basic("alice", "wrong-guess-00000")


@pytest.fixture(scope="module")
def service(onnx_bundle: Path) -> Any:
    return load_service(onnx_bundle)


@contextmanager
def serving(tmp_path: Path, service: Any, **settings: Any) -> Iterator[StandaloneServer]:
    srv = StandaloneServer(Settings().updated(data_dir=tmp_path / "data", users=USERS, port=0, threads=1,
                                              **settings), services=[service])
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def _connect(server: StandaloneServer, source: str = "127.0.0.1") -> socket.socket:
    """A connection from ``source`` (any 127.x.y.z is this machine, and another client address to the service)."""
    conn = socket.socket()
    conn.settimeout(10)
    conn.bind((source, 0))
    conn.connect(server.socket.getsockname()[:2])
    return conn


def _request(path: str, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _answer(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Everything until the service closes: status, headers (lower-case names), body."""
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    conn.close()
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _ask(server: StandaloneServer, data: bytes, source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn = _connect(server, source)
    conn.sendall(data)
    return _answer(conn)


def _busy(server: StandaloneServer) -> int:
    """Connections with a request under way (here: waiting for the rest of a body)."""
    return sum(1 for p in server.uvicorn.server_state.connections if p.cycle and not p.cycle.response_complete)


def _assert_secure(headers: dict[str, str], what: str) -> None:
    assert headers.get("x-content-type-options") == "nosniff", (what, headers)
    assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), (what, headers)
    assert headers.get("cache-control") == "no-store", (what, headers)


def test_idle_sockets_from_one_address_do_not_lock_others_out(tmp_path: Path, service: Any) -> None:
    # Item 6: idle sockets counted toward T2I_MAX_CONNECTIONS, so one client could make the service answer 503 to
    # everyone.
    with serving(tmp_path, service, max_connections=40, max_connections_per_address=10, request_timeout=30) as srv:
        idle = [_connect(srv) for _ in range(60)]
        try:
            time.sleep(0.5)  # let the service accept them all
            status, _, body = _ask(srv, _request(f"{BASE}/is_available"), source="127.0.0.2")
            assert status == 200 and json.loads(body)["ocs"]["data"] == {"isAvailable": True}, body
            for conn in idle:
                conn.settimeout(0.01)
            closed = sum(1 for conn in idle if _closed(conn))
            assert closed >= 50, f"only {closed} of one address's 60 idle connections were closed"
        finally:
            for conn in idle:
                conn.close()


def _closed(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False


def test_when_every_connection_is_busy_the_503_is_ocs_with_retry_after(tmp_path: Path, service: Any) -> None:
    with serving(tmp_path, service, max_connections=20, max_connections_per_address=10, request_timeout=30) as srv:
        slow_body = _request(f"{BASE}/schedule", method="POST", body=b"{" * 100)[:-90]
        busy = []
        try:
            for source in ("127.0.0.1", "127.0.0.3"):
                for _ in range(10):
                    busy.append(_connect(srv, source))
                    busy[-1].sendall(slow_body)
                wait_until(lambda: _busy(srv) == len(busy), 10, what="the requests to be under way")
            for source, words in [("127.0.0.1", "too many connections from your address: at most 10"),
                                  ("127.0.0.2", "at its limit of 20 connections")]:
                status, headers, body = _answer(_connect(srv, source))
                assert status == 503 and headers["retry-after"] == str(RETRY_AFTER), (status, headers)
                assert headers["content-type"].startswith("application/json")
                meta = json.loads(body)["ocs"]["meta"]
                assert meta["statuscode"] == 503 and words in meta["message"], meta
                _assert_secure(headers, "503")
        finally:
            for conn in busy:
                conn.close()


def test_a_rotating_forwarded_for_does_not_reset_the_login_budget(tmp_path: Path, service: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Item 7: from loopback, uvicorn believed X-Forwarded-For, so each guess came from a "new" address.
    monkeypatch.setattr(asgi, "FAILURE_BUDGET", 5)
    monkeypatch.setattr(asgi, "FAILURE_DELAY", 0.0)
    with serving(tmp_path, service) as srv:
        statuses = [_ask(srv, _request(f"{BASE}/tasks/app/x", f"Authorization: {WRONG}",
                                       f"X-Forwarded-For: 10.0.{i}.1"))[0] for i in range(8)]
        assert statuses == [401] * 5 + [429] * 3, statuses
        status, headers, body = _ask(srv, _request(f"{BASE}/tasks/app/x", f"Authorization: {basic(*ALICE)}"))
        assert status == 429 and int(headers["retry-after"]) >= 1, (status, headers)
        assert "too many failed logins from your address: at most 5 per 60 s" in json.loads(body)["ocs"]["meta"][
            "message"]
        # Without credentials nothing is checked, so nothing is refused.
        assert Client(srv.url).get("is_available").status == 200


def test_a_configured_proxy_names_the_client(tmp_path: Path, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "FAILURE_BUDGET", 2)
    monkeypatch.setattr(asgi, "FAILURE_DELAY", 0.0)
    with serving(tmp_path, service, trusted_proxies="127.0.0.0/8") as srv:
        guess = [f"Authorization: {WRONG}", "X-Forwarded-For: 203.0.113.7"]
        assert [_ask(srv, _request(f"{BASE}/tasks/app/x", *guess))[0] for _ in range(3)] == [401, 401, 429]
        other = _request(f"{BASE}/tasks/app/x", f"Authorization: {basic(*ALICE)}", "X-Forwarded-For: 203.0.113.8")
        assert _ask(srv, other)[0] == 200


def test_parallel_guesses_from_one_address_are_bounded(tmp_path: Path, service: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Item 7: 200 parallel connections from one throttled address made 97 guesses/s; the slowdown alone does not
    # bound guesses that are already waiting.
    monkeypatch.setattr(asgi, "FAILURE_BUDGET", 10)
    monkeypatch.setattr(asgi, "FAILURE_DELAY", 0.01)
    with serving(tmp_path, service, max_connections_per_address=100) as srv:
        conns = [_connect(srv) for _ in range(60)]
        for conn in conns:
            conn.sendall(_request(f"{BASE}/tasks/app/x", f"Authorization: {WRONG}"))
        statuses = Counter(_answer(conn)[0] for conn in conns)
        assert statuses == Counter({401: 10, 429: 50}), statuses


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_a_client_leaving_mid_body_writes_no_traceback(tmp_path: Path, service: Any) -> None:
    # Item 10: each such request logged a 30-line "Exception in ASGI application" traceback, unauthenticated.
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "text2image")]
    with serving(tmp_path, service) as srv:
        for logger in loggers:
            logger.addHandler(collect)
        try:
            for _ in range(5):
                conn = _connect(srv)
                conn.sendall(_request(f"{BASE}/schedule", method="POST", body=b"x" * 1000)[:-990])
                conn.close()
            wait_until(lambda: _busy(srv) == 0, 10, what="the requests to end")
            assert Client(srv.url).get("is_available").status == 200
        finally:
            for logger in loggers:
                logger.removeHandler(collect)
    text = "\n".join(collect.lines)
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]


def test_every_answer_carries_the_security_headers(tmp_path: Path, service: Any) -> None:
    # Item 11: API and image answers had none of the page's headers (nosniff, frame-ancestors, no-store).
    with serving(tmp_path, service) as srv:
        alice = Client(srv.url, basic(*ALICE))
        task = alice.schedule(steps=1).data["task"]["id"]
        wait_until(lambda: alice.get(f"task/{task}").data["task"]["status"] == 3, 60, what="the task")
        replies = {"json": alice.get(f"task/{task}"), "image": alice.get(f"task/{task}/image/0"),
                   "404": alice.get("task/999"), "405": alice.post("is_available"),
                   "401": Client(srv.url, WRONG).get("tasks/app/x"), "400": alice.get("task/x")}
        assert replies["image"].headers["content-type"] == "image/png"
        for what, reply in replies.items():
            assert reply.status in (200, 400, 401, 404, 405), (what, reply)
            _assert_secure(reply.headers, what)
        status, headers, _ = _ask(srv, _request(f"{BASE}/schedule", "Content-Length: 1_0", method="POST"))
        assert status == 400
        _assert_secure(headers, "400 for a request that is not HTTP/1.1")
        page = Client(srv.url).get("/")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["cache-control"] == "no-cache"


def test_the_host_header_must_name_the_service(tmp_path: Path, service: Any) -> None:
    # Item 11: any Host was answered, so a page on a DNS-rebinding name could talk to the service.
    with serving(tmp_path, service) as srv:
        port = srv.socket.getsockname()[1]
        client = Client(srv.url, basic(*ALICE))
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            for path in ("is_available", "/"):
                reply = client.get(path, headers={"Host": host})
                assert reply.status == 400, (host, path, reply)
                assert f"Host {host!r} is not a name of this service" in reply.message
                assert "T2I_ALLOWED_HOSTS" in reply.message
                _assert_secure(reply.headers, "400 for a host")
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LocalHost.", f"[::1]:{port}",
                     "192.0.2.10", socket.gethostname()):
            assert client.get("is_available", headers={"Host": host}).status == 200, host
    with serving(tmp_path, service, allowed_hosts="t2i.example.org, other.example") as srv:
        client = Client(srv.url, basic(*ALICE))
        assert client.get("is_available", headers={"Host": "t2i.example.org:443"}).status == 200
        assert client.get("is_available", headers={"Host": "evil.example"}).status == 400
    with serving(tmp_path, service, allowed_hosts="*") as srv:
        assert Client(srv.url).get("is_available", headers={"Host": "evil.example"}).status == 200


@pytest.mark.parametrize("setting, words", [
    ({"allowed_hosts": "https://t2i.example.org"}, "T2I_ALLOWED_HOSTS entry 'https://t2i.example.org' is not a host"),
    ({"allowed_hosts": "t2i.example.org:8765"}, "(no scheme, port or path)"),
    ({"trusted_proxies": "10.0.0.1, proxy.lan"}, "T2I_TRUSTED_PROXIES entry 'proxy.lan' is not an IP address"),
    ({"max_connections_per_address": -1}, "T2I_MAX_CONNECTIONS_PER_ADDRESS -1 is not allowed; use 0 (no cap)"),
    ({"max_connections": 0}, "T2I_MAX_CONNECTIONS 0 is not allowed; use 1 or more"),
    ({"request_timeout": 0.0}, "T2I_REQUEST_TIMEOUT 0.0 is not allowed; use a number of seconds above 0"),
    ({"request_timeout": float("nan")}, "T2I_REQUEST_TIMEOUT nan is not allowed"),
])
def test_bad_http_settings_are_named(tmp_path: Path, setting: dict[str, Any], words: str) -> None:
    with pytest.raises(T2IError) as raised:
        StandaloneServer(Settings().updated(data_dir=tmp_path / "data", users=USERS, port=0, **setting))
    assert words in str(raised.value)


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    # One IPv6 host usually has a /64 to spread its connections and guesses over.
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("192.0.2.7") == "192.0.2.7"
    # An IPv4 client of a dual-stack socket (or behind a proxy that says so) is that IPv4 address, not one /64
    # shared by every IPv4 client.
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" != address_key("::ffff:192.0.2.8")
