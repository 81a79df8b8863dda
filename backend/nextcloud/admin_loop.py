"""Applying the admin settings form's values to a running ExApp: read them between tasks, use new marking and
defaults at once, and load the models again (after the tasks in hand) when the models, threads or decoder change.
The form itself and the parsing of its values are in :mod:`backend.nextcloud.admin_settings`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from backend.config import Settings
from backend.nextcloud.admin_defaults import drop_outdated_overrides
from backend.nextcloud.admin_settings import AdminChoice, choose, field_ids
from backend.nextcloud.client import Gone, Nextcloud, Unreachable, sleep_or
from backend.nextcloud.models import Model
from backend.nextcloud.provider import model_names
from runtime.errors import T2IError
from runtime.request import Defaults

if TYPE_CHECKING:
    from backend.tasks.service import ImageService
    from runtime.pipeline import Pipeline

log = logging.getLogger(__name__)


class App(Protocol):
    """What the admin loop uses of the ExApp (:class:`backend.nextcloud.exapp.ExApp`, which builds on this module):
    its settings and models (:class:`backend.nextcloud.models.ModelLife`), Nextcloud, the workers and its tasks."""

    base_settings: Settings
    settings: Settings
    models: dict[str, Model]
    nc: Nextcloud
    enabled: asyncio.Event
    stopping: asyncio.Event

    async def reload(self, settings: Settings) -> None: ...

    async def register(self, models: dict[str, Model]) -> None: ...

    async def retire_workers(self) -> None: ...

    def resume_workers(self) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task: ...


class AdminSettings:
    """The admin form's side of one ExApp: what was last read and applied, and the loop that watches it."""

    def __init__(self, app: App) -> None:
        self.app = app
        #: The choice in use (None until the form was read once).
        self.applied: AdminChoice | None = None
        self._values: dict[str, str] | None = None
        self._lock = asyncio.Lock()
        self._watching = False
        self._unregistered = False
        self._fault: str | None = None
        #: A choice whose models could not be loaded: not tried again until the admin changes a value.
        self._refused: AdminChoice | None = None

    async def read(self) -> AdminChoice | None:
        """What the form's stored values ask for; None when Nextcloud cannot say or the values cannot be read (the
        settings in use stay)."""
        app = self.app
        try:
            values = await self._stored_values()
            choice = choose(app.base_settings, values)
        except (Unreachable, Gone) as exc:
            log.warning("cannot read the admin settings (%s); keeping the settings in use", exc)
            return None
        except Exception as exc:  # choose names bad values itself: this is a bug, and must not stop the app
            problem = f"the admin settings could not be read ({type(exc).__name__}: {exc}); keeping the settings in use"
            log.error(problem)
            log.debug("reading the admin settings failed", exc_info=True)
            if problem != self._fault:  # once, not at every poll
                self._fault = problem
                await app.nc.admin_log(f"text2image_sd2: {problem}", level=3)
            return None
        self._fault = None
        if values != self._values:
            self._values = values
            for problem in choice.problems:
                log.warning(problem)
                await app.nc.admin_log(f"text2image_sd2: {problem}")
        return choice

    async def _stored_values(self) -> dict[str, str]:
        app = self.app
        asked: list[str] = []
        values: dict[str, str] = {}
        for _ in range(2):  # the second read adds the fields of a newly chosen model list
            models = model_names((choose(app.base_settings, values).settings if values else app.settings).store.model)
            if models == asked:
                break
            asked = models
            values = await app.nc.admin_values(field_ids(models))
        return values

    async def before_first_load(self) -> None:
        """An admin's choice of models counts from the first load on (unless a new deploy replaced it)."""
        if self.applied is None:
            await drop_outdated_overrides(self.app.nc, self.app.base_settings)
            choice = await self.read()
            if choice is not None:
                self.app.settings, self.applied = choice.settings, choice

    def watch(self) -> None:
        """Start the loop that applies the form's changes (once per process)."""
        if not self._watching:
            self._watching = True
            self.app.spawn(self._watch(), "admin-settings")

    async def _watch(self) -> None:
        app = self.app
        while not app.stopping.is_set():
            await sleep_or(app.stopping, app.settings.exapp.settings_poll)
            if app.stopping.is_set() or not app.enabled.is_set():
                continue
            # Whatever one poll meets (Nextcloud gone while registering, a bug), the next poll still comes: a
            # dead loop would ignore every later change without a word.
            try:
                choice = await self.read()
                if choice is not None and choice != self._refused and (choice != self.applied or self._unregistered):
                    await self.apply(choice)
            except Exception as exc:
                log.error("applying the admin settings failed (%s: %s); trying again in %g s", type(exc).__name__,
                          exc, app.settings.exapp.settings_poll)
                log.debug("the failed poll of the admin settings", exc_info=True)

    async def apply(self, choice: AdminChoice) -> None:
        """Use ``choice``: marking and per-model defaults at once (the providers show the new defaults); a new
        model list, thread cap or decoder by loading the models again once the tasks in hand are done."""
        app = self.app
        async with self._lock:
            old = self.applied.settings if self.applied else app.settings
            heavy = (choice.settings.store, choice.settings.runtime) != (old.store, old.runtime)
            if heavy and not await self._reload(choice.settings):
                # Loading it again at every poll would stop the workers each time for the same failure.
                self._refused = choice
                return
            self._refused = None
            app.settings, self.applied = choice.settings, choice
            await self.apply_light()
            # Until Nextcloud has the providers with these defaults, each poll tries again.
            self._unregistered = True
            await app.register(app.models)
            self._unregistered = False
            log.info("admin settings applied: models %s, thread cap %s, %s decoder, AI marking %s, watermark %s",
                     ", ".join(app.models), app.settings.runtime.threads or "all cores",
                     app.settings.runtime.decoder, app.settings.images.ai_marking, app.settings.images.watermark)

    async def apply_light(self) -> None:
        """The changes loaded models take as they are: the PNG marking and the per-model defaults. A default the
        model cannot take (a size its bundle was not exported for) is left out, and named in Nextcloud's log."""
        if self.applied is None:
            return
        choice = self.applied
        problems: list[str] = []
        for model in self.app.models.values():
            wanted = choice.defaults.get(model.name, Defaults())
            for i, service in enumerate(model.services):
                service.settings = replace(service.settings, images=choice.settings.images)
                if service.pipeline is not None:
                    refused = _set_defaults(service.pipeline, wanted)
                    problems += [f"admin default for {model.name} ignored: {why}" for why in refused if i == 0]
        for problem in problems:
            log.warning(problem)
            await self.app.nc.admin_log(f"text2image_sd2: {problem}")
        for model in self.app.models.values():
            for i, service in enumerate(model.services):
                self.app.spawn(_warm(service), f"warm {model.name} #{i}")

    async def _reload(self, settings: Settings) -> bool:
        """Swap the loaded models for those ``settings`` ask for, between tasks. On failure the previous models
        are loaded again and the admin is told in Nextcloud's log; returns whether the new settings are in use."""
        app = self.app
        log.info("admin settings changed: models %s, thread cap %s, %s decoder; loading them once the tasks in "
                 "hand are done", settings.store.model, settings.runtime.threads or "all cores",
                 settings.runtime.decoder)
        await app.retire_workers()
        old_ids, previous = set(app.models), app.settings
        ok = False
        try:
            try:
                await app.reload(settings)
                ok = True
            except Exception as exc:
                problem = f"text2image_sd2: the admin settings could not be applied ({exc}); using the previous ones"
                log.error(problem)
                await app.nc.admin_log(problem, level=3)
                await app.reload(previous)
        finally:  # whatever loaded, the workers take tasks again: a stopped app would ignore every later change
            for pid in old_ids - set(app.models):
                try:
                    await app.nc.unregister(pid)
                except Exception as exc:
                    log.warning("could not unregister %s: %s", pid, exc)
            app.resume_workers()
        if not ok:
            await self.apply_light()  # the previous models are new services: they get the admin's defaults again
            self._unregistered = True  # the next poll registers them if Nextcloud is away now
            await app.register(app.models)
            self._unregistered = False
        return ok


async def _warm(service: ImageService) -> None:
    """Make the defaults' shape ready in the background (see ImageService.warm_defaults): a task that comes
    meanwhile waits for it as it would have for its own compile."""
    try:
        if await asyncio.to_thread(service.warm_defaults):
            log.info("%s is ready at its new default size and guidance", service.model_name)
    except Exception as exc:  # the first task at these defaults then compiles, and reports any failure itself
        log.warning("could not prepare %s for its new defaults: %s", service.model_name, exc)


def _set_defaults(pipe: Pipeline, wanted: Defaults) -> list[str]:
    """Give ``pipe`` the admin's defaults, each one it takes; return why the others were left out."""
    try:
        pipe.use_defaults(wanted)
        return []
    except T2IError:
        pass
    kept = Defaults()
    refused = []
    for part in ({"width": wanted.width, "height": wanted.height}, {"steps": wanted.steps},
                 {"guidance": wanted.guidance}):
        if all(value is None for value in part.values()):
            continue
        try:
            pipe.use_defaults(replace(kept, **part))
            kept = replace(kept, **part)
        except T2IError as exc:
            refused.append(str(exc))
    pipe.use_defaults(kept)
    return refused
