"""The HTTP side of the ExApp (FastAPI under uvicorn) and ``text2image serve``.

AppAPI calls ``GET /heartbeat`` (no auth), ``POST /init``, ``PUT /enabled?enabled=0|1`` and, from Nextcloud 33 on,
``POST /trigger?providerId=``. Every route but /heartbeat needs AppAPI's headers (checked by our own
:mod:`backend.nextcloud.auth`, which never writes a secret anywhere); anything else gets 401.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from backend.config import Settings
from backend.http_server import Limits, server_options
from runtime.errors import ConfigError

log = logging.getLogger(__name__)

def create_app(settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """The FastAPI application; ``settings`` default to the environment (``T2I_*``)."""
    from fastapi import FastAPI
    from nc_py_api import AsyncNextcloudApp
    from nc_py_api.ex_app import set_handlers

    from backend.nextcloud.auth import AppAPIAuth
    from backend.nextcloud.exapp import ExApp, exapp_settings

    state: dict[str, ExApp] = {}
    appapi = (settings or Settings.from_env()).exapp

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        exapp = ExApp(exapp_settings(settings))
        state["exapp"] = exapp
        await exapp.start()
        yield
        # uvicorn runs this after SIGTERM/SIGINT: finish or report the task in hand, then exit.
        await exapp.shutdown()

    app = FastAPI(lifespan=lifespan, title="text2image_sd2")
    app.add_middleware(AppAPIAuth, app_id=appapi.app_id, secret=appapi.app_secret)

    async def enabled_handler(enabled: bool, _nc: AsyncNextcloudApp) -> str:
        exapp = state["exapp"]
        error = await (exapp.enable() if enabled else exapp.disable())
        log.info("%s by AppAPI%s", "enabled" if enabled else "disabled", f"; error: {error}" if error else "")
        return error

    async def trigger_handler(provider_id: str) -> None:
        state["exapp"].trigger.fire()

    set_handlers(app, enabled_handler, default_init=False, map_app_static=False, trigger_handler=trigger_handler)

    @app.post("/init")
    async def init() -> dict:
        # Answer at once; progress (0..100) or an error goes to AppAPI's status endpoint.
        state["exapp"].spawn(state["exapp"].init(), "init")
        return {}

    return app


def serve(host: str | None = None, port: int | None = None, workers: int | None = None) -> None:
    """Run the ExApp until SIGTERM/SIGINT. Host and port default to ``APP_HOST``/``APP_PORT``; with HaRP
    (``HP_SHARED_KEY`` set) it listens on the unix socket ``HP_EXAPP_SOCK`` (default /tmp/exapp.sock) instead."""
    settings = Settings.from_env(workers=workers)
    appapi = settings.exapp
    # AppAPI sets these in the container; nc_py_api reads them too.
    missing = appapi.missing()
    if missing:
        raise ConfigError(
            f"the Nextcloud ExApp needs {', '.join(missing)} in its environment (AppAPI sets them when it deploys "
            "the app); to run without Nextcloud use `text2image serve --standalone`"
        )
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("the Nextcloud ExApp needs its extra: pip install 'text2image-sd2[nextcloud]'") from None
    for name in ("backend", "runtime"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:  # INFO at least; -vv (DEBUG) stays: the task timelines
            logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    where: dict = {}
    if appapi.harp_key:
        where["uds"] = appapi.harp_socket
    else:
        where["host"] = host or appapi.app_host
        where["port"] = port or appapi.app_port
        if not where["port"]:
            raise ConfigError("no port to listen on: set APP_PORT (AppAPI does) or pass --port")
    log.info("text2image_sd2 ExApp %s for %s on %s", appapi.app_version, appapi.nextcloud_url,
             where.get("uds") or f"{where['host']}:{where['port']}")
    # The standalone service's bounds on head and idle time and on connections; no cap per address, as the one
    # client, Nextcloud (or HaRP), comes from one address.
    limits = Limits(settings.http.request_timeout, settings.http.max_connections)
    uvicorn.run(create_app(settings), log_level="warning", timeout_graceful_shutdown=5, **where,
                **server_options(limits))
