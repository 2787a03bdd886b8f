"""JSONL I/O of users in the steerx schema (one :class:`UserHistory` per line, UTF-8).

Reading errors are :class:`~steerx_lens.errors.DataError` s that name the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from steerx_lens.atomic import write_text
from steerx_lens.data.schema import UserHistory
from steerx_lens.errors import DataError


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark is dropped).

    Raises :class:`DataError` naming the file, line and column of the first byte that is not
    UTF-8.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at column "
            f"{err.start - line_start + 1}); save the file as UTF-8"
        ) from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads(text)``; :class:`DataError` prefixed with ``where`` if it is not JSON, or if
    it holds a lone surrogate (``"\\ud800"``: such a string cannot be written back as UTF-8)."""
    try:
        value = json.loads(text)
        if "\\u" in text:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{where}: a string holds a lone surrogate escape (\\ud800-\\udfff)"
        ) from None
    except (json.JSONDecodeError, RecursionError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise DataError(f"{where}: not valid JSON ({detail})") from None
    return value


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; errors name the file and line."""
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{path}:{lineno}")
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        yield lineno, obj


def write_jsonl(path: Path, objects: Iterable[Any]) -> Path:
    """Write one JSON object per line (UTF-8, not ASCII-escaped) atomically; returns the path."""
    lines = (json.dumps(obj, ensure_ascii=False) + "\n" for obj in objects)
    return write_text(path, "".join(lines))


def read_users(path: str | Path) -> list[UserHistory]:
    """Read users from a JSONL file in the steerx schema (one user per line).

    Raises :class:`DataError` (a ``ValueError``) naming the file and line for bytes that are
    not UTF-8, malformed lines, wrong fields and duplicate user ids.
    """
    path = Path(path)
    users: list[UserHistory] = []
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        try:
            user = UserHistory.from_dict(obj)
        except ValueError as err:
            raise DataError(f"{path}:{lineno}: {err}") from None
        if user.user_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate user_id {user.user_id!r}")
        seen.add(user.user_id)
        users.append(user)
    return users


def save_users(users: Iterable[UserHistory], path: str | Path) -> Path:
    """Write users as JSONL (one user per line, UTF-8), atomically; returns the path."""
    return write_jsonl(Path(path), (user.to_dict() for user in users))
