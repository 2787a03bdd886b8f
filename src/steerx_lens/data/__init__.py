"""User histories: the data model, JSONL I/O and the sources users are loaded from.

A user is a :class:`UserHistory`: the items they wrote (``history``, used to build steering
vectors), items kept apart for evaluation (``heldout``) and free-form ``meta``. Each item is a
:class:`HistoryItem` ``(input, output)``: ``input`` is the question/context, ``output`` is the
user's own text. On disk the format is JSONL, one user per line::

    {"user_id": str, "history": [{"input": str, "output": str}, ...], "heldout": [...], "meta": {}}

Items may carry an optional ``"meta"`` object (written only when non-empty), e.g. the planted
marker spans of the synthetic data set.

Modules: :mod:`~steerx_lens.data.schema` (the data model), :mod:`~steerx_lens.data.io` (JSONL
read/save), :mod:`~steerx_lens.data.sources` (the source registry behind :func:`load_users`, one
module per source). Turning items into prompts and tokens is :mod:`steerx_lens.text`'s job.
"""

from steerx_lens.data.io import read_users, save_users
from steerx_lens.data.schema import HistoryItem, UserHistory
from steerx_lens.data.sources import (
    FILE_READERS,
    SOURCES,
    detect_format,
    load_users,
    register_source,
)
from steerx_lens.data.sources.health_tweets import HEALTH_ACCOUNTS, load_health_tweets
from steerx_lens.data.sources.lamp import read_lamp
from steerx_lens.data.sources.stackexchange import (
    read_stackexchange,
    shared_data_dir,
    stackexchange_item,
)
from steerx_lens.data.sources.synthetic import MAX_SYNTHETIC_USERS, make_synthetic_users
from steerx_lens.data.splits import DEFAULT_N_VALIDATION, fit_split, has_validation

__all__ = [
    "DEFAULT_N_VALIDATION",
    "fit_split",
    "has_validation",
    "FILE_READERS",
    "HEALTH_ACCOUNTS",
    "MAX_SYNTHETIC_USERS",
    "SOURCES",
    "HistoryItem",
    "UserHistory",
    "detect_format",
    "load_health_tweets",
    "load_users",
    "make_synthetic_users",
    "read_lamp",
    "read_stackexchange",
    "read_users",
    "register_source",
    "save_users",
    "shared_data_dir",
    "stackexchange_item",
]
