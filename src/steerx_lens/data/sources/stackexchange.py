"""Stack Exchange answers: one user per answerer, from a JSONL file or the shared beer file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from steerx_lens.data.io import iter_jsonl
from steerx_lens.data.schema import HistoryItem, UserHistory
from steerx_lens.errors import DataError

SE_BODY_CHARS = 600
"""Question bodies are cut to this many characters (at a word boundary, then "…")."""
SE_TEXT_FIELDS = ("question_title", "question_body", "answer")
STACKEXCHANGE_BEER_FILE = "stackexchange_beer/users.jsonl"


def _truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters at a word boundary and append "…"."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "…"


def stackexchange_item(raw: dict[str, Any], body_chars: int = SE_BODY_CHARS) -> HistoryItem:
    """One Stack Exchange answer as an item.

    ``input`` = question title, a blank line, and the question body cut to ``body_chars``
    characters (long bodies would dominate the prompt; the title carries the topic);
    ``output`` = the user's answer, unchanged. Every other field (``id``, ``question_id``,
    ``date``, ``score``, ``question_tags``...) goes to ``meta`` (the ids give attribution URLs).
    """
    missing = [k for k in ("question_title", "answer") if not isinstance(raw.get(k), str)]
    if missing:
        raise ValueError(f"item without string field(s) {missing}")
    body = _truncate(str(raw.get("question_body") or "").strip(), body_chars)
    title = raw["question_title"].strip()
    meta = {k: v for k, v in raw.items() if k not in SE_TEXT_FIELDS}
    return HistoryItem(
        input=f"{title}\n\n{body}" if body else title, output=raw["answer"], meta=meta
    )


def read_stackexchange(path: str | Path, body_chars: int = SE_BODY_CHARS) -> list[UserHistory]:
    """Read a Stack Exchange users file (``user_id``, ``history``, ``heldout`` per line).

    Items are converted by :func:`stackexchange_item`; the file's own history/heldout split is
    kept (its items are oldest first). Errors name the file and line.
    """
    path = Path(path)
    users = []
    for lineno, obj in iter_jsonl(path):
        try:
            users.append(
                UserHistory(
                    user_id=str(obj["user_id"]),
                    history=[stackexchange_item(r, body_chars) for r in obj["history"]],
                    heldout=[stackexchange_item(r, body_chars) for r in obj.get("heldout", [])],
                    meta={"source": "stackexchange", **obj.get("meta", {})},
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}:{lineno}: not a Stack Exchange user record ({err})") from None
    return users


def shared_data_dir() -> Path:
    """The project's shared data folder: ``$STEERX_SHARED_DATA``, else ``<repo>/../shared/data``.

    The shared data is read in place and never copied into the repository.
    """
    env = os.environ.get("STEERX_SHARED_DATA")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[4]  # src/steerx_lens/data/sources/ -> repo root
    return repo_root.parent / "shared" / "data"


def stackexchange_beer_path() -> Path:
    """Path of the shared Stack Exchange beer file; ``FileNotFoundError`` says how to fix it."""
    path = shared_data_dir() / STACKEXCHANGE_BEER_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"Stack Exchange beer data not found at {path}. It lives in the project's "
            f"../shared/data folder; set STEERX_SHARED_DATA to the folder that holds "
            f"{STACKEXCHANGE_BEER_FILE}."
        )
    return path


def load_stackexchange_beer(n_users: int | None = None, **options: Any) -> list[UserHistory]:
    """The shared beer.stackexchange.com file (:func:`read_stackexchange`), licence in ``meta``."""
    users = read_stackexchange(stackexchange_beer_path(), **options)
    for user in users:
        user.meta.update(
            license="CC BY-SA 3.0",
            attribution="see ../shared/data/stackexchange_beer/README.md (one URL per answer id)",
        )
    return users[:n_users]
