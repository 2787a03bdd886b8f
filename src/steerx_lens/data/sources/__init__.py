"""Where users come from: named sources (a registry) and files in three formats.

A *source* is a function ``loader(n_users=None, **options) -> list[UserHistory]`` registered
under a name with :func:`register_source`; :func:`load_users` looks names up in :data:`SOURCES`
before treating its argument as a path. Built in: ``"synthetic"``
(:func:`~steerx_lens.data.sources.synthetic.make_synthetic_users`), ``"health_tweets"``
(:func:`~steerx_lens.data.sources.health_tweets.load_health_tweets`), ``"news_outlets"``
(:func:`~steerx_lens.data.sources.news_outlets.load_news_outlets`) and
``"stackexchange_beer"`` (the project's shared file). Adding a source = one module with a loader
+ one :func:`register_source` call.

Files: steerx JSONL (:func:`~steerx_lens.data.io.read_users`), Stack Exchange JSONL
(:func:`~steerx_lens.data.sources.stackexchange.read_stackexchange`) or LaMP JSON
(:func:`~steerx_lens.data.sources.lamp.read_lamp`), see :data:`FILE_READERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerx_lens.data.io import iter_jsonl, read_users
from steerx_lens.data.schema import UserHistory
from steerx_lens.data.sources.health_tweets import load_health_tweets
from steerx_lens.data.sources.lamp import read_lamp
from steerx_lens.data.sources.news_outlets import load_news_outlets
from steerx_lens.data.sources.stackexchange import load_stackexchange_beer, read_stackexchange
from steerx_lens.data.sources.synthetic import load_synthetic

Loader = Callable[..., list[UserHistory]]
"""``loader(n_users: int | None = None, **options) -> list[UserHistory]``."""

SOURCES: dict[str, Loader] = {
    "synthetic": load_synthetic,
    "health_tweets": load_health_tweets,
    "news_outlets": load_news_outlets,
    "stackexchange_beer": load_stackexchange_beer,
}
"""Named sources that :func:`load_users` accepts (extend with :func:`register_source`)."""
FILE_READERS: dict[str, Callable[..., list[UserHistory]]] = {
    "steerx": read_users,
    "stackexchange": read_stackexchange,
    "lamp": read_lamp,
}
"""File formats that :func:`load_users` reads: ``reader(path, **options)``."""


def register_source(name: str, loader: Loader) -> None:
    """Make ``load_users(name, n_users, **options)`` call ``loader(n_users=..., **options)``.

    The name also works in the CLI's ``--data``. Registering a name again replaces its loader.
    """
    SOURCES[name] = loader


def detect_format(path: Path) -> str:
    """Guess a file's format: ``.json`` is LaMP; JSONL whose items have ``answer`` or
    ``question_title`` is Stack Exchange; any other JSONL is the steerx schema."""
    if path.suffix.lower() == ".json":
        return "lamp"
    for _, obj in iter_jsonl(path):
        items = obj.get("history") or obj.get("heldout") or [{}]
        first = items[0] if isinstance(items, list) and isinstance(items[0], dict) else {}
        return "stackexchange" if {"answer", "question_title"} & first.keys() else "steerx"
    return "steerx"


def load_users(
    source: str | Path,
    n_users: int | None = None,
    *,
    file_format: str | None = None,
    **options: Any,
) -> list[UserHistory]:
    """Load users from a registered source name (:data:`SOURCES`) or a file.

    Files are read by :data:`FILE_READERS`, the format chosen by ``file_format`` or
    :func:`detect_format`. ``options`` go to the loader or reader (e.g. ``seed`` for
    ``"synthetic"``, ``body_chars`` for Stack Exchange, ``gold_path`` for LaMP). ``n_users`` keeps
    the first users (for ``"synthetic"`` it is the number generated, default 6).
    """
    if n_users is not None and n_users < 1:
        raise ValueError(f"n_users must be at least 1, got {n_users}")
    if isinstance(source, str) and source in SOURCES:
        return SOURCES[source](n_users=n_users, **options)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no file {path} and not a built-in source {tuple(SOURCES)}")
    fmt = file_format or detect_format(path)
    if fmt not in FILE_READERS:
        raise ValueError(f"unknown file_format {fmt!r}; choose one of {tuple(FILE_READERS)}")
    return FILE_READERS[fmt](path, **options)[:n_users]
