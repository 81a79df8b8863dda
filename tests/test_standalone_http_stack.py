"""Issue #11, the HTTP stack: requests that are not valid HTTP/1.1, idle and slow clients, and guessing secrets, each
from the adversarial review's reproduction, against the running service on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standalone_helpers import ALICE, USERS, Client, basic, load_service

from backend.config import Settings
from backend.standalone import asgi
from backend.standalone.asgi import MAX_HEADER_BYTES, MAX_TARGET_BYTES
from backend.standalone.http_api import BASE
from backend.standalone.server import StandaloneServer

TIMEOUT = 2.0  # the service's request timeout in these tests


@pytest.fixture(scope="module")
def service(onnx_bundle: Path) -> Any:
    return load_service(onnx_bundle)


@pytest.fixture
def server(tmp_path: Path, service: Any) -> Iterator[StandaloneServer]:
    settings = Settings().updated(data_dir=tmp_path / "data", users=USERS, port=0, threads=1,
                                  request_timeout=TIMEOUT)
    srv = StandaloneServer(settings, services=[service])
    srv.start()
    yield srv
    srv.close()


def _address(server: StandaloneServer) -> tuple[str, int]:
    host, port = server.socket.getsockname()[:2]
    return host, port


def _raw(server: StandaloneServer, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the service answers until it closes (or ``wait``)."""
    with socket.create_connection(_address(server), timeout=wait) as conn:
        conn.sendall(data)
        got = b""
        try:
            while chunk := conn.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        return got


def _probe(server: StandaloneServer) -> float:
    t0 = time.monotonic()
    reply = Client(server.url, timeout=5).get("is_available")
    assert reply.status == 200 and reply.data == {"isAvailable": True}
    return time.monotonic() - t0


def test_two_content_lengths_are_refused_and_nothing_is_smuggled(server: StandaloneServer) -> None:
    # Row 2: the first Content-Length used to be taken and the rest answered as a second request.
    hidden = f"GET {BASE}/is_available HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    head = (f"POST {BASE}/schedule HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: 2\r\nContent-Length: {2 + len(hidden)}\r\n\r\n").encode()
    answer = _raw(server, head + b"{}" + hidden)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Content-Length" in answer and b'"statuscode": 400' in answer


@pytest.mark.parametrize("length", ["\u00b2", "1_0", "+5", "0x10", "5, 6"])
def test_a_content_length_that_is_not_digits_is_400(server: StandaloneServer, length: str) -> None:
    # Row 3: "²" passed isdigit() and then failed int() with a 500.
    head = f"POST {BASE}/schedule HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n{{}}".encode()
    answer = _raw(server, head)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Content-Length" in answer
    assert _probe(server) < 1.0


def test_too_long_request_lines_and_headers(server: StandaloneServer) -> None:
    line = _raw(server, f"GET {BASE}/task/{'1' * (MAX_TARGET_BYTES + 10)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert line.startswith(b"HTTP/1.1 414 "), line[:200]
    headers = _raw(server, f"GET {BASE}/is_available HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           f"X-Big: {'a' * MAX_HEADER_BYTES}\r\n\r\n".encode())
    assert headers.startswith(b"HTTP/1.1 431 "), headers[:200]


def test_idle_and_slow_clients_are_bounded(server: StandaloneServer) -> None:
    # Row 4: 900 idle connections used to hold 925 threads, and the read timeout was per read.
    threads_before = threading.active_count()
    idle = [socket.create_connection(_address(server)) for _ in range(1000)]
    slow: list[socket.socket] = []
    stop = threading.Event()

    def drip() -> None:  # 50 clients sending their request head one byte every 0.2 s
        head = f"GET {BASE}/is_available HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        for i in range(len(head)):
            for conn in slow:
                try:
                    conn.send(head[i:i + 1])
                except OSError:
                    pass
            if stop.wait(0.2):
                return

    slow.extend(socket.create_connection(_address(server)) for _ in range(50))
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        time.sleep(0.5)
        probes = [_probe(server) for _ in range(5)]
        assert max(probes) < 1.0, probes
        assert threading.active_count() - threads_before < 40, "threads grow with connections"
        # Within the request timeout (plus the loop's slack) every idle and slow connection is closed.
        time.sleep(TIMEOUT + 1.0)
        for conn in [*idle[::50], *slow[::5]]:
            conn.settimeout(2.0)
            assert conn.recv(1) == b"", "a connection outlived the request timeout"
        assert _probe(server) < 1.0
    finally:
        stop.set()
        for conn in idle + slow:
            conn.close()
    print(f"\n1000 idle + 50 slow connections: probe max {max(probes) * 1000:.0f} ms, "
          f"threads {threading.active_count()} (before {threads_before})")


def test_a_body_that_does_not_arrive_in_time_is_408(server: StandaloneServer) -> None:
    head = (f"POST {BASE}/schedule HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {basic(*ALICE)}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input\"").encode()
    t0 = time.monotonic()
    answer = _raw(server, head, wait=TIMEOUT * 3)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within" in answer, answer
    assert time.monotonic() - t0 < TIMEOUT * 2
    assert server.manager.store.find() == []


def test_failed_logins_are_slowed_down_and_good_ones_are_not(server: StandaloneServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Row 5: 3,000 wrong tokens on one connection were all answered in 0.48 s.
    monkeypatch.setattr(asgi, "FAILURE_DELAY", 0.02)
    monkeypatch.setattr(asgi, "MAX_FAILURE_DELAY", 0.1)
    client = Client(server.url, "Bearer wrong-token-guess-0000")
    t0 = time.monotonic()
    for _ in range(20):
        assert client.get("tasks/app/x").status == 401
    wanted = sum(min(0.1, 0.02 * k) for k in range(20))
    assert time.monotonic() - t0 >= wanted
    t1 = time.monotonic()
    assert Client(server.url, basic(*ALICE)).get("tasks/app/x").status == 200
    assert time.monotonic() - t1 < 0.5, "a right secret is not held back"
