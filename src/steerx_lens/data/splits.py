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
"""

from __future__ import annotations

from dataclasses import replace

from steerx_lens.data.schema import HistoryItem, UserHistory

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
