"""All settings in one typed place, composed of one part per concern and filled by one :meth:`Settings.from_env`.

Every field ``name`` of a part is read from the environment variable ``T2I_<NAME>`` (e.g. ``T2I_MODEL``), except
the values AppAPI gives an ExApp (``APP_ID`` …, see :class:`ExAppSettings`); CLI flags and the Nextcloud admin
settings override them by field name (:meth:`Settings.updated`). Nothing else in the project reads ``T2I_*``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from runtime.errors import ConfigError
from runtime.options import LoadOptions

ENV_PREFIX = "T2I_"
FormatChoice = Literal["auto", "onnx", "openvino"]


def _default_store() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "text2image-sd2" / "models"


@dataclass(frozen=True)
class StoreSettings:
    """Which model, and where bundles are kept."""

    #: Model to use when none is given: a short name (sd-turbo, sd2.1-base, sd2.1, sdxs-512), a hub id, a folder,
    #: or tiny.
    #: The ExApp takes a comma-separated list (one provider each).
    model: str = "sd-turbo"
    #: Folder where downloaded and exported bundles are kept.
    model_store: Path = field(default_factory=_default_store)
    #: Bundle format to export hub models to: openvino (fastest on x86 CPUs) or onnx (needed for CUDA).
    format: FormatChoice = "auto"
    #: Never touch the network; models must already be in the store.
    offline: bool = False


@dataclass(frozen=True, kw_only=True)
class RuntimeSettings(LoadOptions):
    """How a loaded pipeline runs (the runtime's :class:`LoadOptions`, passed to :meth:`runtime.Pipeline.load`) and
    how work is spread."""

    #: Generation workers per process; the thread cap is split between them (e.g. one per GPU).
    workers: int = 1
    #: Most images run through the UNet at once; larger requests run in several batches.
    max_batch: int = 4


@dataclass(frozen=True)
class ImageSettings:
    """What goes into every PNG."""

    #: Mark generated PNGs as AI-generated in their metadata (IPTC trainedAlgorithmicMedia).
    ai_marking: bool = True
    #: Also stamp "Generated using Artificial Intelligence" visibly into the bottom-left corner of each image.
    watermark: bool = False


def _appapi(name: str, default: Any = "", secret: bool = False) -> Any:
    """A field AppAPI sets (under its own name, not ``T2I_*``)."""
    return field(default=default, repr=not secret, metadata={"env": name})


@dataclass(frozen=True)
class ExAppSettings:
    """The Nextcloud ExApp: what AppAPI gives it, and how it polls."""

    #: Seconds between polls for new tasks when no trigger has arrived (Nextcloud < 33 never triggers).
    poll_interval: float = 5.0
    #: Seconds between reads of the admin settings form's values (Nextcloud does not announce a change).
    settings_poll: float = 10.0
    nextcloud_url: str = _appapi("NEXTCLOUD_URL")
    app_id: str = _appapi("APP_ID")
    app_version: str = _appapi("APP_VERSION")
    app_secret: str = _appapi("APP_SECRET", secret=True)
    app_host: str = _appapi("APP_HOST", "127.0.0.1")
    app_port: int = _appapi("APP_PORT", 0)
    #: With HaRP (``HP_SHARED_KEY`` set), the ExApp listens on the unix socket ``HP_EXAPP_SOCK``.
    harp_key: str = _appapi("HP_SHARED_KEY", secret=True)
    harp_socket: str = _appapi("HP_EXAPP_SOCK", "/tmp/exapp.sock")

    def missing(self) -> list[str]:
        """The variables AppAPI always sets that this environment lacks."""
        wanted = {"nextcloud_url": self.nextcloud_url, "app_id": self.app_id, "app_version": self.app_version,
                  "app_secret": self.app_secret}
        return [_env_name(_field(type(self), k)) for k, v in wanted.items() if not v]


@dataclass(frozen=True)
class StandaloneSettings:
    """The standalone task service (``text2image serve --standalone``)."""

    #: Folder of the task store (SQLite) and the images.
    data_dir: Path = field(default_factory=lambda: _default_store().parent / "tasks")
    #: Address and port to listen on.
    host: str = "127.0.0.1"
    port: int = 8765
    #: Credentials, "user:secret" pairs separated by commas; a secret works as a bearer token and as the basic-auth
    #: password of its user.
    users: str = field(default="", repr=False)
    #: Schedules allowed per user within rate_window seconds (more answer 429).
    rate_limit: int = 20
    rate_window: int = 120
    #: Finished tasks older than this many days are deleted with their images.
    task_max_age_days: int = 30
    #: Connections one client address may hold open; its idle ones make room for a new one, and when all are busy
    #: the new one is answered 503. Trusted proxies are exempt.
    max_connections_per_address: int = 128
    #: Reverse proxies (addresses or networks, comma-separated) whose X-Forwarded-For names the client; none by
    #: default, so the client is always the connecting address.
    trusted_proxies: str = ""
    #: Host names the service answers to, comma-separated ("*": any). IP addresses, localhost and this machine's
    #: name are always accepted; any other Host is answered 400 (a guard against DNS rebinding).
    allowed_hosts: str = ""


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP server of both services (the standalone service and the ExApp)."""

    #: Seconds a client has to send a request's head (from connecting, or from its last answer) and, again, its
    #: body; slower connections are closed (408 for a body).
    request_timeout: float = 30.0
    #: Open connections at once; near the limit idle ones are closed, and when all are busy more are answered 503.
    max_connections: int = 2000


PARTS = {"store": StoreSettings, "runtime": RuntimeSettings, "images": ImageSettings, "exapp": ExAppSettings,
         "standalone": StandaloneSettings, "http": HttpSettings}


@dataclass(frozen=True)
class Settings:
    """Settings of the CLI and both services, one part per concern."""

    store: StoreSettings = field(default_factory=StoreSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    exapp: ExAppSettings = field(default_factory=ExAppSettings)
    standalone: StandaloneSettings = field(default_factory=StandaloneSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    #: The field names set by the environment or by an override (not defaults), e.g. to tell whether an admin chose
    #: the model store.
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment (``T2I_*`` and AppAPI's variables), then apply the non-None ``overrides`` (CLI
        flags) by field name. A value that does not fit its field raises :class:`ConfigError` naming the variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for _part, f in _all_fields():
            raw = env.get(_env_name(f))
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls().updated(**values)

    def updated(self, **changes: Any) -> Settings:
        """These settings with fields changed by name (``model=…``, ``threads=…``), each checked like the
        environment's; an unknown name raises :class:`ConfigError`."""
        by_part: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            part, f = _find(name)
            by_part.setdefault(part, {})[name] = _check(f, value, name)
        parts = {p: replace(getattr(self, p), **v) for p, v in by_part.items()}
        return replace(self, **parts, explicit=self.explicit | frozenset(changes))

    def flat(self) -> dict[str, Any]:
        """Every field by name (for logs and tests; secrets included)."""
        return {f.name: getattr(getattr(self, part), f.name) for part, f in _all_fields()}

    def bundle_format(self) -> str:
        """The bundle format hub models are exported to: the setting, or for auto the engine's (onnx for CUDA or
        onnxruntime, openvino otherwise)."""
        if self.store.format != "auto":
            return self.store.format
        from backend.model_store import default_format

        return default_format(self.runtime.engine)

    def threads_per_worker(self, sessions: int) -> int:
        """The thread cap (``threads``, or the cores this process may use) split between ``sessions`` workers
        that may all be busy at once; never below 1."""
        from runtime.engines import default_threads

        return max(1, (self.runtime.threads or default_threads()) // max(1, sessions))

    @staticmethod
    def env_names(part: str | None = None) -> dict[str, str]:
        """``{field name: environment variable}`` of every field, or of one part's."""
        return {f.name: _env_name(f) for p, f in _all_fields() if part in (None, p)}


def _all_fields() -> Iterator[tuple[str, Field]]:
    for part, cls in PARTS.items():
        for f in fields(cls):
            yield part, f


def _find(name: str) -> tuple[str, Field]:
    for part, f in _all_fields():
        if f.name == name:
            return part, f
    raise ConfigError(f"setting '{name}' is not known; the settings are {', '.join(Settings.env_names())}")


def _field(cls: type, name: str) -> Field:
    return next(f for f in fields(cls) if f.name == name)


def _env_name(f: Field) -> str:
    return f.metadata.get("env") or ENV_PREFIX + f.name.upper()


def _hint(f: Field) -> Any:
    owner = next(cls for cls in PARTS.values() if f in fields(cls))
    return get_type_hints(owner)[f.name]


def _convert(f: Field, raw: str) -> Any:
    """An environment string as the field's type."""
    name, kind = _env_name(f), _hint(f)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r} is not a yes/no value; use 1/0, true/false, yes/no")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
    if kind is Path:
        return Path(raw).expanduser()
    return raw


def _check(f: Field, value: Any, given_as: str) -> Any:
    """``value`` if it fits the field (a Literal's choices, a number's type), else :class:`ConfigError`."""
    kind = _hint(f)
    name = _env_name(f)
    choices = get_args(kind) if getattr(kind, "__origin__", None) is Literal else ()
    if choices and value not in choices:
        raise ConfigError(f"{name}={value!r} is not allowed; use one of {', '.join(map(str, choices))}")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a yes/no value")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name}={value!r} is not a number")
    if kind is int and value != int(value):
        raise ConfigError(f"{name}={value!r} is not a whole number")
    if kind is Path:
        return Path(value).expanduser()
    return int(value) if kind is int else float(value) if kind is float else value
