"""The fixed role of every item: fit, validation or held-out, the same in every command.

A user's items are in time order (oldest first) and their roles never change between the
sweep, the evaluation and the tutorials:

- **held-out** = ``user.heldout`` (the newest items): scored once, by the evaluation only;
- **validation** = the last ``n_validation`` items of ``user.history``: where the sweep chooses
  layers and strengths;
- **fit** = the rest of ``user.history``: the only items vectors, attribution, descriptions,
  distinctive-term masks and history prompts are built from.

A user with fewer than ``n_validation + 2`` history items has no validation items (at least two
fit items must remain); every history item is then a fit item.

Time-ordered sources (health tweets, news outlets) take their users' items from one contiguous
window of time; :func:`time_window` picks older, disjoint windows for replicate evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from steerx_lens.data.schema import HistoryItem, UserHistory

T = TypeVar("T")

DEFAULT_N_VALIDATION = 2
"""Validation items per user (the sweep's and the evaluation's default)."""


def has_validation(user: UserHistory, n_validation: int = DEFAULT_N_VALIDATION) -> bool:
    """Whether the user keeps ``n_validation`` validation items and still has 2 fit items."""
    return n_validation > 0 and len(user.history) >= n_validation + 2


def fit_split(
    user: UserHistory, n_validation: int = DEFAULT_N_VALIDATION
) -> tuple[UserHistory, list[HistoryItem]]:
    """(the user with ``history`` = its fit items and ``heldout`` unchanged, its validation
    items). See the module docstring for the roles."""
    if n_validation < 0:
        raise ValueError(f"n_validation must be >= 0, got {n_validation}")
    if not has_validation(user, n_validation):
        return user, []
    return (
        replace(user, history=list(user.history[:-n_validation])),
        list(user.history[-n_validation:]),
    )


def time_window(items: Sequence[T], size: int, window: int = 0) -> list[T]:
    """The ``window``-th block of ``size`` consecutive items counting back from the newest
    (``items`` oldest first): 0 = the newest ``size``, 1 = the ``size`` before them, ...

    Disjoint windows are independent replicates of a time-ordered source's protocol: a run on
    window 1 fits, validates and scores only items that are older than everything window 0
    used, so it can repeat a held-out evaluation on items no choice ever saw. Raises
    ``ValueError`` when fewer than ``(window + 1) * size`` items exist.
    """
    if size < 1 or window < 0:
        raise ValueError(f"need size >= 1 and window >= 0, got {size}, {window}")
    end = len(items) - window * size
    if end - size < 0:
        raise ValueError(f"window {window} needs {(window + 1) * size} items, only {len(items)}")
    return list(items[end - size : end])
