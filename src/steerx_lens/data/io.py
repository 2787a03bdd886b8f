"""JSONL I/O of users in the steerx schema (one :class:`UserHistory` per line, UTF-8)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from steerx_lens.atomic import write_text
from steerx_lens.data.schema import UserHistory


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, obj


def write_jsonl(path: Path, objects: Iterable[Any]) -> Path:
    """Write one JSON object per line (UTF-8, not ASCII-escaped) atomically; returns the path."""
    lines = (json.dumps(obj, ensure_ascii=False) + "\n" for obj in objects)
    return write_text(path, "".join(lines))


def read_users(path: str | Path) -> list[UserHistory]:
    """Read users from a JSONL file in the steerx schema (one user per line).

    Raises ``ValueError`` naming the file and line for malformed lines and duplicate user ids.
    """
    path = Path(path)
    users: list[UserHistory] = []
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        try:
            user = UserHistory.from_dict(obj)
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        if user.user_id in seen:
            raise ValueError(f"{path}:{lineno}: duplicate user_id {user.user_id!r}")
        seen.add(user.user_id)
        users.append(user)
    return users


def save_users(users: Iterable[UserHistory], path: str | Path) -> Path:
    """Write users as JSONL (one user per line, UTF-8), atomically; returns the path."""
    return write_jsonl(Path(path), (user.to_dict() for user in users))
