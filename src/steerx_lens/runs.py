"""What a run may reuse, what its files are called, and who may write its output folder.

- :func:`content_key`: a short hash of JSON content. A run keys its results by the hash of
  everything they depend on (the configuration, the model, the users' data), so a result is
  reused only when all of that is unchanged.
- :func:`user_file_names`: one file name per user id, distinct (also on case-insensitive file
  systems), valid, visible and at most :data:`MAX_NAME_CHARS` characters long. An id that is
  already such a name is kept; any other becomes a readable prefix, ``~`` and a hash of the id
  (``a/b`` → ``a_b~0e2d5b7c4c3b``). Kept names never contain ``~``, so the two kinds cannot
  collide. :func:`write_name_index` records the mapping (``names.json``: file name → user id).
- :func:`out_lock`: one run at a time per output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steerx_lens.atomic import write_text
from steerx_lens.errors import DataError, OutputLockedError

KEY_CHARS = 16
KEPT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""User ids of this form (not ending with ``.``) are their own file name."""
MAX_NAME_CHARS = 64
PREFIX_CHARS = 40
HASH_CHARS = 12
INDEX_FILE = "names.json"
LOCK_FILE = "steerx.lock"

_held: dict[Path, list[int]] = {}  # folder -> [lock file descriptor, depth] of this process


def content_key(content: Any) -> str:
    """A 16-hex-digit SHA-256 of ``content`` as canonical JSON (sorted keys): equal content
    gives an equal key, any change a different one."""
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_CHARS]


def _is_kept(user_id: str) -> bool:
    return (
        len(user_id) <= MAX_NAME_CHARS
        and KEPT_NAME.fullmatch(user_id) is not None
        and not user_id.endswith(".")
    )


def _escaped(user_id: str, digits: int) -> str:
    """``<readable prefix>~<hash of the id>``: the prefix keeps the id's safe characters."""
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "_" for c in user_id)
    prefix = readable.lstrip(".-")[:PREFIX_CHARS] or "user"
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}~{digest[:digits]}"


def user_file_names(user_ids: Sequence[str]) -> dict[str, str]:
    """A distinct file name (without suffix) for every user id; :class:`DataError` on a
    duplicate id.

    Ids that are valid names are kept unless another id differs from them only by case;
    every other id gets ``<prefix>~<hash>`` (see the module docstring). A name depends only on
    the id and, for case clashes, on the other ids of the same run.
    """
    duplicates = sorted(uid for uid, n in Counter(user_ids).items() if n > 1)
    if duplicates:
        raise DataError(f"duplicate user id(s) {duplicates[:5]}: every user needs its own id")
    folded = Counter(uid.casefold() for uid in user_ids if _is_kept(uid))
    names = {
        uid: uid if _is_kept(uid) and folded[uid.casefold()] == 1 else _escaped(uid, HASH_CHARS)
        for uid in user_ids
    }
    clashes = Counter(name.casefold() for name in names.values())
    return {  # two ids whose short hashes clash get the whole hash
        uid: _escaped(uid, 64) if clashes[name.casefold()] > 1 else name
        for uid, name in names.items()
    }


def write_name_index(folder: str | Path, names: Mapping[str, str]) -> Path:
    """Add ``names`` (user id → file name) to ``folder/names.json`` (file name → user id).

    Names of earlier runs into the folder are kept: a name always maps to one id.
    """
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    index.update({name: uid for uid, name in names.items()})
    return write_text(path, json.dumps(dict(sorted(index.items())), indent=1, ensure_ascii=False))


def _acquire(path: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock, or :class:`OutputLockedError`."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 100).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise OutputLockedError(
                f"{path.parent} is in use by another steerx run ({holder}): wait for it to "
                "finish, or write to another folder"
            ) from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous holder removed the file as we opened it: try again


@contextmanager
def out_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` (created if needed) for this process while the block runs.

    Another process that asks for the same folder gets :class:`OutputLockedError` at once,
    naming the holder's pid; this process may nest the lock. The lock file
    (``steerx.lock``) is removed on exit, and the system releases the lock of a killed
    process, so an interrupted run never blocks the next one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key not in _held:
        _held[key] = [_acquire(key / LOCK_FILE), 0]
    _held[key][1] += 1
    try:
        yield folder
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fd = _held.pop(key)[0]
            (key / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)
