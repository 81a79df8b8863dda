"""The task-input codec: a task's input (Nextcloud's keys, also the standalone API's and the task store's) to the
runtime's one request type and back. :func:`parse` is the only place that refuses unknown keys and reads numbers sent
loosely (as text or integral floats); :func:`dump` writes a request back in the same keys.

Nextcloud validates only types, not ranges (numberOfImages 0, 13 or 1.5 and a 100 kB prompt all reach the provider).
This module only parses: keys, numbers sent as text, the size string; every value is then checked by
:class:`runtime.request.GenerationRequest` itself, whose messages name the value and what is allowed and are shown to
the user as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from runtime import validation as v
from runtime.errors import InvalidRequest
from runtime.request import GenerationRequest
from runtime.schedulers import SCHEDULER_NAMES
from runtime.validation import shown

#: Task input keys: Nextcloud's core:text2image slots and our optional ones, with a description for provider shapes.
CORE_INPUTS = {"input": "Prompt: what the image should show", "numberOfImages": f"How many images (1-{v.MAX_IMAGES})"}
OPTIONAL_INPUTS = {
    "size": f"Image size WIDTHxHEIGHT, multiples of {v.SIDE_STEP} from {v.MIN_SIDE} to {v.MAX_SIDE}",
    "steps": f"Denoising steps (1-{v.MAX_STEPS}); more is slower and often finer",
    "guidance": f"How closely to follow the prompt (0-{v.MAX_GUIDANCE:g}; 0 or 1 turns guidance off)",
    "negative_prompt": "What the image should not show",
    "seed": "Seed for reproducible images (image i uses seed+i)",
    "scheduler": f"Sampler: {', '.join(SCHEDULER_NAMES)}",
}


#: The whitespace int() and float() skip around ASCII digits.
_ASCII_SPACE = " \t\n\r\v\f"


def dump(request: GenerationRequest) -> dict[str, Any]:
    """A request back in task-input keys (for storing and showing); ``parse(dump(r)) == r``."""
    d = asdict(request)
    out: dict[str, Any] = {"input": d.pop("prompt"), "numberOfImages": d.pop("n")}
    w, h = d.pop("width"), d.pop("height")
    if w is not None and h is not None:
        out["size"] = f"{w}x{h}"
    out.update({k: val for k, val in d.items() if val is not None and val != ""})
    return out


def _number(value: Any, kind: type) -> Any:
    """JSON and forms carry numbers loosely: an integral float or a numeric string becomes ``kind``; anything
    else is passed on as it is, for the request's own check to refuse by name."""
    if kind is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        # ASCII digits only: str.isdigit() also admits '²' and '①', which int() then rejects. The spaces around
        # them are only those int() skips too: str.strip() also removes control characters such as '\x1f'.
        if isinstance(value, str):
            text = value.strip(_ASCII_SPACE)
            if re.fullmatch(r"-?[0-9]{1,19}", text):
                return int(text)
    elif isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse(raw: Mapping[str, Any]) -> GenerationRequest:
    """Parse a task's input dict (Nextcloud keys) into a checked request; raise :class:`InvalidRequest` naming the
    bad key or value and what is allowed."""
    if not isinstance(raw, Mapping):
        raise InvalidRequest(
            f"task input must be an object with 'input' and 'numberOfImages', got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - set(CORE_INPUTS) - set(OPTIONAL_INPUTS))
    if unknown:
        allowed = ", ".join([*CORE_INPUTS, *OPTIONAL_INPUTS])
        raise InvalidRequest(f"unknown input {', '.join(shown(k) for k in unknown[:5])}; allowed: {allowed}")
    if raw.get("input") is None:
        raise InvalidRequest("the prompt ('input') is missing")
    width = height = None
    if raw.get("size") not in (None, ""):
        if not isinstance(raw["size"], str):
            raise InvalidRequest(f"size {shown(raw['size'])} must be text like 512x512")
        width, height = v.parse_size(raw["size"])
    optional = {key: None if raw.get(key) is None else _number(raw[key], kind)
                for key, kind in (("steps", int), ("guidance", float), ("seed", int))}
    return GenerationRequest(prompt=raw["input"], negative_prompt=raw.get("negative_prompt") or "",
                             n=_number(raw.get("numberOfImages", 1), int), width=width, height=height,
                             scheduler=raw.get("scheduler") or None, **optional)
