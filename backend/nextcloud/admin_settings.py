"""The admin settings form this ExApp declares in Nextcloud (Administration settings → Artificial intelligence), and
how its stored values become :class:`Settings` and per-model defaults.

Nextcloud keeps an admin form's values in the app's config (``appconfig_ex``, one string per field id) and does not
tell the app when one changes, so the ExApp reads them between tasks (:mod:`backend.nextcloud.exapp`). The deploy-time
settings (the ``T2I_*`` environment variables) are the defaults and a saved value overrides them: an empty field
(model, threads, a model's steps or guidance) or the decoder's "deploy default" option means the deploy-time value,
and a new deploy with another ``T2I_*`` value drops the override saved against the old one
(:mod:`backend.nextcloud.admin_defaults`). A stored value that is not allowed is ignored with a warning naming the
field and the value.

The form's id has no ``<appid>_`` prefix: Nextcloud's settings page saves a field with ``formId`` set to the form's
id minus that prefix, and AppAPI 32 looks the form up by its full id, so a prefixed form would never be saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.config import Settings
from backend.nextcloud.provider import model_names, provider_id
from runtime import validation as v
from runtime.errors import ConfigError, T2IError
from runtime.request import Defaults
from runtime.validation import shown

FORM_ID = "sd2_admin"
#: Ids this form had before; the ExApp removes them, as Nextcloud's page could not save into them.
OLD_FORM_IDS = ("text2image_sd2_admin",)
#: The decoder option that means "the deploy-time T2I_DECODER" (followed by that value in brackets).
DEPLOY_DEFAULT = "deploy default"
#: Nextcloud's admin section "Artificial intelligence".
SECTION_ID = "ai"
#: The fields every deployment has; each model adds its own size, steps and guidance.
GLOBAL_FIELDS = ("model", "threads", "decoder", "ai_marking", "watermark")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
#: The most CPU threads the form accepts (far beyond any machine: a larger number is a typo).
MAX_THREADS = 1024


@dataclass(frozen=True)
class AdminChoice:
    """What the stored values ask for, and what had to be ignored."""

    settings: Settings
    defaults: dict[str, Defaults] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def model_key(model: str) -> str:
    """The field-id part for ``model`` (its provider id's name part: letters, digits, ``._-``)."""
    return provider_id(model).split(":", 1)[1].replace(".", "_").replace("-", "_")


def field_ids(models: list[str]) -> list[str]:
    """Every field id of the form for these models."""
    ids = list(GLOBAL_FIELDS)
    for m in models:
        ids += [f"{model_key(m)}_{k}" for k in ("size", "steps", "guidance")]
    return ids


def build_form(base: Settings, models: Mapping[str, Any]) -> dict[str, Any]:
    """The form, in the shape AppAPI's ``ui/settings`` takes (``formScheme``). ``base`` gives the defaults shown
    (the deploy-time settings); ``models`` maps each configured model name to its loaded service (for its sizes
    and own defaults)."""
    r, i = base.runtime, base.images
    onoff = {True: "on", False: "off"}
    again = " A new deploy with another value replaces the choice made here."
    fields_: list[dict[str, Any]] = [
        _field("model", "Models", "text", "",
               "One or more models, separated by commas: sd-turbo and sdxs-512 (one step, fastest), sd2.1-base, "
               "sd2.1, a hub id or a folder (a bundle or a diffusers checkpoint). Each becomes an image-generation "
               "provider. A new model is downloaded and loaded between tasks; watch the app's log for its progress. "
               "Empty: the models "
               f"the app was deployed with (T2I_MODEL={base.store.model}).{again}",
               placeholder=f"{DEPLOY_DEFAULT}: {base.store.model}"),
        _field("threads", "CPU threads", "number", r.threads,
               "Op threads for all models and workers together; 0 uses every core the container may use. Empty: "
               f"the deploy-time value (T2I_THREADS={r.threads}).{again}",
               placeholder=f"{DEPLOY_DEFAULT}: {r.threads}"),
        _field("decoder", "Image decoder", "select", f"{DEPLOY_DEFAULT} ({r.decoder})",
               "vae: the model's own decoder (best pixels); taesd: about 18× cheaper, coarser (the model bundle "
               f"must include it); {DEPLOY_DEFAULT}: T2I_DECODER ({r.decoder}).{again}",
               options=[f"{DEPLOY_DEFAULT} ({r.decoder})", "vae", "taesd"]),
        _field("ai_marking", "Mark images as AI-generated in their metadata", "checkbox", i.ai_marking,
               "IPTC digital source type trainedAlgorithmicMedia, read by photo tools and platforms. Deployed "
               f"with T2I_AI_MARKING={onoff[i.ai_marking]}.{again}",
               label="Mark in metadata"),
        _field("watermark", "Visible watermark", "checkbox", i.watermark,
               'Stamp "Generated using Artificial Intelligence" into the bottom-left corner of every image. '
               f"Deployed with T2I_WATERMARK={onoff[i.watermark]}.{again}",
               label="Stamp a visible mark"),
    ]
    for name, service in models.items():
        key, own = model_key(name), service.bundle_defaults
        sizes = [f"{size} ({label.split('(', 1)[1]}" if "(" in label else size
                 for size, label in service.allowed_sizes().items()]
        current = next((s for s in sizes if s.split(" ", 1)[0] == own.size), sizes[0])
        fields_ += [
            _field(f"{key}_size", f"{name}: default size", "select", current,
                   "The size of an image when the user does not choose one.", options=sizes),
            _field(f"{key}_steps", f"{name}: default steps", "number", own.steps,
                   f"Denoising steps when the user does not choose (1–{v.MAX_STEPS}); more is slower and finer. "
                   f"Empty: the model's own ({own.steps})."),
            _field(f"{key}_guidance", f"{name}: default guidance", "number", own.guidance,
                   f"How closely images follow the prompt when the user does not choose (0–{v.MAX_GUIDANCE:g}; "
                   f"sd-turbo: 0). Empty: the model's own ({own.guidance})."),
        ]
    return {"id": FORM_ID, "priority": 10, "section_type": "admin", "section_id": SECTION_ID,
            "title": "Local image generation (Stable Diffusion 2)",
            "description": "Settings of the text2image_sd2 app; they take effect between tasks. The values the app "
                           "was deployed with (T2I_* variables) are the defaults: an empty field, or 'deploy "
                           "default', goes back to them.",
            "doc_url": "", "fields": fields_}


def _field(fid: str, title: str, kind: str, default: Any, description: str, options: list[str] | None = None,
           label: str = "", placeholder: str = "") -> dict[str, Any]:
    return {"id": fid, "title": title, "type": kind, "default": default, "description": description,
            "options": options or [], "placeholder": placeholder, "label": label, "notify": False, "sensitive": False}


def choose(base: Settings, values: Mapping[str, str]) -> AdminChoice:
    """The settings and per-model defaults that the stored ``values`` (field id → string) ask for, on top of
    ``base``. Each value that is not allowed is left out and described in ``problems``."""
    problems: list[str] = []
    changes: dict[str, Any] = {}
    for fid in GLOBAL_FIELDS:
        raw = values.get(fid)
        if raw is None or (raw.strip() == "" and fid not in ("ai_marking", "watermark")) or raw.startswith(
                DEPLOY_DEFAULT):
            continue
        try:
            value = _parse(fid, raw)
            base.updated(**{fid: value})  # checked like the environment's value
        except T2IError as exc:
            problems.append(f"admin setting {fid}={shown(raw)} ignored: {exc}")
            continue
        changes[fid] = value
    settings = base.updated(**changes) if changes else base
    defaults: dict[str, Defaults] = {}
    for name in model_names(settings.store.model):
        key, parsed = model_key(name), {}
        for part in ("size", "steps", "guidance"):
            raw = (values.get(f"{key}_{part}") or "").strip()
            if not raw:
                continue
            try:
                parsed.update(_parse_default(part, raw))
            except T2IError as exc:
                problems.append(f"admin setting {key}_{part}={shown(raw)} ignored: {exc}")
        defaults[name] = Defaults(**parsed)  # an admin's choice; None keeps the model's own
    return AdminChoice(settings, defaults, problems)


def _parse(fid: str, raw: str) -> Any:
    text = raw.strip()
    if fid in ("ai_marking", "watermark"):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError("not a yes/no value; use 1/0, true/false, yes/no")
    if fid == "threads":
        allowed = f"use 0 (every core) or a whole number of threads up to {MAX_THREADS}"
        number = _finite(text, allowed)
        if not number.is_integer() or not 0 <= number <= MAX_THREADS:
            raise ConfigError(f"{shown(text)} is not allowed; {allowed}")
        return int(number)
    if fid == "model" and not model_names(text):
        raise ConfigError("no model named; use one or more model names, hub ids or folders, separated by commas")
    return text


def _parse_default(part: str, raw: str) -> dict[str, Any]:
    """A per-model default, checked as a request's value is (size, steps, guidance); the size may
    carry the form's label (``256x384 (portrait 2:3)``). Raises T2IError naming the value and what is allowed."""
    if part == "size":
        width, height = v.parse_size(raw.split("(", 1)[0])
        return {"width": width, "height": height}
    if part == "steps":
        number = _finite(raw, f"use a whole number of steps from 1 to {v.MAX_STEPS}")
        return {"steps": v.check_steps(int(number) if number.is_integer() else number)}
    return {"guidance": v.check_guidance(_finite(raw, f"use a number from 0 to {v.MAX_GUIDANCE:g}, such as 7.5"))}


def _finite(text: str, allowed: str) -> float:
    """``text`` as a finite number; 'inf', 'nan' and words are refused with ``allowed``."""
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{shown(text.strip())} is not a number; {allowed}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{shown(text.strip())} is not a finite number; {allowed}")
    return number
