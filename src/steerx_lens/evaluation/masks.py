"""Token masks over held-out responses: which tokens each NLL metric counts.

- ``nll``: every response token;
- ``nll_distinct``: tokens inside the words and bigrams distinctive of the user's *fit* history
  against the other users' fit histories (:mod:`steerx_lens.evaluation.distinct`, model-free,
  fixed before anything is fitted; SteerX's estimator has no part in it);
- ``nll_marker``: for users with planted ground truth (synthetic users: ``item.meta["spans"]``),
  the tokens of the planted markers;
- ``nll_pref`` (secondary, *estimator-defined*): tokens whose patch-CE under the user's history
  exceeds 1 nat (:func:`~steerx_lens.evaluation.metrics.preference_masks`): the same estimator
  that selects SteerX's swapped tokens, so it favours SteerX by construction.

A metric whose mask is empty for every held-out item of a user has no value for that user (the
paired statistics use the users that have one and report how many).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from steerx_lens.data import UserHistory
from steerx_lens.evaluation.distinct import heldout_distinct_spans, token_mask_from_spans
from steerx_lens.text import EncodedText, response_offsets

Spans = list[tuple[int, int]]


def planted_spans(user: UserHistory) -> list[Spans] | None:
    """Per held-out item, the planted markers' character spans; None unless every held-out
    item carries ground truth (``meta["spans"]``)."""
    if not user.heldout or any("spans" not in item.meta for item in user.heldout):
        return None
    return [[(int(s["start"]), int(s["end"])) for s in item.meta["spans"]] for item in user.heldout]


def span_masks(
    tokenizer: Any, texts: Sequence[EncodedText], user: UserHistory, spans: Sequence[Spans]
) -> list[Bool[Tensor, " n_response"]]:
    """Per held-out item, the response tokens overlapping its character spans (all False when
    the tokens cannot be aligned with the output's characters)."""
    masks = []
    for text, item, item_spans in zip(texts, user.heldout, spans, strict=True):
        offsets = response_offsets(tokenizer, text, item.output)
        n = len(text.response_ids)
        if offsets is None or not item_spans:
            masks.append(torch.zeros(n, dtype=torch.bool))
            continue
        masks.append(torch.from_numpy(token_mask_from_spans(offsets.numpy(), item_spans)))
    return masks


def distinct_spans(users: Sequence[UserHistory]) -> dict[str, list[Spans]]:
    """Per user, per held-out item, the spans of its distinctive terms (from fit histories
    only: ``users`` must carry their fit items as ``history``)."""
    return heldout_distinct_spans(users)
