"""The ExApp's HTTP server has the standalone service's bounds (issue #14, item 14): 1,500 idle connections and 10
half-sent request heads used to stay open for good. The real ``text2image serve`` process, small limits from the
environment, raw sockets."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from fake_nextcloud import ExAppProcess, FakeNextcloud

TIMEOUT = 1.0  # T2I_REQUEST_TIMEOUT in this test


def _ended(conn: socket.socket) -> bool:
    """Whether the ExApp has closed ``conn`` (whatever it answered first)."""
    try:
        while conn.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_and_half_sent_heads_are_closed(tmp_path: Path) -> None:
    fake = FakeNextcloud(version=32).start()
    fake.enabled = False  # nothing to load: only the HTTP side is under test
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": "nobody/no-model", "T2I_OFFLINE": "1",
                                                     "T2I_REQUEST_TIMEOUT": str(TIMEOUT),
                                                     "T2I_MAX_CONNECTIONS": "50"})
    conns: list[socket.socket] = []
    try:
        proc.start()
        fake.heartbeat()
        address = ("127.0.0.1", proc.port)
        conns += [socket.create_connection(address) for _ in range(200)]
        for _ in range(10):
            conns.append(socket.create_connection(address))
            conns[-1].sendall(b"GET /heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for path in ("/heartbeat", "/init"):  # clients that leave mid-body
            with socket.create_connection(address) as gone:
                gone.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n".encode()
                             + b"x" * 10)
        # Over the connection limit the idle ones make room: AppAPI is still answered.
        assert fake.call_exapp("GET", "/heartbeat", auth=False, timeout=5) == (200, {"status": "ok"})
        time.sleep(TIMEOUT + 1.0)
        end = time.monotonic() + 5.0  # the loop's slack, on a busy machine
        still_open = 0
        for conn in conns:
            conn.settimeout(max(0.01, end - time.monotonic()))
            still_open += not _ended(conn)
        assert still_open == 0, f"{still_open} of {len(conns)} connections outlived the request timeout"
        fake.heartbeat(timeout=5)
        assert proc.proc is not None and proc.proc.poll() is None
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        for conn in conns:
            conn.close()
        proc.stop()
        fake.stop()
