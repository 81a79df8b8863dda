"""The ExApp's models and their life: resolve (download/export) each configured model into the store, verify the
files against the bundle's manifest, and load one :class:`ImageService` per worker, reporting progress 0..99 as it
goes; :class:`ModelLife` loads them once for every caller (a resume and /init share one load) and again with other
settings.

Each worker gets its own service (its own engine sessions) with an equal share of the thread cap: a shared service
would serialise the workers on its lock, and an OpenVINO infer request must not be used by two threads at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from backend.config import Settings
from backend.nextcloud.provider import model_names, provider_id
from backend.tasks.service import ImageService
from runtime.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

Report = Callable[[int], None]

#: In the persistent storage: which bundle manifests a run has verified, so a restart does not hash GBs again.
VERIFIED = "verified.json"


def storage_dir() -> Path:
    """AppAPI's persistent volume (``APP_PERSISTENT_STORAGE``), kept across container updates."""
    from nc_py_api.ex_app import persistent_storage

    return Path(persistent_storage())


@dataclass
class Model:
    """One configured model: its provider id, one service per worker, and tasks recovered from the journal."""

    name: str
    provider_id: str
    services: list[ImageService]
    recovered: asyncio.Queue = field(default_factory=asyncio.Queue)


def worker_settings(settings: Settings) -> Settings:
    """The settings of one worker: the container's thread cap split evenly between every worker of every model
    (``T2I_MODEL`` lists the models, each runs ``T2I_WORKERS`` workers), since all of them may be busy at once.
    Below one thread each, every worker still gets one (and the log says so)."""
    from runtime.engines import default_threads

    total = settings.runtime.threads or default_threads()
    sessions = max(1, len(model_names(settings.store.model))) * max(1, settings.runtime.workers)
    if sessions > total:
        log.warning("%d model(s) × %d worker(s) share a cap of %d thread(s): each worker gets 1, %d in all",
                    sessions // max(1, settings.runtime.workers), settings.runtime.workers, total, sessions)
    return settings.updated(threads=settings.threads_per_worker(sessions))


def worker_device(settings: Settings, worker: int) -> str:
    """One worker per GPU: with several GPUs, worker i runs on GPU i (round robin); otherwise the setting as is."""
    from runtime.engines import cuda_device_count

    if settings.runtime.device not in ("auto", "cuda") or settings.runtime.engine == "openvino":
        return settings.runtime.device
    count = cuda_device_count()
    return f"cuda:{worker % count}" if count > 1 else settings.runtime.device


def load_models(settings: Settings, report: Report, verify: bool,
                verified: Path | None = None) -> list[tuple[str, str, list[ImageService]]]:
    """Blocking: ready every configured model; return ``(name, provider id, services)`` per model.

    Every file's sha256 is checked against the manifest when ``verify`` (at init) and otherwise when the record
    ``verified`` (a JSON file) does not show this bundle's manifest verified before, so no path loads a model
    nobody has verified. Raises :class:`T2IError` with a message for the admin.
    """
    names = model_names(settings.store.model)
    if not names:
        raise ConfigError("T2I_MODEL is empty; set it to a model name (e.g. sd-turbo), a hub id or a bundle folder")
    ids = [provider_id(n) for n in names]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"T2I_MODEL lists models that would share a provider id: {', '.join(ids)}")
    if settings.runtime.workers < 1:
        raise ConfigError(f"T2I_WORKERS={settings.runtime.workers} is not allowed; use 1 or more")
    per_worker = worker_settings(settings)
    share = 99 / len(names)
    ready = []
    for m, name in enumerate(names):
        base = m * share

        def at(fraction: float, base: float = base) -> None:
            report(int(base + share * fraction))

        first = ImageService(per_worker.updated(model=name))
        # Resolving (download or export) is most of the time on a first start; the service reports 1, 60, 85, 100.
        first.load(progress=partial(_scaled, at, 0.0, 0.006))
        bundle_path = first.bundle.path
        verify_bundle(first, partial(_scaled, at, 0.6, 0.2), force=verify, verified=verified)
        services = [first]
        for w in range(1, settings.runtime.workers):
            at(0.8 + 0.2 * w / settings.runtime.workers)
            service = ImageService(per_worker.updated(model=name, device=worker_device(per_worker, w)))
            service.load(bundle=bundle_path)
            services.append(service)
        at(1.0)
        log.info("model %s ready as provider %s: %d worker(s) with %d thread(s) each (of a cap of %d for %d "
                 "model(s)), bundle %s", name, ids[m], len(services), per_worker.runtime.threads,
                 settings.runtime.threads or per_worker.runtime.threads * len(names) * settings.runtime.workers,
                 len(names), bundle_path)
        ready.append((name, ids[m], services))
    return ready


