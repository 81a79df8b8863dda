"""All settings in one typed place, filled from ``T2I_*`` environment variables; CLI flags override them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from runtime.errors import T2IError

ENV_PREFIX = "T2I_"


def _default_store() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "text2image-sd2" / "models"


@dataclass(frozen=True)
class Settings:
    """Settings of the CLI and services. Each field has env var ``T2I_<FIELD>`` (e.g. ``T2I_MODEL``)."""

    #: Model to use when none is given: a short name (sd-turbo, sd2.1-base, sd2.1), a hub id, a folder, or tiny.
    model: str = "sd-turbo"
    #: Folder where downloaded and exported bundles are kept.
    model_store: Path = field(default_factory=_default_store)
    #: Bundle format to export hub models to: openvino (fastest on x86 CPUs) or onnx (needed for CUDA).
    format: str = "auto"
    #: auto | cpu | cuda
    device: str = "auto"
    #: auto | onnxruntime | openvino
    engine: str = "auto"
    #: Latent decoder: vae (the model's own) or taesd (much faster, coarser; the bundle must include it).
    decoder: str = "vae"
    #: Math precision: auto (OpenVINO picks bf16 on CPUs with AVX512-BF16/AMX), fp32 (exact), bf16 (OpenVINO).
    precision: str = "auto"
    #: On CUDA, capture a CUDA graph per image size and replay it (less launch overhead, more GPU memory).
    cuda_graph: bool = False
    #: Op threads for both engines; 0 = the cores this process may use.
    threads: int = 0
    #: Never touch the network; models must already be in the store.
    offline: bool = False
    #: Generation workers per process; the thread cap is split between them (e.g. one per GPU).
    workers: int = 1
    #: Most images run through the UNet at once; larger requests run in several batches.
    max_batch: int = 4
    #: Mark generated PNGs as AI-generated in their metadata (IPTC trainedAlgorithmicMedia).
    ai_marking: bool = True
    #: Also stamp "Generated using Artificial Intelligence" visibly into the bottom-left corner of each image.
    watermark: bool = False
    #: Seconds between polls for new tasks when no trigger has arrived (Nextcloud < 33 never triggers).
    poll_interval: float = 5.0
    #: Standalone service: folder of the task store (SQLite) and the images.
    data_dir: Path = field(default_factory=lambda: _default_store().parent / "tasks")
    #: Standalone service: address and port to listen on.
    host: str = "127.0.0.1"
    port: int = 8765
    #: Standalone service: credentials, "user:secret" pairs separated by commas; a secret works as a bearer token
    #: and as the basic-auth password of its user.
    users: str = ""
    #: Standalone service: schedules allowed per user within rate_window seconds (more answer 429).
    rate_limit: int = 20
    rate_window: int = 120
    #: Standalone service: finished tasks older than this many days are deleted with their images.
    task_max_age_days: int = 30

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``T2I_*`` variables, then apply non-None ``overrides`` (CLI flags)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            values[f.name] = _convert(f.name, raw, default)
        settings = cls(**values)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _convert(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise T2IError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a yes/no value; use 1/0, true/false, yes/no")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise T2IError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a whole number") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise T2IError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from None
    if isinstance(default, Path):
        return Path(raw).expanduser()
    return raw
