"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

A crash or an interruption leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created).

    The data is flushed to disk before the rename. The file keeps the mode of the file it
    replaces; a new file gets the mode ``open()`` would give it (0o666 minus the umask), so a
    colleague can read a run's results exactly when they can read the user's other files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as handle:
            if previous is not None:
                os.fchmod(handle.fileno(), previous)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))