def _scaled(report: Callable[[float], None], start: float, scale: float, value: float) -> None:
    report(start + scale * value)


def verify_bundle(service: ImageService, progress: Callable[[float], None], force: bool = True,
                  verified: Path | None = None) -> None:
    """Hash every file the manifest lists, reporting progress by bytes; a bundle without manifest is skipped.

    Unless ``force``, a bundle that ``verified`` records as checked with this very manifest is not hashed again
    (a plain restart); a successful check is recorded there."""
    from runtime.bundle import MANIFEST, file_digest

    bundle = service.bundle
    if bundle.manifest is None:
        log.warning("bundle %s has no manifest.json; its files cannot be verified", bundle.path)
        return
    key, digest = str(bundle.path.resolve()), file_digest(bundle.path / MANIFEST)
    record = _read_record(verified)
    if not force and record.get(key) == digest:
        log.info("bundle %s was verified before; not hashing it again", bundle.path)
        return
    log.info("verifying every file of %s against its manifest", bundle.path)
    bad = bundle.verify_hashes(progress)
    if bad:
        raise BundleError(
            f"{len(bad)} file(s) of the model bundle {bundle.path} do not match its manifest.json "
            f"({', '.join(bad[:5])}); delete that folder and initialise the app again to download it anew"
        )
    if verified is not None:
        try:
            verified.write_text(json.dumps({**_read_record(verified), key: digest}, indent=1))
        except OSError as exc:
            log.warning("could not record the verification in %s: %s", verified, exc)


def _read_record(path: Path | None) -> dict[str, str]:
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _FirstLoad(Protocol):
    """The admin settings as the first load sees them: an admin's choice of models counts from it on."""

    async def before_first_load(self) -> None: ...


class ModelLife:
    """The model life cycle of the ExApp (:class:`backend.nextcloud.exapp.ExApp` builds on it): one shared load of
    the configured models, verified for /init, and a reload with other settings (the admin's)."""

    settings: Settings
    models: dict[str, Model]
    admin: _FirstLoad
    _loading: asyncio.Future | None
    _verified: bool
    _init_progress: asyncio.Queue | None

    async def load(self, verify: bool = False) -> dict[str, Model]:
        """Ready the models once (later callers wait for the same load); raise T2IError when that fails.

        ``verify`` (init) hashes every bundle file even when an earlier run did; a load without it still hashes a
        bundle no run has verified. Whichever caller comes first, the one ordered load serves both: when /init asks
        for verification of models a resume already loaded without it, they are verified before init reports."""
        loop = asyncio.get_running_loop()
        record = storage_dir() / VERIFIED
        if not self.models:
            if self._loading is None or (self._loading.done() and self._loading.exception() is not None):
                # Claimed before the first await: a resume and /init arriving together must share one load, or
                # two would download into the same folder and one would delete it under the other.
                self._loading = loop.create_task(self._load_models(verify, record), name="load-models")
                self._verified = verify
            ready = await asyncio.shield(self._loading)
            if not self.models:
                self.models = {pid: Model(name, pid, services) for name, pid, services in ready}
        if verify and not self._verified:
            for model in self.models.values():
                await loop.run_in_executor(None, verify_bundle, model.services[0], lambda _: None, True, record)
            self._verified = True
        return self.models

    async def _load_models(self, verify: bool, record: Path) -> list:
        await self.admin.before_first_load()
        loop = asyncio.get_running_loop()

        def report(p: int) -> None:
            if self._init_progress is not None:
                loop.call_soon_threadsafe(self._init_progress.put_nowait, p)

        return await loop.run_in_executor(None, load_models, self.settings, report, verify, record)

    async def reload(self, settings: Settings) -> None:
        """Drop the loaded models (the workers must be retired) and load those ``settings`` ask for."""
        self.models, self._loading, self.settings = {}, None, settings
        await self.load()
