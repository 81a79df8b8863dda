"""``text2image serve --standalone``: the task service on the standard library's threading HTTP server.

Listens at once and loads the model in the background (``is_available`` says false until it is ready; schedules
meanwhile answer 412 with the reason). SIGTERM or Ctrl-C stop it cleanly: a task being made goes back to the queue
and runs after the next start.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.config import Settings
from backend.standalone.auth import LOCAL_USER, Credentials, RateLimiter
from backend.standalone.http_api import BASE, MAX_BODY_BYTES, Api, HttpError, Request, Response, error
from backend.standalone.manager import TaskManager
from runtime.errors import T2IError

if TYPE_CHECKING:
    from backend.tasks.service import ImageService

log = logging.getLogger("text2image.standalone")

#: A body over the limit is still read (and dropped) up to this size, so the client gets to see the 413.
DRAIN_BYTES = 16 * 1024 * 1024
#: How often the HTTP loop looks for a stop request (a stop takes at most this long).
POLL_SECONDS = 0.05


class StandaloneServer:
    """The HTTP API, the task manager and the model workers for one data directory.

    ``services``: already loaded :class:`ImageService` objects (tests); without them :meth:`load_models` loads
    ``settings.workers`` services from ``settings.model``. Port 0 picks a free port (see :attr:`url`).
    """

    def __init__(self, settings: Settings, services: list[ImageService] | None = None,
                 sync_budget: float = 0.0) -> None:
        if settings.workers < 1:
            raise T2IError(f"workers {settings.workers} is not allowed; use 1 or more")
        self.settings = settings
        self.credentials_file: Path | None = None
        if settings.users.strip():
            self.credentials = Credentials.parse(settings.users)
        else:
            self.credentials, self.credentials_file = Credentials.local(settings.data_dir)
        self.manager = TaskManager(settings.data_dir, settings.task_max_age_days, services or ())
        limiter = RateLimiter(settings.rate_limit, settings.rate_window)
        self.api = Api(self.manager, self.credentials, limiter, sync_budget)
        try:
            self.httpd = _Server((settings.host, settings.port), _Handler)
        except OSError as exc:
            self.manager.close()
            raise T2IError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}; choose another "
                           "--port or stop what uses it") from None
        self.httpd.api = self.api
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.socket.getsockname()[:2]
        return f"http://{host}:{port}{BASE}"

    def load_models(self) -> None:
        """Load ``settings.workers`` image services (the thread cap split between them) and hand them to the
        manager. A failure is logged and shown in 412 answers; the service stays up."""
        from backend.tasks.service import ImageService
        from runtime.engines import default_threads

        s = self.settings
        threads = max(1, (s.threads or default_threads()) // s.workers)
        try:
            for _ in range(s.workers):
                service = ImageService(replace(s, threads=threads))
                service.load()
                self.manager.add_service(service)
                log.info("model %s ready (%d threads)", service.model_name, threads)
        except Exception as exc:
            if not isinstance(exc, T2IError):
                log.exception("loading the model failed")
            self.api.unavailable_reason = f"the model could not be loaded ({exc}); see the service log"
            log.error("the model could not be loaded: %s", exc)

    def start(self) -> None:
        """Serve in a background thread (for tests and embedding); :meth:`close` stops it."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(POLL_SECONDS,), name="t2i-http",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop answering, put a running task back in the queue, release the data directory."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.manager.close()


def serve(host: str | None = None, port: int | None = None, workers: int | None = None,
          data_dir: Path | None = None, sync_budget: float = 0.0) -> None:
    """Run the standalone service until SIGTERM or Ctrl-C. Unset arguments come from ``T2I_*`` settings."""
    settings = Settings.from_env(host=host, port=port, workers=workers, data_dir=data_dir)
    server = StandaloneServer(settings, sync_budget=sync_budget)
    log.info("listening on %s (tasks in %s)", server.url, settings.data_dir)
    if server.credentials_file:
        log.info("no users configured (T2I_USERS): user '%s' with the token in %s", LOCAL_USER,
                 server.credentials_file)
    # shutdown() waits for serve_forever to return, so it must run outside the thread that serves.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.httpd.shutdown, daemon=True).start())
    threading.Thread(target=server.load_models, name="t2i-load", daemon=True).start()
    try:
        server.httpd.serve_forever(POLL_SECONDS)
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping")
        server.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops connections when many clients arrive at once.
    request_queue_size = 128
    api: Api


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "text2image-sd2"
    sys_version = ""
    timeout = 60  # seconds a client may stall mid-request before its connection is closed
    # Headers and body leave in two writes; with Nagle, a keep-alive client would wait ~40 ms on each answer.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        try:
            response = self.server.api.handle(Request(method, self.path, self.headers, self._read_body))
        except HttpError as exc:
            response = error(exc.status, exc.message, exc.headers)
        except Exception:
            log.exception("unexpected error answering %s %s", method, self.path[:200])
            response = error(500, "internal error; the administrator can find the details in the service log")
        if not self._body_read and self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True  # an unread body would be taken for the next request
        self._send(response)

    def _read_body(self) -> bytes:
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HttpError(411, "send the body with a Content-Length header; chunked bodies are not accepted")
        raw = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw.isdigit():
            self.close_connection = True
            raise HttpError(400, f"Content-Length {raw[:32]!r} is not a number")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            if length <= DRAIN_BYTES:
                self._drain(length)
            raise HttpError(413, f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are allowed")
        return self.rfile.read(length)

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                return
            length -= len(chunk)

    def _send(self, response: Response) -> None:
        try:
            self.send_response(response.status)
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
