"""Applying the admin settings form's values to a running ExApp: read them between tasks, use new marking and
defaults at once, and load the models again (after the tasks in hand) when the models, threads or decoder change.
The form itself and the parsing of its values are in :mod:`backend.nextcloud.admin_settings`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from backend.config import Settings
from backend.nextcloud.admin_defaults import drop_outdated_overrides
from backend.nextcloud.admin_settings import AdminChoice, ModelDefaults, choose, field_ids
from backend.nextcloud.client import Gone, Unreachable, sleep_or
from backend.nextcloud.provider import model_names
from runtime.errors import T2IError

if TYPE_CHECKING:
    from backend.nextcloud.exapp import ExApp

log = logging.getLogger(__name__)


class AdminSettings:
    """The admin form's side of one ExApp: what was last read and applied, and the loop that watches it."""

    def __init__(self, app: ExApp) -> None:
        self.app = app
        #: The choice in use (None until the form was read once).
        self.applied: AdminChoice | None = None
        self._values: dict[str, str] | None = None
        self._lock = asyncio.Lock()
        self._watching = False

    async def read(self) -> AdminChoice | None:
        """What the form's stored values ask for; None when Nextcloud cannot say (the settings in use stay)."""
        app = self.app
        asked: list[str] = []
        values: dict[str, str] = {}
        try:
            for _ in range(2):  # the second read adds the fields of a newly chosen model list
                models = model_names((choose(app.base_settings, values).settings if values
                                      else app.settings).store.model)
                if models == asked:
                    break
                asked = models
                values = await app.nc.admin_values(field_ids(models))
        except (Unreachable, Gone) as exc:
            log.warning("cannot read the admin settings (%s); keeping the settings in use", exc)
            return None
        choice = choose(app.base_settings, values)
        if values != self._values:
            self._values = values
            for problem in choice.problems:
                log.warning(problem)
                await app.nc.admin_log(f"text2image_sd2: {problem}")
        return choice

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
            choice = await self.read()
            if choice is not None and choice != self.applied:
                try:
                    await self.apply(choice)
                except Exception:
                    log.exception("applying the admin settings failed")

    async def apply(self, choice: AdminChoice) -> None:
        """Use ``choice``: marking and per-model defaults at once (the providers show the new defaults); a new
        model list, thread cap or decoder by loading the models again once the tasks in hand are done."""
        app = self.app
        async with self._lock:
            old = self.applied.settings if self.applied else app.settings
            heavy = (choice.settings.store, choice.settings.runtime) != (old.store, old.runtime)
            if heavy and not await self._reload(choice.settings):
                return
            app.settings, self.applied = choice.settings, choice
            self.apply_light()
            await app.register(app.models)
            log.info("admin settings applied: models %s, thread cap %s, %s decoder, AI marking %s, watermark %s",
                     ", ".join(app.models), app.settings.runtime.threads or "all cores",
                     app.settings.runtime.decoder, app.settings.images.ai_marking, app.settings.images.watermark)

    def apply_light(self) -> None:
        """The changes loaded models take as they are: the PNG marking and the per-model defaults."""
        if self.applied is None:
            return
        choice = self.applied
        for model in self.app.models.values():
            wanted = choice.defaults.get(model.name, ModelDefaults())
            for service in model.services:
                service.settings = replace(service.settings, images=choice.settings.images)
                pipe = service.pipeline
                if pipe is None:
                    continue
                try:
                    pipe.set_defaults(wanted.width, wanted.height, wanted.steps, wanted.guidance)
                except T2IError as exc:
                    log.warning("admin default for %s ignored: %s", model.name, exc)
                    pipe.set_defaults()

    async def _reload(self, settings: Settings) -> bool:
        """Swap the loaded models for those ``settings`` ask for, between tasks. On failure the previous models
        are loaded again and the admin is told in Nextcloud's log; returns whether the new settings are in use."""
        app = self.app
        log.info("admin settings changed: models %s, thread cap %s, %s decoder; loading them once the tasks in "
                 "hand are done", settings.store.model, settings.runtime.threads or "all cores",
                 settings.runtime.decoder)
        await app.retire_workers()
        old_ids, previous = set(app.models), app.settings
        try:
            await app.reload(settings)
            ok = True
        except Exception as exc:
            problem = f"text2image_sd2: the admin settings could not be applied ({exc}); using the previous ones"
            log.error(problem)
            await app.nc.admin_log(problem, level=3)
            await app.reload(previous)
            ok = False
        for pid in old_ids - set(app.models):
            try:
                await app.nc.unregister(pid)
            except Exception as exc:
                log.warning("could not unregister %s: %s", pid, exc)
        if not ok:
            await app.register(app.models)
        app.resume_workers()
        return ok
