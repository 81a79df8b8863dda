"""The deploy-time settings and the settings page's overrides of them, across deploys.

The ``T2I_*`` variables the app is deployed with are the defaults; a value saved on the settings page overrides one
of them. Nextcloud keeps the page's values (``appconfig_ex``) even when the app is unregistered with its data, so an
override would otherwise outlive the deploy it was made against and silently beat a new ``T2I_MODEL``. The app
records the deploy-time values it started with (one more key in its config, not shown on the page); when a start
finds a global field's deploy-time value changed since that record, the new deploy is the admin's newer word: the
page's override of that field is removed, and Nextcloud's log says so. Overrides of unchanged fields stay.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from backend.config import Settings
from backend.nextcloud.admin_settings import GLOBAL_FIELDS
from backend.nextcloud.client import Gone, Unreachable

if TYPE_CHECKING:
    from backend.nextcloud.client import Nextcloud

log = logging.getLogger(__name__)

#: The app-config key that holds the deploy-time values of the last start (JSON: field id → value as stored).
DEPLOYED_KEY = "deployed_settings"
_VARIABLE = {"model": "T2I_MODEL", "threads": "T2I_THREADS", "decoder": "T2I_DECODER",
             "ai_marking": "T2I_AI_MARKING", "watermark": "T2I_WATERMARK"}


def deployed(base: Settings) -> dict[str, str]:
    """The deploy-time value of each global field, as the page stores a value (checkboxes "1"/"0")."""
    return {"model": base.store.model, "threads": str(base.runtime.threads), "decoder": base.runtime.decoder,
            "ai_marking": "1" if base.images.ai_marking else "0", "watermark": "1" if base.images.watermark else "0"}


async def drop_outdated_overrides(nc: Nextcloud, base: Settings) -> list[str]:
    """Remove the page's overrides of fields whose deploy-time value changed since the last start, and record the
    values of this one; return the fields dropped. Never raises: without Nextcloud nothing changes."""
    now = deployed(base)
    try:
        stored = await nc.admin_values([*GLOBAL_FIELDS, DEPLOYED_KEY])
        try:
            before = json.loads(stored.get(DEPLOYED_KEY) or "{}")
        except ValueError:
            before = {}
        before = before if isinstance(before, dict) else {}
        dropped = [f for f in GLOBAL_FIELDS if f in stored and f in before and before[f] != now[f]]
        if dropped:
            await nc.delete_admin_values(dropped)
            for f in dropped:
                message = (f"text2image_sd2: the app was deployed with {_VARIABLE[f]}={now[f]!r} (was "
                           f"{before[f]!r}); the settings page's {f}={stored[f]!r} is dropped and the deploy-time "
                           "value applies")
                log.warning(message)
                await nc.admin_log(message)
        if before != now:
            await nc.set_admin_value(DEPLOYED_KEY, json.dumps(now, sort_keys=True))
        return dropped
    except (Unreachable, Gone) as exc:
        log.warning("cannot compare the deploy-time settings with the settings page's (%s)", exc)
        return []
