"""The errors the runtime raises: one user-facing tree, and cancellation beside it.

Each front end maps the tree in one place: the CLI turns any :class:`T2IError` into its error line; a task service
tells the user "your input was refused" for :class:`InvalidRequest` only, and "internal error" (with the detail for
the admin) for everything else. Unexpected failures are *not* wrapped in this tree, so that they are logged with a
traceback.
"""

from __future__ import annotations

from typing import Any


class T2IError(Exception):
    """A problem the user or admin can act on; the message names the bad value and what is allowed."""


def quoted(value: Any, limit: int = 100) -> str:
    """``value`` for an error message, cut to about ``limit`` characters so that an outside value of any size or
    content stays one short line: a string repr-quoted (control characters escaped), anything else as ``repr``."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    if not isinstance(value, str):
        return f"{text[:limit]}… ({len(text):,} characters)"
    cut = repr(text[:limit])
    return f"{cut[:-1]}…{cut[-1]} ({len(text):,} characters)"


class InvalidRequest(T2IError):
    """A generation request the model cannot take (size, count, steps, guidance, seed, scheduler, prompt): the
    requester's to fix."""


class ConfigError(T2IError):
    """A setting, option or deployment that is not allowed or not complete (device, engine, threads, precision,
    decoder, users, ports, folders, a missing extra): the admin's (or the command's caller's) to fix."""


class BundleError(T2IError):
    """A model bundle that is missing, damaged, or made for other hardware or software."""


class EngineError(T2IError):
    """An inference engine that is missing, or failed to load, compile or run a graph, or a device that does not
    answer."""


class Unavailable(T2IError):
    """A service that cannot take work now (no model loaded yet, stopping, its task store not usable): nobody's
    input is wrong; try again later."""


class GenerationCancelled(Exception):
    """Raised by ``Pipeline.generate`` when the ``on_step`` callback asked to stop: a request, not a failure, so it
    stands outside the T2IError tree."""
