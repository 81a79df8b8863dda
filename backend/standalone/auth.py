"""Who is calling, and how often: credentials per user (bearer token or basic auth) and a per-user rate limit."""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from runtime.errors import ConfigError

#: Secrets are compared in constant time and failed logins are slowed down; 16 characters keep guessing hopeless.
MIN_SECRET_CHARS = 16
#: The user that gets a generated token when no users are configured.
LOCAL_USER = "local"
CREDENTIALS_FILE = "credentials"
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class Credentials:
    """Users and their secrets. A secret is accepted as ``Authorization: Bearer <secret>`` and as the password of
    ``Authorization: Basic base64(user:secret)``."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = dict(users)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """Read ``"alice:secret1,bob:secret2"`` (the T2I_USERS format). Messages never repeat a secret."""
        users: dict[str, str] = {}
        for number, pair in enumerate((p.strip() for p in text.split(",") if p.strip()), start=1):
            user, sep, secret = pair.partition(":")
            if not sep or not _USER_RE.match(user):
                raise ConfigError(f"T2I_USERS entry {number} is not 'user:secret' with a user name of letters, digits, "
                               "'_', '.', '@' or '-' (at most 64)")
            if len(secret) < MIN_SECRET_CHARS:
                raise ConfigError(f"the secret of user {user!r} in T2I_USERS is {len(secret)} characters long; use at "
                               f"least {MIN_SECRET_CHARS} (e.g. from: python -c 'import secrets; "
                               "print(secrets.token_urlsafe(24))')")
            if user in users:
                raise ConfigError(f"user {user!r} appears twice in T2I_USERS")
            if secret in users.values():
                raise ConfigError(f"user {user!r} has the same secret as another user in T2I_USERS; a bearer token "
                               "must name one user")
            users[user] = secret
        return cls(users)

    @classmethod
    def local(cls, data_dir: Path) -> tuple[Credentials, Path]:
        """One user, ``local``, with a random token kept in ``<data_dir>/credentials`` (mode 0600, reused)."""
        path = data_dir / CREDENTIALS_FILE
        try:
            if not path.is_file():
                data_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(f"{LOCAL_USER}:{secrets.token_urlsafe(24)}\n")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"the credentials file {str(path)!r} cannot be written or read ({exc}); give the service "
                           "a writable data folder (--data-dir / T2I_DATA_DIR) or users in T2I_USERS") from None
        return cls.parse(text.strip()), path

    def authenticate(self, header: str | None) -> str | None:
        """The user an ``Authorization`` header proves, or None."""
        if not header:
            return None
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            # Compare with every secret, so the time taken does not tell how many users there are before a match.
            found = [u for u, s in self.users.items() if hmac.compare_digest(s.encode(), value.encode())]
            return found[0] if found else None
        if scheme.lower() == "basic":
            try:
                user, sep, secret = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            expected = self.users.get(user)
            if sep and expected is not None and hmac.compare_digest(expected.encode(), secret.encode()):
                return user
        return None


class RateLimiter:
    """At most ``limit`` events per ``window`` seconds per key (a sliding window). ``limit`` ≤ 0 turns it off.

    Check-and-record is one atomic step, so concurrent requests cannot slip past the limit together.
    """

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self._clock = limit, window, clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Record one event for ``key`` and return 0, or return the seconds to wait when the limit is reached."""
        if self.limit <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                return max(0.001, events[0] + self.window - now)
            events.append(now)
            return 0.0
