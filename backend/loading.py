"""Opening the configured model as a pipeline: the one path every front end (CLI, Nextcloud worker, standalone
service) takes from settings to a loaded :class:`runtime.Pipeline`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from backend.config import Settings

if TYPE_CHECKING:
    from runtime import Pipeline

log = logging.getLogger(__name__)

#: The model store's folder of compiled OpenVINO blobs (see runtime.engines.compile_cache_dir).
COMPILED = "compiled"


def open_pipeline(settings: Settings, progress: Callable[[float], None] | None = None,
                  say: Callable[[str], None] = log.warning, bundle: Path | None = None) -> Pipeline:
    """Get the configured model into the store (download and convert it when needed) and load it with the
    settings' runtime options (OpenVINO's compiled models, when kept, go to the store's ``compiled/``). ``bundle``
    skips the lookup (a worker loading what another already resolved); ``progress`` gets the fraction of the
    download and conversion done (0..1)."""
    from backend.model_store import resolve_model
    from runtime import Pipeline

    store = settings.store
    if bundle is None:
        bundle = resolve_model(store.model, store.model_store, settings.bundle_format(), offline=store.offline,
                               say=say, progress=progress)
    return Pipeline.load(bundle, settings.runtime, cache=store.model_store / COMPILED)
