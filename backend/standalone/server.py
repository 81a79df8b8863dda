"""``text2image serve --standalone``: the task service on uvicorn (HTTP parsed by h11) with bounded connections,
threads and time per request.

Listens at once and loads the model in the background (``is_available`` says false until it is ready; schedules
meanwhile answer 412 with the reason). SIGTERM or Ctrl-C stop it cleanly: a task being made goes back to the queue
and runs after the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.config import Settings
from backend.standalone.auth import LOCAL_USER, Credentials, RateLimiter
from backend.standalone.http_api import BASE, Api
from backend.standalone.manager import TaskManager
from runtime.errors import T2IError

if TYPE_CHECKING:
    from backend.tasks.service import ImageService

log = logging.getLogger("text2image.standalone")

#: Seconds an idle keep-alive connection stays open after its last answer.
KEEP_ALIVE_SECONDS = 5
#: The longest request line (with the query) and header block accepted; longer ones answer 414 / 431.
MAX_HEAD_BYTES = 16 * 1024


def _protocol_class(request_timeout: float) -> type:
    """uvicorn's h11 protocol, with two additions: a connection that has not sent a whole request head within
    ``request_timeout`` seconds (of opening, or of its last answer) is closed, so idle and slow clients cannot
    pile up; and a request that is not valid HTTP gets an OCS error that says what is wrong."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(request_timeout, self._expire)

        def _expire(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()  # no request under way: an idle or a slow-dripping client

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._deadline = self.loop.call_later(request_timeout, self._expire)

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
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
            meta = {"status": "failure", "statuscode": status, "message": text}
            body = json.dumps({"ocs": {"meta": meta, "data": {"message": text}}}).encode()
            headers = [(b"content-type", b"application/json; charset=utf-8"), (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body),
                              h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # the connection broke mid-answer: nothing more to say
                pass
            self.transport.close()

    return BoundedH11


def _server_class() -> type:
    """uvicorn's server without its signal handling: :func:`serve` handles SIGTERM and Ctrl-C itself, so that a
    clean stop exits 0 (uvicorn raises the signal again once stopped)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


class StandaloneServer:
    """The HTTP API, the task manager and the model workers for one data directory.

    ``services``: already loaded :class:`ImageService` objects (tests); without them :meth:`load_models` loads
    ``workers`` services from the configured model. Port 0 picks a free port (see :attr:`url`).
    """

    def __init__(self, settings: Settings, services: list[ImageService] | None = None,
                 sync_budget: float = 0.0) -> None:
        try:
            import uvicorn

            from backend.standalone.asgi import AsgiApp
        except ImportError as exc:
            raise T2IError(f"the standalone service needs {exc.name}, which comes with its extra: pip install "
                           "'text2image-sd2[nextcloud]'") from None

        if settings.runtime.workers < 1:
            raise T2IError(f"workers {settings.runtime.workers} is not allowed; use 1 or more")
        self.settings = settings
        st = settings.standalone
        self.credentials_file: Path | None = None
        if st.users.strip():
            self.credentials = Credentials.parse(st.users)
        else:
            self.credentials, self.credentials_file = Credentials.local(st.data_dir)
        self.manager = TaskManager(st.data_dir, st.task_max_age_days, services or ())
        self.api = Api(self.manager, self.credentials, RateLimiter(st.rate_limit, st.rate_window), sync_budget)
        try:
            self.socket = socket.create_server((st.host, st.port), backlog=1024)
        except OSError as exc:
            self.manager.close()
            raise T2IError(f"cannot listen on {st.host}:{st.port}: {exc.strerror}; choose another --port or stop "
                           "what uses it") from None
        config = uvicorn.Config(
            AsgiApp(self.api, st.request_timeout), http=_protocol_class(st.request_timeout), lifespan="off",
            limit_concurrency=st.max_connections, timeout_keep_alive=KEEP_ALIVE_SECONDS,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES, log_level="warning", access_log=False,
            server_header=False, date_header=True, timeout_graceful_shutdown=5)
        self.uvicorn = _server_class()(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}{BASE}"

    def load_models(self) -> None:
        """Load ``workers`` image services (the thread cap split between them) and hand them to the
        manager. A failure is logged and shown in 412 answers; the service stays up."""
        from backend.tasks.service import ImageService

        s = self.settings
        threads = s.threads_per_worker(s.runtime.workers)
        try:
            for _ in range(s.runtime.workers):
                service = ImageService(s.updated(threads=threads))
                service.load()
                self.manager.add_service(service)
                log.info("model %s ready (%d threads)", service.model_name, threads)
        except Exception as exc:
            if not isinstance(exc, T2IError):
                log.exception("loading the model failed")
            self.api.unavailable_reason = f"the model could not be loaded ({exc}); see the service log"
            log.error("the model could not be loaded: %s", exc)

    def run(self) -> None:
        """Serve in this thread until :meth:`stop` (or, in the main thread, SIGTERM / Ctrl-C)."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> None:
        """Serve in a background thread (for tests and embedding); :meth:`close` stops it."""
        self._thread = threading.Thread(target=self.run, name="t2i-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            self._thread.join(0.01)

    def close(self) -> None:
        """Stop answering, put a running task back in the queue, release the data directory."""
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.socket.close()
        self.manager.close()


def serve(host: str | None = None, port: int | None = None, workers: int | None = None,
          data_dir: Path | None = None, sync_budget: float = 0.0) -> None:
    """Run the standalone service until SIGTERM or Ctrl-C. Unset arguments come from ``T2I_*`` settings."""
    settings = Settings.from_env(host=host, port=port, workers=workers, data_dir=data_dir)
    server = StandaloneServer(settings, sync_budget=sync_budget)
    st = settings.standalone
    log.info("listening on %s (tasks in %s; web page at %s/); at most %d connections, %g s per request head "
             "and body", server.url, st.data_dir, server.url.split(BASE)[0], st.max_connections, st.request_timeout)
    if server.credentials_file:
        log.info("no users configured (T2I_USERS): user '%s' with the token in %s", LOCAL_USER,
                 server.credentials_file)
    def stop(*_: Any) -> None:
        server.uvicorn.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=server.load_models, name="t2i-load", daemon=True).start()
    try:
        server.run()
    finally:
        log.info("stopping")
        server.close()
