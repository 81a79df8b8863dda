"""What a task asks for, checked once for every front end (Nextcloud, the standalone service, Python callers).

Nextcloud validates only types, not ranges (numberOfImages 0, 13 or 1.5 and a 100 kB prompt all reach the provider),
so every range is checked here, and each message names the value and what is allowed: it is shown to the user.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from runtime import validation as v
from runtime.errors import InvalidRequest
from runtime.schedulers import SCHEDULER_NAMES
from runtime.validation import shown

#: CLIP reads 77 tokens; a prompt this long is already far past that. Larger inputs are refused, not truncated.
MAX_PROMPT_CHARS = 4000

#: Task input keys: Nextcloud's core:text2image slots and our optional ones, with a description for provider shapes.
CORE_INPUTS = {"input": "Prompt: what the image should show", "numberOfImages": "How many images (1-12)"}
OPTIONAL_INPUTS = {
    "size": "Image size WIDTHxHEIGHT, multiples of 64 from 256 to 1024",
    "steps": "Denoising steps (1-100); more is slower and often finer",
    "guidance": "How closely to follow the prompt (0-30; 0 or 1 turns guidance off)",
    "negative_prompt": "What the image should not show",
    "seed": "Seed for reproducible images (image i uses seed+i)",
    "scheduler": f"Sampler: {', '.join(SCHEDULER_NAMES)}",
}


class TaskInputError(InvalidRequest):
    """A task's input is not acceptable; the message is meant for the user who sent it."""


@dataclass(frozen=True)
class ImageRequest:
    """A checked request for images. None means the model's default (or a random seed)."""

    prompt: str
    n: int = 1
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    scheduler: str | None = None

    def to_input(self) -> dict[str, Any]:
        """Back to task-input keys (for storing and re-running)."""
        d = asdict(self)
        out: dict[str, Any] = {"input": d.pop("prompt"), "numberOfImages": d.pop("n")}
        w, h = d.pop("width"), d.pop("height")
        if w is not None and h is not None:
            out["size"] = f"{w}x{h}"
        out.update({k: val for k, val in d.items() if val is not None and val != ""})
        return out


def _whole(name: str, value: Any, check: Any) -> int:
    """Accept an int or an integral float (JSON has one number type); anything else is refused by name."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    # ASCII digits only: str.isdigit() also admits '²' and '①', which int() then rejects.
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value.strip()):
        value = int(value)
    return int(check(value))


def _text(name: str, value: Any, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise TaskInputError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise TaskInputError(f"{name} is {len(value)} characters long; at most {limit} are allowed")
    return value


def parse_task_input(raw: Mapping[str, Any]) -> ImageRequest:
    """Check a task's input dict (Nextcloud keys) and return the request; raise :class:`TaskInputError`."""
    if not isinstance(raw, Mapping):
        raise TaskInputError(
            f"task input must be an object with 'input' and 'numberOfImages', got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - set(CORE_INPUTS) - set(OPTIONAL_INPUTS))
    if unknown:
        allowed = ", ".join([*CORE_INPUTS, *OPTIONAL_INPUTS])
        raise TaskInputError(f"unknown input {', '.join(repr(k) for k in unknown)}; allowed: {allowed}")
    if raw.get("input") is None:
        raise TaskInputError("the prompt ('input') is missing")
    prompt = _text("prompt", raw["input"])
    if not prompt.strip():
        raise TaskInputError("the prompt is empty; describe the image you want")
    try:
        n = _whole("numberOfImages", raw.get("numberOfImages", 1), v.check_count)
        width = height = None
        if raw.get("size") not in (None, ""):
            if not isinstance(raw["size"], str):
                raise TaskInputError(f"size {shown(raw['size'])} must be text like 512x512")
            width, height = v.parse_size(raw["size"])
        steps = None if raw.get("steps") is None else _whole("steps", raw["steps"], v.check_steps)
        seed = None if raw.get("seed") is None else _whole("seed", raw["seed"], v.check_seed)
        guidance = None
        if raw.get("guidance") is not None:
            g = raw["guidance"]
            if isinstance(g, str):
                try:
                    g = float(g)
                except ValueError:
                    pass
            guidance = v.check_guidance(g)
    except TaskInputError:
        raise
    except InvalidRequest as exc:
        raise TaskInputError(str(exc)) from None
    scheduler = raw.get("scheduler") or None
    if scheduler is not None and scheduler not in SCHEDULER_NAMES:
        raise TaskInputError(f"scheduler {shown(scheduler)} is not known; use one of {', '.join(SCHEDULER_NAMES)}")
    negative = _text("negative prompt", raw.get("negative_prompt") or "")
    return ImageRequest(prompt, n, negative, width, height, steps, guidance, seed, scheduler)
