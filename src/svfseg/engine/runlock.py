"""An exclusive OS lock on a run folder, held for a whole run, that dies with its process."""
from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".svfseg.lock"


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """Context manager: ``flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.svfseg.lock``.

    The kernel drops a ``flock`` when its process ends, however it ends (kill -9 included), so
    a lock is never stale; the file's text (PID, host, command) is only there to name the
    holder in the refusal. The folder is created if needed: the lock is the first thing a run
    writes.

    Args:
        run_dir: the folder to own.
        what: what takes the lock (``train``, ``compare cell``, ...), recorded for the refusal.
        instead: what a refused user may do instead (the refusal's last words).
    """

    def __init__(self, run_dir: str | os.PathLike, what: str = "svfseg",
                 instead: str = "choose another folder (name=<new name>)"):
        self.run_dir, self.what, self.instead = Path(run_dir), what, instead
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None
        self._created = False

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLocked` naming the holder (never waits)."""
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.run_dir}: in use by {holder}; wait for it to end, or "
                            f"{self.instead}") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": platform.node(), "what": self.what, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it could split two waiters onto two inodes)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> bool:
        self.release()
        if exc_type is not None and self._created:
            # A run refused by its checks leaves nothing behind: the folder it made holds only the lock.
            try:
                if [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                    self.path.unlink()
                    self.run_dir.rmdir()
            except OSError:
                pass
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"{info.get('what', 'svfseg')} (PID {info['pid']} on host {info['host']})"
    except (ValueError, KeyError, OSError):
        return "another process (its PID is not recorded yet)"
