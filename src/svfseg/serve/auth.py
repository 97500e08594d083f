"""`svfseg serve --auth`: the password from the environment or a file (not `ps`-visible), and a login that slows
down after each failed attempt."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
from pathlib import Path
from typing import Mapping, Optional

logger = logging.getLogger(__name__)

PASSWORD_ENV = "SVFSEG_SERVE_PASSWORD"


def parse_auth(value: Optional[str]) -> Optional[tuple[str, str]]:
    """``USER:PASS`` -> (user, password); None stays None."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth: expected USER:PASS with both parts non-empty, got {value!r}")
    return user, password


def resolve_auth(value: Optional[str], password_file: Optional[Path] = None,
                 environ: Mapping[str, str] = os.environ) -> tuple[Optional[tuple[str, str]], Optional[str]]:
    """The (user, password) of ``--auth`` and a warning to print, if any.

    ``--auth USER`` takes the password from ``--password-file`` (its first line) or else from
    ``$SVFSEG_SERVE_PASSWORD``; neither shows in ``ps``. ``--auth USER:PASS`` still works, with
    a warning that other users of the machine can read it.

    Raises:
        ValueError: an empty user, no password anywhere, an unreadable or empty password file,
            or ``--password-file`` without ``--auth``.
    """
    if value is None:
        if password_file is not None:
            raise ValueError("--password-file: expected --auth USER with it, found no --auth")
        return None, None
    if ":" in value:
        return parse_auth(value), ("--auth USER:PASS puts the password on the command line, where other users "
                                   f"can read it (ps); use --auth USER with ${PASSWORD_ENV} or --password-file")
    if not value:
        raise ValueError("--auth: expected a user name, found ''")
    if password_file is not None:
        try:
            lines = Path(password_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--password-file {password_file}: cannot read it ({e.strerror})") from None
        password = lines[0] if lines else ""
        if not password:
            raise ValueError(f"--password-file {password_file}: expected the password on its first line, "
                             f"found an empty line")
        return (value, password), None
    password = environ.get(PASSWORD_ENV, "")
    if not password:
        raise ValueError(f"--auth {value}: no password; set ${PASSWORD_ENV} or give --password-file FILE")
    return (value, password), None


class LoginGuard:
    """Checks a login; each failed attempt in a row doubles the wait before its answer (``base`` .. ``cap`` s).

    Attempts are answered one at a time, so parallel guesses wait too. The wait is shared by all
    clients (Gradio's login hook is not told who is asking): while someone guesses, the real user
    waits as well. At most ``max_waiting`` attempts are checked in turn; one more is refused at
    once, unchecked: a burst of guesses (their clients long gone, their attempts still queued)
    would otherwise keep the real user out for one ``cap`` per guess (60 guesses: 8 minutes),
    and now keeps them out for at most ``max_waiting`` x ``cap`` seconds after it ends.
    """

    def __init__(self, user: str, password: str, *, base: float = 0.5, cap: float = 8.0, max_waiting: int = 4):
        self._user, self._password = user.encode(), password.encode()
        self.base, self.cap, self.max_waiting = base, cap, max_waiting
        self.failures = 0
        self.waiting = 0  # attempts being checked or queued to be
        self._lock: Optional[asyncio.Lock] = None

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failed attempt in a row."""
        return min(self.base * 2 ** (failures - 1), self.cap) if failures > 0 else 0.0

    async def check(self, username: str, password: str) -> bool:
        """Gradio's ``auth`` callable (a coroutine function, so Gradio awaits it instead of blocking its loop)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self.waiting >= self.max_waiting:
            logger.warning("login as %r refused unchecked: %d attempts already waiting (a burst of guesses?)",
                           username, self.waiting)
            return False
        self.waiting += 1
        try:
            async with self._lock:
                ok = hmac.compare_digest(username.encode(), self._user) & hmac.compare_digest(password.encode(),
                                                                                               self._password)
                if ok:
                    self.failures = 0
                    return True
                self.failures += 1
                wait = self.delay(self.failures)
                logger.warning("failed login as %r (%d in a row); answered after %.1f s", username, self.failures,
                               wait)
                await asyncio.sleep(wait)
                return False
        finally:
            self.waiting -= 1
