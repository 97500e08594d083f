"""Output folders checked before the work that fills them: writable, with room for what will be written.

A command that scores 1,000 episodes or trains an epoch and only then finds its folder read-only
(or its disk too small) has lost that work; these checks run first and write nothing but a
probe file that is removed at once.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def check_output_folder(path: str | os.PathLike, what: str) -> None:
    """Refuse an output folder that cannot be created or written (``what`` names the option, e.g. "test --out").

    Raises:
        OSError: naming the folder and why (not a folder, read-only, no permission).
    """
    path = Path(path)
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{what} {path}: cannot be a folder: {base} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".svfseg-probe-", dir=base)
    except OSError as e:
        raise OSError(e.errno, f"{what} {path}: cannot write in {base} ({e.strerror}); choose another folder "
                               f"before the work starts") from None
    os.close(fd)
    os.unlink(probe)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds (or will hold) ``path``."""
    return shutil.disk_usage(_existing_ancestor(Path(path))).free
