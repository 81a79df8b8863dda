"""Input checks shared by every front end. Each error names the bad value and what is allowed."""

from __future__ import annotations

import math
import re

from runtime.errors import InvalidRequest

MIN_SIDE, MAX_SIDE, SIDE_STEP = 256, 1024, 64
MAX_IMAGES = 12
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1

def shown(value: object, limit: int = 60) -> str:
    """A value as quoted in an error message, cut short: messages reach users and logs, huge inputs must not."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' → (width, height), both checked with :func:`check_side`."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidRequest(
            f"size {shown(text)} is not of the form WIDTHxHEIGHT; use e.g. 512x512 "
            f"(multiples of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE})"
        )
    width, height = int(m.group(1)), int(m.group(2))
    check_side("width", width)
    check_side("height", height)
    return width, height


def check_side(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(
            f"{name} {shown(value)} is not a whole number; use a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}"
        )
    if value % SIDE_STEP or not MIN_SIDE <= value <= MAX_SIDE:
        raise InvalidRequest(
            f"{name} {value} is not allowed; use a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}"
        )
    return value


def _whole(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} {shown(value)} is not a whole number; use {low} to {high}")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} {shown(value)} is out of range; use {low} to {high}")
    return value


def check_count(n: object) -> int:
    return _whole("number of images", n, 1, MAX_IMAGES)


def check_steps(steps: object) -> int:
    return _whole("steps", steps, 1, MAX_STEPS)


def check_seed(seed: object) -> int:
    return _whole("seed", seed, 0, MAX_SEED)


def check_guidance(guidance: object) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or (
        isinstance(guidance, float) and not math.isfinite(guidance)
    ):
        raise InvalidRequest(f"guidance {shown(guidance)} is not a finite number; use 0 to {MAX_GUIDANCE:g}")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise InvalidRequest(f"guidance {shown(guidance)} is out of range; use 0 to {MAX_GUIDANCE:g}")
    return float(guidance)


#: CLIP reads 77 tokens; a prompt this long is already far past that. Longer ones are refused, not truncated.
MAX_PROMPT_CHARS = 4000


def check_text(name: str, text: object) -> str:
    """Text that can be stored and shown: a str without lone surrogates (JSON's "\\ud800" decodes to one, and no
    UTF-8 file, database or reply can hold it)."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{name} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{name} holds a character that is not text (a lone surrogate at position "
                             f"{exc.start}); send it as UTF-8") from None
    return text


def check_prompt(name: str, text: object) -> str:
    checked = check_text(name, text)
    if len(checked) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"{name} is {len(checked)} characters long; at most {MAX_PROMPT_CHARS} are allowed")
    return checked
