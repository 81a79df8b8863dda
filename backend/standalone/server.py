"""``text2image serve --standalone``: the task service on uvicorn (HTTP parsed by h11) with bounded connections,
threads and time per request (see :mod:`backend.http_server`).

Listens at once and loads the model in the background (``is_available`` says false until it is ready; schedules
meanwhile answer 412 with the reason). SIGTERM or Ctrl-C stop it cleanly: a task being made goes back to the queue
and runs after the next start.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.config import Settings
from backend.http_server import Limits, host_names, parse_proxies, server_class, server_options
from backend.standalone.auth import LOCAL_USER, Credentials, RateLimiter
from backend.standalone.http_api import BASE, Api
from backend.standalone.manager import TaskManager
from runtime.errors import ConfigError, T2IError

if TYPE_CHECKING:
    from backend.tasks.service import ImageService

log = logging.getLogger("text2image.standalone")


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
            raise ConfigError(f"the standalone service needs {exc.name}, which comes with its extra: pip install "
                           "'text2image-sd2[nextcloud]'") from None

        if settings.runtime.workers < 1:
            raise ConfigError(f"workers {settings.runtime.workers} is not allowed; use 1 or more")
        st, http = settings.standalone, settings.http
        limits = Limits(http.request_timeout, http.max_connections, st.max_connections_per_address,
                        parse_proxies(st.trusted_proxies))
        hosts = host_names(st.allowed_hosts, st.host)
        self.settings = settings
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
            raise ConfigError(f"cannot listen on {st.host}:{st.port}: {exc.strerror}; choose another --port or stop "
                           "what uses it") from None
        config = uvicorn.Config(AsgiApp(self.api, http.request_timeout, hosts), lifespan="off",
                                log_level="warning", timeout_graceful_shutdown=5, **server_options(limits))
        self.uvicorn = server_class()(config)
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
    st, http = settings.standalone, settings.http
    log.info("listening on %s (tasks in %s; web page at %s/); at most %d connections (%s per address), %g s per "
             "request head and body; trusted proxies: %s", server.url, st.data_dir, server.url.split(BASE)[0],
             http.max_connections, st.max_connections_per_address or "any", http.request_timeout,
             st.trusted_proxies or "none")
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
