"""The one user-facing error type; each front end translates it at its boundary (CLI, Nextcloud, REST)."""

from __future__ import annotations


class T2IError(Exception):
    """A problem the user or admin can act on: bad input, a broken bundle, a missing engine.

    The message names the bad value and what is allowed. Unexpected failures are *not* wrapped in this type so
    that they are logged with a traceback.
    """


class GenerationCancelled(T2IError):
    """Raised by ``Pipeline.generate`` when the ``on_step`` callback asked to stop."""
